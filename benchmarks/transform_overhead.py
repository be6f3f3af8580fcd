"""Train-step overhead of optax_depthnorm's transforms on a ResNet-50-shaped tree.

Times one jitted optimizer step, ``tx.update`` followed by ``optax.apply_updates``,
with fixed random gradients, for five optimizers side by side in one run:

1. ``optax.adam(1e-3)``, the baseline;
2. ``layerwise_normalize() -> depth_decay(0.01) -> adam(1e-3)``, the transform
   under test;
3. ``track_gradient_flow() -> adam(1e-3)``, the in-state gradient-flow monitor;
4. ``optax.lamb(1e-3)``, a peer that also takes per-leaf norms;
5. ``clip_by_global_norm(1.0) -> adam(1e-3)``, a peer that takes one global norm.

Method: every variant is compiled first, then the variants are alternated for
``--rounds`` rounds (their order rotates each round); in each round every
variant runs ``--steps`` consecutive steps, blocked on at the end, and the
per-step time of that round is recorded. Reported per variant: the median over
rounds with min and max, median / adam median, and the median over rounds of
the per-round ratio to adam (robust to load that drifts during the run). Params
and optimizer state are donated to the step, so memory does not double. Also
reported: XLA kernels per step (top-level ops of the optimized module), the
StableHLO op count before optimization, and trace + compile time.

Run from the repository root::

  python3 benchmarks/transform_overhead.py                  # full size, 15 rounds
  python3 benchmarks/transform_overhead.py --quick          # smoke: widths / 4, 1 block a stage
  python3 benchmarks/transform_overhead.py --json out.json  # also write results
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import (
  Runner,
  add_timing_args,
  check_timing_args,
  machine_facts,
  print_machine,
  run_all,
)

import optax_depthnorm as odn

Params = dict[str, Any]

STAGES = (3, 4, 6, 3)
QUICK_STAGES = (1, 1, 1, 1)  # --quick: one block per stage, 53 leaves (a third to compile)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
NUM_CLASSES = 1000


# --------------------------------------------------------------------------- #
# ResNet-50-shaped parameter tree (linen naming, creation order).


def _conv(key: jax.Array, kh: int, kw: int, cin: int, cout: int) -> Params:
  fan_in = kh * kw * cin
  kernel = jax.random.normal(key, (kh, kw, cin, cout), jnp.float32) / np.sqrt(fan_in)
  return {"kernel": kernel}


def _batch_norm(features: int) -> Params:
  return {
    "scale": jnp.ones((features,), jnp.float32),
    "bias": jnp.zeros((features,), jnp.float32),
  }


def _bottleneck(key: jax.Array, cin: int, width: int, project: bool) -> Params:
  """One bottleneck block: 1x1 -> 3x3 -> 1x1 convs with BNs, maybe a projection."""
  keys = jax.random.split(key, 4)
  cout = width * EXPANSION
  block: Params = {
    "Conv_0": _conv(keys[0], 1, 1, cin, width),
    "BatchNorm_0": _batch_norm(width),
    "Conv_1": _conv(keys[1], 3, 3, width, width),
    "BatchNorm_1": _batch_norm(width),
    "Conv_2": _conv(keys[2], 1, 1, width, cout),
    "BatchNorm_2": _batch_norm(cout),
  }
  if project:
    block["conv_proj"] = _conv(keys[3], 1, 1, cin, cout)
    block["norm_proj"] = _batch_norm(cout)
  return block


def resnet50_params(
  key: jax.Array, width_divisor: int = 1, stages: tuple[int, ...] = STAGES
) -> Params:
  """Float32 params with ResNet-50's shapes (HWIO convs), as a linen-style dict.

  Args:
    key: PRNG key for the conv and dense kernels.
    width_divisor: divide every channel width by this (1 = the real ResNet-50).
    stages: bottleneck blocks per stage (ResNet-50's by default).

  Returns:
    ``{"Conv_0", "BatchNorm_0", "BottleneckResNetBlock_0".."_15", "Dense_0"}`` in
    creation order; 161 leaves, 25,557,032 parameters at full size.
  """
  keys = iter(jax.random.split(key, 2 + sum(stages)))
  stem = 64 // width_divisor
  params: Params = {
    "Conv_0": _conv(next(keys), 7, 7, 3, stem),
    "BatchNorm_0": _batch_norm(stem),
  }
  cin, index = stem, 0
  for blocks, stage_width in zip(stages, STAGE_WIDTHS, strict=True):
    width = stage_width // width_divisor
    for b in range(blocks):
      # A stage's first block changes the channel count (and, after the first
      # stage, the stride), so it has a projection shortcut.
      params[f"BottleneckResNetBlock_{index}"] = _bottleneck(next(keys), cin, width, b == 0)
      cin, index = width * EXPANSION, index + 1
  dense_key = next(keys)
  params["Dense_0"] = {
    "kernel": jax.random.normal(dense_key, (cin, NUM_CLASSES), jnp.float32) / np.sqrt(cin),
    "bias": jnp.zeros((NUM_CLASSES,), jnp.float32),
  }
  return params


# --------------------------------------------------------------------------- #
# A stacked transformer tree (``nn.scan`` style: every block leaf has a leading
# layer axis).

TRANSFORMER = {"layers": 24, "width": 512, "heads": 8, "mlp": 2048, "vocab": 8192}
TRANSFORMER_STACK = {"Transformer/blocks": 0}  # the `stack_axis` of this tree


def transformer_params(key: jax.Array, width_divisor: int = 1, layers: int | None = None) -> Params:
  """Float32 params of a decoder-only transformer whose blocks are stacked on axis 0.

  Args:
    key: PRNG key for the kernels.
    width_divisor: divide the width, MLP width and vocabulary by this.
    layers: the number of blocks (default 24).

  Returns:
    ``{"embed", "Transformer": {"blocks": {...}}, "final_norm", "head"}`` in creation
    order, each block leaf of shape ``(layers, ...)`` (``stack_axis`` `TRANSFORMER_STACK`):
    pre-norm attention (query, key, value, out: ``(d, heads, d / heads)``) and a
    two-layer MLP; 24 blocks of width 512: 84,005,888 parameters in 17 leaves.
  """
  c = TRANSFORMER
  n = layers or c["layers"]
  d, mlp, h = c["width"] // width_divisor, c["mlp"] // width_divisor, c["heads"]
  vocab = c["vocab"] // width_divisor
  keys = iter(jax.random.split(key, 8))
  normal = lambda shape, fan_in: jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)
  norm = lambda: {"scale": jnp.ones((n, d), jnp.float32), "bias": jnp.zeros((n, d), jnp.float32)}
  blocks = {
    "LayerNorm_0": norm(),
    "Attention_0": {
      "query": {"kernel": normal((n, d, h, d // h), d)},
      "key": {"kernel": normal((n, d, h, d // h), d)},
      "value": {"kernel": normal((n, d, h, d // h), d)},
      "out": {"kernel": normal((n, h, d // h, d), d)},
    },
    "LayerNorm_1": norm(),
    "Mlp_0": {
      "Dense_0": {"kernel": normal((n, d, mlp), d), "bias": jnp.zeros((n, mlp), jnp.float32)},
      "Dense_1": {"kernel": normal((n, mlp, d), mlp), "bias": jnp.zeros((n, d), jnp.float32)},
    },
  }
  return {
    "embed": {"embedding": normal((vocab, d), 1)},
    "Transformer": {"blocks": blocks},
    "final_norm": {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)},
    "head": {"kernel": normal((d, vocab), d), "bias": jnp.zeros((vocab,), jnp.float32)},
  }


def tree_size(tree: Any) -> tuple[int, int]:
  """(number of parameters, number of leaves) of a pytree of arrays."""
  leaves = jax.tree_util.tree_leaves(tree)
  return sum(int(x.size) for x in leaves), len(leaves)


# --------------------------------------------------------------------------- #
# Variants and the timed step.


DEFAULT_VARIANTS = (
  "adam",
  "layerwise_normalize+depth_decay+adam",
  "track_gradient_flow+adam",
  "lamb",
  "clip_by_global_norm+adam",
)


def variants(stack_axis: Any = None) -> dict[str, Callable[[], optax.GradientTransformation]]:
  """Every optimizer that can be compared, baseline first, by the name printed in the table.

  `--variants` picks some (default: `DEFAULT_VARIANTS`); `stack_axis` is passed
  to the transforms (the stacked transformer tree).
  """
  sa = {"stack_axis": stack_axis}
  track = lambda **kw: optax.chain(odn.track_gradient_flow(**sa, **kw), optax.adam(1e-3))
  return {
    "adam": lambda: optax.adam(1e-3),
    "layerwise_normalize+depth_decay+adam": lambda: optax.chain(
      odn.layerwise_normalize(**sa), odn.depth_decay(0.01, **sa), optax.adam(1e-3)
    ),
    "track_gradient_flow+adam": lambda: track(),
    "track_gradient_flow(stats=norm)+adam": lambda: track(stats="norm"),
    "track_gradient_flow(stats=norm|mean_abs|max_abs)+adam": lambda: track(
      stats=("norm", "mean_abs", "max_abs")
    ),
    "track_gradient_flow(stats=all)+adam": lambda: track(stats="all"),
    "track_gradient_flow(every_k_steps=10)+adam": lambda: track(every_k_steps=10),
    "track_gradient_flow(stats=all, every_k_steps=10)+adam": lambda: track(
      stats="all", every_k_steps=10
    ),
    "lamb": lambda: optax.lamb(1e-3),
    "clip_by_global_norm+adam": lambda: optax.chain(
      optax.clip_by_global_norm(1.0), optax.adam(1e-3)
    ),
  }


def optimizer_runner(tx: optax.GradientTransformation, params: Params, grads: Params) -> Runner:
  """A runner of one optimizer step on its own copy of params and state."""

  def step(carry: tuple[Params, Any], grads: Params) -> tuple[Params, Any]:
    params, state = carry
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)  # the creation-ordered dict: depths resolved here
  own = jax.tree_util.tree_map(jnp.copy, params)
  return Runner(step, (own, state), grads)


def period_notes(names: list[str], steps: int) -> list[str]:
  """A note for each ``every_k_steps=k`` variant whose k does not divide `steps`.

  Its recorded step then falls in some rounds and not others, and the median of
  the per-round ratios says little about its average cost.
  """
  notes = []
  for name in names:
    for k in map(int, re.findall(r"every_k_steps=(\d+)", name)):
      if steps % k:
        notes.append(
          f"note: {name} records every {k} steps but a round has {steps}; use --steps "
          f"{k} (or a multiple) for its average cost."
        )
  return notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_timing_args(parser)
  parser.add_argument(
    "--tree",
    choices=("resnet50", "transformer"),
    default="resnet50",
    help="the parameter tree: ResNet-50's shapes, or a stacked 24-block transformer",
  )
  parser.add_argument(
    "--variant",
    action="append",
    dest="variants",
    metavar="NAME",
    help="a variant to time (repeat for several; the baseline, adam, always runs first); "
    f"'all' for every one; default: {'; '.join(DEFAULT_VARIANTS)}",
  )
  args = parser.parse_args(argv)
  check_timing_args(parser, args)
  known = list(variants())
  if args.variants is None or "all" in args.variants:
    chosen = list(DEFAULT_VARIANTS if args.variants is None else known)
  else:
    chosen = args.variants
    bad = [v for v in chosen if v not in known]
    if bad:
      parser.error(f"unknown variant {bad[0]!r}; known: {'; '.join(known)}")
  args.variants = ["adam", *(v for v in chosen if v != "adam")]
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  width_divisor = 4 if args.quick else 1
  facts = machine_facts()
  print_machine(facts)

  key_params, key_grads = jax.random.split(jax.random.key(args.seed))
  stack_axis = None
  if args.tree == "transformer":
    params, stack_axis = transformer_params(key_params, width_divisor), TRANSFORMER_STACK
  else:
    params = resnet50_params(key_params, width_divisor, QUICK_STAGES if args.quick else STAGES)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  grad_keys = jax.random.split(key_grads, len(leaves))
  grads = jax.tree_util.tree_unflatten(
    treedef,
    [1e-2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(grad_keys, leaves)],
  )
  n_params, n_leaves = tree_size(params)
  size = "ResNet-50" if args.tree == "resnet50" else "stacked transformer (24 blocks)"
  size += "" if width_divisor == 1 else f", widths / {width_divisor}"
  size += ", one block per stage" if args.quick and args.tree == "resnet50" else ""
  print(f"\n## Tree: {size}: {n_params:,} params in {n_leaves} leaves (float32)")
  print(
    f"Method: compile all, {args.warmup} warm-up steps each, then {args.rounds} rounds "
    f"alternating the variants, {args.steps} consecutive steps per variant per round.\n"
  )
  for note in period_notes(args.variants, args.steps):
    print(note)
  known = variants(stack_axis) if stack_axis is not None else variants()
  makers = {
    name: (lambda make=known[name]: optimizer_runner(make(), params, grads))
    for name in args.variants
    if name in known
  }
  setup = {
    "tree": args.tree,
    "width_divisor": width_divisor,
    "params": n_params,
    "leaves": n_leaves,
  }
  return run_all(makers, args, facts, setup)


if __name__ == "__main__":
  main()
