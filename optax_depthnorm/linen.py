"""Flax linen adapters of optax_depthnorm: the `BGN` layer and `activation_gradient_norms`.

Both are also exported at the top level (``odn.BGN``, ``odn.activation_gradient_norms``);
the optax transforms work on linen params as they are.

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
NNX_MSG = (
  "activation_gradient_norms supports Flax linen modules only for now. In NNX, "
  "call `self.perturb('name', z)` on each pre-activation and differentiate with "
  "respect to the state `nnx.capture(model, nnx.Perturbation)` returns."
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

ModuleFilter = Union[type, tuple[type, ...], Callable[[nn.Module], bool]]


def _module_filter(modules: ModuleFilter) -> Callable[[nn.Module], bool]:
  if isinstance(modules, type) or (
    isinstance(modules, tuple) and modules and all(isinstance(m, type) for m in modules)
  ):
    return lambda module: isinstance(module, modules)
  if callable(modules):
    return modules
  raise TypeError(
    "modules must be a linen Module class, a tuple of them, or a callable "
    f"(module) -> bool; got {type(modules).__name__}."
  )


def _perturbed_loss(model, variables, args, apply_kwargs, loss_fn, select, record):
  """``perturbations -> loss``, each selected module output shifted by its perturbation.

  With ``perturbations=None`` nothing is added, and `record` gets the name and
  shape of every selected output, in call order.
  """

  def loss(perturbations):
    calls: dict[str, int] = defaultdict(int)
    position = iter(range(1 << 30))

    def interceptor(next_fun, call_args, call_kwargs, context):
      out = next_fun(*call_args, **call_kwargs)
      if context.method_name != "__call__" or not select(context.module):
        return out
      path = "/".join(context.module.path) or "<root>"
      name = path if calls[path] == 0 else f"{path}[{calls[path]}]"
      calls[path] += 1
      if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.inexact):
        raise TypeError(f"the output of {name!r} is not a floating array; exclude it via modules=.")
      i = next(position)
      if perturbations is None:
        record.append((name, jax.ShapeDtypeStruct(out.shape, out.dtype)))
        return out
      return out + perturbations[i]

    with nn.intercept_methods(interceptor):
      return loss_fn(model.apply(variables, *args, **apply_kwargs))

  return loss


def activation_gradient_norms(
  model: nn.Module,
  variables: Any,
  *args: Any,
  loss_fn: Callable[[Any], jax.Array],
  modules: ModuleFilter = PRE_ACTIVATION_MODULES,
  **apply_kwargs: Any,
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
  pre-activation) through ``flax.linen.intercept_methods`` and differentiating
  the loss with respect to those perturbations; the model need not call
  ``Module.perturb``. The norm is over the whole tensor, batch included (the
  paper's; for a batch-mean loss it scales like 1/sqrt(batch)). A BGN layer
  after a Dense normalizes the gradient before it reaches the Dense output, so
  what is measured there is Cabana & Lago-Fernández's ``delta_BGN^(K)`` (norm kappa); a
  BatchNorm after a Dense is likewise above the measured point.

  Layers are the calls, in the order they run (depth 0 = the first call); for
  a feed-forward stack this equals `layer_depths`' labels of the weights. A
  module called twice appears twice (``Dense_0``, ``Dense_0[1]``). Works inside
  `jit`. Linen only for now (an NNX model raises a TypeError that says how to
  do it with ``self.perturb`` and ``nnx.capture``); inside ``nn.scan`` the
  scanned calls are summed into one entry.

  Args:
    model: a Flax linen module.
    variables: its variables, ``{"params": ...}`` (and other collections).
    *args: the inputs, as for ``model.apply(variables, *args)``.
    loss_fn: maps what ``model.apply`` returns to a scalar loss (close over
      the targets: ``lambda logits: xent(logits, y).mean()``).
    modules: which calls to measure: linen classes (default Dense,
      DenseGeneral, Conv, ConvTranspose, ConvLocal, Einsum) or a callable
      ``(module) -> bool``.
    **apply_kwargs: passed to ``model.apply`` (``rngs=``, ``mutable=``, model
      flags such as ``train=``).

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

  References:
    Cabana & Lago-Fernández, "Backward Gradient Normalization in Deep Neural
    Networks", 2021, eq. (6)-(9) and sec. 3.1 (fig. 1, top).
  """
  if isinstance(model, nnx.Module):
    raise TypeError(NNX_MSG)
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a Flax linen Module, got {type(model).__name__}.")
  select = _module_filter(modules)
  record: list[tuple[str, jax.ShapeDtypeStruct]] = []
  loss = _perturbed_loss(model, variables, args, apply_kwargs, loss_fn, select, record)
  jax.eval_shape(lambda: loss(None))
  if not record:
    raise ValueError(
      f"no module selected by modules={modules!r} ran in `model.apply`; pass the "
      "classes of the model's layers (or a callable) as modules=."
    )
  zeros = [jnp.zeros(s.shape, s.dtype) for _, s in record]
  grads = jax.grad(loss)(zeros)
  dtype = _report._float_dtype(grads)
  found = [_layers.Leaf(i, name, np.zeros((), np.int32)) for i, (name, _) in enumerate(record)]
  stats = _report.stats(*_layers.layer_stats(grads, found, exact_zero=True))
  norm, mean_abs, max_abs, rms = (v.astype(dtype) for v in stats)
  paths = tuple(name for name, _ in record)
  sizes = tuple(math.prod(s.shape) for _, s in record)
  return FlowReport(
    paths, tuple(range(len(paths))), sizes, "pre-activation gradient", norm, mean_abs, max_abs, rms
  )
