"""Flax linen adapters of optax_depthnorm: the `BGN` layer and `activation_gradient_norms`.

Both are also exported at the top level (``odn.BGN``, ``odn.activation_gradient_norms``);
the optax transforms work on linen params as they are. ``activation_gradient_norms``
also takes an NNX model (see `optax_depthnorm.nnx.activation_gradient_norms`); the
machinery both share (recording the selected calls, the report) lives here.

Example:
  >>> import jax.numpy as jnp
  >>> import optax_depthnorm as odn
  >>> layer = odn.linen.BGN()  # identity forward, gradient norm sqrt(d) backward
  >>> layer.apply({}, jnp.ones((2, 3))).shape
  (2, 3)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_depthnorm import _layers, _report
from optax_depthnorm._bgn import bgn
from optax_depthnorm._report import FlowReport

__all__ = ("BGN", "activation_gradient_norms")

PRE_ACTIVATION_MODULES = (
  nn.Dense,
  nn.DenseGeneral,
  nn.Conv,
  nn.ConvTranspose,
  nn.ConvLocal,
  nn.Einsum,
)


# ----------------------------------------------------------------------------- layers


class BGN(nn.Module):
  """Flax linen layer: Backward Gradient Normalization (see `bgn`).

  No parameters; identity forward. Put it before each activation.

  Attributes:
    kappa: gradient norm after BGN; ``None`` for sqrt(d).
    eps: norm floor.
    per_example: normalize each example alone.
    axis_name: mapped axis over which the batch is split.

  Example:
    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> model = nn.Sequential([nn.Dense(4), odn.BGN(), nn.relu, nn.Dense(1)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> sorted(variables["params"])  # BGN holds no parameters
    ['layers_0', 'layers_3']

  References:
    Cabana & Lago-Fernández 2021, eq. (4)-(5).
  """

  kappa: float | None = None
  eps: float = 1e-12
  per_example: bool = False
  axis_name: Hashable | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return bgn(x, self.kappa, eps=self.eps, per_example=self.per_example, axis_name=self.axis_name)


# ----------------------------------------------------------------------------- activations

ModuleFilter = Union[type, tuple[type, ...], Callable[[Any], bool]]


def _module_filter(modules: ModuleFilter, kind: str = "a linen") -> Callable[[Any], bool]:
  """``module -> bool`` from classes or a callable; `kind` names the framework in the error."""
  if isinstance(modules, type) or (
    isinstance(modules, tuple) and modules and all(isinstance(m, type) for m in modules)
  ):
    return lambda module: isinstance(module, modules)
  if callable(modules):
    return modules
  raise TypeError(
    f"modules must be {kind} Module class, a tuple of them, or a callable "
    f"(module) -> bool; got {type(modules).__name__}."
  )


class _Calls:
  """The selected calls of one forward pass, in call order; each adds its perturbation.

  Called as ``calls(path, out)`` on the output of every selected call (linen's
  interceptor, NNX's swapped ``__call__``): names a repeated call ``path[1]``,
  ``path[2]``, ... and returns ``out + perturbations[i]``. With
  ``perturbations=None`` it adds nothing and appends the name and shape of each
  output to `record`.
  """

  def __init__(self, perturbations: list[jax.Array] | None, record: list[Any]):
    self.perturbations, self.record = perturbations, record
    self.count: dict[str, int] = defaultdict(int)
    self.position = 0

  def __call__(self, path: str, out: Any) -> Any:
    name = path if self.count[path] == 0 else f"{path}[{self.count[path]}]"
    self.count[path] += 1
    if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.inexact):
      raise TypeError(f"the output of {name!r} is not a floating array; exclude it via modules=.")
    i, self.position = self.position, self.position + 1
    if self.perturbations is None:
      self.record.append((name, jax.ShapeDtypeStruct(out.shape, out.dtype)))
      return out
    return out + self.perturbations[i]


def _perturbation_report(
  loss: Callable[[_Calls], jax.Array], modules: ModuleFilter, where: str
) -> FlowReport:
  """The `FlowReport` of ``d loss / d perturbation`` at every selected call.

  `loss` runs the model once, passing each selected output through the
  `_Calls` it is given. A first abstract pass (`jax.eval_shape`) records the
  calls, then `jax.grad` at zero perturbations measures them; `where` names
  the forward pass in the error when no selected module ran.
  """
  record: list[tuple[str, jax.ShapeDtypeStruct]] = []
  jax.eval_shape(lambda: loss(_Calls(None, record)))
  if not record:
    raise ValueError(
      f"no module selected by modules={modules!r} ran in {where}; pass the "
      "classes of the model's layers (or a callable) as modules=."
    )
  zeros = [jnp.zeros(s.shape, s.dtype) for _, s in record]
  grads = jax.grad(lambda p: loss(_Calls(p, [])))(zeros)
  dtype = _report._float_dtype(grads)
  found = [_layers.Leaf(i, name, np.zeros((), np.int32)) for i, (name, _) in enumerate(record)]
  stats = _report.stats(*_layers.layer_stats(grads, found, exact_zero=True))
  norm, mean_abs, max_abs, rms = (v.astype(dtype) for v in stats)
  paths = tuple(name for name, _ in record)
  sizes = tuple(math.prod(s.shape) for _, s in record)
  return FlowReport(
    paths, tuple(range(len(paths))), sizes, "pre-activation gradient", norm, mean_abs, max_abs, rms
  )


def _linen_loss(model, variables, args, apply_kwargs, loss_fn, select):
  """``calls -> loss``: `model.apply`, each selected output through `calls` (`_Calls`)."""

  def loss(calls: _Calls) -> jax.Array:
    def interceptor(next_fun, call_args, call_kwargs, context):
      out = next_fun(*call_args, **call_kwargs)
      if context.method_name != "__call__" or not select(context.module):
        return out
      return calls("/".join(context.module.path) or "<root>", out)

    with nn.intercept_methods(interceptor):
      return loss_fn(model.apply(variables, *args, **apply_kwargs))

  return loss


def activation_gradient_norms(
  model: nn.Module | nnx.Module,
  *args: Any,
  loss_fn: Callable[[Any], jax.Array],
  modules: ModuleFilter | None = None,
  **kwargs: Any,
) -> FlowReport:
  r"""Norms of the loss gradient with respect to each layer's pre-activation.

  Cabana & Lago-Fernández's ``delta^(K)``, the gradient with respect to the output ``z^(K)``
  of layer K before its non-linearity:

  $$
  \delta^{(K)} = \frac{\partial L}{\partial z^{(K)}}
    = [W^{(K+1)T} \delta^{(K+1)}] \circ f'(z^{(K)}) \quad (6)
  $$

  measured, with no change to the model, by adding a zero perturbation to the
  output of every `modules` call (Dense, Conv, ...: their output is the
  pre-activation) and differentiating the loss with respect to those
  perturbations; the model need not call ``perturb``. Linen: through
  ``flax.linen.intercept_methods``, called as
  ``activation_gradient_norms(model, variables, *args, ...)``. NNX: called as
  ``activation_gradient_norms(model, *args, ...)`` (the model holds its state),
  on a copy of the model (`optax_depthnorm.nnx.activation_gradient_norms`): the
  model itself, BatchNorm statistics and RNG counts included, is left as it was.

  The norm is over the whole tensor, batch included (the paper's; for a
  batch-mean loss it scales like 1/sqrt(batch)). A BGN layer after a Dense
  normalizes the gradient before it reaches the Dense output, so what is
  measured there is Cabana & Lago-Fernández's ``delta_BGN^(K)`` (norm kappa); a
  BatchNorm after a Dense is likewise above the measured point.

  Layers are the calls, in the order they run (depth 0 = the first call); for
  a feed-forward stack this equals `layer_depths`' labels of the weights. Each
  is named by its module's path (linen ``Dense_0``; NNX ``layers/0``, as in
  ``nnx.state``); a module called twice appears twice (``Dense_0``,
  ``Dense_0[1]``). Works inside `jit` (and ``nnx.jit``). Inside ``nn.scan`` or
  ``nnx.scan`` the scanned calls are summed into one entry.

  Args:
    model: a Flax linen module, or a Flax NNX module (``nnx.Module``).
    *args: linen: ``variables, *inputs``, the variables (``{"params": ...}``
      and other collections) and the inputs, as for
      ``model.apply(variables, *inputs)``. NNX: the inputs, as for
      ``model(*inputs)``.
    loss_fn: maps what the model returns to a scalar loss (close over the
      targets: ``lambda logits: xent(logits, y).mean()``).
    modules: which calls to measure: classes of the model's framework or a
      callable ``(module) -> bool``. ``None``: linen Dense, DenseGeneral,
      Conv, ConvTranspose, ConvLocal, Einsum; NNX Linear, LinearGeneral, Conv,
      ConvTranspose, Einsum (subclasses included).
    **kwargs: linen: passed to ``model.apply`` (``rngs=``, ``mutable=``, model
      flags such as ``train=``); NNX: passed to ``model(...)``.

  Returns:
    A `FlowReport` of the pre-activation gradients: one entry per call, with
    no param statistics (``what="pre-activation gradient"``).

  Example:
    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> model = nn.Sequential([nn.Dense(4), nn.sigmoid, nn.Dense(4), nn.sigmoid, nn.Dense(1)])
    >>> x = jnp.ones((8, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> report = odn.activation_gradient_norms(
    ...     model, variables, x, loss_fn=lambda out: jnp.mean(out**2))
    >>> report.paths
    ('layers_0', 'layers_2', 'layers_4')
    >>> with_bgn = nn.Sequential([nn.Dense(4), odn.BGN(), nn.sigmoid, nn.Dense(1)])
    >>> variables = with_bgn.init(jax.random.key(0), x)
    >>> report = odn.activation_gradient_norms(
    ...     with_bgn, variables, x, loss_fn=lambda out: jnp.mean(out**2))
    >>> print(f"{float(report.norm[0]):.4f}")  # kappa = sqrt(4)
    2.0000

    An NNX model, without variables:

    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(
    ...     nnx.Linear(3, 4, rngs=rngs), odn.nnx.BGN(), nnx.sigmoid, nnx.Linear(4, 1, rngs=rngs))
    >>> report = odn.activation_gradient_norms(model, x, loss_fn=lambda out: jnp.mean(out**2))
    >>> report.paths
    ('layers/0', 'layers/3')
    >>> print(f"{float(report.norm[0]):.4f}")  # kappa = sqrt(4)
    2.0000

  References:
    Cabana & Lago-Fernández, "Backward Gradient Normalization in Deep Neural
    Networks", 2021, eq. (6)-(9) and sec. 3.1 (fig. 1, top).
  """
  if isinstance(model, nnx.Module):
    from optax_depthnorm import nnx as odn_nnx  # imports this module: import here

    chosen = {} if modules is None else {"modules": modules}
    return odn_nnx.activation_gradient_norms(model, *args, loss_fn=loss_fn, **chosen, **kwargs)
  if not isinstance(model, nn.Module):
    raise TypeError(
      f"model must be a Flax linen Module, got {type(model).__name__} (an NNX model, an "
      "nnx.Module, works too: activation_gradient_norms(model, *inputs, loss_fn=...))."
    )
  if "variables" in kwargs:
    variables = kwargs.pop("variables")
  elif args:
    variables, *args = args
  else:
    raise TypeError(
      "a linen model needs its variables: activation_gradient_norms(model, variables, "
      "*inputs, loss_fn=...)."
    )
  modules = PRE_ACTIVATION_MODULES if modules is None else modules
  loss = _linen_loss(model, variables, args, kwargs, loss_fn, _module_filter(modules))
  return _perturbation_report(loss, modules, "`model.apply`")
