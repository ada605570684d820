"""Writes the Hugging Face golden files that tests/parity/test_hf_caption_parity.py checks
(goldens/hf_vit_gpt2_*.npz).

Run it where transformers and torch import (no GPU needed; here they live in a side folder):

    PYTHONPATH=/work/sidepkgs python tests/parity/make_hf_caption_goldens.py          # all
    PYTHONPATH=/work/sidepkgs python tests/parity/make_hf_caption_goldens.py tiny     # some

For each reduced-size case it makes deterministic weights with OUR code from a seed
(`deterministic_params`, numpy only, so every machine makes the same bits), converts them with
`to_hf`, loads them into transformers' `VisionEncoderDecoderModel` built from the equivalent
ViTConfig + GPT2Config twice: strictly into the module (`load_state_dict(strict=True)`, the
'transformers5' layout) and through `from_pretrained` of a saved checkpoint-layout folder (the
files on the Hub), which must report no missing or unexpected keys and give the same logits. It
saves the eval-mode logits on a fixed image batch and token sequence, the state-dict layouts
and the versions. The 'full' file pins what full-size weights cannot be stored for: the
parameter counts of the full-size variants (models built on the meta device) and the full
vit_gpt2's state-dict layout.

transformers imports torchvision, whose C operators do not load beside a CPU-only torch; their
schemas are declared first (`make_torchvision_goldens.import_torchvision`).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import tempfile
import zlib

import numpy as np

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"
PREFIX = "hf_vit_gpt2_"
SEED = 0
BATCH = 2
TOKENS = 7

# case -> (jaxvision variant, its kwargs). 'tiny' has different encoder and decoder widths
# (enc_to_dec_proj); 'reduced' is vit_gpt2 itself with equal widths, 2 + 2 layers, small vocab.
CASES = {
    "tiny": ("vit_gpt2_tiny", {}),
    "reduced": ("vit_gpt2", dict(image_size=48, encoder_size=(64, 2, 4, 128),
                                 decoder_size=(64, 2, 4, 256), vocab_size=97, max_positions=24)),
}
FULL_VARIANTS = ("vit_gpt2", "vit_gpt2_small")
FULL_FILE = PREFIX + "full.npz"


def _uniform(path: str, shape: tuple, seed: int) -> np.ndarray:
  """U(-1, 1) values of one leaf, from its own stream: independent of traversal order."""
  rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
  return (rng.random(shape) * 2.0 - 1.0).astype(np.float32)


def _leaf(path: str, shape: tuple, seed: int) -> np.ndarray:
  u = _uniform(path, shape, seed)
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "kernel":  # unit-variance preserving: Var = 1 / fan_in
    return u * np.float32(math.sqrt(3.0 / math.prod(shape[:-1])))
  if leaf == "scale":  # LayerNorm around 1, so every channel still matters
    return 1.0 + 0.2 * u
  if leaf == "embedding":  # token and position embeddings: the tied logits stay O(1)
    return 0.5 * u
  return 0.1 * u  # biases, cls_token, pos_embed


def deterministic_params(name: str, kwargs: dict, seed: int = SEED) -> dict:
  """jaxvision params of variant `name` made from `seed` by numpy alone (same bits everywhere)."""
  from jaxvision.convert.hf_vit_gpt2 import expected_params
  from jaxvision.convert.timm_vit import unflatten
  from jaxvision.models import create_model

  shapes = expected_params(create_model(name, **kwargs))
  return unflatten({p: _leaf("/".join(p), s, seed) for p, s in shapes.items()})


def deterministic_inputs(model, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
  """A fixed NHWC image batch in [-1, 1] and fixed token ids for `model`."""
  size = model.image_size
  images = _uniform("images", (BATCH, size, size, 3), seed + 1)
  rng = np.random.default_rng([seed, 2])
  tokens = rng.integers(0, model.vocab_size, (BATCH, TOKENS)).astype(np.int32)
  return images, tokens


def hf_config(model):
  """The transformers VisionEncoderDecoderConfig equivalent to jaxvision VitGpt2 `model`."""
  from transformers import GPT2Config, VisionEncoderDecoderConfig, ViTConfig

  ew, ed, eh, em = model.encoder_dims
  dw, dd, dh, dm = model.decoder_dims
  encoder = ViTConfig(hidden_size=ew, num_hidden_layers=ed, num_attention_heads=eh,
                      intermediate_size=em, image_size=model.image_size,
                      patch_size=model.patch_size, layer_norm_eps=model.encoder_ln_epsilon,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  special = model.vocab_size - 1  # any id inside the vocabulary (GPT-2's 50256 for full size)
  decoder = GPT2Config(vocab_size=model.vocab_size, n_positions=model.max_positions, n_embd=dw,
                       n_layer=dd, n_head=dh, n_inner=dm, add_cross_attention=True,
                       is_decoder=True, bos_token_id=special, eos_token_id=special)
  return VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)


def _layout_lines(shapes: dict) -> np.ndarray:
  return np.array([f"{k}:{'x'.join(map(str, s))}" for k, s in shapes.items()])


def import_transformers():
  """transformers (and torch), with torchvision's operator schemas declared when needed."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  from make_torchvision_goldens import import_torchvision

  import_torchvision()
  import transformers

  transformers.logging.set_verbosity_error()
  return transformers


def make_case(case: str, transformers) -> pathlib.Path:
  """Runs one case through transformers and writes goldens/hf_vit_gpt2_CASE.npz."""
  import safetensors.torch
  import torch

  from jaxvision.convert import to_hf
  from jaxvision.models import create_model

  name, kwargs = CASES[case]
  model = create_model(name, **kwargs)
  params = deterministic_params(name, kwargs)
  images, tokens = deterministic_inputs(model)
  config = hf_config(model)
  pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2)  # NCHW for torch
  ids = torch.from_numpy(tokens.astype(np.int64))

  def logits_of(hf_model) -> np.ndarray:
    with torch.no_grad():
      out = hf_model.eval()(pixel_values=pixel_values, decoder_input_ids=ids)
    return out.logits.numpy().astype(np.float32)

  # (a) the module's own names, loaded strictly.
  modules = {k: torch.from_numpy(v.copy()) for k, v in
             to_hf(name, {"params": params}, layout="transformers5").items()}
  hf_model = transformers.VisionEncoderDecoderModel(config)
  hf_model.load_state_dict(modules, strict=True)
  logits = logits_of(hf_model)
  count = sum(p.numel() for p in hf_model.parameters())
  module_layout = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}

  # (b) the Hub's file layout, through from_pretrained (which renames the ViT keys).
  checkpoint = to_hf(name, {"params": params}, layout="checkpoint")
  with tempfile.TemporaryDirectory() as folder:
    config.save_pretrained(folder)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in checkpoint.items()
               if k != "decoder.lm_head.weight"}  # tied: save_pretrained leaves it out too
    safetensors.torch.save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    loaded, info = transformers.VisionEncoderDecoderModel.from_pretrained(
        folder, output_loading_info=True)
  problems = {k: sorted(v) for k, v in info.items() if v}
  if problems:
    raise RuntimeError(f"from_pretrained of the checkpoint layout reported {problems}")
  if not np.array_equal(logits_of(loaded), logits):
    raise RuntimeError("checkpoint layout and module layout give different logits")

  meta = dict(case=case, model=name, kwargs=kwargs, seed=SEED, parameters=count,
              transformers=transformers.__version__, torch=torch.__version__)
  GOLDENS.mkdir(exist_ok=True)
  path = GOLDENS / f"{PREFIX}{case}.npz"
  np.savez_compressed(
      path, logits=logits, module_layout=_layout_lines(module_layout),
      checkpoint_layout=_layout_lines({k: v.shape for k, v in checkpoint.items()}),
      meta=np.array(json.dumps(meta)))
  return path


def make_full(transformers) -> pathlib.Path:
  """Parameter counts of the full-size variants and vit_gpt2's module layout (meta tensors)."""
  import torch

  from jaxvision.models import create_model

  counts, layout = {}, {}
  for name in FULL_VARIANTS:
    with torch.device("meta"):
      hf_model = transformers.VisionEncoderDecoderModel(hf_config(create_model(name)))
    counts[name] = sum(p.numel() for p in hf_model.parameters())
    if name == "vit_gpt2":
      layout = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
  meta = dict(counts=counts, transformers=transformers.__version__, torch=torch.__version__)
  path = GOLDENS / FULL_FILE
  np.savez_compressed(path, module_layout=_layout_lines(layout), meta=np.array(json.dumps(meta)))
  return path


def main(argv: list[str]) -> int:
  """Writes the goldens named in `argv` ('full' and the CASES; all when none)."""
  cases = argv or [*CASES, "full"]
  unknown = sorted(set(cases) - {*CASES, "full"})
  if unknown:
    print(f"unknown cases {unknown}; known: {', '.join([*CASES, 'full'])}", file=sys.stderr)
    return 2
  try:
    transformers = import_transformers()
  except ImportError as e:
    print(f"transformers does not import here ({e}); run this where it does", file=sys.stderr)
    return 1
  for case in cases:
    print(make_full(transformers) if case == "full" else make_case(case, transformers))
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo, for jaxvision
  sys.exit(main(sys.argv[1:]))
