"""JAX set-up for the tests and doctests: 8 fake CPU devices, fast compiles, rank promotion raises.

Strict dtype promotion is not global because optax's own optimizers (adam's
bias correction) do not pass it; tests of our transforms alone switch it on
with ``jax.numpy_dtype_promotion("strict")``.
"""

import os

# LLVM's optimization level 0: the suite compiles hundreds of small programs and runs each
# a few times, so compiling is most of its CPU time (the experiment tests: 205 s of CPU at
# the default level, 126 s at 0). HLO passes (fusion, layouts) are the same; only the
# machine code is less optimized, which no test times.
os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
