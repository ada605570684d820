"""ONNX export with jax2onnx, checked with ONNX Runtime.

    OUT/model.onnx       input 'images' float32 [batch, H, W, C] (NHWC, symbolic batch), outputs
                         named as in the metadata ('logits'); the weights are initializers;
                         metadata_props carries the metadata JSON under 'jaxvision'
    OUT/metadata.json    see jaxvision.export

    import onnxruntime as ort
    session = ort.InferenceSession('OUT/model.onnx', providers=['CPUExecutionProvider'])
    logits, = session.run(None, {'images': images})

Needs `pip install 'jaxvision[export]'` (jax2onnx, onnx, onnxruntime).

jax2onnx lowers `lax.reduce_window_max` to an ONNX MaxPool over every axis of the operand, and
ONNX Runtime runs MaxPool over at most 3 spatial axes, so an NHWC max-pool (a 4-D window with
unit batch and channel sizes) fails at run time. Before conversion, such pools are rewritten
into the same reduction over a [batch * channels, H, W] view (`pools_as_3d`), which both
handle; the values are the same.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from jaxvision.export.artifact import Exportable, write_metadata

MODEL_NAME = "model.onnx"
INPUT_NAME = "images"
# Call-like primitives whose bodies are inlined so that the pools inside them are rewritten.
_INLINE = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
           "remat", "checkpoint"}


def _require():
  try:
    import jax2onnx  # noqa: F401
    import onnx  # noqa: F401
  except ImportError as e:
    raise ImportError(f"ONNX export needs jax2onnx and onnx ({e.name} is missing): "
                      "pip install 'jaxvision[export]'") from None


def _pool_3d(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
  """reduce_window_max over the pooled axes of `x`, on a [rest, *pooled] view."""
  if any(d != 1 for d in base_dilation):
    raise ValueError("ONNX export: max-pool with base dilation is not supported")
  pooled = [a for a in range(x.ndim) if window_dimensions[a] != 1 or window_strides[a] != 1
            or tuple(padding[a]) != (0, 0) or window_dilation[a] != 1]
  rest = [a for a in range(x.ndim) if a not in pooled]
  if len(pooled) > 3 or not rest:
    return lax.reduce_window_max_p.bind(
        x, window_dimensions=window_dimensions, window_strides=window_strides, padding=padding,
        base_dilation=base_dilation, window_dilation=window_dilation)
  order = rest + pooled
  y = jnp.transpose(x, order)
  lead = y.shape[:len(rest)]
  y = y.reshape((-1, *y.shape[len(rest):]))
  pick = lambda values: tuple(values[a] for a in pooled)
  y = lax.reduce_window_max_p.bind(
      y, window_dimensions=(1, *pick(window_dimensions)),
      window_strides=(1, *pick(window_strides)),
      padding=((0, 0), *(tuple(p) for p in pick(padding))),
      base_dilation=(1,) * (1 + len(pooled)), window_dilation=(1, *pick(window_dilation)))
  y = y.reshape((*lead, *y.shape[1:]))
  return jnp.transpose(y, np.argsort(order))


def _eval(jaxpr, consts, *args):
  """Evaluates `jaxpr` with every max-pool of 4 or more axes rewritten by `_pool_3d`."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, value in zip(jaxpr.constvars, consts, strict=True):
    env[v] = value
  for v, value in zip(jaxpr.invars, args, strict=True):
    env[v] = value
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    body = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr")
                 if k in eqn.params), None)
    if eqn.primitive is lax.reduce_window_max_p and inputs[0].ndim > 3:
      outputs = [_pool_3d(inputs[0], **eqn.params)]
    elif eqn.primitive.name in _INLINE and body is not None:
      if isinstance(body, jex_core.ClosedJaxpr):
        outputs = _eval(body.jaxpr, body.consts, *inputs)
      else:
        outputs = _eval(body, (), *inputs)
    else:
      with eqn.ctx.manager:
        outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outputs = [outputs]
    for v, value in zip(eqn.outvars, outputs, strict=True):
      env[v] = value
  return [read(v) for v in jaxpr.outvars]


def pools_as_3d(fn):
  """`fn` (arrays -> a tuple of arrays) with its NHWC max-pools in a form ONNX Runtime runs."""

  def wrapped(*args):
    closed = jax.make_jaxpr(fn)(*args)
    if not any(e.primitive is lax.reduce_window_max_p for e in _all_eqns(closed.jaxpr)):
      return fn(*args)
    return tuple(_eval(closed.jaxpr, closed.consts, *args))

  return wrapped


def _all_eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          yield from _all_eqns(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          yield from _all_eqns(sub)


@contextlib.contextmanager
def _quiet():
  """jax2onnx prints debugging lines and logs every plugin it skips; keep the terminal clean."""
  loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for lg, level in zip(loggers, levels, strict=True):
      lg.setLevel(level)


def to_onnx_model(exportable: Exportable, *, opset: int = 23):
  """The onnx.ModelProto of `exportable` (weights as initializers, symbolic batch 'batch')."""
  _require()
  from jax2onnx import to_onnx

  h, w, c = exportable.input_shape
  fn = pools_as_3d(exportable.baked())
  with _quiet():
    model = to_onnx(fn, [("batch", h, w, c)], model_name=exportable.metadata["model"],
                    opset=opset, input_names=[INPUT_NAME],
                    output_names=exportable.output_names)
  # jax2onnx stamps some intermediate values with the shapes of their NHWC originals where its
  # plugins work in NCHW; ONNX Runtime infers them anyway and warns at every load otherwise.
  del model.graph.value_info[:]
  entry = model.metadata_props.add()
  entry.key, entry.value = "jaxvision", json.dumps({**exportable.metadata, "format": "onnx"})
  return model


def export_onnx(exportable: Exportable, out_dir: str, *, opset: int = 23) -> list[str]:
  """Writes model.onnx and metadata.json to `out_dir`; returns their paths."""
  import onnx

  model = to_onnx_model(exportable, opset=opset)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, MODEL_NAME)
  onnx.save(model, path)
  metadata = {**exportable.metadata, "files": {"model": MODEL_NAME}, "opset": opset,
              "input_name": INPUT_NAME}
  return [path, write_metadata(out_dir, metadata, "onnx")]


def onnx_session(path: str):
  """An ONNX Runtime CPU session of model file `path`."""
  try:
    import onnxruntime as ort
  except ImportError:
    raise ImportError("running ONNX models needs onnxruntime: pip install 'jaxvision[export]'"
                      ) from None
  options = ort.SessionOptions()
  options.log_severity_level = 3  # shape-inference merge notices are not errors
  return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
