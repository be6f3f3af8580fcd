"""Gradient-flow diagnostics: `gradient_flow`, `track_gradient_flow`, `diagnose`.

One number per layer (L2 norm, mean |g|, max |g|, RMS) shows where gradients
vanish or explode on their way down a deep network (seed 002's gradient-flow
plots, seed 003's sec. 3). A layer is a depth group, as in every transform of
the library: the leaves that `layer_depths` gives the same depth.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optax_depthnorm import _depths, _tree

STATS = ("norm", "mean_abs", "max_abs", "rms", "param_norm", "ratio")
KINDS = ("dead", "vanishing", "exploding", "nonfinite")
PRE_ACTIVATION_MODULES = (
  nn.Dense,
  nn.DenseGeneral,
  nn.Conv,
  nn.ConvTranspose,
  nn.ConvLocal,
  nn.Einsum,
)
TRACED_MSG = (
  "{what} needs concrete values, but the report holds traced arrays (inside `jit`); "
  "return the report from the jitted function and call {what} outside."
)
LAYER_MISMATCH_MSG = (
  "the tracker's state has {expected} layers (from the params given to `init`) but "
  "{got} arrive in `update`; init and update must see trees with the same paths, "
  "or pass `depths=` computed once with `odn.layer_depths`."
)
NNX_MSG = (
  "activation_gradient_norms supports Flax linen modules only for now. In NNX, "
  "call `self.perturb('name', z)` on each pre-activation and differentiate with "
  "respect to the state `nnx.capture(model, nnx.Perturbation)` returns."
)


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True, eq=False)
class FlowReport:
  """Per-layer gradient statistics, ordered by depth (0 at the input side).

  A pytree: the arrays are its leaves and the paths, depths and sizes static
  data, so a report can be returned from `jit` or stacked by `lax.scan` (then
  every array gains a leading step axis). ``print(report)`` shows a table.

  Attributes:
    paths: one name per layer: the path of its module (``'Dense_3'``).
    depths: the depth of each layer.
    sizes: number of elements of each layer (-1 where unknown).
    what: what was measured, for labels (``'gradient'``).
    norm: L2 norm of each layer's gradient, all its leaves together.
    mean_abs: mean |g| over the layer's elements.
    max_abs: max |g|.
    rms: root mean square, ``norm / sqrt(size)``.
    param_norm: L2 norm of the layer's parameters (``None`` without params).
    ratio: ``norm / param_norm``: the update/weight ratio when the report is
      taken of the updates (``None`` without params).
    step: the training step each row was taken at (from the tracker), or None.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {f"Dense_{i}": {"kernel": jnp.full(4, 10.0 ** (3 * i - 6))} for i in range(3)}
    >>> report = odn.gradient_flow(grads)
    >>> report.paths, report.depths, report.sizes
    (('Dense_0', 'Dense_1', 'Dense_2'), (0, 1, 2), (4, 4, 4))
    >>> print(report.norm)
    [2.e-06 2.e-03 2.e+00]
    >>> print(report)
    depth  path     size  norm       mean|g|    max|g|     rms
    0      Dense_0  4     2.000e-06  1.000e-06  1.000e-06  1.000e-06
    1      Dense_1  4     2.000e-03  1.000e-03  1.000e-03  1.000e-03
    2      Dense_2  4     2.000e+00  1.000e+00  1.000e+00  1.000e+00
  """

  paths: tuple[str, ...]
  depths: tuple[int, ...]
  sizes: tuple[int, ...]
  what: str
  norm: jax.Array
  mean_abs: jax.Array
  max_abs: jax.Array
  rms: jax.Array
  param_norm: jax.Array | None = None
  ratio: jax.Array | None = None
  step: jax.Array | None = None

  def table(self) -> str:
    """The report as a text table, one layer per line."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(self)):
      raise TypeError(TRACED_MSG.format(what="FlowReport.table()"))
    if np.ndim(self.norm) != 1:
      raise ValueError(
        f"table() shows one step, but this report holds arrays of shape "
        f"{np.shape(self.norm)} (stacked steps); pick one first: "
        "`jax.tree.map(lambda x: x[-1], report)`."
      )
    columns = [
      ("depth", [str(d) for d in self.depths]),
      ("path", list(self.paths)),
      ("size", [str(s) if s >= 0 else "-" for s in self.sizes]),
    ]
    fields = ["norm", "mean_abs", "max_abs", "rms"]
    if self.param_norm is not None and not np.all(np.isnan(np.asarray(self.param_norm))):
      fields += ["param_norm", "ratio"]
    for field in fields:
      values = np.asarray(getattr(self, field), np.float64)
      columns.append((_HEADERS[field], [f"{v:.3e}" for v in values]))
    rows = list(zip(*(values for _, values in columns)))
    header = tuple(name for name, _ in columns)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)

  def __str__(self) -> str:
    try:
      return self.table()
    except (TypeError, ValueError):
      return repr(self)


_HEADERS = {
  "norm": "norm",
  "mean_abs": "mean|g|",
  "max_abs": "max|g|",
  "rms": "rms",
  "param_norm": "norm(w)",
  "ratio": "norm/norm(w)",
}
jax.tree_util.register_dataclass(
  FlowReport,
  data_fields=["norm", "mean_abs", "max_abs", "rms", "param_norm", "ratio", "step"],
  meta_fields=["paths", "depths", "sizes", "what"],
)


# ----------------------------------------------------------------------------- layers


class _Layers(NamedTuple):
  """Depth groups of a flattened tree: distinct depths, leaf indices, names.

  ``stacked`` holds the leaves with per-slice depths (`StackedDepth`), as
  ``(leaf index, stack axis, layer position of each slice or -1)``; their
  slices are not in ``members``.
  """

  depths: tuple[int, ...]
  members: tuple[tuple[int, ...], ...]
  paths: tuple[str, ...]
  stacked: tuple[tuple[int, int, np.ndarray], ...] = ()


def _layer_name(names: list[str]) -> str:
  names = list(dict.fromkeys(names))
  return "+".join(names) if len(names) <= 3 else f"{names[0]}+{len(names) - 1} more"


def _layers(tree: Any, depths: Any, stack_axis: Any = None) -> _Layers:
  """Groups the parameter leaves of `tree` by depth, ordered by depth.

  Reads paths and leaf types only (works on `jax.ShapeDtypeStruct`s); a masked
  leaf (`optax.MaskedNode`) keeps its place, so the layers never depend on a mask.
  """
  flat = _tree.flatten(tree)[0]
  labels = _depths.leaf_depths(tree, depths, stack_axis)
  groups: dict[int, list[int]] = defaultdict(list)
  names: dict[int, list[str]] = defaultdict(list)
  for i, label in enumerate(labels):
    key = "/".join(_depths._layer_key(flat[i][0])) or "<root>"
    if isinstance(label, _depths.StackedDepth):
      for k, d in enumerate(label.depths):
        if d != _depths.NOT_A_LAYER:
          names[d].append(f"{key}[{k}]")
    elif label != _depths.NOT_A_LAYER:
      groups[label].append(i)
      names[label].append(key)
  order = tuple(sorted(names))
  position = {d: j for j, d in enumerate(order)}
  stacked = tuple(
    (i, label.axis, np.asarray([position.get(d, -1) for d in label.depths]))
    for i, label in enumerate(labels)
    if isinstance(label, _depths.StackedDepth)
  )
  return _Layers(
    order,
    tuple(tuple(groups[d]) for d in order),
    tuple(_layer_name(names[d]) for d in order),
    stacked,
  )


def _pieces(leaves: list[Any], layers: _Layers) -> list[_tree.Piece]:
  """The float leaves of every layer (whole leaves and stacked slices) as segment pieces."""
  pieces = [
    (leaves[i], None, j)
    for j, members in enumerate(layers.members)
    for i in members
    if _tree.is_float_leaf(leaves[i])
  ]
  pieces += [(leaves[i], a, ids) for i, a, ids in layers.stacked if _tree.is_float_leaf(leaves[i])]
  return pieces


def _layer_sizes(leaves: list[Any], layers: _Layers) -> tuple[int, ...]:
  """Number of float elements of each layer (static, from shapes)."""
  sizes = _tree.segment_sizes(_pieces(leaves, layers), len(layers.depths))
  return tuple(int(n) for n in sizes)


def _segment_stats(pieces: list[_tree.Piece], n: int, dtype: Any) -> list[jax.Array]:
  """`_block_stats` of `n` layers made of whole leaves and stacked slices, vectorized."""
  top = _tree.segment_reduce(pieces, n, "max", dtype)
  scale = jnp.where(top > 0, top, 1)
  scaled = [
    (
      x.astype(dtype)
      / _tree.along(_tree.block_values(scale, ids) if a is not None else scale[ids], a, x.ndim),
      a,
      ids,
    )
    for x, a, ids in pieces
  ]
  norm = jnp.sqrt(_tree.segment_reduce(scaled, n, "sumsq", dtype)) * scale
  size = np.maximum(_tree.segment_sizes(pieces, n), 1).astype(np.float64)
  mean_abs = _tree.segment_reduce(pieces, n, "sumabs", dtype) / size.astype(dtype)
  return [norm, mean_abs, top, norm / np.sqrt(size).astype(dtype)]


def _float_dtype(leaves: Sequence[Any]) -> Any:
  return _tree.acc_dtype(*(x.dtype for x in leaves if _tree.is_float_leaf(x)))


def _block_stats(leaves: list[jax.Array], dtype: Any) -> tuple[jax.Array, ...]:
  """(L2 norm, mean |x|, max |x|, RMS) of several leaves taken as one vector.

  The L2 norm is taken of the leaves divided by their max |x| and multiplied
  back: the squares of a vanished gradient (|g| ~ 1e-25) underflow float32,
  and a plain sum of squares would report 0.
  """
  if not leaves:
    zero = jnp.zeros([], dtype)
    return zero, zero, zero, zero
  size = sum(x.size for x in leaves)
  top = _tree.block_norm(leaves, "max").astype(dtype)
  scale = jnp.where(top > 0, top, 1)
  norm = _tree.block_norm([x.astype(dtype) / scale for x in leaves], "l2").astype(dtype) * scale
  mean_abs = _tree.block_norm(leaves, "l1").astype(dtype) / size
  return norm, mean_abs, top, norm / math.sqrt(size)


def _stack(values: list[jax.Array], dtype: Any) -> jax.Array:
  return jnp.stack(values) if values else jnp.zeros((0,), dtype)


def _layer_stats(blocks: list[list[jax.Array]], dtype: Any) -> list[jax.Array]:
  """`_block_stats` of each block, stacked: four arrays of shape (n_blocks,)."""
  per_block = [_block_stats(b, dtype) for b in blocks]
  return [_stack([s[k] for s in per_block], dtype) for k in range(4)]


def _ratio(norm: jax.Array, param_norm: jax.Array) -> jax.Array:
  """``norm / param_norm``; inf where the params are zero and the norm is not, 0 for 0/0."""
  positive = param_norm > 0
  quotient = norm / jnp.where(positive, param_norm, 1)
  return jnp.where(positive, quotient, jnp.where(norm > 0, jnp.inf, 0))


def _param_norms(params: Any, layers: _Layers, flat: list, dtype: Any) -> jax.Array:
  """Norm of each layer's parameters, matched to the gradient's leaves by path."""
  lookup = {_tree.path_name(p): x for p, x in _tree.flatten(params)[0]}

  def param(i: int) -> Any:
    name = _tree.path_name(flat[i][0])
    if name not in lookup:
      raise ValueError(
        f"params has no leaf at {name!r}, where the gradient has one; pass params "
        "with the same paths as the gradients."
      )
    return lookup[name]

  if layers.stacked:
    used = {i for m in layers.members for i in m} | {i for i, _, _ in layers.stacked}
    leaves = {i: param(i) for i in used}
    pieces = _pieces([leaves.get(i) for i in range(len(flat))], layers)
    return _segment_stats(pieces, len(layers.depths), dtype)[0]
  norms = []
  for members in layers.members:
    block = [x for x in map(param, members) if _tree.is_float_leaf(x)]
    norms.append(_block_stats(block, dtype)[0])
  return _stack(norms, dtype)


def gradient_flow(
  grads: Any, params: Any = None, depths: Any = None, *, stack_axis: Any = None
) -> FlowReport:
  r"""Per-layer statistics of a gradient (or update) pytree, ordered by depth.

  For each layer ``l`` (the leaves of one depth, e.g. a Dense kernel and bias)
  with ``n_l`` elements ``g_i``:

  .. math::

    \|g_l\|_2 = \sqrt{\textstyle\sum_i g_i^2}, \quad
    \overline{|g_l|} = \tfrac{1}{n_l} \textstyle\sum_i |g_i|, \quad
    \max_i |g_i|, \quad
    \mathrm{rms}_l = \|g_l\|_2 / \sqrt{n_l}

  and, with `params`, the weight norm ``||w_l||`` and the ratio
  ``||g_l|| / ||w_l||`` (taken of the updates an optimizer applies, it is the
  update/weight ratio; inf where ``w_l = 0`` and ``g_l`` is not, 0 for 0/0).
  Seed 002 plots the mean |g| per layer; seed 003 (sec. 3) the norms.

  Statistics are computed in float32 (float64 for float64 leaves). Pure JAX:
  works inside `jit` (arrays out, no host sync); labels come from paths at
  trace time. Leaves that are not floating arrays are left out; a layer with
  no floating leaf (masked out) has size 0 and zero statistics.

  Args:
    grads: a gradient or update pytree (linen, NNX, Equinox, dicts).
    params: optional parameters with the same paths, for the weight norms.
    depths: what defines the layers: ``None`` (labels from the paths, see
      `layer_depths`), a rule, or a pytree from `layer_depths` or
      `infer_depths`. Under `jit` close over it (depths are static). Each
      slice of a `StackedDepth` leaf is a layer of its own (named
      ``path[i]``), reduced in one vectorized pass.
    stack_axis: leaves that stack layers, see `layer_depths`.

  Returns:
    A `FlowReport`: one entry per layer, ordered by depth; print it for a table.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {"Dense_0": {"kernel": jnp.array([3.0, -4.0])},
    ...          "Dense_1": {"kernel": jnp.array([0.0, 1e-9])}}
    >>> print(odn.gradient_flow(grads))
    depth  path     size  norm       mean|g|    max|g|     rms
    0      Dense_0  2     5.000e+00  3.500e+00  4.000e+00  3.536e+00
    1      Dense_1  2     1.000e-09  5.000e-10  1.000e-09  7.071e-10

  References:
    Seed 002, "Analysis of vanishing gradient problem", sec. 2 (mean |grad| per
    layer, figs. 2-3). Cabana & Lago-Fernández, "Backward Gradient
    Normalization in Deep Neural Networks", 2021 (seed 003), sec. 3.
  """
  flat = _tree.flatten(grads)[0]
  layers = _layers(grads, depths, stack_axis)
  dtype = _float_dtype([x for _, x in flat])
  if layers.stacked:
    leaves = [x for _, x in flat]
    pieces = _pieces(leaves, layers)
    norm, mean_abs, max_abs, rms = _segment_stats(pieces, len(layers.depths), dtype)
    sizes = _layer_sizes(leaves, layers)
  else:
    blocks = [[flat[i][1] for i in m if _tree.is_float_leaf(flat[i][1])] for m in layers.members]
    norm, mean_abs, max_abs, rms = _layer_stats(blocks, dtype)
    sizes = tuple(sum(x.size for x in b) for b in blocks)
  param_norm = ratio = None
  if params is not None:
    param_norm = _param_norms(params, layers, flat, dtype)
    ratio = _ratio(norm, param_norm)
  return FlowReport(
    layers.paths, layers.depths, sizes, "gradient", norm, mean_abs, max_abs, rms, param_norm, ratio
  )


# ----------------------------------------------------------------------------- tracker


class FlowStats(NamedTuple):
  """Per-layer statistics as arrays (last axis: layers), as `FlowReport` names them.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
    >>> tx = odn.track_gradient_flow(history=4)
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
  state; step ``t`` (0-based) is row ``t % history`` of ``flow_history``.

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
  flow: FlowStats  # latest step, each (n_layers,)
  flow_history: FlowStats  # last `history` steps, each (history, n_layers), a ring buffer


def _check_history(history: Any) -> None:
  if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history < 1:
    raise ValueError(
      f"history must be a positive Python int (a number of steps, fixed at construction), "
      f"got {history!r}; under `optax.inject_hyperparams` list it in `static_args`."
    )


def track_gradient_flow(
  *, history: int = 16, depths: Any = None, stack_axis: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Passes updates through unchanged and keeps their per-layer statistics in state.

  .. math::

    u \leftarrow u, \qquad s_t = \mathrm{gradient\_flow}(u_t, w_t)

  The state holds the latest ``s_t`` (``state.flow``, a `FlowStats` of
  arrays of shape ``(n_layers,)``) and the last `history` steps in a ring
  buffer (``state.flow_history``, shapes ``(history, n_layers)``, step ``t``
  in row ``t % history``). A jitted train step thus logs the gradient flow with
  the reductions fused into the step: no extra pass, no host sync. Read it out
  with `flow_from_state` (however nested: `optax.chain`, `inject_hyperparams`,
  `MultiSteps`, `partition`) or ``optax.tree.get(state, "flow")``.

  Where it sits in a chain decides what it sees: first, the raw gradients;
  last, the updates the optimizer applies (then ``ratio`` is the
  update/weight ratio, ~1e-3 per step being a common rule of thumb for SGD).
  The layers (their number fixes the state's shapes) come from the params'
  paths at `init`, which reads no values; statistics are stored in float32
  (float64 for float64 params). ``param_norm`` and ``ratio`` are NaN when
  `update` gets no params.

  Args:
    history: how many past steps to keep (a small fixed number; a static int:
      under `optax.inject_hyperparams` list it in `static_args`).
    depths: what defines the layers, see `gradient_flow`.
    stack_axis: leaves that stack layers, see `layer_depths`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `GradientFlowState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones(2)}}
    >>> opt = optax.chain(odn.track_gradient_flow(history=4), optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(lambda p: 0.5 * p, params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)
    >>> print(odn.flow_from_state(state, params))
    depth  path     size  norm       mean|g|    max|g|     rms        norm(w)    norm/norm(w)
    0      Dense_0  4     1.000e+00  5.000e-01  5.000e-01  5.000e-01  2.000e+00  5.000e-01
    1      Dense_1  2     7.071e-01  5.000e-01  5.000e-01  5.000e-01  1.414e+00  5.000e-01

  References:
    Seed 002, sec. 2 (gradient flow monitored during training). Optax's
    ``optax.snapshot`` / ``optax.monitor`` store measurements in state likewise.
  """
  _check_history(history)
  _depths._check_stack_axis_type(stack_axis)

  def init_fn(params: Any) -> GradientFlowState:
    n = len(_layers(params, depths, stack_axis).depths)
    dtype = _float_dtype(jax.tree.leaves(params))
    zeros = lambda *shape: FlowStats(*(jnp.zeros(shape, dtype) for _ in FlowStats._fields))
    return GradientFlowState(jnp.zeros([], jnp.int32), zeros(n), zeros(history, n))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    report = gradient_flow(updates, params, depths, stack_axis=stack_axis)
    n, dtype = state.flow.norm.shape[-1], state.flow.norm.dtype
    if len(report.depths) != n:
      raise ValueError(LAYER_MISMATCH_MSG.format(expected=n, got=len(report.depths)))
    missing = jnp.full((n,), jnp.nan, dtype)
    stats = FlowStats(
      *(getattr(report, f).astype(dtype) for f in STATS[:4]),
      param_norm=missing if params is None else report.param_norm.astype(dtype),
      ratio=missing if params is None else report.ratio.astype(dtype),
    )
    slot = state.count % state.flow_history.norm.shape[0]
    past = jax.tree.map(lambda h, s: jnp.asarray(h).at[slot].set(s), state.flow_history, stats)
    return updates, GradientFlowState(optax.safe_increment(state.count), stats, past)

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
      with (values unused), to name the layers; without it layers are named
      ``layer_0, layer_1, ...`` and their sizes are unknown (-1).
    depths: the `depths` the tracker was built with.
    stack_axis: the `stack_axis` the tracker was built with.
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
    >>> print(past.step, past.mean_abs[:, 0])
    [1 2] [2. 3.]
  """
  state = _find_tracker(opt_state, index)
  n = state.flow.norm.shape[-1]
  if params is None:
    paths, depth_labels, sizes = tuple(f"layer_{i}" for i in range(n)), tuple(range(n)), (-1,) * n
  else:
    layers = _layers(params, depths, stack_axis)
    if len(layers.depths) != n:
      raise ValueError(LAYER_MISMATCH_MSG.format(expected=n, got=len(layers.depths)))
    paths, depth_labels = layers.paths, layers.depths
    sizes = _layer_sizes([x for _, x in _tree.flatten(params)[0]], layers)
  if not history:
    stats, step = state.flow, state.count - 1
  else:
    if isinstance(state.count, jax.core.Tracer):
      raise TypeError(TRACED_MSG.format(what="flow_from_state(..., history=True)"))
    count, size = int(state.count), state.flow_history.norm.shape[0]
    step = np.arange(max(count - size, 0), count)
    stats = jax.tree.map(lambda h: h[step % size], state.flow_history)
    step = jnp.asarray(step, jnp.int32)
  return FlowReport(paths, depth_labels, sizes, "gradient", *stats, step=step)


# ----------------------------------------------------------------------------- diagnose


class Flag(NamedTuple):
  """One problem `diagnose` found: what, where, and why (one line).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {f"Dense_{i}": {"kernel": jnp.full(4, 10.0 ** (3 * i - 6))} for i in range(3)}
    >>> flag = odn.diagnose(odn.gradient_flow(grads))[0]
    >>> flag.kind, flag.depth, flag.path
    ('vanishing', 0, 'Dense_0')
    >>> print(flag)  # doctest: +ELLIPSIS
    vanishing at depth 0 (Dense_0): rms 1.00e-06 is 1.0e-06 x the largest above it ...
  """

  kind: str  # one of KINDS
  depth: int
  path: str
  reason: str

  def __str__(self) -> str:
    return f"{self.kind} at depth {self.depth} ({self.path}): {self.reason}"


def _concrete(report: FlowReport, field: str) -> np.ndarray:
  value = getattr(report, field)
  if isinstance(value, jax.core.Tracer):
    raise TypeError(TRACED_MSG.format(what="diagnose"))
  value = np.asarray(value, np.float64)
  if value.ndim != 1:
    raise ValueError(
      f"diagnose reads one step, but the report's {field} has shape {value.shape}; pick "
      "one step first: `jax.tree.map(lambda x: x[-1], report)`."
    )
  return value


def _check_thresholds(stat: str, thresholds: dict[str, float]) -> None:
  if stat not in STATS[:4]:
    raise ValueError(f"stat must be one of {STATS[:4]}, got {stat!r}.")
  for name, value in thresholds.items():
    if not (_tree.is_concrete_number(value) and value > 0):
      raise ValueError(f"{name} must be a positive number, got {value!r}.")
  if thresholds["vanish_ratio"] >= 1 or thresholds["explode_ratio"] <= 1:
    raise ValueError(
      f"need vanish_ratio < 1 < explode_ratio, got {thresholds['vanish_ratio']!r} and "
      f"{thresholds['explode_ratio']!r}."
    )
  if thresholds["floor"] >= thresholds["ceiling"]:
    raise ValueError(
      f"need floor < ceiling, got {thresholds['floor']!r} and {thresholds['ceiling']!r}."
    )


def _flag(report: FlowReport, i: int, values: np.ndarray, max_abs: np.ndarray, t: dict) -> Any:
  """The kind and reason of layer i's problem, or None."""
  name, value = t["stat"], values[i]
  if not np.isfinite(max_abs[i]):
    return "nonfinite", f"the gradient holds inf or nan (max|g| = {max_abs[i]})"
  if max_abs[i] == 0:
    return "dead", "the gradient is exactly zero"
  finite = [
    (values[j], j)
    for j in range(i + 1, len(values))
    if report.sizes[j] != 0 and np.isfinite(values[j]) and values[j] > 0
  ]
  if not np.isfinite(value) or value > t["ceiling"]:
    return "exploding", f"{name} {value:.2e} is above the ceiling {t['ceiling']:.0e}"
  if value < t["floor"]:
    return "vanishing", f"{name} {value:.2e} is below the floor {t['floor']:.0e}"
  if finite:
    top, j = max(finite)
    if value < t["vanish_ratio"] * top:
      return "vanishing", (
        f"{name} {value:.2e} is {value / top:.1e} x the largest above it "
        f"({top:.2e} at depth {report.depths[j]}; threshold {t['vanish_ratio']:.0e})"
      )
    low, j = min(finite)
    if value > t["explode_ratio"] * low:
      return "exploding", (
        f"{name} {value:.2e} is {value / low:.1e} x the smallest above it "
        f"({low:.2e} at depth {report.depths[j]}; threshold {t['explode_ratio']:.0e})"
      )
  return None


def diagnose(
  report: FlowReport,
  *,
  stat: str = "rms",
  vanish_ratio: float = 1e-3,
  explode_ratio: float = 1e3,
  floor: float = 1e-8,
  ceiling: float = 10.0,
) -> list[Flag]:
  r"""Flags dead, vanishing and exploding layers in a gradient-flow report.

  With ``s_d`` the chosen statistic of the layer at depth ``d`` and "above" the
  layers between it and the output (larger depth, where backpropagation
  comes from), a layer is

  .. math::

    \text{dead:}\ \max|g_d| = 0, \qquad
    \text{vanishing:}\ s_d < \text{floor} \ \text{or}\
      s_d < r_v \max_{d' > d} s_{d'}, \qquad
    \text{exploding:}\ s_d > \text{ceiling} \ \text{or}\
      s_d > r_e \min_{d' > d} s_{d'}

  (the min over nonzero finite ``s``), and ``nonfinite`` where the gradient
  holds inf or nan. Comparing with the layers *above* (not only the next one)
  catches the slow, compounding decay of a deep sigmoid stack, whose
  neighbouring layers differ by a factor of ~4 only. The defaults:

  - ``stat="rms"``: root mean square per element, so that layers of very
    different sizes (a classifier head, a wide hidden layer) compare fairly.
  - ``vanish_ratio=1e-3``, ``explode_ratio=1e3``: three orders of magnitude
    from the layers above. A well-initialized net stays within ~10x.
  - ``floor=1e-8``: per-element gradients below it are below Adam's default
    ``eps`` (so Adam's step shrinks with them) and, times any learning rate
    up to 1, below the float32 resolution of a weight of size ~0.1: the layer
    effectively stops learning.
  - ``ceiling=10``: for a loss of order 1 (a mean over the batch), per-element
    gradients above it move a weight of size ~0.1 by more than its own size
    at an SGD learning rate of 0.01. (An over-scaled ReLU net hits it at every
    layer: its weight gradients stay level across depth, since growing
    pre-activation gradients meet shrinking inputs, seed 003 sec. 3.1.)

  Floor and ceiling are in the unit of `stat`; set them for a loss of unusual
  scale. Layers of size 0 (masked out) are skipped. Depths must count from the
  input (the default labels, not ``reverse=True``).

  Args:
    report: a one-step `FlowReport` (from `gradient_flow`, `flow_from_state`
      or `activation_gradient_norms`), with concrete values.
    stat: the statistic compared: ``"rms"``, ``"norm"``, ``"mean_abs"`` or
      ``"max_abs"``.
    vanish_ratio: relative threshold r_v < 1 for vanishing.
    explode_ratio: relative threshold r_e > 1 for exploding.
    floor: absolute threshold for vanishing.
    ceiling: absolute threshold for exploding.

  Returns:
    A list of `Flag` (kind, depth, path, one-line reason), ordered by depth;
    empty when every layer looks healthy.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {f"Dense_{i}": {"kernel": jnp.full(4, s)}
    ...          for i, s in enumerate([1e-9, 0.0, 2e-7, 1e-3, 1e-2])}
    >>> for flag in odn.diagnose(odn.gradient_flow(grads)):
    ...   print(flag)
    vanishing at depth 0 (Dense_0): rms 1.00e-09 is below the floor 1e-08
    dead at depth 1 (Dense_1): the gradient is exactly zero
    vanishing at depth 2 (Dense_2): rms 2.00e-07 is 2.0e-05 x the largest above it
    (1.00e-02 at depth 4; threshold 1e-03)

  References:
    Seed 002, sec. 2 (mean |grad| "approaches zero" below a layer: VGG38).
    Cabana & Lago-Fernández 2021 (seed 003), sec. 3 (exponential decay of the
    gradient norms with depth).
  """
  thresholds = {
    "vanish_ratio": vanish_ratio,
    "explode_ratio": explode_ratio,
    "floor": floor,
    "ceiling": ceiling,
  }
  _check_thresholds(stat, thresholds)
  values, max_abs = _concrete(report, stat), _concrete(report, "max_abs")
  flags = []
  for i in range(len(values)):
    if report.sizes[i] == 0:
      continue
    found = _flag(report, i, values, max_abs, {**thresholds, "stat": stat})
    if found is not None:
      flags.append(Flag(found[0], report.depths[i], report.paths[i], found[1]))
  return flags


# ----------------------------------------------------------------------------- activations

ModuleFilter = Union[type, tuple[type, ...], Callable[[nn.Module], bool]]


def _module_filter(modules: ModuleFilter) -> Callable[[nn.Module], bool]:
  if isinstance(modules, type) or (
    isinstance(modules, tuple) and modules and all(isinstance(m, type) for m in modules)
  ):
    return lambda module: isinstance(module, modules)
  if callable(modules):
    return modules
  raise TypeError(
    "modules must be a linen Module class, a tuple of them, or a callable "
    f"(module) -> bool; got {type(modules).__name__}."
  )


def _perturbed_loss(model, variables, args, apply_kwargs, loss_fn, select, record):
  """``perturbations -> loss``, each selected module output shifted by its perturbation.

  With ``perturbations=None`` nothing is added, and `record` gets the name and
  shape of every selected output, in call order.
  """

  def loss(perturbations):
    calls: dict[str, int] = defaultdict(int)
    position = iter(range(1 << 30))

    def interceptor(next_fun, call_args, call_kwargs, context):
      out = next_fun(*call_args, **call_kwargs)
      if context.method_name != "__call__" or not select(context.module):
        return out
      path = "/".join(context.module.path) or "<root>"
      name = path if calls[path] == 0 else f"{path}[{calls[path]}]"
      calls[path] += 1
      if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.inexact):
        raise TypeError(f"the output of {name!r} is not a floating array; exclude it via modules=.")
      i = next(position)
      if perturbations is None:
        record.append((name, jax.ShapeDtypeStruct(out.shape, out.dtype)))
        return out
      return out + perturbations[i]

    with nn.intercept_methods(interceptor):
      return loss_fn(model.apply(variables, *args, **apply_kwargs))

  return loss


def activation_gradient_norms(
  model: nn.Module,
  variables: Any,
  *args: Any,
  loss_fn: Callable[[Any], jax.Array],
  modules: ModuleFilter = PRE_ACTIVATION_MODULES,
  **apply_kwargs: Any,
) -> FlowReport:
  r"""Norms of the loss gradient with respect to each layer's pre-activation.

  Seed 003's ``delta^(K)``, the gradient with respect to the output ``z^(K)``
  of layer K before its non-linearity:

  .. math::

    \delta^{(K)} = \frac{\partial L}{\partial z^{(K)}}
      = [W^{(K+1)T} \delta^{(K+1)}] \circ f'(z^{(K)}) \quad (6)

  measured, with no change to the model, by adding a zero perturbation to the
  output of every `modules` call (Dense, Conv, ...: their output is the
  pre-activation) through ``flax.linen.intercept_methods`` and differentiating
  the loss with respect to those perturbations; the model need not call
  ``Module.perturb``. The norm is over the whole tensor, batch included (the
  paper's; for a batch-mean loss it scales like 1/sqrt(batch)). A BGN layer
  after a Dense normalizes the gradient before it reaches the Dense output, so
  what is measured there is seed 003's ``delta_BGN^(K)`` (norm kappa); a
  BatchNorm after a Dense is likewise above the measured point.

  Layers are the calls, in the order they run (depth 0 = the first call); for
  a feed-forward stack this equals `layer_depths`' labels of the weights. A
  module called twice appears twice (``Dense_0``, ``Dense_0[1]``). Works inside
  `jit`. Linen only for now (an NNX model raises a TypeError that says how to
  do it with ``self.perturb`` and ``nnx.capture``); inside ``nn.scan`` the
  scanned calls are summed into one entry.

  Args:
    model: a Flax linen module.
    variables: its variables, ``{"params": ...}`` (and other collections).
    *args: the inputs, as for ``model.apply(variables, *args)``.
    loss_fn: maps what ``model.apply`` returns to a scalar loss (close over
      the targets: ``lambda logits: xent(logits, y).mean()``).
    modules: which calls to measure: linen classes (default Dense,
      DenseGeneral, Conv, ConvTranspose, ConvLocal, Einsum) or a callable
      ``(module) -> bool``.
    **apply_kwargs: passed to ``model.apply`` (``rngs=``, ``mutable=``, model
      flags such as ``train=``).

  Returns:
    A `FlowReport` of the pre-activation gradients: one entry per call, with
    no param statistics (``what="pre-activation gradient"``).

  Example:
    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> model = nn.Sequential([nn.Dense(4), nn.sigmoid, nn.Dense(4), nn.sigmoid, nn.Dense(1)])
    >>> x = jnp.ones((8, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> report = odn.activation_gradient_norms(
    ...     model, variables, x, loss_fn=lambda out: jnp.mean(out**2))
    >>> report.paths
    ('layers_0', 'layers_2', 'layers_4')
    >>> with_bgn = nn.Sequential([nn.Dense(4), odn.BGN(), nn.sigmoid, nn.Dense(1)])
    >>> variables = with_bgn.init(jax.random.key(0), x)
    >>> report = odn.activation_gradient_norms(
    ...     with_bgn, variables, x, loss_fn=lambda out: jnp.mean(out**2))
    >>> print(f"{float(report.norm[0]):.4f}")  # kappa = sqrt(4)
    2.0000

  References:
    Cabana & Lago-Fernández, "Backward Gradient Normalization in Deep Neural
    Networks", 2021 (seed 003), eq. (6)-(9) and sec. 3.1 (fig. 1, top).
  """
  if isinstance(model, nnx.Module):
    raise TypeError(NNX_MSG)
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a Flax linen Module, got {type(model).__name__}.")
  select = _module_filter(modules)
  record: list[tuple[str, jax.ShapeDtypeStruct]] = []
  loss = _perturbed_loss(model, variables, args, apply_kwargs, loss_fn, select, record)
  jax.eval_shape(lambda: loss(None))
  if not record:
    raise ValueError(
      f"no module selected by modules={modules!r} ran in `model.apply`; pass the "
      "classes of the model's layers (or a callable) as modules=."
    )
  zeros = [jnp.zeros(s.shape, s.dtype) for _, s in record]
  grads = jax.grad(loss)(zeros)
  dtype = _float_dtype(grads)
  norm, mean_abs, max_abs, rms = _layer_stats([[g] for g in grads], dtype)
  paths = tuple(name for name, _ in record)
  sizes = tuple(math.prod(s.shape) for _, s in record)
  return FlowReport(
    paths, tuple(range(len(paths))), sizes, "pre-activation gradient", norm, mean_abs, max_abs, rms
  )
