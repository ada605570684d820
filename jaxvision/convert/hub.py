"""Where pretrained weights come from: the Hugging Face Hub, local files, torch checkpoints.

    weights = read_weights('hf-hub:timm/resnet50.tv_in1k')
    weights.arrays     # {'conv1.weight': np.ndarray, ...}
    weights.layout     # 'torch' (timm / torchvision names), 'jaxvision' or 'vit_npz'
    weights.config     # the repo's config.json (timm's pretrained_cfg), or None

Weight specs:
  hf-hub:ORG/REPO[@REVISION]   `model.safetensors` and `config.json` of a Hub repo, through
                               `huggingface_hub.hf_hub_download`: its cache (HF_HUB_CACHE),
                               offline mode (HF_HUB_OFFLINE=1) and revision pinning apply.
  DIR                          a local folder laid out like such a repo.
  FILE.safetensors             a torch-layout state dict (timm, torchvision) or jaxvision's own
                               layout ('/'-joined parameter paths).
  FILE.npz                     jaxvision's layout ('params/conv1/kernel', as train.transfer's
                               export_npz writes) or an official ViT checkpoint (vit_jax /
                               big_vision naming: 'Transformer/encoderblock_0/...').
  FILE.pth | .pt | .bin        a torch state dict; reading it needs PyTorch.

Arrays are numpy (`safetensors.numpy`): nothing here imports torch except for `.pth` files. A
file that cannot be read is a one-line ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

HUB_PREFIX = "hf-hub:"
WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
LAYOUTS = ("torch", "jaxvision", "vit_npz")
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Weights:
  """Arrays read from one weight source.

  Attributes:
    arrays: name -> numpy array, in the source's own naming.
    layout: 'torch' (timm / torchvision state-dict keys), 'jaxvision' ('/'-joined Flax paths,
      optionally under 'params/' and 'batch_stats/') or 'vit_npz' (official ViT checkpoints).
    path: the file the arrays came from (what error messages name).
    spec: the spec as given.
    config: the source's config.json (timm's format) when it has one, else None.
  """

  arrays: dict[str, np.ndarray]
  layout: str
  path: str
  spec: str
  config: dict | None = None

  @property
  def name(self) -> str:
    """What error messages call the source: the file, after the Hub spec it came from."""
    return f"{self.spec} ({self.path})" if self.spec.startswith(HUB_PREFIX) else self.path


def is_spec(value: Any) -> bool:
  """Whether `value` names pretrained weights this module reads (True, a hf-hub: spec, a
  weights file or a Hub-style folder), as opposed to a trainer workdir or checkpoint."""
  if value is True:
    return True
  if not isinstance(value, str) or not value:
    return False
  if value.startswith(HUB_PREFIX):
    return True
  if value.endswith((".safetensors", ".npz", *TORCH_SUFFIXES)):
    return True
  return os.path.isdir(value) and os.path.exists(os.path.join(value, WEIGHTS_NAME))


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
  """'hf-hub:ORG/REPO[@REVISION]' -> (repo id, revision or None); ValueError when malformed."""
  body = spec.removeprefix(HUB_PREFIX)
  repo, _, revision = body.partition("@")
  if not _REPO.match(repo) or (revision == "" and "@" in body):
    raise ValueError(f"pretrained={spec!r}: expected 'hf-hub:ORG/REPO' or "
                     "'hf-hub:ORG/REPO@REVISION'")
  return repo, revision or None


def read_weights(spec: str) -> Weights:
  """The arrays (and config.json) of weight spec `spec`; see the module docstring."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"pretrained={spec!r}: expected 'hf-hub:ORG/REPO[@REV]' or a weights file")
  if spec.startswith(HUB_PREFIX):
    path, config_path = hub_files(*parse_hub_spec(spec), spec=spec)
  elif os.path.isdir(spec):
    path = os.path.join(spec, WEIGHTS_NAME)
    if not os.path.exists(path):
      raise ValueError(f"pretrained={spec!r}: the folder has no {WEIGHTS_NAME}")
    config_path = os.path.join(spec, CONFIG_NAME)
  elif not os.path.exists(spec):
    raise ValueError(f"pretrained={spec!r}: no such file, and not an 'hf-hub:ORG/REPO' spec")
  else:
    path, config_path = spec, os.path.join(os.path.dirname(os.path.abspath(spec)), CONFIG_NAME)
  arrays, layout = read_file(path)
  return Weights(arrays, layout, path, spec, read_config(config_path))


def read_file(path: str) -> tuple[dict[str, np.ndarray], str]:
  """(arrays, layout) of one weights file, chosen by its suffix."""
  if path.endswith(".safetensors"):
    arrays = read_safetensors(path)
  elif path.endswith(".npz"):
    arrays = read_npz(path)
  elif path.endswith(TORCH_SUFFIXES):
    arrays = read_torch(path)
  else:
    raise ValueError(f"{path}: unknown weights format; expected .safetensors, .npz, .pth or .bin")
  if not arrays:
    raise ValueError(f"{path}: holds no arrays")
  return arrays, detect_layout(arrays)


def detect_layout(arrays: Mapping[str, Any]) -> str:
  """'vit_npz', 'jaxvision' or 'torch', from the array names."""
  names = [k.removeprefix("params/") for k in arrays]
  if any(k.startswith("Transformer/") or k == "embedding/kernel" for k in names):
    return "vit_npz"
  return "jaxvision" if any("/" in k for k in arrays) else "torch"


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file as numpy arrays (no torch)."""
  from safetensors.numpy import load_file

  try:
    return dict(load_file(path))
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
    raise ValueError(f"{path}: not a readable safetensors file ({_reason(e)})") from None


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an .npz file (no pickles)."""
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as e:  # noqa: BLE001 - zipfile, OSError, ValueError, EOFError alike
    raise ValueError(f"{path}: not a readable .npz file ({_reason(e)})") from None


def read_torch(path: str) -> dict[str, np.ndarray]:
  """The tensors of a torch checkpoint (a state dict, or one under 'state_dict' / 'model')."""
  try:
    import torch
  except ImportError:
    raise ImportError(f"{path} is a PyTorch checkpoint and reading it needs torch "
                      "(pip install torch), or convert it to .safetensors") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
    raise ValueError(f"{path}: not a readable torch checkpoint ({_reason(e)})") from None
  for key in ("state_dict", "model", "model_state_dict"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
  if obj and all(str(k).startswith("module.") for k in obj):
    obj = {str(k).removeprefix("module."): v for k, v in obj.items()}
  out = {}
  for key, value in obj.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu()
      out[str(key)] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def read_config(path: str | None) -> dict | None:
  """A timm-style config.json (architecture, pretrained_cfg, label names), or None when `path`
  is absent or is some other file (e.g. a trainer's config.json)."""
  if not path or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable config.json ({_reason(e)})") from None
  if not isinstance(config, dict) or not ({"pretrained_cfg", "architecture"} & set(config)):
    return None
  return config


def hub_files(repo: str, revision: str | None, *, spec: str = "") -> tuple[str, str | None]:
  """Local paths of (weights, config.json or None) of Hub repo `repo` at `revision`, from the
  Hugging Face cache or downloaded into it."""
  from huggingface_hub import constants, hf_hub_download
  from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

  spec = spec or f"{HUB_PREFIX}{repo}" + (f"@{revision}" if revision else "")

  def fetch(filename: str, required: bool = True) -> str | None:
    try:
      return hf_hub_download(repo, filename, revision=revision)
    except LocalEntryNotFoundError:
      if not required:  # offline, a file the cache lacks may not exist at all
        return None
      if constants.is_offline_mode():
        raise ValueError(f"{spec}: {filename} is not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set") from None
      raise ValueError(f"{spec}: {filename} could not be downloaded (no connection?) and is not "
                       f"in the Hugging Face cache ({constants.HF_HUB_CACHE})") from None
    except EntryNotFoundError:
      return None
    except Exception as e:  # noqa: BLE001 - repository / revision not found, HTTP errors
      raise ValueError(f"{spec}: {_hub_reason(e)}") from None

  weights = fetch(WEIGHTS_NAME)
  if weights is None:
    weights = fetch(TORCH_WEIGHTS_NAME)
  if weights is None:
    raise ValueError(f"{spec}: the repo has neither {WEIGHTS_NAME} nor {TORCH_WEIGHTS_NAME}")
  return weights, fetch(CONFIG_NAME, required=False)


def _hub_reason(error: BaseException) -> str:
  name = type(error).__name__
  if name == "RepositoryNotFoundError":
    return "no such repository on the Hub (or it is private or gated: log in with `hf auth login`)"
  if name == "RevisionNotFoundError":
    return "no such revision in the repository"
  return _reason(error)


def _reason(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


# --- jaxvision's own layout ---------------------------------------------------------------------


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'params/conv1/kernel': leaf, ...} from nested dicts."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if hasattr(value, "items"):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Nested dicts from '/'-joined paths."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def jaxvision_variables(arrays: Mapping[str, np.ndarray]) -> dict:
  """Flax variables {'params': ..., 'batch_stats': ...} from jaxvision-layout arrays (paths
  with or without the 'params/' collection prefix)."""
  if any(k.startswith(("params/", "batch_stats/")) for k in arrays):
    tree = unflatten(arrays)
    return {c: tree[c] for c in ("params", "batch_stats") if c in tree}
  return {"params": unflatten(arrays)}
