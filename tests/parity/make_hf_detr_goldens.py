"""Writes the Hugging Face DETR golden files that tests/parity/test_hf_detr_parity.py checks
(goldens/hf_detr_*.npz).

Run it where transformers and torch import (no GPU needed; here they live in a side folder):

    PYTHONPATH=/work/sidepkgs python tests/parity/make_hf_detr_goldens.py            # all
    PYTHONPATH=/work/sidepkgs python tests/parity/make_hf_detr_goldens.py tiny loss  # some

Model cases: deterministic weights made with OUR code from a seed (`deterministic_variables`,
numpy only, so every machine makes the same bits) are converted with `to_hf` and loaded into
transformers' `DetrForObjectDetection` (ResNet backbone from transformers, not timm) built from
the equivalent DetrConfig twice: strictly into the module (the 'transformers5' layout) and
through `from_pretrained` of a saved checkpoint-layout folder (the Hub's files), which must
report no missing or unexpected keys and give the same outputs. Eval-mode outputs on a fixed
batch, with and without a pixel mask that pads part of one image, are saved: `logits`,
`pred_boxes` and the auxiliary outputs (the heads on the decoder norm of every decoder layer
but the last, captured with forward hooks; for 'tiny_hf_aux', transformers' own
`intermediate_hidden_states` of `auxiliary_loss=True`). Small cases keep the arrays, the
ResNet-50 case sums and sampled entries (the file stays small). Each file also keeps the
parameter count and both state-dict layouts.

'loss': transformers' DETR loss (`ForObjectDetectionLoss`: its scipy Hungarian matcher and
`ImageLoss`, auxiliary losses on) on random outputs and padded targets, and
`post_process_object_detection` on the same outputs.

transformers imports torchvision, whose C operators do not load beside a CPU-only torch; their
schemas are declared first (`make_torchvision_goldens.import_torchvision`).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys
import tempfile
import zlib

import numpy as np

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"
PREFIX = "hf_detr_"
SEED = 0
IMAGE_SHAPE = (2, 128, 160, 3)
# The second image's real pixels (rows, columns); the rest of it is padding.
REAL_HW = (96, 128)
SAMPLES = 256  # sampled entries per output of the cases that keep no full arrays

_TINY = dict(layers=(1, 1, 1, 1), block="bottleneck", widths=(8, 16, 32, 64), d_model=32,
             num_heads=4, encoder_layers=2, decoder_layers=2, ffn_dim=64, num_queries=10,
             num_classes=7)
# case -> (jaxvision variant, its kwargs, whether the file keeps full arrays).
CASES = {
    "tiny": ("detr_resnet50", _TINY, True),
    "tiny_hf_aux": ("detr_resnet50", {**_TINY, "hf_auxiliary_norm": True}, True),
    "detr_tiny": ("detr_tiny", {}, True),
    "resnet50": ("detr_resnet50", {}, False),
}
OUTPUTS = ("logits", "pred_boxes", "aux_logits", "aux_pred_boxes")
LOSS_FILE = PREFIX + "loss.npz"
# The loss case: batch, queries, classes, decoder layers, padded boxes, boxes per image.
LOSS_SHAPE = dict(batch=4, queries=12, classes=5, layers=3, max_boxes=5, counts=(2, 0, 5, 3),
                  image_hw=(96, 128))
POSTPROCESS_THRESHOLD = 0.3


def _uniform(path: str, shape: tuple, seed: int) -> np.ndarray:
  """U(-1, 1) values of one leaf, from its own stream: independent of traversal order."""
  rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
  return (rng.random(shape) * 2.0 - 1.0).astype(np.float32)


def _leaf(path: str, shape: tuple, seed: int, bottleneck: bool) -> np.ndarray:
  u = _uniform(path, shape, seed)
  leaf = path.rsplit("/", 1)[-1]
  if path.startswith("batch_stats/"):
    last = re.search(r"layer\d_\d+/bn3/" if bottleneck else r"layer\d_\d+/bn2/", path)
    if leaf == "scale":  # small residual branches keep a deep random ResNet's scale O(1)
      return (0.3 + 0.1 * u) if last else (1.0 + 0.2 * u)
    if leaf == "var":
      return 1.0 + 0.5 * u
    return 0.1 * u  # bias, mean
  if leaf == "kernel":  # Var = 1 / fan_in
    return u * np.float32(math.sqrt(3.0 / math.prod(shape[:-1])))
  if leaf == "scale":  # LayerNorms around 1
    return 1.0 + 0.2 * u
  if leaf == "query_embed":
    return u
  return 0.1 * u  # biases


def deterministic_variables(name: str, kwargs: dict, seed: int = SEED) -> dict:
  """jaxvision {'params', 'batch_stats'} of variant `name` made from `seed` by numpy alone."""
  from jaxvision.convert.hf_detr import expected_variables
  from jaxvision.convert.timm_vit import unflatten
  from jaxvision.models import create_model

  model = create_model(name, **kwargs)
  bottleneck = model.block == "bottleneck"
  return {c: unflatten({p: _leaf(f"{c}/{'/'.join(p)}", s, seed, bottleneck)
                        for p, s in shapes.items()})
          for c, shapes in expected_variables(model).items()}


def deterministic_inputs(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
  """A fixed NHWC image batch in [-1, 1] and a pixel mask padding part of the second image."""
  images = _uniform("images", IMAGE_SHAPE, seed + 1)
  mask = np.ones(IMAGE_SHAPE[:3], np.int32)
  mask[1, REAL_HW[0]:, :] = 0
  mask[1, :, REAL_HW[1]:] = 0
  return images, mask


def sample_indices(shape: tuple, seed: int = SEED) -> np.ndarray:
  """Fixed flat indices of the entries kept for an output of `shape`."""
  size = math.prod(shape)
  rng = np.random.default_rng([seed, 7, size])
  return np.sort(rng.choice(size, min(SAMPLES, size), replace=False))


def summaries(prefix: str, arrays: dict[str, np.ndarray], full: bool) -> dict[str, np.ndarray]:
  """What a golden keeps of each output: the array, or its sum over the last axis (per query)
  and sampled entries."""
  out = {}
  for name, value in arrays.items():
    key = f"{prefix}{name}"
    if full:
      out[key] = value
    else:
      out[f"{key}__sum"] = value.sum(-1)
      out[f"{key}__sample"] = value.reshape(-1)[sample_indices(value.shape)]
  return out


def hf_config(model, transformers):
  """The transformers DetrConfig equivalent to jaxvision DETR `model`."""
  widths = list(model.widths)
  bottleneck = model.block == "bottleneck"
  backbone = transformers.ResNetConfig(
      embedding_size=widths[0], hidden_sizes=[w * (4 if bottleneck else 1) for w in widths],
      depths=list(model.layers), layer_type=model.block, out_features=["stage4"])
  return transformers.DetrConfig(
      use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
      num_labels=model.num_classes, num_queries=model.num_queries, d_model=model.d_model,
      encoder_layers=model.encoder_layers, decoder_layers=model.decoder_layers,
      encoder_attention_heads=model.num_heads, decoder_attention_heads=model.num_heads,
      encoder_ffn_dim=model.ffn_dim, decoder_ffn_dim=model.ffn_dim,
      auxiliary_loss=model.hf_auxiliary_norm, attn_implementation="eager")


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


def _hf_outputs(hf_model, images, mask, hf_aux: bool) -> dict[str, np.ndarray]:
  """Eval-mode logits, boxes and auxiliary outputs of a transformers DETR."""
  import torch

  decoder = hf_model.model.decoder
  captured = []
  hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
           for layer in decoder.layers]
  try:
    with torch.no_grad():
      out = hf_model.eval()(pixel_values=images, pixel_mask=mask)
      states = torch.stack([decoder.layernorm(h) for h in captured[:-1]])
      if hf_aux:  # transformers' own intermediate states must be what the hooks saw
        inner = hf_model.model(pixel_values=images, pixel_mask=mask).intermediate_hidden_states
        if not torch.allclose(inner[:-1], states, atol=1e-6):
          raise RuntimeError("hooked decoder states differ from intermediate_hidden_states")
      aux_logits = hf_model.class_labels_classifier(states)
      aux_boxes = hf_model.bbox_predictor(states).sigmoid()
  finally:
    for hook in hooks:
      hook.remove()
  return {"logits": out.logits.numpy(), "pred_boxes": out.pred_boxes.numpy(),
          "aux_logits": aux_logits.numpy(), "aux_pred_boxes": aux_boxes.numpy()}


def make_case(case: str, transformers) -> pathlib.Path:
  """Runs one model case through transformers and writes goldens/hf_detr_CASE.npz."""
  import safetensors.torch
  import torch

  from jaxvision.convert import to_hf
  from jaxvision.models import create_model

  name, kwargs, full = CASES[case]
  model = create_model(name, **kwargs)
  variables = deterministic_variables(name, kwargs)
  images, mask = deterministic_inputs()
  config = hf_config(model, transformers)
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NCHW for torch
  masks = {"nomask": None, "mask": torch.from_numpy(mask.astype(np.int64))}

  # (a) the module's own names, loaded strictly.
  modules = {k: torch.from_numpy(v.copy()) for k, v in
             to_hf(name, variables, layout="transformers5").items()}
  hf_model = transformers.DetrForObjectDetection(config)
  hf_model.load_state_dict(modules, strict=True)
  results = {m: _hf_outputs(hf_model, pixels, pm, model.hf_auxiliary_norm)
             for m, pm in masks.items()}
  count = sum(p.numel() for p in hf_model.parameters())
  trainable = sum(p.numel() for p in hf_model.parameters() if p.requires_grad)
  module_layout = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}

  # (b) the Hub's file layout, through from_pretrained (which renames the keys).
  checkpoint = to_hf(name, variables, layout="checkpoint")
  with tempfile.TemporaryDirectory() as folder:
    config.save_pretrained(folder)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in checkpoint.items()}
    safetensors.torch.save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    loaded, info = transformers.DetrForObjectDetection.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager")
  problems = {k: sorted(v) for k, v in info.items() if v}
  if problems:
    raise RuntimeError(f"from_pretrained of the checkpoint layout reported {problems}")
  again = _hf_outputs(loaded, pixels, masks["mask"], model.hf_auxiliary_norm)
  differences = {k: float(np.abs(again[k] - results["mask"][k]).max()) for k in OUTPUTS}
  if max(differences.values()) > 1e-5:
    raise RuntimeError(f"checkpoint layout and module layout give different outputs: "
                       f"{differences}")

  arrays = {}
  for m, outputs in results.items():
    arrays.update(summaries(f"{m}__", outputs, full))
  meta = dict(case=case, model=name, kwargs=kwargs, seed=SEED, parameters=count,
              trainable=trainable, full=full, transformers=transformers.__version__,
              torch=torch.__version__)
  GOLDENS.mkdir(exist_ok=True)
  path = GOLDENS / f"{PREFIX}{case}.npz"
  np.savez_compressed(path, module_layout=_layout_lines(module_layout),
                      checkpoint_layout=_layout_lines({k: v.shape for k, v in checkpoint.items()}),
                      meta=np.array(json.dumps(meta)), **arrays)
  return path


def loss_inputs(seed: int = SEED) -> dict[str, np.ndarray]:
  """Random outputs (all decoder layers) and padded xyxy pixel targets of the loss case."""
  s = LOSS_SHAPE
  b, q, k, lay, m = s["batch"], s["queries"], s["classes"], s["layers"], s["max_boxes"]
  h, w = s["image_hw"]
  rng = np.random.default_rng([seed, 11])
  logits = (2.0 * rng.standard_normal((lay, b, q, k + 1))).astype(np.float32)
  boxes = (1.0 / (1.0 + np.exp(-rng.standard_normal((lay, b, q, 4))))).astype(np.float32)
  boxes[..., 2:] *= 0.6  # widths and heights below 0.6 of the image, like real objects
  valid = np.arange(m)[None, :] < np.array(s["counts"])[:, None]
  x1 = rng.uniform(0, 0.7 * w, (b, m))
  y1 = rng.uniform(0, 0.7 * h, (b, m))
  gt_boxes = np.stack([x1, y1, x1 + rng.uniform(4, 0.3 * w, (b, m)),
                       y1 + rng.uniform(4, 0.3 * h, (b, m))], -1).astype(np.float32)
  gt_boxes = np.where(valid[..., None], gt_boxes, 0.0).astype(np.float32)
  gt_classes = np.where(valid, rng.integers(0, k, (b, m)), 0).astype(np.int32)
  return dict(logits=logits, pred_boxes=boxes, gt_boxes=gt_boxes, gt_classes=gt_classes,
              gt_valid=valid, image_hw=np.array(s["image_hw"], np.int32))


def make_loss(transformers) -> pathlib.Path:
  """transformers' DETR loss and post-processing on `loss_inputs`."""
  import torch
  from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

  inputs = loss_inputs()
  s = LOSS_SHAPE
  h, w = s["image_hw"]
  config = transformers.DetrConfig(
      use_timm_backbone=False, backbone_config=transformers.ResNetConfig(),
      use_pretrained_backbone=False, num_labels=s["classes"], decoder_layers=s["layers"],
      auxiliary_loss=True)
  scale = np.array([w, h, w, h], np.float32)
  labels = []
  for boxes, classes, valid in zip(inputs["gt_boxes"], inputs["gt_classes"], inputs["gt_valid"],
                                   strict=True):
    xyxy = boxes[valid] / scale
    cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
    labels.append({"class_labels": torch.from_numpy(classes[valid].astype(np.int64)),
                   "boxes": torch.from_numpy(cxcywh.astype(np.float32))})
  logits, boxes = torch.from_numpy(inputs["logits"]), torch.from_numpy(inputs["pred_boxes"])
  total, parts, _ = ForObjectDetectionLoss(logits[-1], labels, "cpu", boxes[-1], config, logits,
                                           boxes)
  part_names = sorted(parts)
  processor = transformers.DetrImageProcessor()
  outputs = transformers.models.detr.modeling_detr.DetrObjectDetectionOutput(
      logits=logits[-1], pred_boxes=boxes[-1])
  detections = processor.post_process_object_detection(
      outputs, threshold=POSTPROCESS_THRESHOLD, target_sizes=[(h, w)] * s["batch"])
  post = {}
  for i, det in enumerate(detections):
    post[f"post_{i}_scores"] = det["scores"].numpy()
    post[f"post_{i}_labels"] = det["labels"].numpy().astype(np.int32)
    post[f"post_{i}_boxes"] = det["boxes"].numpy()
  meta = dict(shape=s, parts=part_names, threshold=POSTPROCESS_THRESHOLD,
              transformers=transformers.__version__, torch=torch.__version__)
  path = GOLDENS / LOSS_FILE
  np.savez_compressed(path, total=np.float32(total.item()),
                      parts=np.array([float(parts[k]) for k in part_names], np.float64),
                      meta=np.array(json.dumps(meta)), **post)
  return path


def main(argv: list[str]) -> int:
  """Writes the goldens named in `argv` ('loss' and the CASES; all when none)."""
  known = [*CASES, "loss"]
  cases = argv or known
  unknown = sorted(set(cases) - set(known))
  if unknown:
    print(f"unknown cases {unknown}; known: {', '.join(known)}", file=sys.stderr)
    return 2
  try:
    transformers = import_transformers()
  except ImportError as e:
    print(f"transformers does not import here ({e}); run this where it does", file=sys.stderr)
    return 1
  for case in cases:
    print(make_loss(transformers) if case == "loss" else make_case(case, transformers))
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo, for jaxvision
  sys.exit(main(sys.argv[1:]))
