"""`bgn-table`: Cabana & Lago-Fernández's Table 1, deep MLPs with and without BatchNorm, BGN.

Dense nets of 30 to 120 hidden layers of 64 units, ReLU / sigmoid / tanh,
with and without BatchNorm, with and without a BGN layer before every
activation, trained with Adam. For every cell a learning-rate sweep on a log
grid runs (all seeds x learning rates of a cell in one vmapped program); the
learning rate with the best mean *validation* accuracy is picked, and the
cell reports the mean ± std *test* accuracy at it, over the sweep's seeds and
(``final_seeds``) more seeds trained at that rate, as the paper does (5 seeds
in the sweep, 10 more at the best rate: 15 values).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import optax

from optax_depthnorm.experiments import models, report, train
from optax_depthnorm.experiments.data import Dataset, split_for

NAME = "bgn-table"
TITLE = "BGN table: deep MLPs with and without BatchNorm and BGN (Cabana & Lago-Fernández)"

# Cabana & Lago-Fernández, Table 1 (MNIST, 15 runs of 20 epochs): mean, std per depth 30/60/90/120.
PAPER = {
  ("relu", False, False): [(0.948, 0.006), (0.729, 0.319), (0.114, 0.000), (0.114, 0.000)],
  ("relu", False, True): [(0.949, 0.007), (0.890, 0.098), (0.901, 0.039), (0.858, 0.045)],
  ("relu", True, False): [(0.958, 0.002), (0.405, 0.058), (0.141, 0.026), (0.115, 0.001)],
  ("relu", True, True): [(0.968, 0.002), (0.637, 0.135), (0.159, 0.038), (0.112, 0.026)],
  ("sigmoid", False, False): [(0.114, 0.000), (0.114, 0.000), (0.113, 0.002), (0.114, 0.000)],
  ("sigmoid", False, True): [(0.206, 0.003), (0.200, 0.025), (0.169, 0.045), (0.181, 0.038)],
  ("sigmoid", True, False): [(0.961, 0.003), (0.954, 0.004), (0.949, 0.004), (0.940, 0.010)],
  ("sigmoid", True, True): [(0.958, 0.001), (0.952, 0.006), (0.947, 0.005), (0.945, 0.005)],
  ("tanh", False, False): [(0.956, 0.002), (0.944, 0.003), (0.935, 0.005), (0.896, 0.017)],
  ("tanh", False, True): [(0.954, 0.002), (0.948, 0.003), (0.928, 0.028), (0.901, 0.013)],
  ("tanh", True, False): [(0.963, 0.003), (0.936, 0.003), (0.870, 0.025), (0.516, 0.076)],
  ("tanh", True, True): [(0.964, 0.002), (0.953, 0.002), (0.917, 0.009), (0.758, 0.126)],
}
PAPER_DEPTHS = (30, 60, 90, 120)
# Cabana & Lago-Fernández, sec. 5: 20-epoch training times, 90 layers, ReLU.
PAPER_TIMES = {"plain": 40.00, "bgn": 50.83, "bn": 118.00, "bn+bgn": 127.78}


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of `bgn-table` (see PRESETS)."""

  depths: tuple[int, ...] = PAPER_DEPTHS
  activations: tuple[str, ...] = ("relu", "sigmoid", "tanh")
  width: int = 64
  bn_momentum: float = 0.99  # Keras' default; the short cpu runs use 0.9
  lrs: tuple[float, ...] = tuple(float(x) for x in np.geomspace(1e-4, 1e-2, 19))
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  final_seeds: tuple[int, ...] = tuple(range(5, 15))
  epochs: int = 20
  batch_size: int = 128
  train_size: int = 0  # 0: all training examples but the validation set
  val_size: int = 5000
  test_size: int = 0  # 0: the whole test set


PRESETS = {
  "full": Config(),
  # About 2 hours on a 2-core CPU: all 60,000 training images (55,000 to train, 5,000 to
  # pick the learning rate), the paper's batch 128, 5 epochs = 2,145 Adam steps per run,
  # five learning rates spanning 100x around every cell's best of the cpu preset, 2 seeds.
  "long": Config(
    lrs=tuple(float(x) for x in np.geomspace(1e-4, 1e-2, 5)),
    seeds=(0, 1),
    final_seeds=(),
    epochs=5,
  ),
  "cpu": Config(
    lrs=(1e-4, 1e-3, 1e-2),
    seeds=(0, 1),
    final_seeds=(),
    epochs=3,
    batch_size=32,
    bn_momentum=0.9,
    train_size=2000,
    val_size=1000,
    test_size=5000,
  ),
  "quick": Config(
    depths=(4, 8),
    lrs=(1e-3, 1e-2),
    seeds=(0,),
    final_seeds=(),
    epochs=1,
    train_size=1000,
    val_size=500,
    test_size=1000,
  ),
}
VARIANTS = ((False, False), (False, True), (True, False), (True, True))  # (bn, bgn)


def _variant(bn: bool, bgn: bool) -> str:
  return {(False, False): "plain", (False, True): "bgn", (True, False): "bn"}.get(
    (bn, bgn), "bn+bgn"
  )


def _cell(cfg: Config, parts: dict, act: str, depth: int, bn: bool, bgn: bool, quiet: bool) -> dict:
  model = models.DeepMLP(depth, cfg.width, act, bn, bgn, 10, cfg.bn_momentum)
  make_tx = lambda learning_rate: optax.adam(learning_rate)
  runs = train.grid(seed=cfg.seeds, learning_rate=cfg.lrs)
  label = f"{act} d={depth} {_variant(bn, bgn)}"
  kw = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, quiet=quiet, eval_every=cfg.epochs)
  hist = train.train_group(
    train.Group(model, make_tx, {"learning_rate": runs["learning_rate"]}, runs["seed"]),
    parts,
    desc=label,
    **kw,
  )
  select = "val_acc" if len(parts["val"][1]) else "test_acc"
  shape = (len(cfg.seeds), len(cfg.lrs))
  chosen = np.nan_to_num(hist.epochs[select][-1].reshape(shape), nan=-1.0).mean(0)
  best = int(np.argmax(chosen))
  test = hist.epochs["test_acc"][-1].reshape(shape)
  accs = list(test[:, best])
  final_s = 0.0
  if cfg.final_seeds:
    lr = np.full(len(cfg.final_seeds), cfg.lrs[best])
    extra = train.train_group(
      train.Group(model, make_tx, {"learning_rate": lr}, np.asarray(cfg.final_seeds)),
      parts,
      desc=label + " final",
      **kw,
    )
    accs += list(extra.epochs["test_acc"][-1])
    final_s = extra.train_s
  return {
    "activation": act,
    "depth": depth,
    "bn": bn,
    "bgn": bgn,
    "lrs": list(cfg.lrs),
    "val_acc_by_lr": hist.epochs["val_acc"][-1].reshape(shape).mean(0)
    if select == "val_acc"
    else None,
    "test_acc_by_lr": test.mean(0),
    "best_lr": cfg.lrs[best],
    "test_acc": accs,
    "mean": float(np.mean(accs)),
    "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
    "final_train_loss": hist.epochs["train_loss"][-1].reshape(shape)[:, best],
    "sweep_runs": int(np.prod(shape)),
    "sweep_train_s": hist.train_s,
    "steps": len(hist.step_loss),
    "steps_per_s": hist.steps_per_s,
    "sweep_compile_s": hist.compile_s,
    "final_train_s": final_s,
  }


def _paper(act: str, bn: bool, bgn: bool, depth: int) -> tuple[float, float] | None:
  if depth not in PAPER_DEPTHS:
    return None
  return PAPER[(act, bn, bgn)][PAPER_DEPTHS.index(depth)]


def tables(cells: list[dict], cfg: Config) -> list[tuple[str, str]]:
  """Accuracy (ours beside the paper's), best learning rate and time per cell."""
  by_key = {(c["activation"], c["bn"], c["bgn"], c["depth"]): c for c in cells}
  best = {
    (a, d): max(by_key[(a, bn, bg, d)]["mean"] for bn, bg in VARIANTS)
    for a in cfg.activations
    for d in cfg.depths
  }
  head = ["activation", "BN", "BGN"]
  acc_rows, lr_rows, time_rows = [], [], []
  for act in cfg.activations:
    for bn, bgn in VARIANTS:
      acc, lrs, times = [act, bn, bgn], [act, bn, bgn], [act, bn, bgn]
      for d in cfg.depths:
        c = by_key[(act, bn, bgn, d)]
        text = report.fmt_mean_std(c["test_acc"])
        acc.append(f"**{text}**" if c["mean"] == best[(act, d)] else text)
        paper = _paper(act, bn, bgn, d)
        acc.append("-" if paper is None else f"{paper[0]:.3f} ± {paper[1]:.3f}")
        lrs.append(f"{c['best_lr']:.2g}")
        times.append(f"{c['sweep_train_s']:.1f} ({c['steps_per_s']:.0f} steps/s)")
      acc_rows.append(acc)
      lr_rows.append(lrs)
      time_rows.append(times)
  acc_head = head + [f"{d} {who}" for d in cfg.depths for who in ("ours", "paper")]
  runs = len(cfg.seeds) * len(cfg.lrs)
  return [
    (
      "Test accuracy, mean ± std (ours, at the best learning rate; paper: MNIST, Table 1)",
      report.markdown_table(acc_head, acc_rows),
    ),
    (
      "Best learning rate per cell (highest mean validation accuracy)",
      report.markdown_table(head + [f"{d} layers" for d in cfg.depths], lr_rows),
    ),
    (
      f"Training time per cell, seconds: all {runs} runs of the sweep at once (vmapped), "
      "compilation excluded; in brackets, optimizer steps per second of each run",
      report.markdown_table(head + [f"{d} layers" for d in cfg.depths], time_rows),
    ),
  ]


def figure(cells: list[dict], cfg: Config) -> Any:
  """Test accuracy against depth, one panel per activation; the paper's dashed."""
  plt = report.pyplot()
  fig, axes = plt.subplots(
    1,
    len(cfg.activations),
    figsize=(4.2 * len(cfg.activations), 3.6),
    squeeze=False,
    layout="constrained",
  )
  for ax, act in zip(axes[0], cfg.activations):
    for k, (bn, bgn) in enumerate(VARIANTS):
      cs = sorted(
        (c for c in cells if (c["activation"], c["bn"], c["bgn"]) == (act, bn, bgn)),
        key=lambda c: c["depth"],
      )
      ax.errorbar(
        [c["depth"] for c in cs],
        [c["mean"] for c in cs],
        [c["std"] for c in cs],
        color=f"C{k}",
        marker="o",
        capsize=3,
        label=f"{_variant(bn, bgn)} (ours)",
      )
      paper = [(d, _paper(act, bn, bgn, d)) for d in cfg.depths if _paper(act, bn, bgn, d)]
      if paper:
        ax.plot(
          [d for d, _ in paper],
          [p[0] for _, p in paper],
          "--",
          color=f"C{k}",
          alpha=0.6,
          label=f"{_variant(bn, bgn)} (paper, MNIST)",
        )
    ax.set_title(act)
    ax.set_xlabel("hidden layers")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test accuracy")
  axes[0][-1].legend(fontsize="x-small")
  return fig


def run(cfg: Config, dataset: Dataset, writer: report.Writer, *, quiet: bool = False) -> dict:
  """Runs every cell and writes the tables and figure; returns the results."""
  parts = split_for(dataset, cfg, flatten=True)
  cells = []
  bar = train.progress(len(cfg.activations) * len(VARIANTS) * len(cfg.depths), NAME, disable=quiet)
  for act in cfg.activations:
    for bn, bgn in VARIANTS:
      for depth in cfg.depths:
        cells.append(_cell(cfg, parts, act, depth, bn, bgn, quiet))
        bar.update(1)
  bar.close()
  writer.figure(figure(cells, cfg), "accuracy_vs_depth.png")
  return {
    "cells": cells,
    "tables": tables(cells, cfg),
    "paper": {
      "source": "Cabana & Lago-Fernández, Table 1 (MNIST, 15 runs x 20 epochs, Adam, "
      "19 LRs in [1e-4, 1e-2])",
      "times_90_relu_s": PAPER_TIMES,
    },
  }
