"""`depth-decay`: the depth-decay paper's CNN claim, with a fair learning-rate sweep.

A ResNet-20 and its plain twin (the same net without shortcuts, He et al.'s
"plain-20"), and a plain deep MLP (30 x 64 ReLU, where vanishing gradients
should make the method matter most), trained with SGD + momentum: the
baseline, and the paper's rule ``optax.chain(depth_normalized(gamma,
decay=...), optax.sgd(lr, momentum))`` (eq. 1: every parameter's gradient
normalized to norm 1, then multiplied by D_gamma(d), d the weight layer's
depth from the input) with the paper's gammas (linear 0.5, exponential 0.01)
and three more (gamma 0: normalization alone; exponential 0.1; linear 0.5 over
normalized depth d / max d). Every variant gets its own learning-rate sweep;
the rate with the best mean *validation* accuracy is picked, and the variant is
reported on *test* at it: the first epoch at which it reaches the baseline's
final test accuracy (the paper's measure).
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
TITLE = "Depth decay: ResNet-20, Plain-20 and a 30-layer MLP, SGD vs depth_normalized"
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
MODELS = ("resnet", "plain", "mlp")
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # 300x: SGD's and the normalized rule's scales


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of `depth-decay` (see PRESETS)."""

  models: tuple[str, ...] = MODELS
  blocks: int = 3  # basic blocks per stage: 3 gives ResNet-20 / Plain-20
  width: int = 16
  mlp_depth: int = 30  # hidden layers of the MLP
  mlp_width: int = 64
  image_size: int = 28  # 14: 2x2 average-pooled images (a quarter of the compute); not the MLP
  sweep: bool = True  # add SWEEP to the paper's variants
  only: tuple[str, ...] = ()  # run only these variants (labels; the baseline always runs)
  lrs: tuple[float, ...] = LRS  # every variant's learning-rate sweep
  momentum: float = 0.9
  seeds: tuple[int, ...] = (0, 1)
  epochs: int = 50
  batch_size: int = 128
  train_size: int = 0  # 0: all training examples but the validation set
  val_size: int = 5000
  test_size: int = 0  # 0: the whole test set


PRESETS = {
  "full": Config(),
  # The MLP at full size: 55,000 images to train, 5,000 to pick the rate, batch 128,
  # 15 epochs = 6,435 SGD steps per run, 6 rates x 6 variants x 2 seeds (18 min on 2 cores).
  "cpu": Config(models=("mlp",), epochs=15),
  # The CNNs on a 2-core CPU, about 2 hours: 14 x 14 images, width 8, 10,000 images to train,
  # 2,000 to pick the rate, 10 epochs = 780 steps per run, 6 rates over 3,333x, 2 seeds.
  "long": Config(
    models=("resnet", "plain"),
    width=8,
    image_size=14,
    lrs=tuple(float(f"{x:.2g}") for x in np.geomspace(3e-4, 1.0, 6)),
    seeds=(0, 1),
    epochs=10,
    train_size=10000,
    val_size=2000,
    test_size=5000,
  ),
  "quick": Config(
    models=("mlp", "resnet"),
    blocks=1,
    width=4,
    mlp_depth=4,
    mlp_width=16,
    image_size=14,
    sweep=False,
    lrs=(1e-2, 1e-1),
    seeds=(0,),
    epochs=2,
    train_size=512,
    val_size=256,
    test_size=500,
  ),
}


def _model(name: str, cfg: Config) -> tuple[str, Any]:
  if name == "mlp":
    return f"mlp{cfg.mlp_depth}", models.DeepMLP(cfg.mlp_depth, cfg.mlp_width, "relu")
  if name not in ("resnet", "plain"):
    raise ValueError(f"models are {MODELS}, got {name!r}")
  return f"{name}{6 * cfg.blocks + 2}", models.ResNet(cfg.blocks, cfg.width, name == "resnet")


def _depths(kind: str, model: Any, x: jax.Array) -> Any:
  """Weight-layer depths from the computation (`odn.infer_depths`), for every model.

  A ResNet's 1x1 shortcut projection gets the depth of the conv it runs beside
  (the serial count of `models.conv_depths` puts it one deeper), each BatchNorm
  its conv's depth, each scanned MLP layer its own.
  """
  variables = model.init(jax.random.key(0), x)
  rest = {k: v for k, v in variables.items() if k != "params"}
  apply = lambda params, x: model.apply({"params": params, **rest}, x)
  return odn.infer_depths(apply, variables["params"], x)


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


def _variants(cfg: Config) -> tuple:
  variants = PAPER_VARIANTS + (SWEEP if cfg.sweep else ())
  unknown = set(cfg.only) - {v[0] for v in variants}
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; choose from {[v[0] for v in variants]}")
  if cfg.only:
    variants = tuple(v for v in variants if v[0] in cfg.only or v[1] is None)
  return variants


def _select(hist: train.History, k: int, shape: tuple[int, int, int], cfg: Config) -> dict:
  """Member k of a group: its best learning rate by mean validation accuracy, and its curves."""
  pick = "val_acc" if "val_acc" in hist.epochs else "test_acc"
  epochs = len(hist.epochs["test_acc"])
  by_lr = lambda key: hist.epochs[key][-1].reshape(shape)[k].mean(-1)
  scores = by_lr(pick)
  best = int(np.argmax(np.nan_to_num(scores, nan=-1.0)))
  acc = hist.epochs["test_acc"].reshape(epochs, *shape)[:, k, best, :]  # (epochs, seeds)
  return {
    "selected_on": pick,
    "lrs": list(cfg.lrs),
    "val_acc_by_lr": scores if pick == "val_acc" else None,
    "test_acc_by_lr": by_lr("test_acc"),
    "best_lr": cfg.lrs[best],
    "best_lr_at_grid_edge": len(cfg.lrs) > 1 and best in (0, len(cfg.lrs) - 1),
    "test_acc_by_epoch": acc,
    "final_test_acc": acc[-1],
    "best_test_acc": acc.max(0),
  }


def _train_model(kind: str, cfg: Config, parts: dict, variants: tuple, quiet: bool) -> tuple:
  """Every variant x learning rate x seed of one model; variants that differ in gamma only
  share one program (vmapped, or mapped for convs on a CPU)."""
  name, model = _model(kind, cfg)
  depths = _depths(kind, model, jnp.asarray(parts["train"][0][:1]))
  groups: dict[tuple, list] = {}
  for label, decay, gamma, norm_depth in variants:
    groups.setdefault((decay, norm_depth), []).append((label, gamma))
  out = {}
  for (decay, norm_depth), members in groups.items():
    runs = train.grid(member=range(len(members)), learning_rate=cfg.lrs, seed=cfg.seeds)
    hp = {"learning_rate": runs["learning_rate"], "gamma": np.array([g for _, g in members])}
    hp["gamma"] = hp["gamma"][runs["member"]]
    group = train.Group(
      model,
      _tx_factory(decay, norm_depth, depths, cfg),
      hp,
      runs["seed"],
      vmap=kind == "mlp" or train.vmap_convs(),
    )
    hist = train.train_group(
      group,
      parts,
      epochs=cfg.epochs,
      batch_size=cfg.batch_size,
      desc=f"{name} {decay or 'baseline'}",
      quiet=quiet,
    )
    shape = (len(members), len(cfg.lrs), len(cfg.seeds))
    for k, (label, gamma) in enumerate(members):
      found = _select(hist, k, shape, cfg)
      out[label] = {"decay": decay, "gamma": gamma, "normalize_depth": norm_depth, **found}
      out[label].update(
        steps=len(hist.step_loss),
        steps_per_s=hist.steps_per_s,
        group_runs=group.size,
        group_train_s=hist.train_s,
      )
  return name, out


def _rows(name: str, variants: dict, target: float, cfg: Config) -> tuple[list, list]:
  result, sweep = [], []
  for label, v in variants.items():
    reach = v["reach_epoch"]
    edge = " (grid edge)" if v["best_lr_at_grid_edge"] else ""
    result.append(
      [
        name,
        label,
        f"{v['best_lr']:.3g}{edge}",
        report.fmt_mean_std(v["final_test_acc"]),
        report.fmt_mean_std(v["best_test_acc"]),
        "never" if reach is None else f"{reach} / {cfg.epochs}",
        f"{v['steps_per_s']:.0f}",
      ]
    )
    scores = v["val_acc_by_lr"] if v["val_acc_by_lr"] is not None else v["test_acc_by_lr"]
    best = int(np.argmax(np.nan_to_num(scores, nan=-1.0)))
    cells = [f"**{x:.3f}**" if i == best else f"{x:.3f}" for i, x in enumerate(scores)]
    sweep.append([name, label, *cells])
  return result, sweep


def run(cfg: Config, dataset: Dataset, writer: report.Writer, *, quiet: bool = False) -> dict:
  """Trains every variant of every model over the learning-rate sweep; writes tables, curves."""
  variants = _variants(cfg)
  plt = report.pyplot()
  fig, axes = plt.subplots(
    1, len(cfg.models), figsize=(5.5 * len(cfg.models), 3.8), squeeze=False, layout="constrained"
  )
  out: dict[str, Any] = {}
  rows, sweep_rows, sizes = [], [], {}
  for ax, kind in zip(axes[0], cfg.models):
    # the MLP reads the full 28 x 28 images, flattened; the CNNs the (pooled) images
    parts = split_for(dataset, dataclasses.replace(cfg, image_size=0) if kind == "mlp" else cfg)
    name, found = _train_model(kind, cfg, parts, variants, quiet)
    sizes[name] = len(parts["train"][1])
    target = float(np.mean(found["baseline"]["final_test_acc"]))
    for k, (label, v) in enumerate(found.items()):
      mean_curve = v["test_acc_by_epoch"].mean(1)
      v["reach_epoch"] = reach_epoch(mean_curve, target)
      ax.plot(
        np.arange(1, cfg.epochs + 1),
        mean_curve,
        "o-" if v["decay"] is None else "-",
        color=f"C{k}",
        label=f"{label} (lr {v['best_lr']:.3g})",
      )
    out[name] = {"target_acc": target, "train_examples": sizes[name], "variants": found}
    result, sweep = _rows(name, found, target, cfg)
    rows += result
    sweep_rows += sweep
    ax.axhline(target, color="red", lw=0.8, label="baseline's final accuracy")
    ax.set_title(name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
  writer.figure(fig, "test_accuracy.png")
  head = ["model", "variant", "best lr", "final test acc", "best test acc"]
  head += ["epoch reaching the baseline's final acc", "steps/s per run"]
  picked = "validation" if cfg.val_size else "test (no validation set)"
  steps = {n: cfg.epochs * (size // cfg.batch_size) for n, size in sizes.items()}
  return {
    "models": out,
    "paper_claims": PAPER_CLAIMS,
    "tables": [
      (
        f"Test accuracy at each variant's best learning rate (mean ± std over "
        f"{len(cfg.seeds)} seeds) and the first epoch at which the mean curve reaches the "
        "baseline's final mean accuracy",
        report.markdown_table(head, rows),
      ),
      (
        f"Learning-rate sweep: final {picked} accuracy (mean over seeds) per rate; the best "
        "in bold",
        report.markdown_table(["model", "variant", *[f"{lr:g}" for lr in cfg.lrs]], sweep_rows),
      ),
    ],
    "notes": [
      f"SGD with momentum {cfg.momentum}, no weight decay, for every variant; each variant's "
      f"learning rate picked from {list(cfg.lrs)} by the best mean final {picked} accuracy "
      "(the paper's LR is not given)",
      "steps per run: "
      + ", ".join(
        f"{n} {s:,} ({sizes[n]:,} training images, batch {cfg.batch_size})"
        for n, s in steps.items()
      ),
      "depth d: the weight layer's depth from the input in the computation graph "
      "(`odn.infer_depths`): each BatchNorm at its conv's depth, a ResNet's 1x1 shortcut "
      "projection at the depth of the conv beside it, each scanned MLP layer its own",
    ],
  }
