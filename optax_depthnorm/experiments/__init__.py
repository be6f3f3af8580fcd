"""Reproductions of the seed papers' experiments: data, models, a vmapped trainer, a CLI.

Run ``optax-depthnorm --help`` (or ``python -m optax_depthnorm.experiments``).
Needs the ``experiments`` extra (matplotlib, tqdm); importing
``optax_depthnorm`` itself never imports this package.

Modules: `data` (IDX loader, generated fallback), `models`, `train` (many runs
in one jitted, vmapped step), `report` (JSON, Markdown, PNG), one module per
experiment (`bgn_table`, `depth_decay`, `scale_norm`, `vgg_flow`) and `cli`.
"""
