"""`vgg-flow`: the vanishing-gradient report, gradient flow in VGG08 / VGG38 and its fixes.

The report's course network (conv stages of `filters` channels with a
reduction block between; VGG08: no processing blocks, VGG38: 5 per stage),
trained with Adam and cosine annealing: VGG08, VGG38, VGG38 + BatchNorm,
+ residual connections, + both, and our additions, VGG38 + BGN before every
activation and VGG38 with ``layerwise_normalize`` before Adam. A table of
train / validation / test loss and accuracy, and a gradient-flow figure per
model (mean |g| per layer at init and over the last steps of training, the
latter recorded inside the train step by ``track_gradient_flow``).
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

NAME = "vgg-flow"
TITLE = (
  "Gradient flow in VGG08 / VGG38 with BN, residual connections, BGN (a vanishing-gradient report)"
)
# (variant, deep, bn, rc, bgn, layerwise_normalize): "deep" nets have `blocks`
# processing blocks per stage (VGG38 with the defaults), the shallow one none (VGG08).
VARIANTS = (
  ("shallow", False, False, False, False, False),
  ("deep", True, False, False, False, False),
  ("deep BN", True, True, False, False, False),
  ("deep RC", True, False, True, False, False),
  ("deep BN + RC", True, True, True, False, False),
  ("deep BGN", True, False, False, True, False),
  ("deep layerwise_normalize", True, False, False, False, True),
)
# The vanishing-gradient report, Table 1 (CIFAR-100, 100 epochs): LR, params, train loss,
# train acc, val loss, val acc.
PAPER = {
  "VGG08": ("1e-3", "60 K", 1.74, 51.59, 1.95, 46.84),
  "VGG38": ("1e-3", "336 K", 4.61, 0.01, 4.61, 0.01),
  "VGG38 BN": ("1e-3", "339 K", 1.82, 49.39, 2.12, 43.92),
  "VGG38 RC": ("1e-3", "336 K", 1.33, 61.52, 1.84, 52.32),
  "VGG38 BN + RC": ("1e-3", "339 K", 0.626, 80.43, 1.661, 59.0),
}
FLOW_STEPS = 16


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of `vgg-flow` (see PRESETS)."""

  variants: tuple[str, ...] = tuple(v[0] for v in VARIANTS)
  blocks: int = 5  # processing blocks per stage of the deep net: 5 gives VGG38
  stages: int = 3
  filters: int = 32
  image_size: int = 28  # 14: 2x2 average-pooled images (a quarter of the compute)
  lr: float = 1e-3
  seeds: tuple[int, ...] = (0,)
  epochs: int = 30
  batch_size: int = 100
  train_size: int = 0
  val_size: int = 5000
  test_size: int = 0  # 0: the whole test set


PRESETS = {
  "full": Config(),
  "cpu": Config(
    filters=16, image_size=14, epochs=3, train_size=5000, val_size=1000, test_size=3000
  ),
  "quick": Config(
    variants=("shallow", "deep", "deep BN + RC"),
    blocks=2,
    filters=4,
    image_size=14,
    epochs=1,
    train_size=400,
    val_size=200,
    test_size=500,
  ),
}


def _variant(name: str, cfg: Config) -> tuple[str, tuple]:
  """(label, settings) of a variant: the label names the depth, e.g. "VGG38 BN"."""
  for v in VARIANTS:
    if v[0] == name:
      blocks = cfg.blocks if v[1] else 0
      depth = 2 + cfg.stages * (2 * blocks + 2)
      return f"VGG{depth:02d}" + name.removeprefix("shallow").removeprefix("deep"), (blocks, *v[2:])
  raise ValueError(f"unknown variant {name!r}; choose from {[v[0] for v in VARIANTS]}")


def _tx_factory(layerwise: bool, depths: Any, total_steps: int):
  def make_tx(learning_rate):
    return optax.chain(
      odn.track_gradient_flow(history=FLOW_STEPS, depths=depths, stats="all"),
      *([odn.layerwise_normalize(depths=depths)] if layerwise else []),
      optax.scale_by_adam(),
      optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, total_steps)),
      optax.scale(-learning_rate),
    )

  return make_tx


def _init_flow(model, params, batch_stats, x, y, depths) -> odn.FlowReport:
  @jax.jit  # one compile; run op by op, the backward pass compiled some 300 small programs
  def flow(params, batch_stats, x, y):
    loss = lambda p: train.loss_fn(model, p, batch_stats, x, y)[0]
    return odn.gradient_flow(jax.grad(loss)(params), params, depths)

  return flow(params, batch_stats, x, y)


def _mean_flow(report_hist: odn.FlowReport) -> odn.FlowReport:
  """The mean over the recorded steps of a history report."""
  return jax.tree.map(lambda a: None if a is None else jnp.mean(a, axis=0), report_hist)


def run(cfg: Config, dataset: Dataset, writer: report.Writer, *, quiet: bool = False) -> dict:
  """Trains every variant, then writes the table and the gradient-flow figures."""
  parts = split_for(dataset, cfg)
  x0, y0 = (jnp.asarray(a[:100]) for a in parts["train"])
  total_steps = cfg.epochs * (len(parts["train"][1]) // cfg.batch_size)
  plt = report.pyplot()
  out: dict[str, Any] = {}
  rows, flows_end = [], {}
  for name in cfg.variants:
    label, (blocks, bn, rc, use_bgn, layerwise) = _variant(name, cfg)
    model = models.VGG(
      blocks, cfg.stages, cfg.filters, bn, rc, use_bgn, num_classes=dataset.num_classes
    )
    variables = model.init(jax.random.key(0), x0[:1])
    depths = models.conv_depths(variables["params"])
    make_tx = _tx_factory(layerwise, depths, total_steps)
    lrs = {"learning_rate": np.full(len(cfg.seeds), cfg.lr)}
    group = train.Group(model, make_tx, lrs, np.asarray(cfg.seeds), vmap=train.vmap_convs())
    init = train.init_states(group, x0[:1])
    s0 = train.run_config(init, 0)
    flow_init = _init_flow(model, s0.params, s0.batch_stats, x0, y0, depths)
    hist = train.train_group(
      group,
      parts,
      epochs=cfg.epochs,
      batch_size=cfg.batch_size,
      desc=f"{NAME} {label}",
      quiet=quiet,
    )
    s_end = train.run_config(hist.state, 0)
    flow_end = _mean_flow(
      odn.flow_from_state(s_end.opt_state, s_end.params, depths=depths, history=True)
    )
    flows_end[label] = flow_end
    final = {k: v[-1] for k, v in hist.epochs.items()}
    flags = odn.diagnose(flow_init)
    out[label] = {
      "params": models.count_params(s0.params),
      "final": final,
      "by_epoch": hist.epochs,
      "train_s": hist.train_s,
      "compile_s": hist.compile_s,
      "flow_init_mean_abs": np.asarray(flow_init.mean_abs),
      "flow_end_mean_abs": np.asarray(flow_end.mean_abs),
      "flow_layers": list(flow_init.paths),
      "first_over_last_init": float(flow_init.mean_abs[0] / flow_init.mean_abs[-1]),
      "first_over_last_end": float(flow_end.mean_abs[0] / flow_end.mean_abs[-1]),
      "diagnose_init": [f"{f.kind} {f.path}" for f in flags],
    }
    paper = PAPER.get(label)
    rows.append(
      [
        label,
        f"{cfg.lr:g}",
        f"{out[label]['params'] / 1000:.0f} K",
        report.fmt_mean_std(final["train_loss"]),
        report.fmt_mean_std(100 * final["train_acc"], 2),
        report.fmt_mean_std(final["val_loss"]),
        report.fmt_mean_std(100 * final["val_acc"], 2),
        report.fmt_mean_std(100 * final["test_acc"], 2),
        f"{out[label]['first_over_last_end']:.1e}",
        "-" if paper is None else f"{paper[2]} / {paper[3]} / {paper[4]} / {paper[5]}",
      ]
    )
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    odn.plot_gradient_flow(
      {"at init": flow_init, f"last {FLOW_STEPS} steps": flow_end},
      ax,
      stats=("mean_abs",),
      title=f"{label}: gradient flow",
    )
    writer.figure(fig, f"flow_{label.lower().replace(' + ', '_').replace(' ', '_')}.png")
  fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
  odn.plot_gradient_flow(
    flows_end,
    ax,
    stats=("mean_abs",),
    title=f"mean |g| per layer over the last {FLOW_STEPS} training steps",
  )
  writer.figure(fig, "flow_all.png")
  head = [
    "model",
    "LR",
    "# params",
    "train loss",
    "train acc %",
    "val loss",
    "val acc %",
    "test acc %",
    "mean|g| first/last layer (end)",
    "paper (CIFAR-100): train loss / acc %, val loss / acc %",
  ]
  return {
    "variants": out,
    "tables": [
      (
        "Final epoch: loss and accuracy (mean ± std over seeds); the paper's Table 1 "
        "(CIFAR-100, 100 epochs) beside",
        report.markdown_table(head, rows),
      )
    ],
    "notes": [
      f"Adam lr {cfg.lr} with cosine annealing over {total_steps} steps, batch {cfg.batch_size}; "
      "no data augmentation; images pooled to "
      f"{cfg.image_size}x{cfg.image_size}, {cfg.filters} filters per conv",
    ],
  }
