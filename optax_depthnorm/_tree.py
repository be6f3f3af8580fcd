"""Paths, leaf tests, dtypes and the eps-safe ratio shared by every transform.

The layer map is in `_layers`, the one safe reduction in `_reduce`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


def is_weight_bias(node: Any) -> bool:
  """A ``(W, b)`` tuple, the JAX tutorials' layer: a matrix (or more) and a vector."""
  if type(node) is not tuple or len(node) != 2:
    return False
  w, b = (getattr(x, "ndim", None) for x in node)
  return w is not None and b is not None and w >= 2 and b == 1


def weight_bias_paths(tree: Any) -> set[tuple[str, ...]]:
  """Paths of the ``(W, b)`` tuples of `tree`: each is one layer, not two."""
  found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_weight_bias)[0]
  return {path_parts(p) for p, node in found if is_weight_bias(node)}


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def flatten(tree: Any) -> tuple[list[tuple[tuple[Any, ...], Any]], Any]:
  """`tree_flatten_with_path` that keeps `optax.MaskedNode` as a leaf.

  `optax.masked` hides leaves behind `MaskedNode()`; keeping them as leaves keeps
  their paths, so the number of layers never depends on the mask.
  """
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)


def is_float_leaf(x: Any) -> bool:
  """Whether a leaf is a non-empty real or complex floating array (the leaves we transform)."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    return False
  return math.prod(getattr(x, "shape", ())) > 0


def is_param_leaf(x: Any) -> bool:
  """A leaf that stands for a parameter: a float array, or one hidden by a mask."""
  return _is_masked(x) or is_float_leaf(x)


def real_dtype(dtype: Any) -> Any:
  """The real dtype of `dtype`'s entries: float32 for complex64, else `dtype` itself."""
  dtype = jnp.dtype(dtype)
  return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def acc_dtype(*dtypes: Any) -> Any:
  """The real dtype norms are computed in: float32, or wider if a leaf is wider.

  A complex leaf counts by its real parts (complex64 as float32, complex128
  as float64): norms and factors are real, of |x|.
  """
  wide = [real_dtype(d) for d in dtypes if real_dtype(d).itemsize > 4]
  return max(wide, key=lambda d: d.itemsize) if wide else jnp.dtype(jnp.float32)


def work_dtype(dtype: Any) -> Any:
  """The dtype a leaf is scaled in: `acc_dtype`, complex where the leaf is complex."""
  real = acc_dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.dtype(jnp.complex128 if real == jnp.float64 else jnp.complex64)
  return real


def check_norm(norm: str) -> None:
  """Raises a ValueError unless `norm` names a supported block norm."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


def scale_leaf(x: jax.Array, *factors: jax.Array) -> jax.Array:
  """``x * f1 * f2 ...`` in float32 (or wider), left to right, cast back to x's dtype.

  Multiplying by ``1 / ||x||`` first and by a target next keeps every
  intermediate in range where the product ``target / ||x||`` would underflow.
  The factors are real; a complex `x` keeps its phase.
  """
  real = acc_dtype(x.dtype)
  out = x.astype(work_dtype(x.dtype))
  for f in factors:
    out = out * jnp.asarray(f).astype(real)
  return cast_back(out, x.dtype)


def cast_back(x: jax.Array, dtype: Any) -> jax.Array:
  """`x` cast to `dtype`, a finite value beyond its range saturating at its largest.

  Float16 holds at most 65504 (bfloat16 a little under float32's largest): a
  finite float32 result above that would otherwise turn into Inf. An Inf or
  NaN in `x` stays one.
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating) or not jnp.issubdtype(dtype, jnp.floating):
    return x.astype(dtype)
  top = float(jnp.finfo(dtype).max)
  if top >= float(jnp.finfo(x.dtype).max):
    return x.astype(dtype)
  return jnp.where(jnp.isfinite(x), jnp.clip(x, -top, top), x).astype(dtype)


def safe_ratio(numerator: jax.Array, norm: jax.Array, eps: Any) -> jax.Array:
  """``numerator / max(norm, eps)``, and 0 where that denominator is 0.

  Finite for a zero norm even when `eps` is 0 (e.g. 1e-8 cast to float16 by
  `optax.inject_hyperparams`); a NaN norm still gives NaN, so a NaN shows.
  """
  norm = jnp.asarray(norm)
  numerator = jnp.asarray(numerator).astype(norm.dtype)
  denom = jnp.maximum(norm, jnp.asarray(eps).astype(norm.dtype))
  if is_concrete_number(eps) and np.asarray(eps, np.float64) >= jnp.finfo(norm.dtype).tiny:
    # denom >= eps > 0 needs no guard (a subnormal eps would: XLA flushes it to
    # zero, hence the smallest normal float); unguarded, `norm` has a single use, so XLA
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
