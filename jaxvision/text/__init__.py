"""Text for captioning: tokenizers (word-level or Hugging Face `tokenizers` files) and decoding
(greedy, beam search, top-k / top-p sampling) with a key/value cache.

    tokenizer = build_word_tokenizer(train_captions, min_count=5)
    batch = pad_captions(tokenizer, captions, max_len=20)           # tokens, mask, truncated
    captions = jit_generate(model, DecodeOptions(20, tokenizer.bos_id, tokenizer.eos_id))(
        variables, images)
"""

from jaxvision.text.generate import (
    DecodeOptions,
    beam_search,
    generate,
    greedy,
    greedy_uncached,
    jit_generate,
    sample,
)
from jaxvision.text.tokenizer import (
    SPECIALS,
    HFTokenizer,
    PaddedCaptions,
    WordTokenizer,
    build_word_tokenizer,
    load_tokenizer,
    pad_captions,
    words,
)

__all__ = [
    "SPECIALS", "DecodeOptions", "HFTokenizer", "PaddedCaptions", "WordTokenizer",
    "beam_search", "build_word_tokenizer", "generate", "greedy", "greedy_uncached",
    "jit_generate", "load_tokenizer", "pad_captions", "sample", "words",
]
