"""The checks of numeric hyperparameters, one rule for every transform.

A hyperparameter (``gamma``, ``target``, ``kappa``, ``eps``) is a real scalar:
shape ``()`` always (a shape is known even when traced, so a vector is an error
either way). Its value is checked

- eagerly, when it is *static* (a Python or NumPy number or array, a concrete
  jax array): out of range is a ValueError naming the argument, its value and
  the valid range (`check`);
- at use, when it is *traced* (under `jit` or `optax.inject_hyperparams`) or
  comes from a schedule: it is clipped into the valid range, an infinity to the
  largest finite float, and a NaN stays NaN, so it shows in the updates as a
  NaN gradient does (`bounded`).

A norm floor ``eps`` is, in addition, never below the smallest normal float of
the dtype the norm is computed in (1.2e-38 in float32): XLA flushes subnormal
numbers to zero, so a subnormal or zero ``eps`` would divide a zero block by
zero (`floor_eps`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Range(NamedTuple):
  """A closed interval of valid values (finite ones only), and how a message names it."""

  low: float
  high: float
  text: str

  def holds(self, value: float) -> bool:
    """Whether a finite value lies in the interval (NaN and infinities never do)."""
    return math.isfinite(value) and self.low <= value <= self.high


NON_NEGATIVE = Range(0.0, math.inf, "a non-negative number (finite, in [0, inf))")
UNIT = Range(0.0, 1.0, "in [0, 1]")
EPS = Range(
  0.0,
  math.inf,
  "a non-negative number (finite, in [0, inf); one below the smallest normal float, "
  "1.2e-38 in float32, acts as that)",
)
NUMBER = "a number or a scalar array"


def is_traced(x: Any) -> bool:
  """Whether `x` is a tracer (under `jit`, `vmap`, `grad`): its value is unknown here."""
  return isinstance(x, jax.core.Tracer)


def describe(x: Any) -> str:
  """How a message shows a value: arrays by dtype and shape, anything else by repr."""
  if isinstance(x, (jax.Array, np.ndarray)) and (np.ndim(x) or is_traced(x)):
    article = "an" if str(x.dtype)[0] in "aeiou" else "a"
    return f"{article} {x.dtype} array of shape {tuple(x.shape)}"
  return repr(x)


def is_real(x: Any) -> bool:
  """Whether `x` is a real number or array: a Python int or float, or an int or float dtype."""
  if not isinstance(x, (int, float, np.number, np.ndarray, jax.Array)) or isinstance(x, bool):
    return False
  dtype = getattr(x, "dtype", None)
  return dtype is None or bool(
    jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
  )


def scalar_value(name: str, value: Any, accepts: str = NUMBER) -> float | None:
  """The value of a static scalar hyperparameter as a float; None for a traced one.

  Raises a TypeError unless `value` is a real number or array (``accepts``
  says what else the argument takes), a ValueError unless it has shape ``()``.
  """
  if not is_real(value):
    raise TypeError(f"{name} must be {accepts}, got {describe(value)}.")
  shape = tuple(np.shape(value))
  if shape:
    raise ValueError(f"{name} must be a scalar (shape ()), got an array of shape {shape}.")
  return None if is_traced(value) else float(value)


def check(name: str, value: Any, valid: Range, accepts: str = NUMBER, context: str = "") -> bool:
  """At construction: raises unless a static `value` is a scalar in `valid`.

  A traced value is only checked for its type and shape (it is `bounded` at
  use). `context` follows the range in the message (`` for decay='linear'``).

  Returns:
    Whether `value` is static (checked here, so it needs no `bounded`).
  """
  number = scalar_value(name, value, accepts)
  if number is not None and not valid.holds(number):
    raise ValueError(f"{name} must be {valid.text}{context}, got {describe(value)}.")
  return number is not None


def bounded(name: str, value: Any, valid: Range) -> jax.Array:
  """At use: a traced or scheduled value clipped into `valid` (a NaN stays NaN).

  An integer value becomes the default float; an infinity becomes the largest
  finite float of its dtype. Raises like `scalar_value` for a wrong type or shape.
  """
  scalar_value(name, value)
  x = jnp.asarray(value)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  top = float(jnp.finfo(x.dtype).max)
  return jnp.clip(x, max(valid.low, -top), min(valid.high, top))


def floor_eps(eps: Any, dtype: Any) -> float | jax.Array:
  """A checked norm floor as used in `dtype`: at least its smallest normal float.

  A static `eps` comes back as a Python float (so `_tree.safe_ratio` can skip
  its zero guard), a traced one as a `dtype` array clipped to
  [smallest normal, largest finite] (a NaN stays NaN).
  """
  info = jnp.finfo(dtype)
  if not is_traced(eps):
    return max(float(eps), float(info.tiny))
  return jnp.clip(jnp.asarray(eps).astype(dtype), float(info.tiny), float(info.max))
