"""Gradient flow of a deep MLP in TensorBoard, with tensorboardX.

Trains a 12-layer tanh MLP on two spirals (generated, no download) with the
tracker in the optimizer, ``optax.chain(odn.track_gradient_flow(...), optax.adam(lr))``,
and every `--log-every` steps writes the per-layer statistics as scalars
(``FlowReport.scalars()``: ``grad_flow/Dense_3/norm``, ...) and the loss, and
at the end the heat map of the recorded steps as an image
(``odn.flow_heatmap_image``). Needs the ``tensorboard`` extra
(``pip install 'optax_depthnorm[tensorboard,plot]'``); takes a few seconds on a CPU.

Run::

  python3 examples/tensorboard_flow.py --logdir runs/flow
  tensorboard --logdir runs/flow   # scalars: grad_flow/<layer>/<stat>; images: grad_flow
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import optax_depthnorm as odn
from optax_depthnorm.demo import two_spirals


class MLP(nn.Module):
  """`depth` tanh Dense layers of `width` units and a 2-way head."""

  depth: int = 12
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(self.depth):
      x = jnp.tanh(nn.Dense(self.width)(x))
    return nn.Dense(2)(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--logdir", type=Path, default=Path("runs/flow"), help="event files go here")
  parser.add_argument("--depth", type=int, default=12, help="hidden layers")
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--log-every", type=int, default=10, help="tracker's every_k_steps")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains and logs; returns the run's final loss, the layers and the event file's path."""
  from tensorboardX import SummaryWriter  # the `tensorboard` extra

  args = parse_args(argv)
  x, y = two_spirals(seed=args.seed)
  model = MLP(args.depth, args.width)
  params = model.init(jax.random.key(args.seed), x[:1])["params"]  # unjitted: creation order
  history = max(1, args.steps // args.log_every)
  tracker = odn.track_gradient_flow(
    history=history, every_k_steps=args.log_every, stats=("norm", "mean_abs", "max_abs")
  )
  tx = optax.chain(tracker, optax.adam(args.lr))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    # the latest recorded step, read inside jit: no extra host sync
    return optax.apply_updates(params, updates), state, loss, odn.flow_from_state(state)

  args.logdir.mkdir(parents=True, exist_ok=True)
  with SummaryWriter(logdir=str(args.logdir)) as writer:
    for t in range(args.steps):
      params, state, loss, flow = step(params, state)
      if t % args.log_every == 0:  # the steps the tracker recorded
        report = odn.flow_from_state(state, params)  # named from params (sizes too)
        for key, value in report.scalars(prefix="grad_flow").items():
          writer.add_scalar(key, value, t)
        writer.add_scalar("train/loss", float(loss), t)
        assert int(flow.step) == t
    image = odn.flow_heatmap_image(state, params=params, title="gradient norm per layer")
    writer.add_image("grad_flow", image, args.steps - 1, dataformats="HWC")
    files = sorted(Path(writer.logdir).glob("events.out.tfevents.*"))
  report = odn.flow_from_state(state, params)
  print(report)
  print(f"final loss {float(loss):.4f}; event file {files[-1]}")
  return {"loss": float(loss), "layers": report.paths, "event_file": files[-1]}


if __name__ == "__main__":
  main()
