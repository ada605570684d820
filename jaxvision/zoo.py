"""The model zoo table, generated from the registry: `python -m jaxvision.zoo`.

Parameters are counted from `jax.eval_shape` (no compute); GFLOPs are XLA's cost analysis of one
forward pass of a single image at the default input size (multiply-adds counted as 2 FLOPs).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxvision.models import create_model, list_models, model_info


def count_params(name: str, **kwargs) -> int:
  """Parameters of variant `name` at its default input shape, without allocating them."""
  info = model_info(name)
  model = create_model(name, **kwargs)
  x = jax.ShapeDtypeStruct((1, *info.input_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  return sum(leaf.size for leaf in jax.tree.leaves(variables.get("params", {})))


def forward_gflops(name: str) -> float | None:
  """XLA's FLOP estimate for one forward pass at the default input, in GFLOPs."""
  info = model_info(name)
  model = create_model(name)
  x = jnp.zeros((1, *info.input_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"]) / 1e9


def zoo_table(pattern: str = "*", flops: bool = True) -> str:
  """A markdown table of every registered variant matching `pattern`."""
  rows = ["| model | parameters | GFLOPs | input (H×W×C) | paper |", "|---|---:|---:|---|---|"]
  for name in list_models(pattern):
    info = model_info(name)
    gflops = forward_gflops(name) if flops else None
    shape = "×".join(str(d) for d in info.input_shape)
    rows.append(
        f"| `{name}` | {count_params(name):,} | {'' if gflops is None else f'{gflops:.3g}'} | "
        f"{shape} | {info.paper} |"
    )
  return "\n".join(rows)


def main() -> None:
  """Prints the zoo table (markdown) for the registry names matching --pattern."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pattern", default="*", help="shell pattern over registry names")
  parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
  args = parser.parse_args()
  print(zoo_table(args.pattern, flops=not args.no_flops))


if __name__ == "__main__":
  main()
