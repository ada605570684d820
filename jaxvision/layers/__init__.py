"""Shared building blocks, one kind per file: `conv` (conv-norm-act, pooling helpers),
`attention`, `transformer` (MLP, encoder block, drop-path), `embed` (patch and position embeddings).

Every layer takes `dtype` (computation) and `param_dtype` (parameters) and passes both down.
"""
