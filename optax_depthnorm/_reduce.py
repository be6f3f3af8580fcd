"""The one safe reduction: norms, sums and maxima of layers, free of overflow and underflow.

Every per-layer number in the library (a block norm, a BGN cotangent norm, a
flow statistic) is computed here. The common case costs one read of the data:
a plain float32 sum of squares (beside the sum and max of |x|), gathered into
layers. Only where some layer's sum of squares is out of float32's safe range
(it overflowed, or it is so small that squares underflowed: a vanished gradient
of 1e-25) is it recomputed, under one `jax.lax.cond` for the whole tree, in
three ranges as LAPACK's ``xNRM2`` does (Blue's algorithm): squares of tiny
entries scaled up, squares of huge ones scaled down. So a float32 gradient of
1e-30 or of 1e30 per entry has the right norm, and a normal step pays nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_depthnorm import _tree

Gather = Callable[[Sequence[jax.Array]], Any]  # per-leaf arrays -> per-layer values


class Sums(NamedTuple):
  """Plain sums of one or more pieces of a layer; they add field by field.

  ``sq`` is the sum of squares, ``abs`` the sum of |x|, ``max`` the max |x|
  and ``size`` the number of entries.
  """

  sq: jax.Array
  abs: jax.Array
  max: jax.Array
  size: jax.Array


def _axes(x: jax.Array, keep: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(a for a in range(x.ndim) if a not in keep)


def sums(x: jax.Array, keep: tuple[int, ...] = ()) -> Sums:
  """`Sums` of `x` over every axis not in `keep` (kept axes keep their size, others 1).

  Computed in float32 (float64 for float64 `x`); the outputs broadcast
  against `x`. Unused fields cost nothing (XLA drops them).
  """
  axes = _axes(x, keep)
  total = lambda v: jnp.sum(v, axis=axes, keepdims=True)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):  # by the moduli: |x|^2 = re^2 + im^2
    real = _tree.acc_dtype(x.dtype)
    re, im = jnp.real(x).astype(real), jnp.imag(x).astype(real)
    modulus = jnp.abs(x).astype(real)
    sq, total_abs = total(jnp.square(re)) + total(jnp.square(im)), total(modulus)
    top = jnp.max(modulus, axis=axes, keepdims=True, initial=0)
  else:
    x = x.astype(_tree.acc_dtype(x.dtype))
    # Separate plain reductions of `x`, each a kernel XLA:CPU hands to its fast
    # reduction library; a |x| shared by two of them would be written out whole.
    sq, total_abs = total(jnp.square(x)), total(jnp.abs(x))
    top = jnp.maximum(
      jnp.max(x, axis=axes, keepdims=True, initial=0),
      -jnp.min(x, axis=axes, keepdims=True, initial=0),
    )
  size = math.prod(x.shape[i] for i in axes)
  return Sums(sq, total_abs, top, jnp.full_like(sq, size))


class _Blue(NamedTuple):
  tsml: float  # below: the "small" range, squares scaled up by ssml^2
  tbig: float  # above: the "big" range, squares scaled down by sbig^2
  ssml: float
  sbig: float


def _blue(dtype: Any) -> _Blue:
  """Blue's constants for `dtype` (Anderson, LAPACK Working Note 292, eq. 3)."""
  info = np.finfo(dtype)
  emin, emax, digits = int(info.minexp) + 1, int(info.maxexp), int(info.nmant) + 1
  return _Blue(
    2.0 ** math.ceil((emin - 1) / 2),
    2.0 ** math.floor((emax - digits + 1) / 2),
    2.0 ** -math.floor((emin - digits) / 2),
    2.0 ** -math.ceil((emax + digits - 1) / 2),
  )


def _ranges(x: jax.Array, keep: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Blue's three scaled sums of squares of `x` (small, medium, big), per kept slice."""
  a = jnp.abs(x).astype(_tree.acc_dtype(x.dtype))  # a complex x by its moduli
  c = _blue(a.dtype)
  total = lambda v: jnp.sum(v, axis=_axes(x, keep), keepdims=True)
  is_small, is_big = a < c.tsml, a > c.tbig
  # The barrier keeps XLA from rewriting (a c)^2 as a^2 c^2, which under- or
  # overflows exactly where the scaling is needed (seen on 1-element leaves).
  up, down = jax.lax.optimization_barrier((a * c.ssml, a * c.sbig))
  return (
    total(jnp.where(is_small, jnp.square(up), 0)),
    total(jnp.where(is_small | is_big, 0, jnp.square(a))),  # NaN lands here, and shows
    total(jnp.where(is_big, jnp.square(down), 0)),
  )


def _blue_l2(small: jax.Array, medium: jax.Array, big: jax.Array) -> jax.Array:
  """The L2 norm from Blue's three sums, as LAPACK's ``xNRM2`` combines them."""
  c = _blue(medium.dtype)
  # a barrier again: folded to one constant, sbig * sbig underflows to 0
  from_big = jnp.sqrt(big + jax.lax.optimization_barrier(medium * c.sbig) * c.sbig) / c.sbig
  lo, hi = jnp.sqrt(small) / c.ssml, jnp.sqrt(medium)
  lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
  mixed = hi * jnp.sqrt(1 + jnp.square(lo / jnp.where(hi > 0, hi, 1)))
  from_small = jnp.where(medium > 0, mixed, jnp.sqrt(small) / c.ssml)
  return jnp.where(big > 0, from_big, jnp.where(small > 0, from_small, jnp.sqrt(medium)))


def _in_range(totals: Sums, active: Any, exact_zero: bool) -> jax.Array:
  """Whether every active layer's plain sum of squares is exact enough.

  A sum of squares of at least sqrt(tiny) loses at most n * tiny to squares
  that underflowed, far below its rounding error. With `exact_zero` a layer
  whose max |x| is 0 is exact too (it costs the max; without, a zero layer
  takes the careful path, which gives 0 as well).
  """
  lowest = float(np.sqrt(np.finfo(totals.sq.dtype).tiny))
  ok = (totals.sq >= lowest) & (totals.sq < jnp.inf)
  if exact_zero:
    ok = ok | (totals.max == 0)
  skip = totals.size == 0 if active is None else ~jnp.asarray(active) | (totals.size == 0)
  return jnp.all(ok | skip)


def l2(
  xs: Sequence[jax.Array],
  keeps: Sequence[tuple[int, ...]],
  add: Gather,
  totals: Sums,
  active: Any = None,
  exact_zero: bool = False,
) -> jax.Array:
  """The L2 norm of each layer, safe over float32's whole range.

  Args:
    xs: the leaves.
    keeps: the axes of each leaf that are not reduced (stack axes), see `sums`.
    add: gathers per-leaf sums into per-layer sums (`sum` over pieces).
    totals: the plain `Sums` already gathered per layer.
    active: which layers count for the range check (default: non-empty ones).
    exact_zero: also read ``totals.max`` so that a zero layer keeps the fast path.

  Returns:
    ``sqrt(totals.sq)`` when every active layer's sum of squares is in range,
    else the norms recomputed from Blue's three ranges (one `jax.lax.cond`).
  """
  careful = lambda: l2_ranges(xs, keeps, add)
  ok = _in_range(totals, active, exact_zero)
  return jax.lax.cond(ok, lambda: jnp.sqrt(totals.sq), careful)


def l2_ranges(xs: Sequence[jax.Array], keeps: Sequence[tuple[int, ...]], add: Gather):
  """The L2 norm of each layer from Blue's three ranges, always (no fast path).

  For reductions whose `add` is a collective (``psum`` over a mapped axis),
  which does not go inside a `jax.lax.cond`.
  """
  parts = [_ranges(x, keep) for x, keep in zip(xs, keeps)]
  small, medium, big = (add([p[i] for p in parts]) for i in range(3))
  return _blue_l2(small, medium, big)


def norm(l2_norm: Any, totals: Sums, kind: str = "l2") -> jax.Array:
  """The block norm `kind` (``"l2"``, ``"l1"``, ``"max"``, ``"rms"``) of each layer."""
  if kind == "l1":
    return totals.abs
  if kind == "max":
    return totals.max
  if kind == "rms":
    return l2_norm / jnp.sqrt(jnp.maximum(totals.size, 1))
  return l2_norm


def vector_norm(
  x: jax.Array, axis: int | tuple[int, ...] | None = None, bounded: bool = False
) -> jax.Array:
  """The L2 norm of `x` over `axis` (all axes by default), reduced axes dropped.

  With `bounded` the caller guarantees that no square of `x` overflows and that
  a norm small enough to lose precision to underflowed squares does not matter
  (data brought to a largest entry in [1, 2) by a power of two, and products of
  such data): a plain sum of squares, no range check. A zero vector would
  otherwise take the careful path (zero rows are common: a black image border).
  """
  axes = (
    set(range(x.ndim)) if axis is None else {int(a) % max(x.ndim, 1) for a in np.atleast_1d(axis)}
  )
  keep = tuple(a for a in range(x.ndim) if a not in axes)
  totals = sums(x, keep)
  if bounded:
    return jnp.reshape(jnp.sqrt(totals.sq), [x.shape[a] for a in keep])
  out = l2([x], [keep], lambda vs: vs[0], totals)
  return jnp.reshape(out, [x.shape[a] for a in keep])
