"""What makes a safe per-leaf norm cost on XLA:CPU: the fast path, a barrier, a range check.

Five minimal transforms, each ``x / max(||x||, 1e-8)`` per leaf before
``optax.adam(1e-3)``, on the ResNet-50-shaped tree of `transform_overhead.py`,
timed side by side with its harness (interleaved rounds, medians):

1. ``plain``: the float32 sum of squares only (unsafe: over- and underflows);
2. ``barrier``: the same, with every norm made to wait for every leaf's sum
   (``+ 0 * sum``), as any step-wide decision does;
3. ``leaf_cond``: a `jax.lax.cond` per leaf, Blue's three ranges where that
   leaf's sum of squares is out of range;
4. ``global_cond``: one `jax.lax.cond` for the tree (what `_reduce.l2` does);
5. ``max_first``: the block's max |x| first, then the sum of squares of x / max.

Run from the repository root::

  python3 benchmarks/norm_check_cost.py            # full size, 15 rounds
  python3 benchmarks/norm_check_cost.py --quick    # smoke test
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transform_overhead

from optax_depthnorm import _reduce

LOWEST = float(np.sqrt(np.finfo(np.float32).tiny))


def _careful(x: jax.Array) -> jax.Array:
  return jnp.reshape(_reduce.l2_ranges([x], [()], lambda vs: vs[0]), ())


def _norms(kind: str, leaves: list[jax.Array]) -> list[jax.Array]:
  sq = [jnp.sum(jnp.square(x)) for x in leaves]
  fast = lambda: [jnp.sqrt(v) for v in sq]
  in_range = [(v >= LOWEST) & (v < jnp.inf) for v in sq]
  if kind == "barrier":
    wait = sum(sq) * 0
    return [jnp.sqrt(v) + wait for v in sq]
  if kind == "leaf_cond":
    return [
      jax.lax.cond(ok, lambda v=v: jnp.sqrt(v), lambda x=x: _careful(x))
      for ok, v, x in zip(in_range, sq, leaves)
    ]
  if kind == "global_cond":
    careful = lambda: [_careful(x) for x in leaves]
    return jax.lax.cond(jnp.all(jnp.stack(in_range)), fast, careful)
  if kind == "max_first":
    tops = [jnp.max(jnp.abs(x)) for x in leaves]
    tops = [jnp.where(m > 0, m, 1) for m in tops]
    return [jnp.sqrt(jnp.sum(jnp.square(x / m))) * m for x, m in zip(leaves, tops)]
  return fast()


def normalizer(kind: str) -> optax.GradientTransformation:
  """``x / max(||x||, 1e-8)`` per leaf, its norm computed the `kind` way."""

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    out = [x / jnp.maximum(n, 1e-8) for x, n in zip(leaves, _norms(kind, leaves))]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


KINDS = ("plain", "barrier", "leaf_cond", "global_cond", "max_first")


def variants() -> dict:
  out = {"adam": lambda: optax.adam(1e-3)}
  for kind in KINDS:
    out[kind] = lambda kind=kind: optax.chain(normalizer(kind), optax.adam(1e-3))
  return out


def main(argv: list[str] | None = None):
  original = transform_overhead.variants
  transform_overhead.variants = variants
  try:
    return transform_overhead.main(argv)
  finally:
    transform_overhead.variants = original


if __name__ == "__main__":
  main()
