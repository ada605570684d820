"""Transfer learning: start a run from the weights of another run or of converted weights.

`config.init_from` names the source; `initialize_from` (called by train.loop on a fresh run, not
on a resumed one) loads every parameter whose path and shape fit this run's model:

  * a trainer workdir, or its checkpoints/ directory: the latest checkpoint's params and
    batch_stats (train.checkpoint.restore_params);
  * an `.npz` of '/'-joined parameter paths ('conv1/kernel', or 'params/conv1/kernel' and
    'batch_stats/bn1/mean'), as `export_npz` or the converters in jaxvision.convert write;
  * a `.msgpack` of flax.serialization (a params dict, or {'params': ..., 'batch_stats': ...}).

What does not fit stays as initialised, and is logged: a head of another class count
(`head/kernel` (84, 5) there, (84, 10) here) is the classic case: the new head for K classes
starts fresh while the backbone is reused. `config.init_skip` (a regex over parameter paths)
leaves more as initialised: layers too specific to the old task, such as LeNet's fc1/fc2
(configs/finetune_mnist.py measures the difference). A ViT's learned `pos_embed` of another
patch grid (weights trained at 224 px, fine-tuned at 384 px) is resampled to this run's grid
(jaxvision.layers.embed.resample_posemb); the loop / scan block layouts are converted. With EMA
on, the average starts at the loaded weights. Freeze the backbone with `config.freeze`
(train.optim), e.g. '^(?!head/)' trains the head alone.

Normalisation presets that match pretrained weights (`config.data.normalize`):

  | weights                                             | preset     | mean / std           |
  | --------------------------------------------------- | ---------- | -------------------- |
  | torchvision CNNs, timm CNNs and DeiT ViTs            | 'imagenet' | ImageNet statistics  |
  | Google ViT / big_vision (timm's augreg ViTs)         | 'half'     | 0.5 / 0.5: [-1, 1]   |
  | a jaxvision run                                      | its own    | from its config.json |

A network sees inputs of the distribution it was trained on only with the same preset, so
when the source is a workdir whose config.json names another preset, a warning says so.
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from jaxvision.convert import hub
from jaxvision.layers.embed import resample_posemb
from jaxvision.models.vit import stack_blocks, unstack_blocks
from jaxvision.pretrained import load_pretrained
from train.build import build_model
from train.checkpoint import restore_params

log = logging.getLogger("train")

# Which normalisation preset pretrained weights expect, by where they come from.
PRETRAINED_NORMALIZATION = {
    "torchvision": "imagenet",
    "timm": "imagenet",
    "deit": "imagenet",
    "vit_augreg": "half",
    "big_vision": "half",
}
_STEP_DIR = re.compile(r"^\d+$")


def pretrained_normalization(source: str) -> str:
  """The `data.normalize` preset for weights from `source` (a PRETRAINED_NORMALIZATION key)."""
  if source not in PRETRAINED_NORMALIZATION:
    raise ValueError(f"unknown weight source {source!r}; known: {sorted(PRETRAINED_NORMALIZATION)}")
  return PRETRAINED_NORMALIZATION[source]


# --- Reading weights ------------------------------------------------------------------------------


def flatten(tree) -> dict[str, np.ndarray]:
  """{'conv1/kernel': array, ...} from a nested dict of arrays."""
  return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: dict) -> dict:
  """The nested dict of '/'-joined paths."""
  return traverse_util.unflatten_dict(flat, sep="/")


def export_npz(path: str, params, batch_stats=None) -> str:
  """Writes params (and batch_stats) as an .npz of 'params/...' / 'batch_stats/...' paths."""
  arrays = {f"params/{k}": np.asarray(v) for k, v in flatten(params).items()}
  arrays.update({f"batch_stats/{k}": np.asarray(v) for k, v in flatten(batch_stats or {}).items()})
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  np.savez(path, **arrays)
  return path


def _split_collections(flat: dict) -> tuple[dict, dict]:
  if any(k.startswith(("params/", "batch_stats/")) for k in flat):
    params = {k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}
    stats = {k[len("batch_stats/"):]: v for k, v in flat.items() if k.startswith("batch_stats/")}
    return params, stats
  return flat, {}


def checkpoint_dir(path: str) -> tuple[str, str | None]:
  """(checkpoints directory, the run's config.json or None) of a workdir or checkpoints dir."""
  nested = os.path.join(path, "checkpoints")
  if os.path.isdir(nested):
    directory = nested
  elif any(_STEP_DIR.match(n) for n in os.listdir(path)):
    directory = path
  else:
    raise FileNotFoundError(f"init_from {path}: neither a trainer workdir (no checkpoints/) nor a "
                            "checkpoints directory (no step folders)")
  config = os.path.join(os.path.dirname(os.path.abspath(directory)), "config.json")
  return directory, config if os.path.exists(config) else None


def load_weights(init_from: str, config) -> tuple[dict, dict, dict | None]:
  """(flat params, flat batch_stats, the source run's config or None) from `init_from`."""
  if _published(init_from):
    return _pretrained_weights(init_from, config)
  if not os.path.exists(init_from):
    raise FileNotFoundError(f"init_from {init_from}: no such file or directory")
  if os.path.isdir(init_from):
    directory, config_path = checkpoint_dir(init_from)
    params, stats, _ = restore_params(directory)
    source_config = None
    if config_path:
      with open(config_path) as f:
        source_config = json.load(f)
    return flatten(params), flatten(stats), source_config
  if init_from.endswith(".npz"):
    try:
      with np.load(init_from, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
      raise ValueError(f"init_from {init_from}: not a readable .npz ({e})") from None
    params, stats = _split_collections(flat)
    return params, stats, None
  if init_from.endswith(".msgpack"):
    with open(init_from, "rb") as f:
      try:
        tree = serialization.msgpack_restore(f.read())
      except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise ValueError(f"init_from {init_from}: not a flax msgpack file ({e})") from None
    if "params" in tree:
      return flatten(tree["params"]), flatten(tree.get("batch_stats", {})), None
    return flatten(tree), {}, None
  raise ValueError(f"init_from {init_from}: expected a trainer workdir, a checkpoints directory, "
                   "an .npz or a .msgpack file")


# --- Fitting them to the model --------------------------------------------------------------------


def _match_block_layout(loaded: dict, fresh: dict) -> dict:
  """ViT blocks: converts the loaded params between loop (`blocks_i`) and scan (`blocks`)."""
  fresh_scan = any(k.startswith("blocks/") for k in fresh)
  loaded_scan = any(k.startswith("blocks/") for k in loaded)
  loaded_loop = any(re.match(r"^blocks_\d+/", k) for k in loaded)
  if fresh_scan and loaded_loop and not loaded_scan:
    return flatten(stack_blocks(unflatten(loaded)))
  if not fresh_scan and loaded_scan and any(re.match(r"^blocks_\d+/", k) for k in fresh):
    return flatten(unstack_blocks(unflatten(loaded)))
  return loaded


def _resample_posemb(value, num_prefix_tokens: int, grid):
  return np.asarray(resample_posemb(jnp.asarray(value), grid, num_prefix_tokens=num_prefix_tokens))


def merge(fresh: dict, loaded: dict, *, num_prefix_tokens: int = 1, grid=None,
          skip: str = "") -> tuple[dict, dict]:
  """Fresh flat params with every loaded array whose path and shape fit (and whose path does not
  match the regex `skip`); and what happened.

  The report has 'loaded', 'resampled' and 'unused' path lists and 'kept' {path: reason}.
  """
  report = {"loaded": [], "resampled": [], "kept": {}, "unused": sorted(set(loaded) - set(fresh))}
  skipped = re.compile(skip) if skip else None
  merged = {}
  for path, value in fresh.items():
    if skipped is not None and skipped.search(path):
      merged[path] = value
      report["kept"][path] = "init_skip"
      continue
    if path not in loaded:
      merged[path] = value
      report["kept"][path] = "not in init_from"
      continue
    new = np.asarray(loaded[path])
    if new.shape == tuple(value.shape):
      merged[path] = new
      report["loaded"].append(path)
    elif (path.split("/")[-1] == "pos_embed" and new.ndim == 3 and len(value.shape) == 3
          and new.shape[2] == value.shape[2] and grid is not None):
      resampled = _resample_posemb(new, num_prefix_tokens, grid)
      if resampled.shape != tuple(value.shape):
        raise ValueError(f"{path}: resampling {new.shape} to the {grid} patch grid gives "
                         f"{resampled.shape}, but the model has {tuple(value.shape)}")
      merged[path] = resampled
      report["resampled"].append(f"{path} {new.shape} -> {resampled.shape}")
    else:
      merged[path] = value
      report["kept"][path] = f"shape {new.shape} there, {tuple(value.shape)} here"
  return merged, report


def _place(value, like):
  """`value` with the dtype and sharding of the fresh leaf `like`."""
  value = np.asarray(value).astype(like.dtype)
  sharding = getattr(like, "sharding", None)
  return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


def _vit_geometry(config, fresh: dict) -> tuple[int, tuple[int, int] | None]:
  """(prefix tokens, patch grid) of this run's model as its resolved config builds it; (0 or 1,
  None) for models without a patch grid."""
  model = build_model(config)
  prefix = int(getattr(model, "num_prefix_tokens", 1 if "cls_token" in fresh else 0))
  grid = getattr(model, "grid", None)
  return prefix, (tuple(grid) if grid is not None else None)


def _rebuild(fresh_tree, merged_flat: dict):
  """The fresh tree's structure with the merged leaves, placed like the fresh ones."""
  fresh_flat = flatten(fresh_tree)
  placed = {k: _place(merged_flat[k], fresh_flat[k]) for k in fresh_flat}
  return unflatten(placed)


def _summary(init_from: str, what: str, report: dict) -> str:
  kept = "; ".join(f"{k} ({v})" for k, v in report["kept"].items())
  parts = [f"init_from {init_from}: {what}: loaded {len(report['loaded'])} arrays"]
  if report["resampled"]:
    parts.append(f"resampled {', '.join(report['resampled'])}")
  if report["kept"]:
    parts.append(f"kept {len(report['kept'])} as initialised: {kept}")
  if report["unused"]:
    parts.append(f"unused {len(report['unused'])}: {', '.join(report['unused'][:8])}"
                 + (" ..." if len(report["unused"]) > 8 else ""))
  return "; ".join(parts)


def _published(init_from: str) -> bool:
  """Whether `init_from` names published weights (jaxvision.pretrained reads them): a hf-hub:
  spec, a .safetensors or torch file, a Hub-style folder, an official ViT .npz."""
  if not hub.is_spec(init_from):
    return False
  if init_from.endswith(".npz"):  # jaxvision's own .npz keeps the path below (init_skip etc.)
    return os.path.exists(init_from) and hub.read_weights(init_from).layout == "vit_npz"
  return True


def _pretrained_weights(spec: str, config) -> tuple[dict, dict, None]:
  """Published weights as this run's model takes them (head, position embedding fitted by
  jaxvision.pretrained); a preprocessing unlike the run's is warned about."""
  kwargs = dict(config.model_kwargs.to_dict())
  _, variables, pretrained = load_pretrained(config.model, spec,
                                             num_classes=int(config.num_classes), **kwargs)
  if pretrained.normalize != config.data.normalize:
    log.warning("init_from %s expects data.normalize=%r but this run uses %r; the weights see "
                "inputs of another distribution (set --config.data.normalize=%s)", spec,
                pretrained.normalize, config.data.normalize, pretrained.normalize)
  return flatten(variables["params"]), flatten(variables.get("batch_stats", {})), None


def initialize_from(state, init_from: str, config):
  """`state` (freshly initialised) with params and batch_stats loaded from `init_from`."""
  loaded_params, loaded_stats, source_config = load_weights(init_from, config)
  fresh_params = flatten(state.params)
  loaded_params = _match_block_layout(loaded_params, fresh_params)
  prefix, grid = _vit_geometry(config, fresh_params)
  skip = config.init_skip
  try:
    re.compile(skip)
  except re.error as e:
    raise ValueError(f"config.init_skip={skip!r} is not a regular expression: {e}") from None
  params, report = merge(fresh_params, loaded_params, num_prefix_tokens=prefix, grid=grid,
                         skip=skip)
  if not report["loaded"] and not report["resampled"]:
    first = next(iter(report["kept"].items()), ("", "no parameters"))
    raise ValueError(f"init_from {init_from}: none of its {len(loaded_params)} arrays fits model "
                     f"{config.model!r} (e.g. {first[0]}: {first[1]})")
  log.warning("%s", _summary(init_from, "params", report))
  new_params = _rebuild(state.params, params)

  new_stats = state.batch_stats
  if state.batch_stats:
    stats, stats_report = merge(flatten(state.batch_stats), loaded_stats, skip=skip)
    if loaded_stats:
      log.warning("%s", _summary(init_from, "batch_stats", stats_report))
    new_stats = _rebuild(state.batch_stats, stats)

  _check_normalization(init_from, source_config, config)
  ema = state.ema_params
  if ema:
    # The average starts at the loaded weights, not at the random init it would drag along.
    ema = jax.tree.map(jnp.copy, new_params)
  return state.replace(params=new_params, batch_stats=new_stats, ema_params=ema)


def _check_normalization(init_from: str, source_config: dict | None, config) -> None:
  if not source_config:
    return
  theirs = (source_config.get("data") or {}).get("normalize")
  ours = config.data.normalize
  if theirs is not None and theirs != ours:
    log.warning("init_from %s was trained with data.normalize=%r but this run uses %r; the "
                "weights see inputs of another distribution (set --config.data.normalize=%s)",
                init_from, theirs, ours, theirs)
