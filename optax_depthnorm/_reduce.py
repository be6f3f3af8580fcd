"""The one safe reduction: norms, sums and maxima of layers, free of overflow and underflow.

Every per-layer number in the library (a block norm, a BGN cotangent norm, a
flow statistic) is computed here. The sum of squares is accumulated in three
ranges, as LAPACK's ``xNRM2`` does (Blue's algorithm): squares of tiny entries
are scaled up, squares of huge ones scaled down, so a float32 gradient of
1e-30 or of 1e30 per entry has the right norm, in one read of the data. The
pieces of a layer (several leaves, slices of stacked leaves, shards) add up
range by range, so a layer's sums can be gathered with `jax.ops.segment_sum`
or `jax.lax.psum` and combined once.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_depthnorm import _tree


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


class Sums(NamedTuple):
  """Partial sums of one or more pieces of a layer; they add field by field.

  ``small``, ``medium`` and ``big`` are the sums of squares of the entries in
  Blue's three ranges (scaled), ``abs`` the sum of |x|, ``max`` the max |x|
  and ``size`` the number of entries.
  """

  small: jax.Array
  medium: jax.Array
  big: jax.Array
  abs: jax.Array
  max: jax.Array
  size: jax.Array


def sums(x: jax.Array, keep: tuple[int, ...] = (), *, dtype: Any = None) -> Sums:
  """`Sums` of `x` over every axis not in `keep` (kept axes keep their size, others 1).

  Args:
    x: a floating array.
    keep: axes not reduced (a stack axis, a batch axis); the outputs broadcast
      against `x`.
    dtype: the accumulation dtype (default: float32, or float64 for float64).

  Returns:
    `Sums` whose arrays have `x`'s rank, size 1 on every reduced axis.
  """
  dtype = dtype or _tree.acc_dtype(x.dtype)
  c = _blue(dtype)
  axes = tuple(a for a in range(x.ndim) if a not in keep)
  a = jnp.abs(x.astype(dtype))
  total = lambda v: jnp.sum(v, axis=axes, keepdims=True)
  is_small, is_big = a < c.tsml, a > c.tbig
  size = math.prod(x.shape[i] for i in axes)
  return Sums(
    total(jnp.where(is_small, jnp.square(a * c.ssml), 0)),
    total(jnp.where(is_small | is_big, 0, jnp.square(a))),  # NaN lands here, and shows
    total(jnp.where(is_big, jnp.square(a * c.sbig), 0)),
    total(a),
    jnp.max(a, axis=axes, keepdims=True, initial=0),
    jnp.full(np.shape(total(a)), size, dtype),
  )


def combine(parts: Sums, how: Any) -> Sums:
  """Adds `Sums` across pieces with `how` (``jnp.sum``-like for sums, max for ``max``).

  `how` is a pair ``(add, maximum)`` of reductions, e.g. a segment sum and a
  segment max, or ``psum`` and ``pmax``.
  """
  add, maximum = how
  return Sums(*(add(v) for v in parts[:4]), maximum(parts.max), add(parts.size))


def l2(parts: Sums) -> jax.Array:
  """The L2 norm from `Sums`: ``sqrt(sum x^2)`` without overflow or underflow."""
  c = _blue(parts.medium.dtype)
  small, medium, big = parts.small, parts.medium, parts.big
  from_big = jnp.sqrt(big + (medium * c.sbig) * c.sbig) / c.sbig
  lo, hi = jnp.sqrt(small) / c.ssml, jnp.sqrt(medium)
  lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
  mixed = hi * jnp.sqrt(1 + jnp.square(lo / jnp.where(hi > 0, hi, 1)))
  from_small = jnp.where(medium > 0, mixed, jnp.sqrt(small) / c.ssml)
  only_medium = jnp.sqrt(medium)
  return jnp.where(big > 0, from_big, jnp.where(small > 0, from_small, only_medium))


def norm(parts: Sums, kind: str = "l2") -> jax.Array:
  """The block norm `kind` (``"l2"``, ``"l1"``, ``"max"``, ``"rms"``) from `Sums`."""
  if kind == "l1":
    return parts.abs
  if kind == "max":
    return parts.max
  value = l2(parts)
  return value / jnp.sqrt(jnp.maximum(parts.size, 1)) if kind == "rms" else value


def vector_norm(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """The L2 norm of `x` over `axis` (all axes by default), reduced axes dropped."""
  axes = range(x.ndim) if axis is None else np.atleast_1d(axis) % max(x.ndim, 1)
  keep = tuple(a for a in range(x.ndim) if a not in set(int(a) for a in axes))
  out = l2(sums(x, keep))
  return jnp.reshape(out, [x.shape[a] for a in keep])
