"""Flax NNX layers of optax_depthnorm: ``odn.nnx.BGN``.

The optax transforms work on NNX states as they are (``nnx.Optimizer`` passes
them through); this module holds the layers that live in the model.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import optax_depthnorm as odn
  >>> layer = odn.nnx.BGN()  # identity forward, gradient norm sqrt(d) backward
  >>> layer(jnp.ones((2, 3))).shape
  (2, 3)
"""

from __future__ import annotations

from collections.abc import Hashable

import jax
from flax import nnx

from optax_depthnorm._bgn import bgn

__all__ = ("BGN",)


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
