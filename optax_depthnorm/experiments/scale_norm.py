"""`scale-norm`: Lo, Amaral & Ding, scale and determinant normalization of a ReLU MLP.

A 784-100-100-100-10 ReLU MLP trained with plain SGD, batch 100, five ways:
Glorot init, orthonormal init, determinant normalization (eq. 1, via
``scale_normalize("determinant")``), scale normalization after every step
(eq. 2-3, ``scale_normalize("data")`` with the layers' mini-batch inputs) and
scale normalization during the first epoch only ("Scale-Norm-1"). The
normalizations start from Glorot init. Loss curves over the first epoch and
over all epochs, as in the paper's figures 1-3.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import optax

import optax_depthnorm as odn
from optax_depthnorm.experiments import models, report, train
from optax_depthnorm.experiments.data import Dataset, split_for

NAME = "scale-norm"
TITLE = "Scale normalization: 784-100-100-100-10 ReLU MLP with SGD (Lo, Amaral & Ding, figs. 1-3)"
METHODS = ("glorot", "orthonormal", "determinant", "scale", "scale-1")
LABELS = {
  "glorot": "Glorot init",
  "orthonormal": "orthonormal init",
  "determinant": "determinant norm",
  "scale": "scale norm (every step)",
  "scale-1": "scale norm (1st epoch)",
}
ALWAYS = 2**30  # first_n_steps meaning "every step"


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of `scale-norm` (see PRESETS)."""

  widths: tuple[int, ...] = (100, 100, 100)
  lrs: tuple[float, ...] = (0.01, 0.1)
  seeds: tuple[int, ...] = (0, 1, 2)
  epochs: int = 10
  batch_size: int = 100
  train_size: int = 50000  # 500 steps an epoch at batch 100, as in the paper
  val_size: int = 10000
  test_size: int = 0  # 0: the whole test set


PRESETS = {
  "full": Config(seeds=(0, 1, 2, 3, 4)),
  "cpu": Config(seeds=(0, 1)),
  "quick": Config(lrs=(0.05,), seeds=(0,), epochs=2, train_size=2000, val_size=500, test_size=1000),
}


def _group(method: str, cfg: Config, steps_per_epoch: int) -> train.Group:
  runs = train.grid(seed=cfg.seeds, learning_rate=cfg.lrs)
  init = "orthogonal" if method == "orthonormal" else "glorot"
  model = models.MLP(cfg.widths, 10, init)
  hp: dict[str, Any] = {"learning_rate": runs["learning_rate"]}
  if method in ("glorot", "orthonormal"):
    make_tx = lambda learning_rate: optax.sgd(learning_rate)
    return train.Group(model, make_tx, hp, runs["seed"])
  if method == "determinant":
    make_tx = lambda learning_rate: optax.chain(
      optax.sgd(learning_rate), odn.scale_normalize("determinant")
    )
    # One run at a time: vmapped over runs, the QR of determinant_scale hung XLA's CPU
    # runtime here (jax 0.10.2), as the vmapped orthogonal init did (see train.init_states).
    return train.Group(model, make_tx, hp, runs["seed"], vmap=False)
  first = ALWAYS if method == "scale" else steps_per_epoch
  hp["first_n_steps"] = np.full(len(runs["seed"]), first, np.int32)
  make_tx = lambda learning_rate, first_n_steps: optax.chain(
    optax.sgd(learning_rate), odn.scale_normalize("data", first_n_steps=first_n_steps)
  )
  return train.Group(model, make_tx, hp, runs["seed"], layer_inputs=True)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  window = max(1, min(window, len(y)))
  kernel = np.ones(window) / window
  return np.convolve(y, kernel, mode="valid")


def figures(results: dict, cfg: Config, steps_per_epoch: int, writer: report.Writer) -> None:
  """Figures 1-3: first-epoch loss, all-epoch loss, and Scale-Norm-1 against the rest."""
  plt = report.pyplot()
  panels = [
    ("fig1_first_epoch.png", "first epoch (per step, moving average of 10)", METHODS, True),
    ("fig2_all_epochs.png", f"{cfg.epochs} epochs (mean training loss per epoch)", METHODS, False),
    (
      "fig3_scale_norm_1.png",
      f"{cfg.epochs} epochs (per step, moving average of 50)",
      ("glorot", "determinant", "scale", "scale-1"),
      None,
    ),
  ]
  for filename, what, methods, first_only in panels:
    fig, axes = plt.subplots(
      1, len(cfg.lrs), figsize=(5.2 * len(cfg.lrs), 3.8), squeeze=False, layout="constrained"
    )
    for ax, lr in zip(axes[0], cfg.lrs):
      for k, method in enumerate(METHODS):
        if method not in methods:
          continue
        r = results[method][f"{lr:g}"]
        if first_only is None:
          y = _smooth(np.asarray(r["step_loss_mean"]), 50)
          ax.plot(np.arange(len(y)) + 50, y, color=f"C{k}", label=LABELS[method])
        elif first_only:
          y = _smooth(np.asarray(r["step_loss_mean"][:steps_per_epoch]), 10)
          ax.plot(np.arange(len(y)) + 10, y, color=f"C{k}", label=LABELS[method])
        else:
          ax.plot(
            np.arange(1, cfg.epochs + 1),
            r["train_loss_by_epoch"],
            "o-",
            color=f"C{k}",
            label=LABELS[method],
          )
      ax.set_title(f"SGD lr {lr:g}: {what}", fontsize="small")
      ax.set_xlabel("epoch" if first_only is False else "step")
      ax.set_yscale("log")
      ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("training loss")
    axes[0][-1].legend(fontsize="x-small")
    writer.figure(fig, filename)


def run(cfg: Config, dataset: Dataset, writer: report.Writer, *, quiet: bool = False) -> dict:
  """Trains the five variants (all seeds x learning rates of one at once)."""
  parts = split_for(dataset, cfg, flatten=True)
  steps_per_epoch = len(parts["train"][1]) // cfg.batch_size
  results: dict[str, Any] = {}
  times = {}
  checkpoints = sorted({min(100, steps_per_epoch), steps_per_epoch})
  rows = []
  for method in METHODS:
    group = _group(method, cfg, steps_per_epoch)
    hist = train.train_group(
      group,
      parts,
      epochs=cfg.epochs,
      batch_size=cfg.batch_size,
      desc=f"{NAME} {method}",
      quiet=quiet,
    )
    times[method] = {"train_s": hist.train_s, "compile_s": hist.compile_s, "runs": group.size}
    results[method] = {}
    shape = (len(cfg.seeds), len(cfg.lrs))
    for j, lr in enumerate(cfg.lrs):
      cols = np.ravel_multi_index((np.arange(len(cfg.seeds)), np.full(len(cfg.seeds), j)), shape)
      steps = hist.step_loss[:, cols]
      by_epoch = {k: v[:, cols] for k, v in hist.epochs.items()}
      r = {
        "step_loss_mean": steps.mean(1),
        "train_loss_by_epoch": by_epoch["train_loss"].mean(1),
        "test_loss_by_epoch": by_epoch["test_loss"].mean(1),
        "test_acc_by_epoch": by_epoch["test_acc"].mean(1),
        "final_test_acc": by_epoch["test_acc"][-1],
        "final_train_loss": by_epoch["train_loss"][-1],
      }
      for c in checkpoints:
        r[f"loss_at_step_{c}"] = steps[max(c - 10, 0) : c].mean(0)  # mean of the last 10 steps
      results[method][f"{lr:g}"] = r
      rows.append(
        [LABELS[method], f"{lr:g}"]
        + [report.fmt_mean_std(r[f"loss_at_step_{c}"]) for c in checkpoints]
        + [report.fmt_mean_std(r["final_train_loss"]), report.fmt_mean_std(r["final_test_acc"])]
      )
  figures(results, cfg, steps_per_epoch, writer)
  head = (
    ["method", "lr"]
    + [f"loss @ step {c}" for c in checkpoints]
    + [f"train loss, epoch {cfg.epochs}", "test acc"]
  )
  caption = (
    f"Training loss (mean of steps c-9..c; mean ± std over {len(cfg.seeds)} seeds) and "
    "final test accuracy"
  )
  time_rows = [
    [LABELS[m], t["runs"], f"{t['train_s']:.1f}", f"{t['compile_s']:.1f}"] for m, t in times.items()
  ]
  return {
    "methods": results,
    "times": times,
    "steps_per_epoch": steps_per_epoch,
    "tables": [
      (caption, report.markdown_table(head, rows)),
      (
        "Time per variant (all seeds x learning rates at once), seconds",
        report.markdown_table(["method", "runs", "train s", "compile s"], time_rows),
      ),
    ],
    "notes": ["the paper gives no learning rate; both columns of the figures are ours"],
  }
