"""What makes a safe per-leaf norm cost on XLA:CPU: the fast path, a barrier, a range check.

Nine minimal transforms, each ``x / max(||x||, 1e-8)`` per leaf before
``optax.adam(1e-3)``, on the ResNet-50-shaped tree of `transform_overhead.py`,
timed side by side with its harness (interleaved rounds, medians):

1. ``plain``: the float32 sum of squares only (unsafe: over- and underflows);
2. ``barrier``: the same, with every norm made to wait for every leaf's sum
   (``+ 0 * sum``), as any step-wide decision does;
3. ``leaf_cond``: a `jax.lax.cond` per leaf, Blue's three ranges where that
   leaf's sum of squares is out of range;
4. ``global_cond``: one `jax.lax.cond` for the tree (what `_reduce.l2` does);
5. ``max_first``: the block's max |x| first, then the sum of squares of x / max;
6. ``sq_max``: the sum of squares and, beside it, max |x| (no check: the cost
   of one more plain reduction per leaf);
7. ``state_scale``: one sum of squares of x times a power of two kept in the
   state from the previous step (no check: the cost of a prescaled reduction);
8. ``group_cond``: one `jax.lax.cond` per 16 groups of consecutive leaves;
9. ``late_cond``: the fast normalized gradients computed first, one
   `jax.lax.cond` at the end choosing them or the careful ones.

Run from the repository root::

  python3 benchmarks/norm_check_cost.py            # full size, 15 rounds
  python3 benchmarks/norm_check_cost.py --quick    # smoke test
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transform_overhead

from optax_depthnorm import _reduce

LOWEST = float(np.sqrt(np.finfo(np.float32).tiny))


def _careful(x: jax.Array) -> jax.Array:
  return jnp.reshape(_reduce.l2_ranges([x], [()], lambda vs: vs[0]), ())


def _group_cond(leaves: list[jax.Array], sq: list, in_range: list, groups: int = 16) -> list:
  ends = np.cumsum([x.size for x in leaves])
  group = np.minimum((ends - 1) * groups // ends[-1], groups - 1)
  out = [None] * len(leaves)
  for g in range(groups):
    idx = [i for i in range(len(leaves)) if group[i] == g]
    if idx:
      fast = lambda idx=idx: [jnp.sqrt(sq[i]) for i in idx]
      careful = lambda idx=idx: [_careful(leaves[i]) for i in idx]
      ok = jnp.all(jnp.stack([in_range[i] for i in idx]))
      for i, n in zip(idx, jax.lax.cond(ok, fast, careful)):
        out[i] = n
  return out


def _norms(kind: str, leaves: list[jax.Array], exps: jax.Array | None = None) -> list[jax.Array]:
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
  if kind == "group_cond":
    return _group_cond(leaves, sq, in_range)
  if kind == "sq_max":
    tops = [jnp.max(jnp.abs(x)) for x in leaves]
    return [jnp.where(ok, jnp.sqrt(v), m) for ok, v, m in zip(in_range, sq, tops)]
  if kind == "state_scale":
    exps = jnp.zeros(len(leaves), jnp.int32) if exps is None else exps
    scales = [jnp.ldexp(jnp.float32(1), -e) for e in exps]
    return [jnp.sqrt(jnp.sum(jnp.square(x * c))) / c for x, c in zip(leaves, scales)]
  if kind == "max_first":
    tops = [jnp.max(jnp.abs(x)) for x in leaves]
    tops = [jnp.where(m > 0, m, 1) for m in tops]
    return [jnp.sqrt(jnp.sum(jnp.square(x / m))) * m for x, m in zip(leaves, tops)]
  return fast()


def normalizer(kind: str) -> optax.GradientTransformation:
  """``x / max(||x||, 1e-8)`` per leaf, its norm computed the `kind` way."""

  def init(params):
    return jnp.zeros(len(jax.tree.leaves(params)), jnp.int32)  # per-leaf exponents

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    norms = _norms(kind, leaves, state)
    out = [x / jnp.maximum(n, 1e-8) for x, n in zip(leaves, norms)]
    if kind == "late_cond":
      in_range = jnp.all(jnp.stack([(n >= LOWEST) & (n < jnp.inf) for n in norms]))
      careful = lambda: [x / jnp.maximum(_careful(x), 1e-8) for x in leaves]
      out = jax.lax.cond(in_range, lambda: out, careful)
    exps = jnp.stack([jnp.frexp(n)[1] for n in norms]).astype(jnp.int32)
    return jax.tree.unflatten(treedef, out), exps

  return optax.GradientTransformation(init, update)


KINDS = (
  "plain",
  "barrier",
  "leaf_cond",
  "global_cond",
  "max_first",
  "sq_max",
  "state_scale",
  "group_cond",
  "late_cond",
)


def variants() -> dict:
  out = {"adam": lambda: optax.adam(1e-3)}
  for kind in KINDS:
    out[kind] = lambda kind=kind: optax.chain(normalizer(kind), optax.adam(1e-3))
  return out


def main(argv: list[str] | None = None):
  original = transform_overhead.variants
  transform_overhead.variants = variants
  try:
    argv = list(sys.argv[1:] if argv is None else argv)
    return transform_overhead.main(argv if "--variant" in argv else [*argv, "--variant", "all"])
  finally:
    transform_overhead.variants = original


if __name__ == "__main__":
  main()
