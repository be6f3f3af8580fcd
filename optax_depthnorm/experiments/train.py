"""Training many configurations at once: one jitted, vmapped step over a config axis.

A `Group` is a set of runs that share a model and an optimizer's structure and
differ in numbers only: the seed (initialization and data order) and the
optimizer's hyperparameters (learning rate, gamma, ...), injected with
`optax.inject_hyperparams`. Their parameters and optimizer states are stacked
on a leading config axis, and one step

  ``jax.vmap(step)(states, x[idx], y[idx])``

trains them all; `jax.lax.scan` runs a whole epoch in one call. A sweep over
seeds x learning rates then costs one compilation and runs as batched matrix
products, instead of one run at a time.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_depthnorm.experiments import models


class TrainState(NamedTuple):
  """Parameters, BatchNorm statistics ({} without BN) and optimizer state of a run."""

  params: Any
  batch_stats: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Group:
  """Runs that train together: same model and optimizer structure, other numbers.

  Attributes:
    model: a linen module called as ``model.apply(variables, x, train=...)``.
    make_tx: ``make_tx(**hyperparams) -> GradientTransformation``; every
      hyperparameter it takes is a number, injected per run.
    hparams: each hyperparameter's value per run, all of one length C.
    seeds: C seeds: parameter init and data order of each run.
    layer_inputs: pass each Dense layer's inputs to ``tx.update`` as
      ``layer_inputs=`` (for ``scale_normalize("data")``).
    vmap: batch the runs with `jax.vmap` (True) or loop over them inside the
      jitted step with `jax.lax.map` (False). Vmapped convolutions become
      grouped convolutions, which XLA's CPU backend runs tens of times slower;
      conv nets on a CPU want False (see `vmap_convs`).
  """

  model: nn.Module
  make_tx: Callable[..., optax.GradientTransformation]
  hparams: dict[str, np.ndarray]
  seeds: np.ndarray
  layer_inputs: bool = False
  vmap: bool = True

  def __post_init__(self) -> None:
    seeds = np.atleast_1d(np.asarray(self.seeds, np.int32))
    object.__setattr__(self, "seeds", seeds)
    hp = {k: np.broadcast_to(np.asarray(v), seeds.shape).copy() for k, v in self.hparams.items()}
    object.__setattr__(self, "hparams", hp)

  @property
  def size(self) -> int:
    """Number of runs C."""
    return len(self.seeds)

  def tx(self) -> optax.GradientTransformation:
    """The optimizer; its numbers come from each run's state."""
    return optax.inject_hyperparams(self.make_tx)(
      **{k: v[0].item() for k, v in self.hparams.items()}
    )


@dataclasses.dataclass
class History:
  """What `train_group` measured.

  Attributes:
    step_loss: training loss of each step's mini-batch, (steps, C).
    epochs: per-epoch metrics, each (epochs, C): train_loss / train_acc (means
      over the epoch's mini-batches), and val_/test_ loss and accuracy.
    compile_s: seconds spent compiling.
    train_s: seconds spent training and evaluating, compilation excluded.
    state: the final stacked `TrainState`.
  """

  step_loss: np.ndarray
  epochs: dict[str, np.ndarray]
  compile_s: float
  train_s: float
  state: TrainState

  @property
  def steps_per_s(self) -> float:
    """Optimizer steps per second of each run (the runs of a group train side by side)."""
    return len(self.step_loss) / self.train_s if self.train_s > 0 else float("nan")


# ----------------------------------------------------------------------------- progress


class _Bar:
  """A minimal progress bar on stderr, used when tqdm is not installed."""

  def __init__(self, total: int, desc: str, disable: bool) -> None:
    self.total, self.desc, self.disable, self.n, self.start = total, desc, disable, 0, time.time()
    self.postfix = ""

  def update(self, n: int = 1) -> None:
    self.n += n
    if not self.disable:
      elapsed = time.time() - self.start
      print(
        f"\r{self.desc}: {self.n}/{self.total} [{elapsed:.0f}s] {self.postfix}",
        end="",
        file=sys.stderr,
        flush=True,
      )

  def set_postfix_str(self, text: str) -> None:
    self.postfix = text

  def close(self) -> None:
    if not self.disable:
      print(file=sys.stderr, flush=True)


def progress(total: int, desc: str, *, disable: bool = False) -> Any:
  """A tqdm progress bar if tqdm is installed (the ``experiments`` extra), else a plain one."""
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return _Bar(total, desc, disable)
  return tqdm(total=total, desc=desc, disable=disable, leave=False, file=sys.stderr)


# ----------------------------------------------------------------------------- steps


def vmap_convs() -> bool:
  """Whether conv nets should be vmapped over runs: not on the CPU (see `Group`)."""
  return jax.default_backend() != "cpu"


def variables_of(params: Any, batch_stats: Any) -> dict[str, Any]:
  """The variables dict of a model from its params and (maybe empty) batch stats."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _sow_dense_inputs(next_fun, args, kwargs, context):
  if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
    context.module.sow("layer_inputs", "inputs", args[0])
  return next_fun(*args, **kwargs)


def loss_fn(
  model: nn.Module,
  params: Any,
  batch_stats: Any,
  x: jax.Array,
  y: jax.Array,
  *,
  train: bool = True,
  layer_inputs: bool = False,
) -> tuple[jax.Array, tuple[dict[str, Any], jax.Array]]:
  """Mean softmax cross-entropy, and (new mutable collections, logits)."""
  mutable = (["batch_stats"] if batch_stats and train else []) + (
    ["layer_inputs"] if layer_inputs else []
  )
  variables = variables_of(params, batch_stats)
  if layer_inputs:
    with nn.intercept_methods(_sow_dense_inputs):
      logits, new = model.apply(variables, x, train=train, mutable=mutable)
  elif mutable:
    logits, new = model.apply(variables, x, train=train, mutable=mutable)
  else:
    logits, new = model.apply(variables, x, train=train), {}
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
  return loss, (dict(new), logits)


def make_step(group: Group) -> Callable[[TrainState, jax.Array, jax.Array], Any]:
  """The training step of one run: (state, x, y) -> (state, (loss, accuracy))."""
  tx = group.tx()

  def step(state: TrainState, x: jax.Array, y: jax.Array):
    grad_fn = jax.value_and_grad(
      lambda p: loss_fn(group.model, p, state.batch_stats, x, y, layer_inputs=group.layer_inputs),
      has_aux=True,
    )
    (loss, (new, logits)), grads = grad_fn(state.params)
    extra = {"layer_inputs": new["layer_inputs"]} if group.layer_inputs else {}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    batch_stats = new.get("batch_stats", state.batch_stats)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return TrainState(params, batch_stats, opt_state), (loss, accuracy)

  return step


def init_states(group: Group, sample_x: np.ndarray) -> TrainState:
  """Stacked initial states of every run (leading axis C)."""

  def one(seed: jax.Array, hp: dict[str, jax.Array]) -> TrainState:
    variables = group.model.init(jax.random.key(seed), sample_x, train=False)
    params = variables["params"]
    opt_state = optax.inject_hyperparams(group.make_tx)(**hp).init(params)
    return TrainState(params, variables.get("batch_stats", {}), opt_state)

  hparams = {k: jnp.asarray(v) for k, v in group.hparams.items()}
  # lax.map, not vmap: the orthogonal initializer vmapped over 4 runs hung XLA's CPU
  # runtime here (jax 0.10.2); a loop over runs costs nothing at init.
  return jax.jit(lambda a: jax.lax.map(lambda b: one(*b), a))((jnp.asarray(group.seeds), hparams))


def run_config(states: TrainState, c: int | slice) -> TrainState:
  """The state of run `c` alone (no run axis), or of a slice of runs."""
  return jax.tree.map(lambda x: x[c], states)


# ----------------------------------------------------------------------------- loop


def _orders(seeds: np.ndarray, epoch: int, n: int, steps: int, batch: int) -> np.ndarray:
  """(steps, C, batch) example indices: each seed's own shuffle of this epoch."""
  rows = [
    np.random.default_rng([int(s), epoch]).permutation(n)[: steps * batch].reshape(steps, batch)
    for s in seeds
  ]
  return np.stack(rows, axis=1).astype(np.int32)


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
  for start in range(0, n, size):
    yield start, min(start + size, n)


def make_evaluate(
  model: nn.Module, eval_batch: int, use_vmap: bool = True
) -> Callable[[TrainState, np.ndarray, np.ndarray], tuple]:
  """A function (states, x, y) -> (mean loss (C,), accuracy (C,)) over a data set."""

  @jax.jit
  def chunk(states: TrainState, x: jax.Array, y: jax.Array, mask: jax.Array):
    def one(s: TrainState):
      loss, (_, logits) = loss_fn(model, s.params, s.batch_stats, x, y, train=False)
      del loss
      losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
      return jnp.sum(losses * mask), jnp.sum((jnp.argmax(logits, -1) == y) * mask)

    return jax.vmap(one)(states)

  def evaluate(states: TrainState, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not use_vmap:  # one run at a time, as in `_looped_epochs`
      runs = jax.tree.leaves(states)[0].shape[0]
      each = [evaluate_all(run_config(states, slice(c, c + 1)), x, y) for c in range(runs)]
      return np.concatenate([e[0] for e in each]), np.concatenate([e[1] for e in each])
    return evaluate_all(states, x, y)

  def evaluate_all(states: TrainState, x: np.ndarray, y: np.ndarray) -> tuple:
    n = len(y)
    size = min(eval_batch, n)
    loss_sum, correct = 0.0, 0.0
    for start, stop in _batches(n, size):
      pad = size - (stop - start)
      xb = np.concatenate([x[start:stop], np.zeros((pad, *x.shape[1:]), x.dtype)])
      yb = np.concatenate([y[start:stop], np.zeros((pad,), y.dtype)])
      mask = np.concatenate([np.ones(stop - start, np.float32), np.zeros(pad, np.float32)])
      l_sum, c_sum = chunk(states, xb, yb, mask)
      loss_sum, correct = loss_sum + np.asarray(l_sum), correct + np.asarray(c_sum)
    return loss_sum / max(n, 1), correct / max(n, 1)

  return evaluate


def _scanned_epochs(group: Group, states: TrainState, x: jax.Array, y: jax.Array, idx: np.ndarray):
  """An epoch as one compiled `lax.scan` over steps of the vmapped step."""
  step = jax.vmap(make_step(group))

  def epoch_fn(states: TrainState, x_all: jax.Array, y_all: jax.Array, idx: jax.Array):
    def body(states: TrainState, idx_t: jax.Array):
      return step(states, x_all[idx_t], y_all[idx_t])

    return jax.lax.scan(body, states, idx)

  compiled = jax.jit(epoch_fn, donate_argnums=0).lower(states, x, y, idx).compile()
  return lambda states, idx: compiled(states, x, y, idx)


def _looped_epochs(group: Group, states: TrainState, x: jax.Array, y: jax.Array, idx: np.ndarray):
  """An epoch as a Python loop over runs and steps of one compiled single-run step.

  For conv nets on a CPU, where vmapped convolutions (grouped convolutions)
  and convolutions inside XLA loops both run several times slower.
  """
  step = jax.vmap(make_step(group))  # over a run axis of size 1
  fn = lambda s, x_all, y_all, i: step(s, x_all[i], y_all[i])
  one = run_config(states, slice(0, 1))
  compiled = jax.jit(fn, donate_argnums=0).lower(one, x, y, idx[0, :1]).compile()

  def run_epoch(states: TrainState, idx: np.ndarray):
    runs, losses, accs = [], [], []
    for c in range(group.size):
      s, out = run_config(states, slice(c, c + 1)), []
      for t in range(len(idx)):
        s, metrics = compiled(s, x, y, idx[t, c : c + 1])
        out.append(metrics)
      runs.append(s)
      losses.append(np.concatenate([np.asarray(m[0]) for m in out]))
      accs.append(np.concatenate([np.asarray(m[1]) for m in out]))
    states = jax.tree.map(lambda *a: jnp.concatenate(a), *runs)
    return states, (np.stack(losses, 1), np.stack(accs, 1))

  return run_epoch


def train_group(
  group: Group,
  data: dict[str, tuple[np.ndarray, np.ndarray]],
  *,
  epochs: int,
  batch_size: int,
  eval_batch: int = 1000,
  desc: str = "training",
  quiet: bool = False,
  eval_every: int = 1,
  on_epoch: Callable[[int, TrainState], None] | None = None,
) -> History:
  """Trains every run of `group` for `epochs` epochs, evaluating after each.

  Args:
    group: the runs.
    data: ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` (val may be empty).
    epochs: passes over the training set (each drops the last partial batch).
    batch_size: examples per step and run.
    eval_batch: examples per evaluation call.
    desc: progress bar label.
    quiet: no progress bar.
    eval_every: evaluate on val and test after every `eval_every`-th epoch
      and after the last (other epochs hold NaN).
    on_epoch: called as ``on_epoch(epoch, states)`` after each epoch.

  Returns:
    A `History`.
  """
  x_train, y_train = data["train"]
  n = len(y_train)
  steps = n // batch_size
  if steps < 1:
    raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} examples).")
  states = init_states(group, x_train[:2])
  x_dev, y_dev = jnp.asarray(x_train), jnp.asarray(y_train)
  start = time.perf_counter()
  idx = _orders(group.seeds, 0, n, steps, batch_size)
  if group.vmap:
    run_epoch = _scanned_epochs(group, states, x_dev, y_dev, idx)
  else:
    run_epoch = _looped_epochs(group, states, x_dev, y_dev, idx)
  evaluate = make_evaluate(group.model, eval_batch, group.vmap)
  compile_s = time.perf_counter() - start

  step_loss, metrics = [], {}
  bar = progress(epochs, desc, disable=quiet)
  start = time.perf_counter()
  for epoch in range(epochs):
    if epoch:
      idx = _orders(group.seeds, epoch, n, steps, batch_size)
    states, (loss, acc) = run_epoch(states, idx)
    loss, acc = np.asarray(loss), np.asarray(acc)
    step_loss.append(loss)
    row = {"train_loss": loss.mean(0), "train_acc": acc.mean(0)}
    due = (epoch + 1) % eval_every == 0 or epoch == epochs - 1
    for part in ("val", "test"):
      if part in data and len(data[part][1]):
        nan = np.full(group.size, np.nan)
        row[f"{part}_loss"], row[f"{part}_acc"] = (
          evaluate(states, *data[part]) if due else (nan, nan)
        )
    for k, v in row.items():
      metrics.setdefault(k, []).append(np.asarray(v, np.float64))
    if on_epoch is not None:
      on_epoch(epoch, states)
    shown = row["test_acc"] if due and "test_acc" in row else row["train_acc"]
    bar.set_postfix_str(f"loss {np.nanmean(row['train_loss']):.3f} acc {np.nanmean(shown):.3f}")
    bar.update(1)
  bar.close()
  train_s = time.perf_counter() - start
  return History(
    np.concatenate(step_loss),
    {k: np.stack(v) for k, v in metrics.items()},
    compile_s,
    train_s,
    states,
  )


def speed_probe(depth: int = 90, runs: int = 4, steps: int = 200, batch_size: int = 128) -> dict:
  """Steps per second of each run of the harness on the deep MLP of the BGN table.

  `runs` Adam runs of a `depth`-layer, width-64 ReLU MLP on 784-pixel inputs,
  vmapped side by side, one epoch of `steps` steps as one compiled scan (as
  every experiment trains); random data, one compile, then one timed epoch.

  Returns:
    ``{"depth", "runs", "steps", "batch_size", "compile_s", "train_s", "steps_per_s"}``
    where ``steps_per_s`` is each run's steps per second.
  """
  rng = np.random.default_rng(0)
  x = rng.standard_normal((steps * batch_size, 784)).astype(np.float32)
  y = rng.integers(0, 10, steps * batch_size).astype(np.int32)
  group = Group(
    models.DeepMLP(depth, 64, "relu", False, False, 10),
    lambda learning_rate: optax.adam(learning_rate),
    {"learning_rate": np.full(runs, 1e-3)},
    np.arange(runs),
  )
  hist = train_group(group, {"train": (x, y)}, epochs=1, batch_size=batch_size, quiet=True)
  return {
    "depth": depth,
    "runs": runs,
    "steps": steps,
    "batch_size": batch_size,
    "compile_s": hist.compile_s,
    "train_s": hist.train_s,
    "steps_per_s": hist.steps_per_s,
  }


def grid(**axes: Iterable[Any]) -> dict[str, np.ndarray]:
  """Every combination of the given values, as flat arrays of one length.

  Example:
    >>> runs = grid(seed=[0, 1], learning_rate=[1e-3, 1e-2])
    >>> runs["seed"].tolist(), runs["learning_rate"].tolist()
    ([0, 0, 1, 1], [0.001, 0.01, 0.001, 0.01])
  """
  names = list(axes)
  values = np.meshgrid(*[np.asarray(list(v)) for v in axes.values()], indexing="ij")
  return {k: v.reshape(-1) for k, v in zip(names, values)}
