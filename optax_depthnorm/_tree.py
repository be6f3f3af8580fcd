"""Paths, leaf tests and safe per-block norms shared by every transform.

Every transform in this library does three things to a pytree: flatten it with
its paths, compute one number per block of leaves (a norm, a depth factor), and
multiply the leaves by it. This module holds the pieces that do not depend on
how depths are assigned.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

NORMS = ("l2", "l1", "max", "rms")


def key_name(key: Any) -> str:
  """Returns the plain name of one `jax.tree_util` path key."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def is_index_key(key: Any) -> bool:
  """Whether a path key is an integer position (a list slot, an int dict key)."""
  if isinstance(key, jax.tree_util.SequenceKey):
    return True
  inner = getattr(key, "key", None)
  return isinstance(inner, int) and not isinstance(inner, bool)


def strip_value(path: Sequence[Any]) -> tuple[Any, ...]:
  """A path without the trailing ``.value`` key of a Flax NNX ``Variable``."""
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    return path[:-1]
  return path


def path_parts(path: Sequence[Any]) -> tuple[str, ...]:
  """Names of a path's keys, without the trailing ``value`` of an NNX Variable."""
  return tuple(key_name(k) for k in strip_value(path))


def path_name(path: Sequence[Any]) -> str:
  """A path as one ``'/'``-joined string (``'Dense_0/kernel'``), the key of depth tables."""
  return "/".join(path_parts(path))


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def flatten(tree: Any) -> tuple[list[tuple[tuple[Any, ...], Any]], Any]:
  """`tree_flatten_with_path` that keeps `optax.MaskedNode` as a leaf.

  `optax.masked` hides leaves behind `MaskedNode()`; keeping them as leaves keeps
  their paths, so the number of layers never depends on the mask.
  """
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)


def is_float_leaf(x: Any) -> bool:
  """Whether a leaf is a non-empty floating array (the only leaves we transform)."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    return False
  return math.prod(getattr(x, "shape", ())) > 0


def is_param_leaf(x: Any) -> bool:
  """A leaf that stands for a parameter: a float array, or one hidden by a mask."""
  return _is_masked(x) or is_float_leaf(x)


def acc_dtype(*dtypes: Any) -> Any:
  """The dtype norms are computed in: float32, or wider if a leaf is wider."""
  wide = [jnp.dtype(d) for d in dtypes if jnp.dtype(d).itemsize > 4]
  return max(wide, key=lambda d: d.itemsize) if wide else jnp.dtype(jnp.float32)


def check_norm(norm: str) -> None:
  """Raises a ValueError unless `norm` names a supported block norm."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


def block_norm(leaves: Sequence[jax.Array], norm: str = "l2") -> jax.Array:
  """The norm of several leaves taken together as one vector.

  Computed in float32 (or float64 if a leaf is float64), never in bf16/f16.

  Args:
    leaves: floating arrays of any shapes.
    norm: ``"l2"`` sqrt(sum x^2), ``"l1"`` sum |x|, ``"max"`` max |x|, or
      ``"rms"`` sqrt(mean x^2).

  Returns:
    A scalar in the accumulation dtype.
  """
  dtype = acc_dtype(*(x.dtype for x in leaves))
  xs = [x.astype(dtype) for x in leaves]
  if norm == "max":
    return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in xs])
  if norm == "l1":
    return sum(jnp.sum(jnp.abs(x)) for x in xs)
  total = sum(jnp.sum(jnp.square(x)) for x in xs)
  if norm == "rms":
    total = total / sum(x.size for x in xs)
  return jnp.sqrt(total)


def scale_leaf(x: jax.Array, factor: jax.Array) -> jax.Array:
  """``x * factor`` computed in float32 (or wider) and cast back to x's dtype."""
  dtype = acc_dtype(x.dtype)
  return (x.astype(dtype) * jnp.asarray(factor).astype(dtype)).astype(x.dtype)


def safe_ratio(numerator: jax.Array, norm: jax.Array, eps: Any) -> jax.Array:
  """``numerator / max(norm, eps)``, and 0 where that denominator is 0.

  Finite for a zero norm even when `eps` is 0 (e.g. 1e-8 cast to float16 by
  `optax.inject_hyperparams`); a NaN norm still gives NaN, so a NaN shows.
  """
  norm = jnp.asarray(norm)
  numerator = jnp.asarray(numerator).astype(norm.dtype)
  denom = jnp.maximum(norm, jnp.asarray(eps).astype(norm.dtype))
  if is_concrete_number(eps) and np.asarray(eps, norm.dtype) > 0:
    # denom >= eps > 0 needs no guard; unguarded, `norm` has a single use, so XLA
    # fuses its reduction, the max and the divide into one kernel per block
    # (the guard splits that in two: one more kernel per block, every step).
    return numerator / denom
  zero = denom == 0
  return jnp.where(zero, 0, numerator / jnp.where(zero, 1, denom))


def is_concrete_number(x: Any) -> bool:
  """A plain Python/NumPy number, which can be validated at construction.

  Traced values (as `optax.inject_hyperparams` passes them) and jax arrays are
  not checked, so validation never branches on a traced value.
  """
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- stacked leaves
#
# A leaf that holds L layers along one axis contributes one value per slice. The
# reductions below take every such piece in one vectorized pass: a per-slice
# reduction over the other axes, then one segment reduction that sums (or
# maxes) the pieces of each block. No Python loop runs over the slices.

Piece = tuple[jax.Array, Union[int, None], Any]  # (leaf, stack axis or None, block id(s))


def along(v: jax.Array, axis: int | None, ndim: int) -> jax.Array:
  """A per-slice vector shaped to broadcast along `axis` of a rank-`ndim` array."""
  if axis is None:
    return v
  shape = [1] * ndim
  shape[axis] = -1
  return jnp.reshape(v, shape)


def slice_reduce(x: jax.Array, axis: int | None, how: str, dtype: Any) -> jax.Array:
  """``sum x^2`` (``"sumsq"``), ``sum |x|`` or ``max |x|`` over every axis but `axis`."""
  x = x.astype(dtype)
  axes = tuple(a for a in range(x.ndim) if a != axis)
  if how == "sumsq":
    return jnp.sum(jnp.square(x), axis=axes)
  x = jnp.abs(x)
  return jnp.sum(x, axis=axes) if how == "sumabs" else jnp.max(x, axis=axes)


def segment_reduce(pieces: Sequence[Piece], n: int, how: str, dtype: Any) -> jax.Array:
  """`slice_reduce` of every piece, summed (maxed for ``"max"``) into `n` blocks.

  A piece is ``(x, axis, ids)``: a whole leaf (``axis`` None, ``ids`` one int)
  or a stacked leaf whose slice ``i`` joins block ``ids[i]``; an id of -1 (or
  >= n) joins no block.
  """
  values = [jnp.reshape(slice_reduce(x, axis, how, dtype), (-1,)) for x, axis, _ in pieces]
  ids = np.concatenate([np.reshape(np.asarray(i, np.int32), (-1,)) for _, _, i in pieces])
  ids = np.where((ids < 0) | (ids >= n), n, ids)
  flat = jnp.concatenate(values) if values else jnp.zeros((0,), dtype)
  if how == "max":
    return jnp.maximum(jax.ops.segment_max(flat, ids, n), 0)
  return jax.ops.segment_sum(flat, ids, n)


def segment_sizes(pieces: Sequence[Piece], n: int) -> np.ndarray:
  """Number of elements of each of the `n` blocks (static, from shapes)."""
  sizes = np.zeros(n + 1, np.int64)
  for x, axis, ids in pieces:
    per = math.prod(x.shape) // (x.shape[axis] if axis is not None else 1)
    flat = np.reshape(np.asarray(ids), (-1,))
    np.add.at(sizes, np.where((flat < 0) | (flat >= n), n, flat), per)
  return sizes[:n]


def segment_norms(pieces: Sequence[Piece], n: int, norm: str = "l2") -> jax.Array:
  """The norm of each of `n` blocks made of whole leaves and slices of stacked leaves.

  The same norms as `block_norm` of each block's leaves, for all blocks at once.
  """
  dtype = acc_dtype(*(x.dtype for x, _, _ in pieces))
  if norm in ("max", "l1"):
    return segment_reduce(pieces, n, "max" if norm == "max" else "sumabs", dtype)
  total = segment_reduce(pieces, n, "sumsq", dtype)
  if norm == "rms":
    total = total / np.maximum(segment_sizes(pieces, n), 1).astype(dtype)
  return jnp.sqrt(total)


def block_values(values: jax.Array, ids: Any) -> jax.Array:
  """``values[ids]`` with 1 where an id is -1 (a slice outside every block)."""
  ids = np.asarray(ids)
  padded = jnp.concatenate([values, jnp.ones((1,), values.dtype)])
  return padded[np.where(ids < 0, values.shape[0], ids)]
