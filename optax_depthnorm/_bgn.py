"""Backward Gradient Normalization: `bgn`, `with_bgn` and `default_kappa`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from typing import Any, Union

import jax
import jax.numpy as jnp

from optax_depthnorm import _checks, _reduce, _tree

Kappa = Union[None, float, jax.Array, Callable[[tuple[int, ...]], float]]
KAPPA_ACCEPTS = "None, a number, a scalar array or a callable of x.shape"
X_MSG = (
  "bgn: x must be a floating array (float16, bfloat16, float32, float64, or complex), got {got}."
)


def default_kappa(shape: tuple[int, ...]) -> float:
  """sqrt(d), d the size of a tensor of this shape without its leading batch axis."""
  size = math.prod(shape)
  return math.sqrt(size // shape[0] if shape and shape[0] else max(size, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bgn(x, kappa, eps, per_example, axis_name):
  del kappa, eps, per_example, axis_name
  return x


def _bgn_fwd(x, kappa, eps, per_example, axis_name):
  del per_example, axis_name
  return x, (kappa, eps)


def _bgn_bwd(per_example, axis_name, residuals, g):
  kappa, eps = residuals
  keep = (0,) if per_example and g.ndim else ()
  if axis_name is not None and not keep:  # a collective: Blue's ranges, no fast path
    norm = _reduce.l2_ranges([g], [keep], lambda vs: jax.lax.psum(vs[0], axis_name))
  else:
    norm = _reduce.l2([g], [keep], lambda vs: vs[0], _reduce.sums(g, keep))
  inverse = _tree.safe_ratio(1, norm, eps)
  return _tree.scale_leaf(g, inverse, kappa), None, None


_bgn.defvjp(_bgn_fwd, _bgn_bwd)


def _check_x(x: Any) -> None:
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    raise TypeError(X_MSG.format(got="None" if x is None else f"a {type(x).__name__}"))
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(X_MSG.format(got=_checks.describe(x)))


def _check_static(kappa: Kappa, eps: Any) -> None:
  """The eager checks of `bgn`'s numbers (a kappa callable is checked on its value)."""
  if kappa is not None and not callable(kappa):
    _checks.check("kappa", kappa, _checks.NON_NEGATIVE, KAPPA_ACCEPTS)
  _checks.check("eps", eps, _checks.EPS)


def _kappa_value(kappa: Kappa, shape: tuple[int, ...]) -> Any:
  """The kappa of a pre-activation of this shape: checked if static, else clipped to [0, inf)."""
  name = "kappa"
  if kappa is None:
    return default_kappa(shape)
  if callable(kappa):
    kappa, name = kappa(shape), f"kappa(x.shape) for shape {shape}"
  if _checks.check(name, kappa, _checks.NON_NEGATIVE, KAPPA_ACCEPTS):
    return kappa
  return _checks.bounded(name, kappa, _checks.NON_NEGATIVE)


def bgn(
  x: jax.Array,
  kappa: Kappa = None,
  *,
  eps: float = 1e-12,
  per_example: bool = False,
  axis_name: Hashable | None = None,
) -> jax.Array:
  r"""Identity forward; rescales the incoming gradient to norm kappa backward.

  $$
  \mathrm{BGN}_f(x) = x \quad (4), \qquad
  \mathrm{BGN}_b(g) = \kappa \, \frac{g}{\|g\|} \quad (5)
  $$

  with ``||g||`` the L2 norm over the whole tensor, batch included (the
  paper's reading), and ``kappa = sqrt(d)``, ``d`` the size of ``g`` without its
  leading batch axis. Placed before each activation, the gradient with respect
  to every pre-activation then has norm kappa (eq. 7-9), and each layer's weight
  gradient stays *parallel* to the plain one, scaled by a positive per-layer
  factor ``prod_{j >= K} 1/n_j`` (eq. 9-11): a per-layer learning rate that
  stops gradients from vanishing or exploding. Forward, ``x`` is returned as it
  is (no copy, no cost).

  The norm is computed in float32 (float64 for float64) and the result cast
  back to ``g``'s dtype. A zero ``g`` gives zero, never NaN; a NaN or Inf in
  ``g`` makes the result NaN (it is not hidden). ``kappa = 0`` gives a zero
  gradient (it stops the gradient, as `jax.lax.stop_gradient` would).

  Batches split over devices: with ``axis_name`` the squared norm is summed
  over that mapped axis (``shard_map``, ``pmap``), so each shard gets exactly
  its slice of the whole batch's cotangent. Under plain ``jit`` with sharded
  arrays the norm is global with no argument. Under ``vmap`` the backward rule
  is vmapped and each mapped example is normalized alone (and the default
  kappa sees one example: pass kappa); to keep the whole-batch norm, name the
  vmapped axis, ``jax.vmap(f, axis_name="batch")``, and pass
  ``axis_name="batch"``.

  ``per_example=True`` normalizes each example (each slice along axis 0) to
  norm kappa on its own, as some third-party versions do: every example then
  pushes a gradient of the same size, whereas the paper's whole-batch norm keeps
  the relative sizes of the examples' gradients.

  Args:
    x: the pre-activation, batch axis first: a real or complex floating
      array (else a TypeError). A complex cotangent's norm is of its moduli,
      ``sqrt(sum |g|^2)``, and the rescale keeps its phase.
    kappa: the gradient norm after BGN: ``None`` for ``sqrt(d)``, a
      non-negative finite number or scalar array, or a callable of ``x.shape``
      returning one. A static value out of range is a ValueError; a traced one
      is clipped into [0, inf) (a NaN stays NaN).
    eps: norms below eps are divided by eps instead: a non-negative finite
      number. One below the smallest normal float of the norm's dtype
      (1.2e-38 in float32), 0 included, acts as that smallest normal; a traced
      eps is clipped the same way.
    per_example: normalize each example alone instead of the whole batch.
    axis_name: a mapped axis (``shard_map``, ``pmap``, named ``vmap``) over
      which the batch is split; the norm is taken over all of it.

  Returns:
    ``x``, unchanged.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> x = jnp.ones((2, 8))
    >>> g = jax.grad(lambda x: jnp.sum(100.0 * odn.bgn(x)))(x)
    >>> print(f"{float(jnp.linalg.norm(g)):.4f}")  # kappa = sqrt(8)
    2.8284

  References:
    Cabana & Lago-Fernández, "Backward Gradient Normalization in Deep Neural
    Networks", 2021, sec. 2, eq. (4)-(11).
    https://arxiv.org/abs/2106.09475
  """
  _check_x(x)
  _checks.check("eps", eps, _checks.EPS)
  dtype = _tree.acc_dtype(x.dtype)  # the dtype of the norm and of the rescale
  kappa = jnp.asarray(_kappa_value(kappa, x.shape), dtype)
  return _bgn(x, kappa, jnp.asarray(_checks.floor_eps(eps, dtype), dtype), per_example, axis_name)


def with_bgn(activation: Callable[[jax.Array], jax.Array], **bgn_kwargs: Any) -> Callable:
  """Wraps an activation so that BGN runs right before it, as in the paper.

  Args:
    activation: any function of one array, e.g. ``nn.relu``.
    **bgn_kwargs: keyword arguments of `bgn` (``kappa``, ``eps``,
      ``per_example``, ``axis_name``).

  Returns:
    ``lambda x: activation(bgn(x, **bgn_kwargs))``, named after the activation.

  Example:
    >>> import flax.linen as nn
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> relu = odn.with_bgn(nn.relu)
    >>> print(relu(jnp.array([-1.0, 2.0])))
    [0. 2.]
    >>> relu.__name__
    'relu_bgn'

  References:
    Cabana & Lago-Fernández 2021, sec. 2.1: "a BGN layer just before
    every activation function".
  """

  _check_static(bgn_kwargs.get("kappa"), bgn_kwargs.get("eps", 0.0))

  @functools.wraps(activation)
  def wrapped(x: jax.Array) -> jax.Array:
    return activation(bgn(x, **bgn_kwargs))

  wrapped.__name__ = f"{getattr(activation, '__name__', 'activation')}_bgn"
  return wrapped
