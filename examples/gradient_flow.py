"""Gradient flow of a deep sigmoid MLP: plain, with BGN, and with layerwise_normalize.

Renders the vanishing-gradient report's picture (mean and max |gradient| per
layer, log scale) for the same deep sigmoid MLP three ways: plain SGD, BGN
before every sigmoid (Cabana & Lago-Fernández) with SGD, and
`layerwise_normalize` before SGD (Kwiatkowski & Chang):

  top row     at init: weight gradients per layer; pre-activation gradients
              ||delta^(K)|| per layer (Cabana & Lago-Fernández, fig. 1); weight
              gradients after training (their fig. 2), as `track_gradient_flow`
              kept them.
  bottom row  per-layer gradient norm over the training steps, one heat map per run.

Data: two interleaved spirals in 2-D (1024 points, synthetic, no download).
Run ``python3 examples/gradient_flow.py --out docs/gradient_flow.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import optax_depthnorm as odn
from optax_depthnorm.demo import two_spirals


class MLP(nn.Module):
  """`depth` sigmoid Dense layers of `width` units (BGN before each sigmoid if `bgn`)."""

  depth: int = 32
  width: int = 64
  bgn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    activation = odn.with_bgn(nn.sigmoid) if self.bgn else nn.sigmoid
    for _ in range(self.depth):
      x = activation(nn.Dense(self.width)(x))
    return nn.Dense(2)(x)


def machine() -> str:
  """A one-line description of the machine this ran on."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  device = jax.devices()[0]
  return (
    f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}; "
    f"python {platform.python_version()}, jax {jax.__version__} on {device.platform} "
    f"({device.device_kind})"
  )


def _xent(model: nn.Module, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model: nn.Module, tx: optax.GradientTransformation, params: Any, x, y, steps: int):
  """Full-batch training in one jitted `lax.scan`, the flow tracked at every step.

  `tx` must hold a `track_gradient_flow`; the scan stacks the `FlowReport` it
  keeps at each step into a (steps, layers) history.
  """
  grad_fn = jax.value_and_grad(lambda p: _xent(model, p, x, y))

  def step(carry, _):
    params, state = carry
    loss, grads = grad_fn(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), (loss, odn.flow_from_state(state, params))

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps))
  (params, state), (losses, history) = run(params)
  return params, state, losses, history


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains the three runs, prints a summary and saves the figure to ``--out``."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=32, help="number of sigmoid layers")
  parser.add_argument("--width", type=int, default=64, help="units per hidden layer")
  parser.add_argument("--steps", type=int, default=300, help="full-batch SGD steps")
  parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="docs/gradient_flow.png", help="where to save the PNG")
  args = parser.parse_args(argv)
  print(f"machine: {machine()}")
  print(
    f"{args.depth}-layer sigmoid MLP, width {args.width}; synthetic two spirals (1024 points); "
    f"{args.steps} full-batch steps of SGD(lr={args.lr}, momentum=0.9)"
  )
  start = time.perf_counter()
  x, y = two_spirals(seed=args.seed)
  plain, with_bgn = MLP(args.depth, args.width), MLP(args.depth, args.width, bgn=True)
  params = jax.jit(plain.init)(jax.random.key(args.seed), x[:1])["params"]  # shared by all runs
  sgd = lambda: optax.sgd(args.lr, momentum=0.9)
  track = lambda: odn.track_gradient_flow(stats=("norm", "mean_abs", "max_abs"))  # plotted below
  runs = {
    "plain": (plain, optax.chain(track(), sgd())),
    "BGN": (with_bgn, optax.chain(track(), sgd())),
    "layerwise_normalize": (
      plain,
      optax.chain(track(), odn.layerwise_normalize(), sgd()),
    ),
  }

  # At init: weight gradients (the layerwise_normalize run: the update it hands to SGD).
  init_grads = {
    name: jax.jit(jax.grad(lambda p, m=model: _xent(m, p, x, y)))(params)
    for name, model in [("plain", plain), ("BGN", with_bgn)]
  }
  normalize = odn.layerwise_normalize()
  normalized, _ = jax.jit(normalize.update)(init_grads["plain"], normalize.init(params))
  flow = jax.jit(odn.gradient_flow)
  at_init = {
    "plain": flow(init_grads["plain"], params),
    "BGN": flow(init_grads["BGN"], params),
    "layerwise_normalize (update)": flow(normalized, params),
  }
  xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  deltas = {  # Cabana & Lago-Fernández's ||delta^(K)||: no change to the model needed
    name: jax.jit(lambda p, m=model: odn.activation_gradient_norms(m, p, x, loss_fn=xent))(
      {"params": params}
    )
    for name, model in [("plain", plain), ("BGN", with_bgn)]
  }
  for name, report in at_init.items():
    flags = odn.diagnose(report)
    kinds = ", ".join(sorted({f.kind for f in flags}))
    line = f"at init, {name}: diagnose flags {len(flags)} of {len(report.depths)} layers {kinds}"
    print(line.rstrip())

  results, after, histories = {}, {}, {}
  print(f"\n{'run':22s} {'loss at init':>12s} {'final loss':>10s} {'accuracy':>9s}")
  for name, (model, tx) in runs.items():
    final_params, state, losses, history = train(model, tx, params, x, y, args.steps)
    accuracy = float(jnp.mean(jnp.argmax(model.apply({"params": final_params}, x), -1) == y))
    results[name] = {"loss": float(losses[-1]), "accuracy": accuracy}
    after[name] = odn.flow_from_state(state, params)
    histories[name] = history
    print(f"{name:22s} {float(losses[0]):12.4f} {float(losses[-1]):10.4f} {accuracy:9.3f}")
  print("(a coin flip: loss 0.6931, accuracy about 0.5)")

  figure = render(at_init, deltas, after, histories, args)
  figure.savefig(args.out, dpi=110)
  print(f"\nsaved {args.out} in {time.perf_counter() - start:.1f} s")
  return {"results": results, "at_init": at_init, "deltas": deltas, "figure": figure}


def render(at_init, deltas, after, histories, args) -> Any:
  """The 2 x 3 figure: three line plots on top, three heat maps below."""
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(2, 3, figsize=(17, 9), layout="constrained")
  odn.plot_gradient_flow(at_init, ax=axes[0, 0], title="at init: weight gradients")
  odn.plot_gradient_flow(
    deltas,
    ax=axes[0, 1],
    stats=("norm",),
    title="at init: pre-activation gradients ||δ(K)||",
  )
  odn.plot_gradient_flow(after, ax=axes[0, 2], title=f"after {args.steps} steps: weight gradients")
  logs = [np.log10(np.asarray(h.norm)[np.asarray(h.norm) > 0]) for h in histories.values()]
  low, high = min(v.min() for v in logs), max(v.max() for v in logs)  # one colour scale
  for ax, (name, history) in zip(axes[1], histories.items()):
    title = f"{name}: ||gradient|| per layer over training"
    odn.plot_flow_heatmap(history, ax=ax, title=title, vmin=low, vmax=high)
  figure.suptitle(
    f"Gradient flow of a {args.depth}-layer sigmoid MLP (width {args.width}) on synthetic "
    f"two spirals; SGD lr={args.lr}, momentum 0.9"
  )
  return figure


if __name__ == "__main__":
  main()
