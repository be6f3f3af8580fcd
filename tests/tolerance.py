"""The one tolerance for float32 results that may be summed in another order.

XLA does not fix the order in which a float32 reduction (a sum, a norm, a
mean, a matmul) adds its terms: XLA:CPU vectorizes it by the CPU's vector
width (AVX2 and AVX-512 split and combine the partial sums differently), GPUs
use other trees again, a sharded array is reduced per shard and then across
devices, and jit fuses and reorders what eager mode runs op by op. Elementwise
functions (``pow``, ``exp``, ``log``) are also approximated differently per
backend. So the same float32 computation agrees with itself across CPUs, GPUs,
shardings and jit/no-jit, and with a float64 NumPy reference, only to about
1e-5 relative: float32 has a 24-bit mantissa (eps = 2**-23 ~ 1.2e-7), a sum of
n terms in two orders differs by up to ~n * eps in the worst case, and by
~1e-6..1e-5 in practice for the sizes in these tests. CI once failed at
rtol=1e-6 on an AVX-512 CPU with a 9.1e-6 relative difference.

Comparisons that are exact by construction (serialization round trips,
identity forward passes, pass-through leaves, integer counts, float64-only
computations) keep their own tighter tolerance or ``assert_array_equal``.

Import it as the other helpers of the tests are imported::

  from tests.tolerance import ATOL, RTOL, assert_close
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import numpy as np

RTOL = 1e-5
"""Relative tolerance of float32 results: reduction order differs by CPU, GPU,
sharding and jit (see the module docstring); never loosen it past 1e-5."""

ATOL = 1e-6
"""Absolute tolerance for float32 values near zero, where RTOL alone fails: a
value that cancels to ~0 keeps an absolute rounding error of about eps times
the magnitude of its terms (terms of order 1 to 10 here), not of the result."""


def assert_close(actual: Any, expected: Any, *, rtol: float = RTOL, atol: float = ATOL) -> None:
  """Asserts that arrays or pytrees of arrays are close to RTOL/ATOL.

  Two pytrees of the same structure (dicts, lists, `FlowReport`s, optimizer
  states) are compared leaf by leaf with `chex.assert_trees_all_close`; anything
  else (an array against a list of numbers or a scalar) as NumPy arrays with
  `np.testing.assert_allclose`, which broadcasts.
  """
  structure = jax.tree.structure(actual)
  if structure == jax.tree.structure(expected):
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)
  else:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)
