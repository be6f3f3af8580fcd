"""Flax NNX adapters of optax_depthnorm: ``odn.nnx.BGN`` and ``activation_gradient_norms``.

The optax transforms work on NNX states as they are (``nnx.Optimizer`` passes
them through); this module holds the layers that live in the model and the
NNX form of `optax_depthnorm.activation_gradient_norms` (which calls it for an
``nnx.Module``).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import optax_depthnorm as odn
  >>> layer = odn.nnx.BGN()  # identity forward, gradient norm sqrt(d) backward
  >>> layer(jnp.ones((2, 3))).shape
  (2, 3)
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Callable, Hashable
from typing import Any

import jax
from flax import nnx

from optax_depthnorm import linen as _linen
from optax_depthnorm._bgn import bgn
from optax_depthnorm._report import FlowReport

__all__ = ("BGN", "activation_gradient_norms")

PRE_ACTIVATION_MODULES = tuple(
  getattr(nnx, name)
  for name in ("Linear", "LinearGeneral", "Conv", "ConvTranspose", "Einsum")
  if hasattr(nnx, name)
)


class BGN(nnx.Module):
  """Flax NNX layer: Backward Gradient Normalization (see `optax_depthnorm.bgn`).

  No parameters; identity forward; backward rescales the gradient to norm
  kappa (sqrt(d) by default). Put it before each activation.

  Args:
    kappa: gradient norm after BGN; ``None`` for sqrt(d).
    eps: norm floor.
    per_example: normalize each example alone.
    axis_name: mapped axis over which the batch is split.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_depthnorm as odn
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), odn.nnx.BGN(), nnx.relu)
    >>> model(jnp.ones((2, 3))).shape
    (2, 4)

  References:
    Cabana & Lago-Fernández 2021, eq. (4)-(5).
  """

  def __init__(
    self,
    kappa: float | None = None,
    *,
    eps: float = 1e-12,
    per_example: bool = False,
    axis_name: Hashable | None = None,
  ):
    self.kappa = kappa
    self.eps = eps
    self.per_example = per_example
    self.axis_name = axis_name

  def __call__(self, x: jax.Array) -> jax.Array:
    return bgn(x, self.kappa, eps=self.eps, per_example=self.per_example, axis_name=self.axis_name)


# ----------------------------------------------------------------------------- activations

_CALLS: contextvars.ContextVar[_linen._Calls | None] = contextvars.ContextVar(
  "optax_depthnorm_nnx_calls", default=None
)
_NAME = "_optax_depthnorm_call_name"  # set on the copy's selected modules only


@functools.cache
def _perturbed_class(cls: type) -> type:
  """A subclass of `cls` whose ``__call__`` passes its output through the active `_Calls`."""

  def call(self, *args, **kwargs):
    out = cls.__call__(self, *args, **kwargs)
    calls = _CALLS.get()
    return out if calls is None else calls(vars(self)[_NAME], out)

  namespace = {"__call__": call, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
  pytree = {"pytree": cls._pytree__is_pytree}  # as the class itself (registers the subclass)
  return types.new_class(cls.__name__, (cls,), pytree, lambda ns: ns.update(namespace))


def activation_gradient_norms(
  model: nnx.Module,
  *args: Any,
  loss_fn: Callable[[Any], jax.Array],
  modules: _linen.ModuleFilter = PRE_ACTIVATION_MODULES,
  **call_kwargs: Any,
) -> FlowReport:
  r"""Norms of the loss gradient with respect to each layer's pre-activation, NNX form.

  Cabana & Lago-Fernández's ``delta^(K)`` (eq. 6), the gradient with respect to
  the output ``z^(K)`` of layer K before its non-linearity,

  $$
  \delta^{(K)} = \frac{\partial L}{\partial z^{(K)}}
    = [W^{(K+1)T} \delta^{(K+1)}] \circ f'(z^{(K)}),
  $$

  for an ``nnx.Module``; `optax_depthnorm.activation_gradient_norms` calls this
  for one (see there for what is measured). The model is not changed: it is
  split once, and each pass runs a fresh copy (``nnx.merge(..., copy=True)``)
  whose selected modules alone get a cached subclass whose ``__call__`` adds a
  zero perturbation to the output; the loss is differentiated with respect to
  those perturbations. BatchNorm statistics, RNG counts and any other state
  the forward pass updates change on the copy only (so two calls see the same
  dropout mask). Works inside ``jax.jit`` and ``nnx.jit``.

  Args:
    model: a Flax NNX module; it holds its state (no variables argument).
    *args: the inputs, as for ``model(*args)``.
    loss_fn: maps what ``model(*args)`` returns to a scalar loss.
    modules: which calls to measure: NNX classes (default Linear,
      LinearGeneral, Conv, ConvTranspose, Einsum, subclasses included) or a
      callable ``(module) -> bool``, given the model's own submodules
      (``lambda m: m is model.head`` works).
    **call_kwargs: passed to ``model(*args, **call_kwargs)``.

  Returns:
    A `FlowReport`: one entry per selected call, in call order, named by the
    module's path in the model (``'layers/0'``, as in ``nnx.state``; the model
    itself is ``'<root>'``); a module called twice appears twice (``'head'``,
    ``'head[1]'``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_depthnorm as odn
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=rngs), nnx.tanh, nnx.Linear(8, 1, rngs=rngs))
    >>> x = jnp.ones((4, 3))
    >>> report = jax.jit(lambda x: odn.nnx.activation_gradient_norms(
    ...     model, x, loss_fn=jnp.sum))(x)
    >>> report.paths, report.sizes
    (('layers/0', 'layers/2'), (32, 4))
    >>> print(f"{float(report.norm[1]):.4f}")  # d sum / d out = 1 at 4 outputs
    2.0000

  References:
    Cabana & Lago-Fernández, "Backward Gradient Normalization in Deep Neural
    Networks", 2021, eq. (6)-(9) and sec. 3.1 (fig. 1, top).
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f"model must be a Flax NNX Module, got {type(model).__name__}; for a linen module call "
      "odn.activation_gradient_norms(model, variables, *inputs, loss_fn=...)."
    )
  select = _linen._module_filter(modules, "an NNX")
  names = {p: "/".join(map(str, p)) or "<root>" for p, m in nnx.iter_modules(model) if select(m)}
  graphdef, state = nnx.split(model)

  def loss(calls: _linen._Calls) -> jax.Array:
    copy = nnx.merge(graphdef, state, copy=True)  # new Variables: the model's are not touched
    for path, module in list(nnx.iter_modules(copy)):
      if path in names:
        object.__setattr__(module, _NAME, names[path])
        object.__setattr__(module, "__class__", _perturbed_class(type(module)))
    token = _CALLS.set(calls)
    try:
      return loss_fn(copy(*args, **call_kwargs))
    finally:
      _CALLS.reset(token)

  return _linen._perturbation_report(loss, modules, "`model(*args)`")
