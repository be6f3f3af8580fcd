"""``python -m optax_depthnorm.experiments``: the `optax-depthnorm` command."""

from optax_depthnorm.experiments.cli import main

main()
