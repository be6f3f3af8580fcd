"""The in-state gradient-flow tracker: `track_gradient_flow` and `flow_from_state`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optax_depthnorm import _depths, _layers, _report, _tree
from optax_depthnorm._report import TRACED_MSG, FlowReport

LAYER_MISMATCH_MSG = (
  "the tracker's state has {expected} layers (from the params given to `init`) but "
  "{got} arrive in `update`; init and update must see trees with the same paths, "
  "or pass `depths=` computed once with `odn.layer_depths`."
)


class FlowStats(NamedTuple):
  """Per-layer statistics as arrays (last axis: layers), as `FlowReport` names them.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
    >>> tx = odn.track_gradient_flow(history=4, stats="all")
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> stats = state.flow  # a FlowStats
    >>> stats._fields
    ('norm', 'mean_abs', 'max_abs', 'rms', 'param_norm', 'ratio')
    >>> print(stats.norm, stats.ratio)
    [1.4142135 1.4142135] [1. 1.]
  """

  norm: jax.Array
  mean_abs: jax.Array
  max_abs: jax.Array
  rms: jax.Array
  param_norm: jax.Array  # NaN where `update` got no params
  ratio: jax.Array  # NaN where `update` got no params


class GradientFlowState(NamedTuple):
  """State of `track_gradient_flow`.

  ``optax.tree.get(state, "flow")`` finds the latest statistics in any optax
  state; the ``j``-th recorded step (0-based; step ``j k`` with
  ``every_k_steps=k``) is row ``j % history`` of ``flow_history``, and
  ``flow_steps`` holds the step of each row (-1: not yet written).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
    >>> state = odn.track_gradient_flow(history=4).init(params)
    >>> int(state.count), state.flow.norm.shape, state.flow_history.norm.shape
    (0, (2,), (4, 2))
    >>> opt = optax.chain(odn.track_gradient_flow(), optax.sgd(0.1))
    >>> optax.tree.get(opt.init(params), "flow").norm.shape
    (2,)
  """

  count: jax.Array  # int32 scalar: steps seen
  flow: FlowStats  # latest recorded step, each (n_layers,)
  flow_history: FlowStats  # last `history` recorded steps, each (history, n_layers), a ring buffer
  depths: Any  # dict[str, int32 array]: each leaf's depth, resolved at `init` (`_layers`)
  flow_steps: jax.Array  # (history,) int32: the step of each row of flow_history (-1: empty)


ALL_STATS = _report.STATS
DEFAULT_STATS = ("norm", "rms")
_ALWAYS = ("norm", "rms")  # both from the sum of squares: recorded whatever `stats` says


def _check_history(history: Any) -> None:
  if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history < 1:
    raise ValueError(
      f"history must be a positive Python int (a number of steps, fixed at construction), "
      f"got {history!r}; under `optax.inject_hyperparams` list it in `static_args`."
    )


def _check_stats(stats: Any) -> frozenset[str]:
  """The statistics to record: `stats` (a name, names or ``"all"``) with norm and rms."""
  if isinstance(stats, str):
    stats = ALL_STATS if stats == "all" else (stats,)
  try:
    names = tuple(stats)
  except TypeError:
    names = (stats,)
  bad = [s for s in names if not isinstance(s, str) or s not in ALL_STATS]
  if bad:
    raise ValueError(
      f"stats must be 'all' or names from {ALL_STATS}, got {bad[0]!r}; under "
      "`optax.inject_hyperparams` list `stats` in `static_args`."
    )
  weights = ("param_norm", "ratio") if {"param_norm", "ratio"} & set(names) else ()
  return frozenset((*names, *_ALWAYS, *weights))


def track_gradient_flow(
  *,
  history: int = 16,
  depths: Any = None,
  stack_axis: Any = None,
  stats: str | tuple[str, ...] = DEFAULT_STATS,
  every_k_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""Passes updates through unchanged and keeps their per-layer statistics in state.

  $$
  u \leftarrow u, \qquad s_t = \mathrm{gradient\_flow}(u_t, w_t)
  $$

  The state holds the latest ``s_t`` (``state.flow``, a `FlowStats` of
  arrays of shape ``(n_layers,)``) and the last `history` steps in a ring
  buffer (``state.flow_history``, shapes ``(history, n_layers)``, step ``t``
  in row ``t % history``; ``state.flow_steps`` says which step each row
  holds). A jitted train step thus logs the gradient flow with the
  reductions inside the step: no host sync. Read it out
  with `flow_from_state` (however nested: `optax.chain`, `inject_hyperparams`,
  `MultiSteps`, `partition`) or ``optax.tree.get(state, "flow")``.

  Where it sits in a chain decides what it sees: first, the raw gradients;
  last, the updates the optimizer applies (then ``ratio`` is the
  update/weight ratio, ~1e-3 per step being a common rule of thumb for SGD).
  The layers (their number fixes the state's shapes) come from the params'
  paths at `init`, which reads no values; statistics are stored in float32
  (float64 for float64 params). Statistics not in `stats` are NaN (the table,
  `FlowReport.scalars` and the plots leave them out), and so are
  ``param_norm`` and ``ratio`` when `update` gets no params.

  Cost: by default each gradient is read once, for its sum of squares
  (``norm`` and ``rms``), and each updated leaf is computed after its own sums
  so that XLA runs them next to the optimizer's pass over it: about 1.2x-1.3x
  of Adam alone on a 2-core CPU (ResNet-50-shaped and stacked transformer
  trees), where ``mean_abs`` and ``max_abs`` (two more reductions per leaf)
  make it 1.7x-2.1x and the weight statistics (a safe norm of the params,
  which XLA copies when they are donated) about 3.6x. With
  ``every_k_steps=k`` the other steps do no work at all (a `jax.lax.cond` on
  the step count): 1.0x-1.2x at ``k = 10``. benchmarks/README.md has the tables.

  Args:
    history: how many past steps to keep (a small fixed number; a static int:
      under `optax.inject_hyperparams` list it in `static_args`).
    depths: what defines the layers, see `gradient_flow`.
    stack_axis: leaves that stack layers, see `layer_depths`.
    stats: which statistics to record: names from ``("norm", "mean_abs",
      "max_abs", "rms", "param_norm", "ratio")`` or ``"all"``; ``norm`` and
      ``rms`` always (both come from the sum of squares), ``param_norm`` and
      ``ratio`` together. Static (under `optax.inject_hyperparams` list it in
      `static_args`).
    every_k_steps: record only steps 0, k, 2k, ... (the ring buffer then holds
      the last `history` recorded steps); the other steps pass the updates
      through and read nothing.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `GradientFlowState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones(2)}}
    >>> opt = optax.chain(odn.track_gradient_flow(history=4, stats="all"), optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(lambda p: 0.5 * p, params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)
    >>> print(odn.flow_from_state(state, params))
    depth  path     size  norm       mean|g|    max|g|     rms        norm(w)    norm/norm(w)
    0      Dense_0  4     1.000e+00  5.000e-01  5.000e-01  5.000e-01  2.000e+00  5.000e-01
    1      Dense_1  2     7.071e-01  5.000e-01  5.000e-01  5.000e-01  1.414e+00  5.000e-01

  References:
    "Analysis of vanishing gradient problem" (the VGG08/VGG38 report), sec. 2. Optax's
    ``optax.snapshot`` / ``optax.monitor`` store measurements in state likewise.
  """
  _check_history(history)
  if _tree.is_concrete_number(every_k_steps) and not every_k_steps >= 1:
    raise ValueError(f"every_k_steps must be >= 1, got {every_k_steps!r}.")
  each_step = _tree.is_concrete_number(every_k_steps) and every_k_steps == 1
  _depths.check_stack_axis_type(stack_axis)
  want = _check_stats(stats)
  weights = bool(want & {"param_norm", "ratio"})

  def init_fn(params: Any) -> GradientFlowState:
    stored, resolved = _layers.init_depths(params, depths, stack_axis)
    n = len({int(v) for d in resolved.values() for v in np.reshape(d, -1) if v >= 0})
    dtype = _report._float_dtype(jax.tree.leaves(params))
    zeros = lambda *shape: FlowStats(*(jnp.zeros(shape, dtype) for _ in FlowStats._fields))
    steps = jnp.full((history,), -1, jnp.int32)
    return GradientFlowState(jnp.zeros([], jnp.int32), zeros(n), zeros(history, n), stored, steps)

  def measure(updates: Any, params: Any, stored: Any, n: int, dtype: Any) -> FlowStats:
    """The statistics in `want` of one step (NaN for the others): one read of each leaf."""
    _, _, found = _layers.read(updates, stored)
    # Ranked among all stored depths: a masked-out layer keeps its row (zeros).
    every = list(stored.values()) if isinstance(stored, Mapping) else []
    d = _layers.concat([*every, *(leaf.depth for leaf in found)]).astype(jnp.int32)
    ids = _layers.dense_ranks(d)[d.shape[0] - sum(int(np.size(f.depth)) for f in found) :]
    # Only the sums that are used are computed (XLA drops the others): the default
    # reads each leaf once, for its sum of squares; max |g| also keeps a zero layer
    # off the careful path of the safe norm (`_reduce.l2`).
    totals, norm = _report.layer_stats(updates, stored, ids, n, exact_zero="max_abs" in want)
    values = dict(zip(ALL_STATS, _report.stats(totals, norm)))
    if params is not None and weights:
      values["param_norm"] = _report.layer_stats(params, stored, ids, n, exact_zero=False)[1]
      values["ratio"] = _report.ratio(norm, values["param_norm"])
    missing = jnp.full((n,), jnp.nan, dtype)
    kept = lambda f: values[f].astype(dtype) if f in want and f in values else missing
    return FlowStats(*(kept(f) for f in FlowStats._fields))

  def tied(updates: Any, stored: Any) -> Any:
    """`updates`, each leaf computed after its own sums (same values, no copy).

    XLA then runs a leaf's reductions next to the optimizer's pass over that
    leaf, which finds it in cache: on XLA:CPU the untied reductions, scheduled
    apart from it, cost 2x-3x of an Adam step on the ResNet-50 tree, the tied
    ones about 1.1x (benchmarks/README.md). The sums are the ones `measure`
    takes (XLA computes them once); no leaf waits for another leaf or the
    range check of the safe norm.
    """
    leaves, treedef, found = _layers.read(updates, stored)
    fields = [
      "sq",
      *(["abs"] if "mean_abs" in want else []),
      *(["max"] if "max_abs" in want else []),
    ]
    for f in found:
      sums = _layers.leaf_sums(leaves[f.index], f.depth)
      used = [getattr(sums, name) for name in fields]
      leaves[f.index] = jax.lax.optimization_barrier((leaves[f.index], used))[0]
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    n, dtype = state.flow.norm.shape[-1], state.flow.norm.dtype
    _layers.read(updates, state.depths)  # another tree than init's: that error first
    if params is not None:
      hint = "`update(updates, state, params)` takes the params the updates are for."
      names = ("the params given to `update`", "the updates")
      _report.check_same_tree(params, _report.param_shapes(updates), names, hint)
    size = state.flow_history.norm.shape[0]
    old = jax.tree.map(jnp.asarray, (state.flow, state.flow_history, state.flow_steps))

    def record() -> tuple[FlowStats, FlowStats, jax.Array]:
      stats = measure(updates, params, state.depths, n, dtype)
      slot = (state.count // jnp.asarray(every_k_steps).astype(state.count.dtype)) % size
      past = jax.tree.map(lambda h, s: h.at[slot].set(s), old[1], stats)
      return stats, past, old[2].at[slot].set(state.count)

    if each_step:
      flow, past, steps = record()
      updates = tied(updates, state.depths)
    else:  # skipped steps read nothing; the updates never wait on the statistics
      k = jnp.asarray(every_k_steps).astype(state.count.dtype)
      flow, past, steps = jax.lax.cond(state.count % k == 0, record, lambda: old)
    count = optax.safe_increment(state.count)
    return updates, GradientFlowState(count, flow, past, state.depths, steps)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_tracker(opt_state: Any, index: int | None) -> GradientFlowState:
  found = [
    v
    for _, v in optax.tree.get_all_with_path(opt_state, "GradientFlowState")
    if isinstance(v, GradientFlowState)
  ]
  if not found:
    raise ValueError(
      "opt_state holds no `track_gradient_flow` state; add `odn.track_gradient_flow()` "
      "to the optimizer, e.g. `optax.chain(odn.track_gradient_flow(), optax.adam(1e-3))`."
    )
  if index is None and len(found) > 1:
    raise ValueError(
      f"opt_state holds {len(found)} `track_gradient_flow` states; pick one with "
      "`index=` (0 for the first in the chain)."
    )
  # Plain arrays also where `nnx.Optimizer` wraps the state's arrays in `nnx.OptArray`s.
  is_variable = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(jnp.asarray, found[index or 0], is_leaf=is_variable)


def _names(state: GradientFlowState, params: Any, depths: Any, stack_axis: Any) -> tuple:
  """(names, depths, sizes) of the tracker's rows, from the depths in its state.

  Inside `jit` the state's depths are traced; then the rows are labelled from
  `params` with `depths` and `stack_axis`, as the tracker's `init` did.
  """
  stored = state.depths
  traced = any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(stored))
  if not traced and isinstance(stored, Mapping):
    stored = _layers.concrete(stored)
    if params is not None:
      table = _report.rows(params, stored)
      return table.names, table.depths, table.sizes
    return _names_from_paths(stored)
  if params is None:
    n = state.flow.norm.shape[-1]
    return tuple(f"layer_{i}" for i in range(n)), tuple(range(n)), (-1,) * n
  table = _report.rows(params, _layers.resolve(params, depths, stack_axis))
  return table.names, table.depths, table.sizes


def _names_from_paths(stored: dict[str, np.ndarray]) -> tuple:
  """Rows named from the state's leaf paths alone (sizes unknown: -1)."""
  names: dict[int, list[str]] = {}
  for path, d in stored.items():
    parent, _, last = path.rpartition("/")
    layer = path if last.isdigit() or not parent else parent
    for k, v in enumerate(np.reshape(d, -1)):
      if v >= 0:
        names.setdefault(int(v), []).append(layer if not np.ndim(d) else f"{layer}[{k}]")
  order = tuple(sorted(names))
  return tuple(_report._row_name(names[d]) for d in order), order, (-1,) * len(order)


def flow_from_state(
  opt_state: Any,
  params: Any = None,
  *,
  depths: Any = None,
  stack_axis: Any = None,
  history: bool = False,
  index: int | None = None,
) -> FlowReport:
  """Reads the statistics of `track_gradient_flow` out of any optax state.

  The tracker's state is found however deeply it is nested (`optax.chain`,
  `optax.inject_hyperparams`, `optax.MultiSteps`, `optax.partition`,
  `optax.masked`).

  Args:
    opt_state: an optimizer state that contains one `track_gradient_flow`.
    params: a tree with the paths of the params the optimizer was initialized
      with (values unused; a ValueError names the first path that differs), for
      the layers' sizes (those of `params`). Rows are named from the
      depths the tracker keeps in its state, so each name sits beside its own
      layer's values whatever the key order of `params`; without `params`
      names come from the state's paths and sizes are unknown (-1).
    depths: inside `jit` only (where the state's depths are traced): the
      `depths` the tracker was built with, to label the rows from `params`.
    stack_axis: inside `jit` only: the `stack_axis` the tracker was built with.
    history: ``False``: the latest step (works inside `jit`); ``True``: the
      recorded steps, oldest first, each array of shape ``(steps, n_layers)``
      (needs concrete values: call it outside `jit`).
    index: which tracker, when the state holds several (0: the first).

  Returns:
    A `FlowReport`; its ``step`` holds the 0-based step of each row (-1 before
    any update).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"w": jnp.ones(3)}
    >>> opt = optax.MultiSteps(optax.chain(odn.track_gradient_flow(history=2),
    ...                                    optax.sgd(0.1)), every_k_schedule=1)
    >>> state = opt.init(params)
    >>> for scale in (1.0, 2.0, 3.0):
    ...   _, state = opt.update({"w": scale * jnp.ones(3)}, state, params)
    >>> past = odn.flow_from_state(state, params, history=True)
    >>> print(past.step, past.rms[:, 0])
    [1 2] [2. 3.]
  """
  state = _find_tracker(opt_state, index)
  n = state.flow.norm.shape[-1]
  if params is not None and isinstance(state.depths, Mapping):  # its keys are static
    hint = (
      "pass a tree with the paths of the params the optimizer was initialized with "
      "(values unused), or none."
    )
    names = ("params", "the params at `init`")
    _report.check_same_tree(params, dict.fromkeys(state.depths), names, hint)
  paths, depth_labels, sizes = _names(state, params, depths, stack_axis)
  if len(depth_labels) != n:
    raise ValueError(LAYER_MISMATCH_MSG.format(expected=n, got=len(depth_labels)))
  if not history:
    stats, step = state.flow, jnp.max(state.flow_steps)
  else:
    if isinstance(state.flow_steps, jax.core.Tracer):
      raise TypeError(TRACED_MSG.format(what="flow_from_state(..., history=True)"))
    steps = np.asarray(state.flow_steps)
    order = np.argsort(steps, kind="stable")
    order = order[steps[order] >= 0]  # the recorded rows, oldest first
    stats = jax.tree.map(lambda h: h[order], state.flow_history)
    step = jnp.asarray(steps[order], jnp.int32)
  return FlowReport(paths, depth_labels, sizes, "gradient", *stats, step=step)
