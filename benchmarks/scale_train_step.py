"""Whole-train-step cost of ``scale_normalize`` against ``optax.sgd``'s train step.

One jitted train step (forward, backward, update, params and state donated) on
two networks, batch 100, generated inputs:

1. the paper's MLP (Lo, Amaral & Ding): 784-100-100-100-10, ReLU;
2. a small CNN: conv 3x3x1x16, conv 3x3x16x32 (stride 2), Dense 6272 -> 10, ReLU, on
   28 x 28 x 1 images.

Variants: ``sgd(0.1)`` (baseline), and ``chain(sgd(0.1), scale_normalize(mode))``
with ``mode`` ``probe``, ``data`` (each layer's inputs sown in the forward pass
by a method interceptor, patches for the convs) and ``determinant`` with
``every_k_steps=10`` (and, for comparison, every step). Targets (issue 16):
probe at most 1.10x, data at most 1.15x, determinant every 10 steps at most 1.10x.
Same harness as the other benchmarks (``_harness.py``): compiled first, alternated
for ``--rounds`` rounds, medians and per-round ratios.

Run from the repository root::

  python3 benchmarks/scale_train_step.py            # 15 rounds x 10 steps
  python3 benchmarks/scale_train_step.py --quick    # 3 rounds
"""

from __future__ import annotations

import argparse
import warnings
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

import optax_depthnorm as odn

BATCH = 100
TARGETS = {"probe": 1.10, "data": 1.15, "determinant(every_k_steps=10)": 1.10}


class PaperMLP(nn.Module):
  """784 -> 100 -> 100 -> 100 -> 10, ReLU (Lo, Amaral & Ding)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for width in (100, 100, 100):
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(10)(x)


class SmallCNN(nn.Module):
  """Two 3x3 convs (16, 32 channels, the second with stride 2) and a Dense head."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2), padding="SAME")(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _sow_inputs(next_fun, args, kwargs, context):
  """Sows each Dense input, and each conv's input patches (channels first: (I, H, W))."""
  module = context.module
  if context.method_name == "__call__" and isinstance(module, nn.Dense):
    module.sow("layer_inputs", "inputs", args[0])
  elif context.method_name == "__call__" and isinstance(module, nn.Conv):
    strides = module.strides or 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    patches = jax.lax.conv_general_dilated_patches(
      args[0],
      module.kernel_size,
      strides,
      module.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    module.sow("layer_inputs", "inputs", patches)
  return next_fun(*args, **kwargs)


def _fan_in(path: tuple, leaf: Any) -> Any:
  """Conv HWIO kernels as (I H W, O), the order the patches come in; the layout otherwise."""
  return (2, 0, 1) if getattr(leaf, "ndim", 0) == 4 else ...


def variants() -> dict[str, Any]:
  """(optimizer, needs layer inputs) of each variant, baseline first."""
  make = lambda mode, **kw: optax.chain(
    optax.sgd(0.1), odn.scale_normalize(mode, fan_in_axes=_fan_in, **kw)
  )
  return {
    "sgd": (optax.sgd(0.1), False),
    "probe": (make("probe"), False),
    "data": (make("data"), True),
    "determinant(every_k_steps=10)": (make("determinant", every_k_steps=10), False),
    "determinant": (make("determinant"), False),
  }


def train_runner(model: nn.Module, tx: Any, sow: bool, x: jax.Array, y: jax.Array) -> Runner:
  """A runner of one forward + backward + update step of `model` on (x, y)."""
  params = model.init(jax.random.key(0), x[:1])["params"]  # unjitted: creation order

  def loss(params: Any) -> tuple[jax.Array, Any]:
    if not sow:
      return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, x), y
      ).mean(), {}
    with nn.intercept_methods(_sow_inputs):
      logits, cols = model.apply({"params": params}, x, mutable=["layer_inputs"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, jax.lax.stop_gradient(cols["layer_inputs"])

  def step(carry: tuple[Any, Any], x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
    del x, y  # closed over; passed so every runner has the same signature
    params, state = carry
    grads, inputs = jax.grad(loss, has_aux=True)(params)
    extra = {"layer_inputs": inputs} if sow else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  with warnings.catch_warnings():  # names that sort as they were created: only
    warnings.simplefilter("ignore", odn.DepthOrderWarning)  # stacked depths matter here
    state = tx.init(params)
  return Runner(step, (params, state), x, y)


def time_network(name: str, model: nn.Module, shape: tuple, args: argparse.Namespace, facts):
  kx, ky = jax.random.split(jax.random.key(args.seed))
  x = jax.random.normal(kx, (BATCH, *shape), jnp.float32)
  y = jax.random.randint(ky, (BATCH,), 0, 10)
  print(f"\n## Network: {name}, batch {BATCH}\n")
  makers = {
    v: (lambda tx=tx, sow=sow: train_runner(model, tx, sow, x, y))
    for v, (tx, sow) in variants().items()
  }
  return measure(makers, args, facts)


def targets_table(networks: dict[str, dict[str, Any]]) -> str:
  names = list(networks)
  lines = [
    "| variant | target | " + " | ".join(f"{n}: per-round ratio to sgd" for n in names) + " |",
    "|---|---:|" + "---:|" * len(names),
  ]
  for i, row in enumerate(networks[names[0]]["results"]):
    target = TARGETS.get(row["variant"])
    cells = []
    for n in names:
      ratio = networks[n]["results"][i]["paired_ratio"]
      met = "" if target is None else (" (met)" if ratio <= target else " (missed)")
      cells.append(f"{ratio:.3f}x{met}")
    goal = "-" if target is None else f"<= {target:.2f}x"
    lines.append(f"| {row['variant']} | {goal} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_timing_args(parser)
  parser.set_defaults(steps=10)
  args = parser.parse_args(argv)
  check_timing_args(parser, args)
  facts = machine_facts()
  print_machine(facts)
  print(
    f"\nMethod: compile all, {args.warmup} warm-up steps each, then {args.rounds} rounds "
    f"alternating the variants, {args.steps} consecutive train steps per variant per round."
  )
  networks = {
    "MLP 784-100-100-100-10": time_network(
      "MLP 784-100-100-100-10", PaperMLP(), (784,), args, facts
    ),
    "small CNN": time_network("small CNN (28x28x1)", SmallCNN(), (28, 28, 1), args, facts),
  }
  print("\n## Targets\n")
  print(targets_table(networks))
  result = {
    "machine": facts,
    "config": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "batch": BATCH},
    "networks": networks,
  }
  return write_json(args, result)


if __name__ == "__main__":
  main()
