"""JAX set-up for the tests and doctests: 8 fake CPU devices, rank promotion raises.

Strict dtype promotion is not global because optax's own optimizers (adam's
bias correction) do not pass it; tests of our transforms alone switch it on
with ``jax.numpy_dtype_promotion("strict")``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
