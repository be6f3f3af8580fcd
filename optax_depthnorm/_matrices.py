"""Weight matrices for `scale_normalize`: fan-in axes, the matrix view, each mode's scale.

A weight is read as a ``(fan_in, fan_out)`` matrix (Flax kernels are
``(..., in, out)``, Equinox and PyTorch weights ``(out, in, ...)``), and its
scale ``c`` is measured on it: the mean ``||W^T x|| / ||x||`` over the layer's
inputs or over random probes (eq. 2-3), or the geometric mean of its nonzero
singular values (eq. 1). Lo, Amaral & Ding, "Scale normalization", 2016.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp

from optax_depthnorm import _reduce, _stack, _tree

AxesSpec = Union[None, int, Sequence[int]]
FanInAxes = Union[None, Mapping[str, AxesSpec], Callable[[str, Any], AxesSpec]]
NO_INPUTS_MSG = (
  "scale_normalize(mode='data') needs each layer's inputs: call "
  "`update(updates, state, params, layer_inputs=...)` with a pytree that holds, under each "
  "layer's path (e.g. {'Dense_0': x0, 'Dense_1': x1}), its inputs of shape (batch, fan_in); "
  "`help(odn.scale_normalize)` shows how a Flax model hands them over. mode='probe' needs "
  "no inputs."
)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- fan-in axes


def _normalize_axes(axes: AxesSpec, ndim: int, name: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not axes or any(_stack.as_index(a) is None or not -ndim <= a < ndim for a in axes):
    raise ValueError(
      f"fan_in_axes gave {axes!r} for the weight at {name!r} of rank {ndim}; give a non-empty "
      f"tuple of axes in [-{ndim}, {ndim})."
    )
  axes = tuple(int(a) % ndim for a in axes)
  if len(set(axes)) != len(axes):
    raise ValueError(f"fan_in_axes gave repeated axes {axes!r} for the weight at {name!r}.")
  return axes


def _default_axes(kernel_layout: str, ndim: int) -> tuple[int, ...]:
  """Flax: all axes but the last (Dense (in, out), conv HWIO); else all but the first."""
  return tuple(range(ndim - 1)) if kernel_layout == "flax" else tuple(range(1, ndim))


def fan_in(spec: FanInAxes, kernel_layout: str, name: str, layer: str, leaf: Any):
  """Fan-in axes of a weight matrix, or None for a leaf that is left alone."""
  if not _tree.is_float_leaf(leaf) or leaf.ndim < 2:
    return None
  if isinstance(spec, Mapping):
    axes = spec.get(name, spec.get(layer, ...))
  elif spec is not None:
    axes = spec(name, leaf)
  else:
    axes = ...
  if axes is ...:
    return _default_axes(kernel_layout, leaf.ndim)
  return None if axes is None else _normalize_axes(axes, leaf.ndim, name)


def check_mapping_keys(spec: FanInAxes, names: list[tuple[str, str]]) -> None:
  if not isinstance(spec, Mapping):
    return
  known = {n for pair in names for n in pair}
  unknown = [k for k in spec if k not in known]
  if unknown:
    raise ValueError(
      f"fan_in_axes names {unknown!r}, which are neither a leaf's path nor its layer's path "
      f"here (paths look like {sorted(known)[:4]})."
    )


def as_matrix(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """`x` as a (fan_in, fan_out) matrix: the fan-in axes (in their order) first."""
  rest = tuple(a for a in range(x.ndim) if a not in axes)
  fan_in = math.prod(x.shape[a] for a in axes)
  return jnp.transpose(x, axes + rest).reshape(fan_in, -1)


# ----------------------------------------------------------------------------- scales


def _rank_tol(m: jax.Array) -> float:
  """The rank tolerance of `numpy.linalg.matrix_rank`, relative to the largest singular value."""
  return max(m.shape) * float(jnp.finfo(m.dtype).eps)


def _svd_log_scale(r: jax.Array, rtol: float) -> jax.Array:
  """Mean log of the singular values above rtol sigma_max (-inf if there are none)."""
  s = jnp.linalg.svd(r, compute_uv=False)
  nonzero = s > jnp.max(s) * rtol
  count = jnp.sum(nonzero).astype(r.dtype)
  total = jnp.sum(jnp.where(nonzero, jnp.log(jnp.where(nonzero, s, 1)), 0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), -jnp.inf)


@jax.jit  # one dispatch when called eagerly; inlined under an outer jit
def determinant_scale(m: jax.Array) -> jax.Array:
  """Geometric mean of the nonzero singular values of `m`, taken in log space.

  "Nonzero" is numpy's `matrix_rank` convention: above max(m.shape) eps
  sigma_max. A QR factorization of `m` in its tall orientation gives an r x r
  factor R (r = min(m.shape)) with the singular values of `m`, and prod |diag
  R| = prod sigma_i, so log c = mean(log |diag R|). It is backward stable on
  `m` itself, unlike the Cholesky factor of the Gram matrix m^T m, which
  squares the condition number (in float32 it fails near cond 1e4, which a
  random square 1000 x 1000 Gaussian matrix exceeds). That route is taken
  where ||R||_F ||R^-1||_F, an upper bound of the condition number, proves
  every singular value nonzero; otherwise (rank-deficient, nearly so, or not
  finite) the singular values of R decide (`lax.cond`: one branch runs).
  Returns 0 for a zero matrix.
  """
  tall = m if m.shape[0] >= m.shape[1] else m.T
  r = jnp.linalg.qr(tall, mode="r")
  eye = jnp.eye(r.shape[0], dtype=r.dtype)
  inverse = jax.scipy.linalg.solve_triangular(r, eye, lower=False)
  rtol = _rank_tol(m)
  full_rank = _reduce.vector_norm(r) * _reduce.vector_norm(inverse) * rtol < 1  # False for inf, NaN
  diag = jnp.abs(jnp.diagonal(r))
  qr_log = jnp.mean(jnp.log(jnp.where(full_rank, diag, 1)))
  return jnp.exp(jax.lax.cond(full_rank, lambda: qr_log, lambda: _svd_log_scale(r, rtol)))


@jax.jit
def mean_scale(m: jax.Array, x: jax.Array) -> jax.Array:
  """Mean over the rows x_b of `x` of ||m^T x_b|| / ||x_b|| (eq. 2-3).

  Rows of norm zero carry no direction and are left out of the mean; if all
  are zero the scale is 0 (so the matrix is left alone). The ratio does not
  change when `m` or a row is multiplied by a number, so both are first brought
  to a largest entry in [1, 2) by a power of two (exact): the product cannot
  overflow, for inputs and weights up to float32's largest.
  """
  m, m_scale = _unit_pow2(m, axis=None)
  x, _ = _unit_pow2(x, axis=-1)
  # Both scaled: no square overflows, and an output row small enough to lose digits to
  # underflow (below 1e-19 of its input's norm) changes the mean by less than that.
  out_norms = _reduce.vector_norm(jnp.matmul(x, m, precision=_HIGHEST), axis=-1, bounded=True)
  in_norms = _reduce.vector_norm(x, axis=-1, bounded=True)
  ratios = _tree.safe_ratio(out_norms, in_norms, 0)
  mean = jnp.sum(ratios) / jnp.maximum(jnp.sum(in_norms > 0), 1).astype(ratios.dtype)
  return mean * m_scale


def _unit_pow2(x: jax.Array, axis: int | None) -> tuple[jax.Array, jax.Array]:
  """`x` divided by 2^e, its largest |entry| (over `axis`) in [1, 2), and 2^e (1 for zeros)."""
  top = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None, initial=0)
  _, exponent = jnp.frexp(jnp.where((top > 0) & jnp.isfinite(top), top, 1))
  # Two exact multiplies by 2^(k/2): one factor 2^(1-e) is subnormal (flushed to 0) for
  # e = 128; the halves are normal over the whole range. Not ldexp on `x`: elementwise,
  # it is much slower on XLA:CPU (ldexp is used on the per-row exponents only).
  shift = 1 - exponent
  half, one = shift // 2, jnp.ones_like(top)
  unit = x * jnp.ldexp(one, half) * jnp.ldexp(one, shift - half)
  scale = jnp.ldexp(one, exponent - 1)
  return unit, jnp.squeeze(scale) if axis is None else scale


# ----------------------------------------------------------------------------- probes


def probes(key: jax.Array, specs: Sequence[tuple[str, tuple[int, ...], Any]]) -> list[jax.Array]:
  """Gaussian probes for each (path, shape, dtype): ``normal(fold_in(key, crc32(path)), shape)``.

  Keyed by the weight's path, so they are the same under `masked`, NNX and
  pure trees. Drawn in a few batched calls instead of one per weight (a
  threefry draw is a loop of many small kernels on a CPU): weights whose probe
  counts round up to the same power of two share one vmapped draw, each then
  taking the first entries of its row (with JAX's default partitionable
  threefry the values do not depend on the length drawn).
  """
  groups: dict[tuple, list[int]] = {}
  for i, (_, shape, dtype) in enumerate(specs):
    size = math.prod(shape)
    groups.setdefault((jnp.dtype(dtype), 1 << max(size - 1, 0).bit_length()), []).append(i)
  out: list[Any] = [None] * len(specs)
  for (dtype, length), members in groups.items():
    tags = jnp.asarray([zlib.crc32(specs[i][0].encode()) & 0x7FFFFFFF for i in members])
    draw = lambda tag, n=length, t=dtype: jax.random.normal(jax.random.fold_in(key, tag), (n,), t)
    rows = jax.vmap(draw)(tags)
    for row, i in zip(rows, members):
      shape = specs[i][1]
      out[i] = jnp.reshape(row[: math.prod(shape)], shape)
  return out


# ----------------------------------------------------------------------------- layer inputs


def flat_inputs(layer_inputs: Any) -> list[tuple[str, Any]]:
  if layer_inputs is None:
    raise ValueError(NO_INPUTS_MSG)
  leaves = jax.tree_util.tree_flatten_with_path(layer_inputs)[0]
  return [(_tree.path_name(p), x) for p, x in leaves]


def _under(path: str, prefix: str) -> bool:
  return path == prefix or path.startswith(prefix + "/")


def inputs_for(
  inputs: list, name: str, layer: str, fan_in: int, dtype: Any, stack: int | None = None
) -> jax.Array:
  """All arrays at or under the weight's path, else its layer's, as (-1, fan_in) rows.

  For a weight that stacks `stack` layers, each array has a leading axis of that
  size (as `sow` inside `nn.scan` stores them) and the rows are (stack, -1, fan_in).
  """
  found = [x for n, x in inputs if _under(n, name)] or [x for n, x in inputs if _under(n, layer)]
  if not found:
    raise ValueError(
      f"scale_normalize(mode='data') has no inputs for the weight at {name!r}: put its "
      f"layer's inputs, shape (..., {fan_in}), at {layer!r} or {name!r} in `layer_inputs` "
      f"(it has {[n for n, _ in inputs][:6]})."
    )
  for x in found:
    if stack is not None and (jnp.ndim(x) < 2 or jnp.shape(x)[0] != stack):
      raise ValueError(
        f"layer inputs for the stacked weight at {name!r} ({stack} layers) have shape "
        f"{jnp.shape(x)}; give them a leading axis of {stack}, one entry per layer "
        "(`sow` inside `nn.scan` stacks them so)."
      )
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != fan_in:
      raise ValueError(
        f"layer inputs for the weight at {name!r} have shape {jnp.shape(x)}, but the weight "
        f"has fan_in {fan_in}: the last axis must hold the fan-in (conv kernels: patches "
        "flattened in the order of the fan-in axes); if the fan-in axes are wrong, set "
        "`kernel_layout` or `fan_in_axes`."
      )
  if stack is not None:
    return jnp.concatenate([jnp.reshape(x, (stack, -1, fan_in)).astype(dtype) for x in found], 1)
  return jnp.concatenate([jnp.reshape(x, (-1, fan_in)).astype(dtype) for x in found])
