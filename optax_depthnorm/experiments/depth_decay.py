"""`depth-decay`: seed 000, gradient normalization with depth-based decay on CNNs.

A ResNet-20 and its plain twin (the same net without shortcuts, He et al.'s
"plain-20") trained with SGD + momentum: the baseline, and the paper's rule
``optax.chain(depth_normalized(gamma, decay=...), optax.sgd(lr, momentum))``
(eq. 1: every parameter's gradient normalized to norm 1, then multiplied by
D_gamma(d), d the weight layer's depth from the input) with the paper's gammas
(linear 0.5, exponential 0.01) and a small sweep (linear 0.5 over normalized
depth d / max d, exponential 0.1, and gamma 0: normalization alone). Reports
the epoch at which each run first reaches the baseline's final test accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_depthnorm as odn
from optax_depthnorm.experiments import models, report, train
from optax_depthnorm.experiments.data import Dataset, split_for

NAME = "depth-decay"
TITLE = "Depth decay: ResNet-20 and Plain-20, SGD vs depth_normalized (seed 000)"
# (label, decay, gamma, normalize_depth); None decay: the baseline.
PAPER_VARIANTS = (
  ("baseline", None, 0.0, False),
  ("linear 0.5", "linear", 0.5, False),
  ("exponential 0.01", "exponential", 0.01, False),
)
SWEEP = (
  ("normalize only (gamma 0)", "exponential", 0.0, False),
  ("exponential 0.1", "exponential", 0.1, False),
  ("linear 0.5 on d / max d", "linear", 0.5, True),
)
PAPER_CLAIMS = {
  "resnet": "baseline's final (epoch 50) accuracy reached at epoch 19 (linear 0.5) and "
  "22 (exponential 0.01)",
  "densenet": "linear 0.5 reached at epoch 28 the baseline's epoch-48 precision",
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of `depth-decay` (see PRESETS)."""

  models: tuple[str, ...] = ("resnet", "plain")
  blocks: int = 3  # basic blocks per stage: 3 gives ResNet-20 / Plain-20
  width: int = 16
  image_size: int = 28  # 14: 2x2 average-pooled images (a quarter of the compute)
  sweep: bool = True  # add SWEEP to the paper's variants
  only: tuple[str, ...] = ()  # run only these variants (labels; the baseline always runs)
  lr: float = 0.05
  momentum: float = 0.9
  seeds: tuple[int, ...] = (0, 1)
  epochs: int = 50
  batch_size: int = 128
  train_size: int = 0
  val_size: int = 0
  test_size: int = 0  # 0: the whole test set


PRESETS = {
  "full": Config(),
  "cpu": Config(
    width=8, image_size=14, sweep=False, seeds=(0,), epochs=4, train_size=8000, test_size=5000
  ),
  "quick": Config(
    models=("resnet",),
    width=4,
    image_size=14,
    sweep=False,
    seeds=(0,),
    epochs=2,
    train_size=512,
    test_size=500,
  ),
}


def _model(name: str, cfg: Config) -> tuple[str, models.ResNet]:
  if name not in ("resnet", "plain"):
    raise ValueError(f"models are 'resnet' and 'plain', got {name!r}")
  return f"{name}{6 * cfg.blocks + 2}", models.ResNet(cfg.blocks, cfg.width, name == "resnet")


def _tx_factory(decay: str | None, normalize_depth: bool, depths: Any, cfg: Config):
  if decay is None:
    return lambda learning_rate, gamma: optax.sgd(learning_rate, cfg.momentum)
  return lambda learning_rate, gamma: optax.chain(
    odn.depth_normalized(gamma, decay=decay, depths=depths, normalize_depth=normalize_depth),
    optax.sgd(learning_rate, cfg.momentum),
  )


def reach_epoch(acc_by_epoch: np.ndarray, target: float) -> int | None:
  """First epoch (1-based) with accuracy >= target, or None."""
  hits = np.flatnonzero(np.asarray(acc_by_epoch) >= target)
  return int(hits[0]) + 1 if hits.size else None


def run(cfg: Config, dataset: Dataset, writer: report.Writer, *, quiet: bool = False) -> dict:
  """Trains every variant of every model; writes the reach-epoch table and curves."""
  parts = split_for(dataset, cfg)
  variants = PAPER_VARIANTS + (SWEEP if cfg.sweep else ())
  unknown = set(cfg.only) - {v[0] for v in variants}
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; choose from {[v[0] for v in variants]}")
  if cfg.only:
    variants = tuple(v for v in variants if v[0] in cfg.only or v[1] is None)
  # Variants that differ only in gamma share one vmapped program.
  groups: dict[tuple, list] = {}
  for label, decay, gamma, norm_depth in variants:
    groups.setdefault((decay, norm_depth), []).append((label, gamma))
  out: dict[str, Any] = {}
  rows = []
  plt = report.pyplot()
  fig, axes = plt.subplots(
    1, len(cfg.models), figsize=(5.5 * len(cfg.models), 3.8), squeeze=False, layout="constrained"
  )
  for ax, kind in zip(axes[0], cfg.models):
    name, model = _model(kind, cfg)
    params = model.init(jax.random.key(0), jnp.asarray(parts["train"][0][:1]))["params"]
    depths = models.conv_depths(params)
    curves: dict[str, np.ndarray] = {}
    times = {}
    for (decay, norm_depth), members in groups.items():
      gammas = np.repeat([g for _, g in members], len(cfg.seeds))
      seeds = np.tile(cfg.seeds, len(members))
      hp = {"learning_rate": np.full(len(seeds), cfg.lr), "gamma": gammas}
      make_tx = _tx_factory(decay, norm_depth, depths, cfg)
      group = train.Group(model, make_tx, hp, seeds, vmap=train.vmap_convs())
      hist = train.train_group(
        group,
        parts,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        desc=f"{name} {decay or 'baseline'}",
        quiet=quiet,
      )
      for k, (label, _) in enumerate(members):
        cols = slice(k * len(cfg.seeds), (k + 1) * len(cfg.seeds))
        curves[label] = hist.epochs["test_acc"][:, cols]
        times[label] = hist.train_s * len(cfg.seeds) / group.size
    target = float(np.mean(curves["baseline"][-1]))
    out[name] = {"target_acc": target, "variants": {}}
    for k, (label, decay, gamma, norm_depth) in enumerate(variants):
      acc = curves[label]
      mean_curve = acc.mean(1)
      reach = reach_epoch(mean_curve, target)
      out[name]["variants"][label] = {
        "decay": decay,
        "gamma": gamma,
        "normalize_depth": norm_depth,
        "test_acc_by_epoch": acc,
        "final_test_acc": acc[-1],
        "best_test_acc": acc.max(0),
        "reach_epoch": reach,
        "train_s_share": times[label],
      }
      rows.append(
        [
          name,
          label,
          report.fmt_mean_std(acc[-1]),
          report.fmt_mean_std(acc.max(0)),
          "never" if reach is None else f"{reach} / {cfg.epochs}",
        ]
      )
      ax.plot(
        np.arange(1, cfg.epochs + 1),
        mean_curve,
        "o-" if decay is None else "-",
        color=f"C{k}",
        label=label,
      )
    ax.axhline(target, color="red", lw=0.8, label="baseline's final accuracy")
    ax.set_title(f"{name} (width {cfg.width})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
  writer.figure(fig, "test_accuracy.png")
  head = [
    "model",
    "variant",
    "final test acc",
    "best test acc",
    "epoch reaching the baseline's final acc",
  ]
  return {
    "models": out,
    "paper_claims": PAPER_CLAIMS,
    "tables": [
      (
        f"Test accuracy (mean ± std over {len(cfg.seeds)} seeds) and the first epoch at "
        "which the mean curve reaches the baseline's final mean accuracy",
        report.markdown_table(head, rows),
      )
    ],
    "notes": [
      f"SGD lr {cfg.lr}, momentum {cfg.momentum}, no weight decay, for every variant (the "
      "paper's LR is not given); depth d counts conv/dense layers from the input, each "
      "BatchNorm sharing its conv's depth",
    ],
  }
