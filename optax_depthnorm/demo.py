"""Demo: a deep sigmoid MLP with and without depth-aware gradient transforms.

Run ``python -m optax_depthnorm.demo`` (or ``optax-depthnorm-demo``). It trains
the same 10-layer sigmoid MLP on an embedded two-spirals data set with plain
SGD, with Kwiatkowski & Chang's rule (``depth_normalized`` + SGD), with block-normalized
gradients (``layerwise_normalize`` + SGD) and with Adam, and prints how much
smaller the first layer's gradient is than the last's at init (the vanishing
gradient) and the loss and accuracy each optimizer reaches.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_depthnorm as odn


class DeepMLP(nn.Module):
  """`depth` sigmoid Dense layers of `width` units and a linear 2-way head."""

  depth: int = 20
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(self.depth):
      x = nn.sigmoid(nn.Dense(self.width)(x))
    return nn.Dense(2)(x)


def two_spirals(n: int = 1024, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Two interleaved spirals in 2-D, labels 0/1: a small data set with no download."""
  rng = np.random.default_rng(seed)
  t = np.sqrt(rng.uniform(size=n)) * 3 * np.pi
  label = rng.integers(0, 2, size=n)
  sign = np.where(label == 1, 1.0, -1.0)
  x = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / (3 * np.pi)
  x = x + 0.02 * rng.normal(size=x.shape)
  return jnp.asarray(x, jnp.float32), jnp.asarray(label, jnp.int32)


def _loss(model: nn.Module, params, x, y):
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def train(
  model: nn.Module, tx: optax.GradientTransformation, steps: int, seed: int = 0
) -> dict[str, float]:
  """Full-batch training in one jitted `lax.scan`; returns the final metrics."""
  x, y = two_spirals()
  params = model.init(jax.random.key(seed), x[:1])["params"]
  grad_fn = jax.value_and_grad(lambda p: _loss(model, p, x, y), has_aux=True)

  def step(carry, _):
    params, state = carry
    (loss, _), grads = grad_fn(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=steps))((params, tx.init(params)))
  loss, logits = _loss(model, params, x, y)
  return {"loss": float(loss), "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y))}


def init_gradient_ratio(model: DeepMLP, seed: int = 0) -> float:
  """||grad of the first kernel|| / ||grad of the last kernel|| at init."""
  x, y = two_spirals()
  params = model.init(jax.random.key(seed), x[:1])["params"]
  grads = jax.grad(lambda p: _loss(model, p, x, y)[0])(params)
  first, last = grads["Dense_0"]["kernel"], grads[f"Dense_{model.depth}"]["kernel"]
  return float(jnp.linalg.norm(first) / jnp.linalg.norm(last))


def optimizers(lr: float) -> dict[str, Callable[[], optax.GradientTransformation]]:
  """The configurations the demo compares."""
  return {
    "sgd": lambda: optax.sgd(lr, momentum=0.9),
    "depth_normalized + sgd": lambda: optax.chain(
      odn.depth_normalized(0.5, decay="linear", normalize_depth=True),
      optax.sgd(lr, momentum=0.9),
    ),
    "layerwise_normalize + sgd": lambda: optax.chain(
      odn.layerwise_normalize(), optax.sgd(lr, momentum=0.9)
    ),
    "adam": lambda: optax.adam(lr),
  }


def main(argv: list[str] | None = None) -> None:
  """Trains every configuration and prints a comparison table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=10, help="number of sigmoid layers")
  parser.add_argument("--steps", type=int, default=800, help="full-batch training steps")
  parser.add_argument("--lr", type=float, default=0.01, help="learning rate of every optimizer")
  args = parser.parse_args(argv)
  model = DeepMLP(depth=args.depth)
  print(
    f"{args.depth}-layer sigmoid MLP, two spirals (1024 points), {args.steps} steps, lr={args.lr}"
  )
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  ratio = init_gradient_ratio(model)
  print(f"at init, ||grad first layer|| / ||grad last layer|| = {ratio:.2e}\n")
  print(f"{'optimizer':28s} {'loss':>8s} {'accuracy':>9s} {'time':>7s}")
  for name, make in optimizers(args.lr).items():
    start = time.perf_counter()
    m = train(model, make(), args.steps)
    took = time.perf_counter() - start
    print(f"{name:28s} {m['loss']:8.4f} {m['accuracy']:9.3f} {took:6.1f}s")
  print("\n(loss of a coin flip: 0.6931; chance accuracy: about 0.5)")


if __name__ == "__main__":
  main()
