"""`combinations`: the combinations none of the seed papers ran, on deep ReLU MLPs.

Dense nets of hidden ReLU layers of `width` units (`models.DeepMLP`, Cabana &
Lago-Fernández's net) on flattened 784-pixel images, in three parts:

1. BGN (Cabana & Lago-Fernández) with depth decay (Kwiatkowski & Chang): the BGN
   net and the plain net with Adam alone, with ``depth_decay(gamma, reverse=True)`` after Adam
   (layer-wise LR decay, the head at the full rate) and with it forward.
2. BGN against ``layerwise_normalize(group="layer")`` (Yu et al.), plain SGD:
   (a) BGN net + SGD, (b) plain net + layerwise_normalize + SGD, (c) plain
   net + SGD. By BGN's eq. 9 (a) and (b) both rescale each layer's plain
   gradient by one scalar; the per-epoch gap and a verdict say how alike.
3. ``scale_normalize("probe")`` (Lo, Amaral & Ding) after SGD, against SGD and Adam.

Every variant sweeps its own learning rates; the best mean *validation*
accuracy picks one, reported as mean ± std *test* accuracy over seeds. Runs
of one net and optimizer structure train vmapped as one group (the decay
variants are one Adam chain with two injected gammas, 0 switching one off);
a variant that two parts use trains once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

import optax_depthnorm as odn
from optax_depthnorm.experiments import models, report, train
from optax_depthnorm.experiments.data import Dataset, split_for

NAME = "combinations"
TITLE = "Combinations no paper ran: BGN x depth decay, BGN vs layerwise_normalize, scale norm"
STACK = {"layer_1_on": 0}  # DeepMLP's nn.scan'ed hidden layers 1..depth-1, one per slice
# The members of a group: variants that differ only in injected numbers.
MEMBERS = {"adam": ("none", "forward", "reverse"), "sgd": ("none", "scale"), "ln-sgd": ("none",)}
LABELS = {"adam": "Adam", "sgd": "SGD", "ln-sgd": "layerwise_normalize(layer) + SGD"}
SUFFIX = {
  "none": "",
  "forward": " + depth_decay forward",
  "reverse": " + depth_decay reverse",
  "scale": " + scale_normalize(probe)",
}
DECAY = {"none": "none", "forward": "forward (from input)", "reverse": "reverse (LLRD)"}
ALWAYS = 2**30  # scale_normalize's first_n_steps meaning "every step"; 0 means never
ALIKE_TOL = 0.02


def _lrs(lo: float, hi: float, n: int) -> tuple[float, ...]:
  return tuple(float(f"{x:.3g}") for x in np.geomspace(lo, hi, n))


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of `combinations` (see PRESETS)."""

  depth: int = 60  # hidden layers of part 1 (Adam)
  sgd_depth: int = 30  # of part 2: with SGD, no variant leaves chance in 300 steps at 60
  scale_depth: int = 30  # of part 3 (at sgd_depth, part 2's plain SGD runs are reused)
  width: int = 64
  gamma: float = 2.0  # depth_decay on d / d_max: the far end's factor is exp(-gamma)
  scale_adam: bool = True  # Adam as a third line in part 3
  adam_lrs: tuple[float, ...] = _lrs(2e-4, 2e-2, 5)
  sgd_lrs: tuple[float, ...] = _lrs(1e-3, 1e-1, 5)  # plain net + SGD, and + scale_normalize
  bgn_sgd_lrs: tuple[float, ...] = _lrs(3e-6, 3e-4, 5)  # BGN's gradients are large
  ln_lrs: tuple[float, ...] = _lrs(1e-3, 1e-1, 5)  # each layer's step has norm lr
  seeds: tuple[int, ...] = (0, 1, 2)
  epochs: int = 10
  batch_size: int = 128
  train_size: int = 0  # 0: all training examples but the validation set
  val_size: int = 5000
  test_size: int = 0  # 0: the whole test set


_CPU_LRS = dict(
  adam_lrs=_lrs(2e-4, 2e-2, 4),
  sgd_lrs=_lrs(1e-3, 1e-1, 4),
  bgn_sgd_lrs=_lrs(3e-6, 3e-4, 4),
  ln_lrs=_lrs(1e-3, 1e-1, 4),
)
_QUICK = dict(
  adam_lrs=(1e-3, 1e-2), sgd_lrs=(0.01, 0.1), bgn_sgd_lrs=(1e-4, 1e-3), ln_lrs=(0.01, 0.1)
)
_QUICK.update(train_size=256, val_size=128, test_size=128, width=16, seeds=(0, 1), batch_size=32)
PRESETS = {
  "full": Config(),
  # About 13 minutes on a 2-core CPU shared with other jobs: 2 epochs of the 55,000
  # training images at batch 64 (1,718 steps per run), 2 seeds, 4 learning rates per variant.
  "cpu": Config(**_CPU_LRS, seeds=(0, 1), epochs=2, batch_size=64),
  "long": Config(**_CPU_LRS, seeds=(0, 1, 2), epochs=4, batch_size=64),  # 3x the cpu preset
  "quick": Config(**_QUICK, depth=3, sgd_depth=3, scale_depth=3, epochs=2),
}


def model_depths(model: models.DeepMLP) -> Any:
  """Depth labels of a DeepMLP's params: 0 at the input, one per scanned slice, the head last."""
  params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 784), np.float32))["params"]
  rule = {"layer_0": 0, "layer_1_on": 1, "head": min(model.depth, 2)}  # sorted keys: say the order
  return odn.layer_depths(params, rule, stack_axis=STACK if model.depth > 1 else None)


def make_tx(kind: str, depths: Any, scale: bool = False):
  """``make_tx(**hyperparams)`` of an optimizer kind; every hyperparameter a number.

  "adam": Adam, then depth_decay forward and reverse (gamma 0 switches one off:
  exp(-0 d) = 1 exactly). "sgd" with `scale`: SGD, then scale_normalize("probe")
  on during the first ``scale_steps`` steps (0: never, plain SGD; the probes'
  key is a number too, the run's seed).
  """
  if kind == "adam":
    decay = dict(depths=depths, normalize_depth=True)
    return lambda learning_rate, gamma_forward, gamma_reverse: optax.chain(
      optax.adam(learning_rate),
      odn.depth_decay(gamma_forward, **decay),
      odn.depth_decay(gamma_reverse, reverse=True, **decay),
    )
  if kind == "sgd" and scale:
    return lambda learning_rate, scale_steps, probe_key: optax.chain(
      optax.sgd(learning_rate),
      odn.scale_normalize("probe", first_n_steps=scale_steps, key=probe_key, depths=depths),
    )
  if kind == "sgd":
    return lambda learning_rate: optax.sgd(learning_rate)
  if kind == "ln-sgd":
    return lambda learning_rate: optax.chain(
      odn.layerwise_normalize(group="layer", depths=depths), optax.sgd(learning_rate)
    )
  raise ValueError(f"unknown optimizer kind {kind!r}")


def label(key: tuple) -> str:
  """A variant's name, e.g. 'BGN + Adam + depth_decay reverse (60 layers)'."""
  net, depth, kind, member = key
  return f"{'BGN' if net == 'bgn' else 'plain'} + {LABELS[kind]}{SUFFIX[member]} ({depth} layers)"


def parts(cfg: Config) -> dict[str, list[tuple]]:
  """The variants (net, depth, kind, member) of each part."""
  d, g, s = cfg.depth, cfg.sgd_depth, cfg.scale_depth
  return {
    "bgn_depth_decay": [(n, d, "adam", m) for n in ("bgn", "plain") for m in MEMBERS["adam"]],
    "bgn_vs_layerwise": [(n, g, k, "none") for n, k in (("bgn", "sgd"), ("plain", "ln-sgd"))]
    + [("plain", g, "sgd", "none")],
    "scale_normalize": [("plain", s, "sgd", "scale"), ("plain", s, "sgd", "none")]
    + [("plain", s, "adam", "none")] * cfg.scale_adam,
  }


def _train(cfg: Config, data: dict, net: str, depth: int, kind: str, members: list, quiet: bool):
  """Trains one group (every member x seed x learning rate); returns per-member results."""
  model = models.DeepMLP(depth, cfg.width, "relu", False, net == "bgn", 10)
  lrs = {"adam": cfg.adam_lrs, "ln-sgd": cfg.ln_lrs}.get(kind, cfg.sgd_lrs)
  lrs = cfg.bgn_sgd_lrs if (net, kind) == ("bgn", "sgd") else lrs
  runs = train.grid(member=range(len(members)), seed=cfg.seeds, learning_rate=lrs)
  hp: dict[str, Any] = {"learning_rate": runs["learning_rate"]}
  which = np.asarray(members)[runs["member"]]
  if kind == "adam":
    hp["gamma_forward"] = np.where(which == "forward", cfg.gamma, 0.0)
    hp["gamma_reverse"] = np.where(which == "reverse", cfg.gamma, 0.0)
  if scale := "scale" in members:
    hp["scale_steps"], hp["probe_key"] = np.where(which == "scale", ALWAYS, 0), runs["seed"]
  group = train.Group(model, make_tx(kind, model_depths(model), scale), hp, runs["seed"])
  desc = f"{NAME} {net} {kind} d={depth}"
  kw = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, desc=desc, quiet=quiet)
  hist = train.train_group(group, data, **kw)
  shape = (len(members), len(cfg.seeds), len(lrs))
  epochs = {k: v.reshape(len(v), *shape) for k, v in hist.epochs.items()}
  step_loss = hist.step_loss.reshape(len(hist.step_loss), *shape)
  select = "val_acc" if "val_acc" in epochs else "test_acc"
  steps = len(hist.step_loss)
  window = max(1, steps // 100)
  timing = dict(group_runs=group.size, group_train_s=hist.train_s, group_compile_s=hist.compile_s)
  timing["steps_per_s"] = hist.steps_per_s
  out = {}
  for m, member in enumerate(members):
    val = np.nan_to_num(epochs[select][-1, m], nan=-1.0).mean(0)
    best = int(np.argmax(val))
    test = epochs["test_acc"][-1, m]
    curve = step_loss[:, m, :, best].mean(1)
    out[(net, depth, kind, member)] = {
      "label": label((net, depth, kind, member)),
      "lrs": list(lrs),
      "val_acc_by_lr": epochs[select][-1, m].mean(0),
      "test_acc_by_lr": test.mean(0),
      "val_acc_runs": epochs[select][-1, m],
      "test_acc_runs": test,
      "best_lr": lrs[best],
      "test_acc": test[:, best],
      "mean": float(np.mean(test[:, best])),
      "std": float(np.std(test[:, best], ddof=1)) if len(cfg.seeds) > 1 else 0.0,
      "test_acc_by_epoch": epochs["test_acc"][:, m, :, best].mean(1),
      "final_train_loss": epochs["train_loss"][-1, m, :, best],
      "diverged_by_lr": (~np.isfinite(epochs["train_loss"][-1, m])).sum(0),  # seeds, per lr
      "diverged": int((~np.isfinite(epochs["train_loss"][-1, m, :, best])).sum()),
      "step_loss_window": window,
      "step_loss_mean": curve[: steps // window * window].reshape(-1, window).mean(1),
      "steps": steps,
      "examples": steps * cfg.batch_size,
      "seeds": list(cfg.seeds),
      **timing,
    }
  return out, {"group": label((net, depth, kind, "none")), "members": members, **timing}


def _diverged(r: dict) -> str:
  return f" ({r['diverged']} of {len(r['seeds'])} runs diverged)" if r["diverged"] else ""


def _figure(results: dict, plan: dict, cfg: Config) -> Any:
  plt = report.pyplot()
  fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), squeeze=False, layout="constrained")
  titles = ["1: BGN x depth_decay (Adam)", "2: BGN vs layerwise_normalize (SGD)", "3: scale norm"]
  for col, (part, keys) in enumerate(plan.items()):
    top, bottom = axes[0][col], axes[1][col]
    for k, key in enumerate(keys):
      r, style = results[key], "--" if key[0] == "plain" and part == "bgn_depth_decay" else "-"
      x = (np.arange(len(r["step_loss_mean"])) + 1) * r["step_loss_window"]
      name = f"{r['label']}, lr {r['best_lr']:g}" + _diverged(r)
      top.plot(x, r["step_loss_mean"], style, color=f"C{k}", label=name)
      epochs = np.arange(1, len(r["test_acc_by_epoch"]) + 1)
      bottom.plot(epochs, r["test_acc_by_epoch"], style + "o", color=f"C{k}")
    top.set(title=titles[col], xlabel="step", yscale="log")
    top.legend(fontsize="xx-small")
    bottom.set(xlabel="epoch", ylim=(0, 1), xticks=np.arange(1, cfg.epochs + 1))
    for ax in (top, bottom):
      ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(f"training loss (mean of {len(cfg.seeds)} seeds at the best lr)")
  axes[1][0].set_ylabel("test accuracy (mean over seeds)")
  return fig


def compare(a: dict, b: dict, chance: float = 0.1) -> dict:
  """Per-epoch gap in mean test accuracy (a - b) and a verdict from the final accuracies.

  "alike" when they are within 0.02; "differ" when further apart than that and
  than 2 std (the larger of the two, over seeds); "inconclusive" in between
  (the seeds disagree more than the means); "both at chance" when neither
  beats chance by 0.05 (then being alike says nothing).
  """
  gap = np.asarray(a["test_acc_by_epoch"]) - np.asarray(b["test_acc_by_epoch"])
  tol, final = max(ALIKE_TOL, 2 * max(a["std"], b["std"])), a["mean"] - b["mean"]
  verdict = "alike" if abs(final) <= ALIKE_TOL else "differ" if abs(final) > tol else "inconclusive"
  if max(a["mean"], b["mean"]) < chance + 0.05:
    verdict = "both at chance"
  return {"gap_by_epoch": gap, "final_gap": final, "tolerance": tol, "verdict": verdict}


def _tables(results: dict, plan: dict, cmp: dict, groups: list, cfg: Config) -> list:
  acc = lambda r: report.fmt_mean_std(r["test_acc"]) + _diverged(r)
  loss = lambda r: report.fmt_mean_std(r["final_train_loss"])
  best = max(results[k]["mean"] for k in plan["bgn_depth_decay"])
  val = lambda r: f"{np.max(r['val_acc_by_lr']):.3f}"
  edge = lambda r: len(r["lrs"]) > 2 and r["best_lr"] in (r["lrs"][0], r["lrs"][-1])
  best_lr = lambda r: f"{r['best_lr']:.3g}" + (" (grid's edge)" if edge(r) else "")
  mark = lambda r: f"**{acc(r)}**" if r["mean"] == best else acc(r)
  rows1 = [
    ["BGN" if k[0] == "bgn" else "plain", DECAY[k[3]], best_lr(r), val(r), mark(r)]
    for k, r in ((k, results[k]) for k in plan["bgn_depth_decay"])
  ]
  e = cfg.epochs
  rows2 = [
    [f"({'abc'[i]}) {results[k]['label']}", best_lr(results[k]), acc(results[k])]
    + [f"{v:.3f}" for v in results[k]["test_acc_by_epoch"]]
    for i, k in enumerate(plan["bgn_vs_layerwise"])
  ]
  rows2.append(["gap (a) - (b)", "", f"{cmp['final_gap']:+.3f}"])
  rows2[-1] += [f"{v:+.3f}" for v in cmp["gap_by_epoch"]]
  rows3 = [
    [r["label"], best_lr(r), val(r), acc(r), loss(r)]
    for r in (results[k] for k in plan["scale_normalize"])
  ]
  width = max(len(r["lrs"]) for r in results.values())
  sweep = [
    [r["label"]]
    + [
      f"{lr:.3g}: {v:.3f} / {t:.3f}"
      for lr, v, t in zip(r["lrs"], r["val_acc_by_lr"], r["test_acc_by_lr"])
    ]
    + ["-"] * (width - len(r["lrs"]))
    for r in results.values()
  ]
  times = [
    [g["group"], ", ".join(g["members"]), g["group_runs"]]
    + [f"{g[k]:.1f}" for k in ("group_train_s", "group_compile_s", "steps_per_s")]
    for g in groups
  ]
  n = len(cfg.seeds)
  return [
    (
      f"Part 1: BGN x depth_decay (gamma {cfg.gamma:g} on d / d_max) with Adam, "
      f"{cfg.depth} x {cfg.width} ReLU; test accuracy mean ± std over {n} seeds at the best lr",
      report.markdown_table(["net", "depth_decay", "best lr", "val acc", "test acc"], rows1),
    ),
    (
      f"Part 2: BGN vs layerwise_normalize (group='layer'), plain SGD, {cfg.sgd_depth} x "
      f"{cfg.width} ReLU; test accuracy by epoch "
      f"(mean over seeds, each at its best lr); verdict (a) vs (b): **{cmp['verdict']}** "
      f"(|final gap| {abs(cmp['final_gap']):.3f}; alike within {ALIKE_TOL}, differ beyond "
      f"{cmp['tolerance']:.3f} = max({ALIKE_TOL}, 2 std))",
      report.markdown_table(
        ["variant", "best lr", "final test acc"] + [f"epoch {i + 1}" for i in range(e)], rows2
      ),
    ),
    (
      f"Part 3: scale_normalize('probe') on a {cfg.scale_depth} x {cfg.width} ReLU MLP",
      report.markdown_table(
        ["variant", "best lr", "val acc", "test acc", "final train loss"], rows3
      ),
    ),
    (
      "Sweeps: lr: mean validation / test accuracy, every variant",
      report.markdown_table(["variant"] + [f"lr {i + 1}" for i in range(width)], sweep),
    ),
    (
      "Time per group (all its runs vmapped at once), seconds, compilation apart; "
      "steps/s of each run",
      report.markdown_table(["group", "members", "runs", "train s", "compile s", "steps/s"], times),
    ),
  ]


def run(cfg: Config, dataset: Dataset, writer: report.Writer, *, quiet: bool = False) -> dict:
  """Trains every group once, then writes the three parts' tables and figure."""
  data = split_for(dataset, cfg, flatten=True)
  plan = parts(cfg)
  wanted: dict[tuple, list] = {}
  for key in (k for keys in plan.values() for k in keys):
    members = wanted.setdefault(key[:3], [])
    if key[3] not in members:
      members.append(key[3])
  results: dict[tuple, dict] = {}
  groups = []
  bar = train.progress(len(wanted), NAME, disable=quiet)
  for (net, depth, kind), members in wanted.items():
    order = [m for m in MEMBERS[kind] if m in members]
    out, info = _train(cfg, data, net, depth, kind, order, quiet)
    results.update(out)
    groups.append(info)
    bar.update(1)
  bar.close()
  a, b, _ = plan["bgn_vs_layerwise"]
  cmp = compare(results[a], results[b], 1 / dataset.num_classes)
  writer.figure(_figure(results, plan, cfg), "curves.png")
  notes = [
    f"settings: {cfg.epochs} epochs of batch {cfg.batch_size} on the train split "
    f"({results[a]['steps']} steps, {results[a]['examples']} examples per run), "
    f"{len(cfg.seeds)} seeds, {len(cfg.adam_lrs)} learning rates per variant",
    "learning rate picked by the best mean validation accuracy; test accuracy reported at it",
    f"depth_decay: factor exp(-gamma d / d_max), gamma {cfg.gamma:g}, d from the input "
    "(forward) or from the head (reverse), placed after Adam: a per-layer learning rate",
    "part 2: (a) and (b) both rescale each layer's plain gradient (kernel and bias together) "
    "by one scalar, but not by the same one: BGN (Cabana & Lago-Fernández, eq. 9) multiplies "
    "hidden layer K's by the product over the BGN layers j >= K of kappa / ||g_j|| (g_j the "
    "gradient arriving at BGN j, kappa = sqrt(width)): its backpropagated delta_K gets norm "
    "kappa, so ||grad W_K|| ~ kappa ||x_K||, summed over the batch (hence its far smaller "
    "best lr), and the head's gradient is left as it is; layerwise_normalize divides every layer's "
    "gradient, head included, by its own norm ||g_l|| (times N = 1): every layer steps by "
    "exactly lr whatever its inputs' scale",
    f"parts 2 and 3 run at {cfg.sgd_depth} and {cfg.scale_depth} layers: in a 300-step probe "
    "at 60 layers no SGD variant (plain, BGN, layerwise_normalize, scale_normalize) left "
    "chance accuracy, while BGN + Adam did",
    "scale_normalize('probe'): every step, each weight matrix (each scanned slice on its "
    "own) rescaled to mean ||W^T x|| / ||x|| = 1 over 16 Gaussian probes",
  ]
  return {
    "variants": {label(k): r for k, r in results.items()},
    "parts": {p: [label(k) for k in keys] for p, keys in plan.items()},
    "bgn_vs_layerwise": cmp,
    "groups": groups,
    "tables": _tables(results, plan, cmp, groups, cfg),
    "notes": notes,
  }
