"""`depth-decay-nets`: Kwiatkowski & Chang's DenseNet and LSTM claims, an LR sweep per variant.

A small DenseNet (three dense blocks of BN-ReLU-Conv3x3 layers, 1x1-conv +
average-pool transitions) on 2x2-pooled Fashion-MNIST, and a stacked LSTM
reading Fashion-MNIST row by row (28 steps of 28 pixels: the stand-in for the
paper's named-entity task, which cannot be downloaded here), trained with SGD
+ momentum: the baseline against the paper's rule ``optax.chain(
depth_normalized(gamma, ...), optax.sgd(lr, momentum))`` with the paper's
settings (DenseNet: linear decay, gamma 0.5; LSTM: exponential decay, gamma
0.001, gradients normalized to the norm of the last layer's weights). Every
variant gets its own learning-rate sweep, chosen by its mean final validation
metric over seeds and reported on test; then the first epoch at which each
variant's mean test curve reaches the baseline's final value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import optax_depthnorm as odn
from optax_depthnorm.experiments import models_extra, report, train
from optax_depthnorm.experiments.data import Dataset, pool_images, split

NAME = "depth-decay-nets"
TITLE = "Depth decay on a DenseNet and an LSTM: SGD vs depth_normalized, LR tuned per variant"


class Variant(NamedTuple):
  """An optimizer: the baseline (decay None) or depth_normalized with these arguments.

  ``lr`` is the centre of the variant's LR grid (``lr * Config.lr_factors``), set
  from a 4-epoch probe (2,000 images, one seed, validation accuracy and
  training loss, the cpu preset's nets and factors 0.1-100) where marked.
  """

  decay: str | None
  gamma: float = 0.0
  normalize_depth: bool = False
  target: float | str = 1.0
  lr: float = 0.01


VARIANTS = {
  "densenet": {
    "baseline": Variant(None, lr=0.03),  # probed
    "linear 0.5": Variant("linear", 0.5, lr=2.0),  # the paper's; probed, then the cpu run
    "linear 0.5 on d / max d": Variant("linear", 0.5, True, lr=0.01),  # probed
    "exponential 0.01": Variant("exponential", 0.01, lr=0.01),
  },
  "lstm": {
    "baseline": Variant(None, lr=0.1),  # probed
    "exponential 0.001 to last weights": Variant(  # the paper's; probed
      "exponential", 0.001, False, "last_layer_weights", lr=0.002
    ),
    "exponential 0.001 to 1": Variant("exponential", 0.001, lr=0.02),  # probed
    "exponential 0.001 to last gradient": Variant("exponential", 0.001, False, "last_layer", 0.05),
  },
}
PAPER_CLAIMS = {
  "densenet": "linear decay with gamma 0.5 reached at epoch 28 the precision the baseline "
  "DenseNet reached at epoch 48 (Fig. 2), and was better at every epoch after epoch 5",
  "lstm": "exponential decay with gamma 0.001, normalized to the norm of the last weight "
  "matrix: a lower loss than the baseline at every epoch, the baseline's final loss reached "
  "at epoch 33, two thirds of the training (LM-LSTM-CRF on named-entity recognition, Fig. 3)",
}
# What the LR is chosen by: (curve, higher is better); and the curves the reach epochs use.
SELECT = {"densenet": ("val_acc", True), "lstm": ("val_loss", False)}
REACH = {"densenet": (("test_acc", True),), "lstm": (("test_loss", False), ("train_loss", False))}
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of `depth-decay-nets` (see PRESETS)."""

  nets: tuple[str, ...] = ("densenet", "lstm")
  dense_variants: tuple[str, ...] = tuple(VARIANTS["densenet"])
  lstm_variants: tuple[str, ...] = tuple(VARIANTS["lstm"])
  blocks: int = 3  # DenseNet: dense blocks
  layers: int = 12  # DenseNet: conv layers per block
  growth: int = 12
  image_size: int = 28  # DenseNet input side (14: 2x2 average-pooled); the LSTM reads 28x28
  hidden: int = 128  # LSTM units per layer
  lstm_layers: int = 2
  lr_factors: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)  # each variant's grid: its lr x these
  momentum: float = 0.9
  clip: float = 5.0  # LSTM: clip the gradient's global norm (LM-LSTM-CRF's default); 0: off
  seeds: tuple[int, ...] = (0, 1, 2)
  epochs: int = 50
  batch_size: int = 64
  train_size: int = 0  # 0: all training images but the validation set
  val_size: int = 5000
  test_size: int = 0  # 0: the whole test set


PRESETS = {
  "full": Config(),
  "cpu": Config(
    dense_variants=("baseline", "linear 0.5", "linear 0.5 on d / max d"),
    lstm_variants=("baseline", "exponential 0.001 to last weights"),
    layers=4,
    growth=8,
    image_size=14,
    hidden=64,
    lr_factors=(0.1, 0.5, 2.0, 10.0),
    seeds=(0, 1),
    epochs=10,
    batch_size=32,
    train_size=2000,
    val_size=1000,
    test_size=1000,
  ),
  "quick": Config(
    dense_variants=("baseline", "linear 0.5"),
    lstm_variants=("baseline", "exponential 0.001 to last weights"),
    blocks=2,
    layers=1,
    growth=2,
    image_size=7,
    hidden=8,
    lr_factors=(0.5, 2.0),
    seeds=(0, 1),
    epochs=2,
    batch_size=16,
    train_size=64,
    val_size=32,
    test_size=32,
  ),
}


def make_model(net: str, cfg: Config) -> tuple[str, Any]:
  """(description, linen module) of ``"densenet"`` or ``"lstm"``."""
  if net == "densenet":
    depth = 1 + cfg.blocks * cfg.layers + (cfg.blocks - 1) + 1
    model = models_extra.DenseNet(cfg.blocks, cfg.layers, cfg.growth)
    return f"DenseNet-{depth} ({cfg.blocks}x{cfg.layers} layers, growth {cfg.growth})", model
  if net == "lstm":
    desc = f"{cfg.lstm_layers}-layer LSTM ({cfg.hidden} units) + Dense, rows as steps"
    return desc, models_extra.RowLSTM(cfg.hidden, cfg.lstm_layers)
  raise ValueError(f"nets are 'densenet' and 'lstm', got {net!r}")


def make_tx_factory(net: str, v: Variant, depths: Any, cfg: Config):
  """``make_tx(learning_rate)``: SGD + momentum, after `depth_normalized` unless the baseline."""
  steps = [optax.clip_by_global_norm(cfg.clip)] if net == "lstm" and cfg.clip > 0 else []
  if v.decay is not None:
    steps.append(
      odn.depth_normalized(
        v.gamma, decay=v.decay, target=v.target, depths=depths, normalize_depth=v.normalize_depth
      )
    )
  return lambda learning_rate: optax.chain(*steps, optax.sgd(learning_rate, cfg.momentum))


def first_epoch(curve: np.ndarray, target: float, higher: bool) -> int | None:
  """First epoch (1-based) whose value reaches `target` (>= if `higher`, else <=), or None."""
  curve = np.asarray(curve, np.float64)
  hits = np.flatnonzero(curve >= target if higher else curve <= target)
  return int(hits[0]) + 1 if hits.size else None


def _parts(net: str, dataset: Dataset, cfg: Config) -> dict:
  parts = split(
    dataset,
    train_size=cfg.train_size or None,
    val_size=cfg.val_size,
    test_size=cfg.test_size or None,
  )
  return pool_images(parts, cfg.image_size) if net == "densenet" else parts


def _sweep(net, label, v, model, depths, parts, cfg, quiet) -> dict[str, Any]:
  """Trains one variant at every LR of its grid and seed; picks its LR on validation."""
  lrs = [float(f"{v.lr * f:.3g}") for f in cfg.lr_factors]
  n_lr, n_seed = len(lrs), len(cfg.seeds)
  group = train.Group(
    model,
    make_tx_factory(net, v, depths, cfg),
    {"learning_rate": np.repeat(np.asarray(lrs, np.float32), n_seed)},
    np.tile(cfg.seeds, n_lr),
    vmap=train.vmap_convs() if net == "densenet" else True,
  )
  hist = train.train_group(
    group, parts, epochs=cfg.epochs, batch_size=cfg.batch_size, desc=f"{net} {label}", quiet=quiet
  )
  curves = {k: hist.epochs[k].reshape(cfg.epochs, n_lr, n_seed) for k in CURVES}
  key, higher = SELECT[net]
  score = curves[key][-1].mean(-1)  # a diverged (NaN) seed makes its LR the worst
  score = np.where(np.isfinite(score), score, -np.inf if higher else np.inf)
  best = int(np.argmax(score) if higher else np.argmin(score))
  steps = len(hist.step_loss)
  return {
    **v._asdict(),
    "lrs": list(lrs),
    "chosen_lr": lrs[best],
    "chosen_at_grid_edge": n_lr > 1 and best in (0, n_lr - 1),
    "select_by": f"mean final {key}",
    "select_score_by_lr": score,
    "by_lr": {f"{lr:g}": {k: c[:, i] for k, c in curves.items()} for i, lr in enumerate(lrs)},
    **{k: c[:, best] for k, c in curves.items()},
    "speed": {
      "runs": group.size,
      "steps_per_run": steps,
      "vmap": group.vmap,
      "compile_s": hist.compile_s,
      "train_s": hist.train_s,
      "steps_per_s": hist.steps_per_s,  # each run's pace, the runs side by side or in turn
      "run_steps_per_s": steps * group.size / hist.train_s if hist.train_s > 0 else None,
    },
  }


def _run_net(net: str, dataset: Dataset, cfg: Config, writer: report.Writer, quiet: bool):
  labels = cfg.dense_variants if net == "densenet" else cfg.lstm_variants
  unknown = sorted(set(labels) - set(VARIANTS[net]))
  if unknown:
    raise ValueError(f"unknown {net} variants {unknown}; choose from {list(VARIANTS[net])}")
  labels = ("baseline", *[lb for lb in labels if lb != "baseline"])
  parts = _parts(net, dataset, cfg)
  desc, model = make_model(net, cfg)
  # Shapes suffice: index_depths labels layers by their numbered names, not by dict order.
  params = jax.eval_shape(model.init, jax.random.key(0), parts["train"][0][:1])["params"]
  depths = models_extra.index_depths(params)
  table = odn.depth_table(params, depths)
  (writer.dir / f"depths_{net}.txt").write_text(table + "\n")
  variants = {
    lb: _sweep(net, lb, VARIANTS[net][lb], model, depths, parts, cfg, quiet) for lb in labels
  }
  targets = {k: float(np.mean(variants["baseline"][k][-1])) for k, _ in REACH[net]}
  last_third = max(1, int(np.ceil(2 * cfg.epochs / 3)))
  for r in variants.values():
    r["reach_epoch"] = {k: first_epoch(r[k].mean(1), targets[k], hi) for k, hi in REACH[net]}
    r["reach_epoch_per_seed"] = {
      k: [first_epoch(r[k][:, s], targets[k], hi) for s in range(len(cfg.seeds))]
      for k, hi in REACH[net]
    }
  base = variants["baseline"]
  key = REACH[net][0][0]
  gain = float(np.mean(base[key][-1]) - np.mean(base[key][last_third - 1]))
  return {
    "model": desc,
    "params": int(sum(x.size for x in jax.tree.leaves(params))),
    "max_depth": int(max(jax.tree.leaves(depths))),
    "depth_table": table,
    "targets": targets,
    "baseline_change_over_last_third": {"metric": key, "from_epoch": last_third, "change": gain},
    "variants": variants,
  }


def _fmt_reach(epoch: int | None, per_seed: list, epochs: int) -> str:
  seeds = ", ".join("-" if e is None else str(e) for e in per_seed)
  return f"{'never' if epoch is None else epoch} / {epochs} (seeds: {seeds})"


def _tables(out: dict, cfg: Config) -> list[tuple[str, str]]:
  tables, sweep_rows = [], []
  for net, res in out.items():
    reach = [k for k, _ in REACH[net]]
    key = SELECT[net][0]
    head = ["variant", "chosen LR (grid)", f"final {key.replace('_', ' ')}"]
    head += ["final test acc", "final test loss"]
    head += [f"epoch reaching the baseline's final {k.replace('_', ' ')}" for k in reach]
    head += ["steps/s per run (all runs)"]
    rows = []
    for label, r in res["variants"].items():
      grid = ", ".join(f"{lr:g}" for lr in r["lrs"])
      edge = " (edge)" if r["chosen_at_grid_edge"] else ""
      rows.append(
        [label, f"{r['chosen_lr']:g}{edge} ({grid})", report.fmt_mean_std(r[key][-1])]
        + [report.fmt_mean_std(r["test_acc"][-1]), report.fmt_mean_std(r["test_loss"][-1])]
        + [_fmt_reach(r["reach_epoch"][k], r["reach_epoch_per_seed"][k], cfg.epochs) for k in reach]
        + [f"{r['speed']['steps_per_s']:.1f} ({r['speed']['run_steps_per_s']:.0f})"]
      )
      for lr, c in r["by_lr"].items():
        sweep_rows.append(
          [net, label, lr, report.fmt_mean_std(c[key][-1]), report.fmt_mean_std(c["test_acc"][-1])]
        )
    target = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in res["targets"].items())
    tables.append(
      (
        f"{res['model']}: each variant at its chosen LR (mean ± std over {len(cfg.seeds)} seeds; "
        f"baseline's final {target}; selected by mean final {SELECT[net][0].replace('_', ' ')})",
        report.markdown_table(head, rows),
      )
    )
  head = ["net", "variant", "LR", "final val (selection metric)", "final test acc"]
  tables.append(("Every LR of every sweep", report.markdown_table(head, sweep_rows)))
  return tables


def _figures(out: dict, cfg: Config, writer: report.Writer) -> None:
  plt = report.pyplot()
  nets = list(out)
  fig, axes = plt.subplots(1, len(nets), figsize=(5.8 * len(nets), 4), squeeze=False)
  sweep, saxes = plt.subplots(1, len(nets), figsize=(5.8 * len(nets), 4), squeeze=False)
  epochs = np.arange(1, cfg.epochs + 1)
  for ax, sax, net in zip(axes[0], saxes[0], nets):
    key, sel = REACH[net][0][0], SELECT[net][0]
    for k, (label, r) in enumerate(out[net]["variants"].items()):
      curve = r[key]
      line = ax.plot(epochs, curve.mean(1), "o-" if k == 0 else "-", color=f"C{k}")[0]
      line.set_label(f"{label} (lr {r['chosen_lr']:g})")
      ax.fill_between(epochs, curve.min(1), curve.max(1), color=f"C{k}", alpha=0.15)
      for other, _ in REACH[net][1:]:  # the LSTM's train loss, dashed
        ax.plot(epochs, r[other].mean(1), "--", color=f"C{k}", lw=0.8)
      sax.plot(r["lrs"], [c[sel][-1].mean() for c in r["by_lr"].values()], "o-", label=label)
    ax.axhline(out[net]["targets"][key], color="red", lw=0.8, label="baseline's final value")
    dashed = " (dashed: train loss)" if len(REACH[net]) > 1 else ""
    ax.set(title=out[net]["model"], xlabel="epoch", ylabel=f"mean {key.replace('_', ' ')}{dashed}")
    sax.set(title=out[net]["model"], xlabel="learning rate", xscale="log")
    sax.set_ylabel(f"mean final {SELECT[net][0].replace('_', ' ')}")
    for a in (ax, sax):
      a.grid(alpha=0.3)
      a.legend(fontsize="x-small")
  fig.tight_layout()
  sweep.tight_layout()
  writer.figure(fig, "test_curves.png")
  writer.figure(sweep, "lr_sweep.png")


def run(cfg: Config, dataset: Dataset, writer: report.Writer, *, quiet: bool = False) -> dict:
  """Sweeps every variant of every net; writes the reach-epoch tables and figures."""
  for net in cfg.nets:
    make_model(net, cfg)  # an unknown net fails before any training
  out = {net: _run_net(net, dataset, cfg, writer, quiet) for net in cfg.nets}
  _figures(out, cfg, writer)
  notes = [
    "every variant has its own LR grid, its centre (Variant.lr, set from a short probe) times "
    f"{', '.join(f'{f:g}' for f in cfg.lr_factors)}; a chosen LR at an end of its grid is "
    "marked (edge): the sweep may not have found that variant's best; SGD momentum "
    f"{cfg.momentum}, batch {cfg.batch_size}, no weight decay, constant LR, {cfg.epochs} "
    f"epochs of {cfg.train_size or 'all'} training images; validation: the last "
    f"{cfg.val_size} training images; test: {cfg.test_size or 'all'} test images",
    "DenseNet depths: d-th weight layer along the block sequence (stem conv 0, then each dense "
    "layer, transition conv and the head in order), each BatchNorm at the depth of the conv it "
    "feeds (pre-activation nets); the dense connections would make the shortest path from the "
    "input to every layer 2 or 3 layers, which we do not use",
    "LSTM depths: stacked layer index from the input (layer 0, 1, ...), the head last; the "
    "unroll over the 28 rows is time, not depth: every step shares the layer's weights",
    "LSTM: the paper's 'normalized to the norm of the last weight matrix' (sec. 3.3; sec. 1.1 "
    "says 'the L2 norm of the weights of the final layer', the conclusion 'the norm of the "
    "gradient of the final layer') is target='last_layer_weights': N = the L2 norm of the "
    f"head's kernel and bias together; gradients clipped to global norm {cfg.clip} first "
    "(LM-LSTM-CRF's default; no effect before the normalization)",
    "reach epochs: first epoch at which the variant's mean curve over seeds reaches the "
    "baseline's final mean (each at its chosen LR); per-seed curves in parentheses. "
    "train loss is the mean over each epoch's mini-batches",
    "steps/s per run: a run's steps over its group's wall time, evaluation included (the "
    "DenseNet's runs go one after another on a CPU, the LSTM's side by side, vmapped); in "
    "parentheses all runs' steps per second together",
  ]
  for net, res in out.items():
    ch = res["baseline_change_over_last_third"]
    notes.append(
      f"{net}: baseline's mean {ch['metric'].replace('_', ' ')} changed by {ch['change']:+.4f} "
      f"from epoch {ch['from_epoch']} to {cfg.epochs} (a plateau shows as a change near 0)"
    )
  return {"nets": out, "paper_claims": PAPER_CLAIMS, "tables": _tables(out, cfg), "notes": notes}
