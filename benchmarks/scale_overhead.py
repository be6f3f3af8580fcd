"""Update cost of ``scale_normalize`` in each mode against ``optax.sgd`` alone.

Times one jitted optimizer step, ``tx.update`` followed by ``optax.apply_updates``,
with fixed random gradients (no forward or backward pass), on two trees:

1. the paper's MLP (Lo, Amaral & Ding: 784-100-100-100-10, Flax ``nn.Dense`` kernels);
2. a ResNet-50-shaped tree (``transform_overhead.resnet50_params``: 53 conv
   kernels HWIO, read as (kh kw cin, cout) matrices, and the 2048 x 1000 head).

Four variants per tree, side by side in one run: ``optax.sgd(0.1)`` (the
baseline) and ``optax.chain(optax.sgd(0.1), odn.scale_normalize(mode))`` for
``mode`` in ``data``, ``probe`` (16 probes) and ``determinant``. In data mode
each weight gets ``--batch`` fixed input rows (conv: patches) passed as
``layer_inputs``, as a training loop would pass its layer inputs.

Method (see ``_harness.py``): every variant is compiled first, then the
variants are alternated for ``--rounds`` rounds; the tables give medians,
min/max, the ratio of medians and the median per-round ratio to sgd, and a
last table puts the per-round ratios of both trees side by side.

Run from the repository root::

  python3 benchmarks/scale_overhead.py            # full size, 15 rounds
  python3 benchmarks/scale_overhead.py --quick    # ResNet widths / 4, 1 block per stage, 3 rounds
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _harness import (
  Runner,
  add_timing_args,
  check_timing_args,
  machine_facts,
  measure,
  print_machine,
  write_json,
)
from transform_overhead import QUICK_STAGES, STAGES, resnet50_params, tree_size

import optax_depthnorm as odn

MODES = ("data", "probe", "determinant")
MLP_WIDTHS = (100, 100, 100, 10)


class PaperMLP(nn.Module):
  """The MLP of Lo, Amaral & Ding's experiments: 784 -> 100 -> 100 -> 100 -> 10, ReLU."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in MLP_WIDTHS[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(MLP_WIDTHS[-1])(x)


def mlp_params(key: jax.Array) -> Any:
  return PaperMLP().init(key, jnp.ones((1, 784)))["params"]


def variants() -> dict[str, optax.GradientTransformationExtraArgs]:
  """The optimizers compared, baseline first."""
  out = {"sgd": optax.sgd(0.1)}
  for mode in MODES:
    out[f"sgd+scale_normalize({mode})"] = optax.chain(optax.sgd(0.1), odn.scale_normalize(mode))
  return out


def random_like(key: jax.Array, tree: Any, scale: float) -> Any:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


def layer_inputs(key: jax.Array, params: Any, batch: int) -> dict[str, jax.Array]:
  """`batch` random rows of width fan_in (Flax layout) for every weight matrix, by path."""
  weights = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if jnp.ndim(x) >= 2]
  keys = jax.random.split(key, len(weights))
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): jax.random.normal(
      key, (batch, x.size // x.shape[-1]), jnp.float32
    )
    for key, (path, x) in zip(keys, weights)
  }


def optimizer_runner(tx: optax.GradientTransformation, params: Any, grads: Any, inputs: Any):
  """A runner of one optimizer step on its own copy of params and state."""

  def step(carry: tuple[Any, Any], grads: Any, inputs: Any) -> tuple[Any, Any]:
    params, state = carry
    updates, state = tx.update(grads, state, params, layer_inputs=inputs)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)  # the creation-ordered dict: depths resolved here
  own = jax.tree_util.tree_map(jnp.copy, params)
  return Runner(step, (own, state), grads, inputs)


def time_tree(name: str, params: Any, args: argparse.Namespace, facts: dict) -> dict[str, Any]:
  key_grads, key_inputs = jax.random.split(jax.random.key(args.seed + 1))
  grads = random_like(key_grads, params, 1e-2)
  inputs = layer_inputs(key_inputs, params, args.batch)
  n_params, n_leaves = tree_size(params)
  print(f"\n## Tree: {name}: {n_params:,} params in {n_leaves} leaves (float32)\n")
  makers = {
    variant: (lambda tx=tx: optimizer_runner(tx, params, grads, inputs))
    for variant, tx in variants().items()
  }
  return {"params": n_params, "leaves": n_leaves, **measure(makers, args, facts)}


def side_by_side(trees: dict[str, dict[str, Any]]) -> str:
  names = list(trees)
  lines = [
    "| variant | " + " | ".join(f"{n}: per-round ratio to sgd" for n in names) + " |",
    "|---|" + "---:|" * len(names),
  ]
  for i, row in enumerate(trees[names[0]]["results"]):
    ratios = [f"{trees[n]['results'][i]['paired_ratio']:.2f}x" for n in names]
    lines.append(f"| {row['variant']} | " + " | ".join(ratios) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_timing_args(parser)
  parser.add_argument("--batch", type=int, default=100, help="input rows per layer (data mode)")
  args = parser.parse_args(argv)
  check_timing_args(parser, args)
  if args.batch < 1:
    parser.error("--batch must be >= 1")
  width_divisor = 4 if args.quick else 1
  facts = machine_facts()
  print_machine(facts)
  print(
    f"\nMethod: compile all, {args.warmup} warm-up steps each, then {args.rounds} rounds "
    f"alternating the variants, {args.steps} consecutive steps per variant per round; "
    f"data mode gets {args.batch} input rows per layer."
  )
  key_mlp, key_resnet = jax.random.split(jax.random.key(args.seed))
  resnet = "ResNet-50" if width_divisor == 1 else f"ResNet-50 / {width_divisor}, 1 block per stage"
  trees = {
    "MLP 784-100-100-100-10": time_tree("MLP 784-100-100-100-10", mlp_params(key_mlp), args, facts),
    resnet: time_tree(
      resnet,
      resnet50_params(key_resnet, width_divisor, QUICK_STAGES if args.quick else STAGES),
      args,
      facts,
    ),
  }
  print("\n## Side by side\n")
  print(side_by_side(trees))
  result = {
    "machine": facts,
    "config": {
      "rounds": args.rounds,
      "steps": args.steps,
      "warmup": args.warmup,
      "batch": args.batch,
      "width_divisor": width_divisor,
    },
    "trees": trees,
  }
  return write_json(args, result)


if __name__ == "__main__":
  main()
