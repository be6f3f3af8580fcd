"""Depths from the computation graph: `infer_depths`.

Path labels give a layer's order only where names encode it. `infer_depths`
reads it from the forward computation instead: it traces the model to a jaxpr
once (no FLOPs run) and walks its equations, carrying for each value the
number of parameter-consuming operations (matmul, conv, table lookup) on the
longest chain from the inputs to it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.extend import core as jcore

from optax_depthnorm import _depths, _order, _tree

UNUSED = _depths.NOT_A_LAYER

# An operation that applies a parameter to data, as a layer does. Where one of
# these meets data (depth d) and a parameter, the parameter is at depth d and
# the result at d + 1. Everything else (add, mul, activations, norms, attention
# scores of two data values) keeps the largest depth of its inputs.
_CONSUMING = frozenset({"dot_general", "conv_general_dilated", "ragged_dot", "ragged_dot_general"})
# Table lookups (`Embed`, `eqx.nn.Embedding`): consuming when the table is a parameter.
_LOOKUP = frozenset({"gather", "dynamic_slice"})
# Shape-preserving elementwise ops: a parameter's leading axis stays its leading axis.
_ELEMENTWISE = frozenset(
  {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "neg",
    "abs",
    "sign",
    "exp",
    "log",
    "tanh",
    "logistic",
    "sqrt",
    "rsqrt",
    "square",
    "integer_pow",
    "pow",
    "add",
    "sub",
    "mul",
    "div",
    "max",
    "min",
    "select_n",
    "stop_gradient",
  }
)


class UnusedParamWarning(UserWarning):
  """Warns that `infer_depths` found parameters the forward computation never uses.

  Example:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> params = {"used": {"w": jnp.ones((2, 2))}, "spare": {"w": jnp.ones(2)}}
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   depths = odn.infer_depths(lambda p, x: x @ p["used"]["w"], params, jnp.ones(2))
    >>> [w.category.__name__ for w in caught], depths["spare"]["w"]
    (['UnusedParamWarning'], -1)
  """


class _Tag(NamedTuple):
  """A parameter leaf a value is derived from.

  ``axis0``: the leaf axis that is the value's axis 0 (None: unknown);
  ``sliced``: ``(leaf axis, index)`` once a `scan` has sliced the leaf.
  """

  leaf: int
  axis0: int | None
  sliced: tuple[int, int] | None


class _Val(NamedTuple):
  """What is known of one jaxpr value.

  ``depth``: parameter-consuming ops on the longest chain from the data to it
  (None: it does not depend on the data); ``tags``: the parameters a
  data-free value is made of.
  """

  depth: int | None
  tags: frozenset[_Tag]


_NEUTRAL = _Val(None, frozenset())


class _Uses:
  """Every use of a parameter: (tag, depth), in the order the walk meets them."""

  def __init__(self) -> None:
    self.records: list[tuple[_Tag, int]] = []

  def add(self, tags: frozenset[_Tag], depth: int) -> None:
    order = sorted(tags, key=lambda t: (t.leaf, -1 if t.axis0 is None else t.axis0, t.sliced or ()))
    self.records.extend((tag, depth) for tag in order)


def _merge(vals: list[_Val]) -> _Val:
  """One value that may be any of `vals` (branches of a `cond`, iterations of a loop)."""
  depths = [v.depth for v in vals if v.depth is not None]
  if depths:
    return _Val(max(depths), frozenset())
  return _Val(None, frozenset().union(*(v.tags for v in vals)))


def _keeps_axis0(eqn: Any, index: int) -> bool:
  """Whether input `index` of a data-free op keeps its axis 0 as the output's axis 0."""
  name = eqn.primitive.name
  in_shape = getattr(eqn.invars[index].aval, "shape", ())
  out_shape = getattr(eqn.outvars[0].aval, "shape", ()) if eqn.outvars else ()
  if not in_shape or not out_shape:
    return False
  if name in _ELEMENTWISE:
    return tuple(in_shape) == tuple(out_shape)
  if name == "transpose":
    return eqn.params["permutation"][0] == 0
  if name == "reshape":  # row-major: equal leading sizes keep each row's elements together
    return eqn.params.get("dimensions") is None and in_shape[0] == out_shape[0]
  return False


def _param_tags(eqn: Any, ins: list[_Val]) -> frozenset[_Tag]:
  """Tags of the output of a data-free op (axis 0 kept only where it is known)."""
  tags: set[_Tag] = set()
  for k, v in enumerate(ins):
    if not v.tags:
      continue
    keep = _keeps_axis0(eqn, k)
    tags.update(t if keep else t._replace(axis0=None) for t in v.tags)
  return frozenset(tags)


def _sub_jaxpr(eqn: Any) -> tuple[Any, int] | None:
  """The one sub-jaxpr of a call-like eqn (pjit, remat, custom_jvp/vjp, ...), if any."""
  found = []
  for value in eqn.params.values():
    if isinstance(value, jcore.ClosedJaxpr):
      found.append(value.jaxpr)
    elif isinstance(value, jcore.Jaxpr):
      found.append(value)
  if len(found) != 1:
    return None
  return found[0], len(found[0].invars)


def _walk(jaxpr: Any, ins: list[_Val], uses: _Uses) -> list[_Val]:
  """Propagates values through `jaxpr` (a `Jaxpr`), recording parameter uses."""
  env: dict[Any, _Val] = dict(zip(jaxpr.invars, ins))

  def read(v: Any) -> _Val:
    return _NEUTRAL if isinstance(v, jcore.Literal) else env.get(v, _NEUTRAL)

  for eqn in jaxpr.eqns:
    outs = _eqn(eqn, [read(v) for v in eqn.invars], uses)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _eqn(eqn: Any, ins: list[_Val], uses: _Uses) -> list[_Val]:
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  if name == "scan":
    return _scan(eqn, ins, uses)
  if name == "cond":
    branches = [_walk(b.jaxpr, ins[1:], uses) for b in eqn.params["branches"]]
    return [_merge(list(outs)) for outs in zip(*branches)]
  if name == "while":
    return _while(eqn, ins, uses)
  sub = _sub_jaxpr(eqn)
  if sub is not None and sub[1] == len(ins):
    outs = _walk(sub[0], ins, uses)
    if len(outs) == n_out:
      return outs
  data = [v.depth for v in ins if v.depth is not None]
  if not data:
    return [_Val(None, _param_tags(eqn, ins))] * n_out
  depth = max(data)
  tags = frozenset().union(*(v.tags for v in ins if v.depth is None))
  if not tags:
    return [_Val(depth, frozenset())] * n_out
  lookup = name in _LOOKUP and ins[0].depth is None and ins[0].tags
  if name in _CONSUMING or lookup:
    uses.add(tags, depth)
    return [_Val(depth + 1, frozenset())] * n_out
  # Used elementwise (bias, norm scale): part of the layer whose output it acts on.
  uses.add(tags, max(depth - 1, 0))
  return [_Val(depth, frozenset())] * n_out


def _while(eqn: Any, ins: list[_Val], uses: _Uses) -> list[_Val]:
  """A while loop counted as one iteration of its body (its trip count is unknown)."""
  p = eqn.params
  cond_n, body_n = p["cond_nconsts"], p["body_nconsts"]
  consts, carry = ins[cond_n : cond_n + body_n], ins[cond_n + body_n :]
  outs = _walk(p["body_jaxpr"].jaxpr, consts + carry, uses)
  return [_merge([a, b]) for a, b in zip(carry, outs)]


def _slice_val(v: _Val, index: int) -> _Val:
  """A `scan` slice of `v` along its axis 0, at iteration `index`."""
  if not v.tags:
    return v
  tags = frozenset(
    _Tag(t.leaf, None, (t.axis0, index) if t.axis0 is not None else None)
    if t.sliced is None
    else t._replace(axis0=None)
    for t in v.tags
  )
  return _Val(v.depth, tags)


def _unslice(v: _Val) -> _Val:
  """A stacked scan output: made of whole leaves as far as anything can tell."""
  return _Val(v.depth, frozenset(_Tag(t.leaf, None, None) for t in v.tags))


def _signature(carry: list[_Val], records: list[tuple[_Tag, int]], index: int) -> tuple:
  """What must repeat for one scan iteration to predict the next ones."""
  shape = tuple((v.depth is None, v.tags) for v in carry)
  keys = tuple(
    (t.leaf, t.axis0, None if t.sliced is None else (t.sliced[0], t.sliced[1] - index))
    for t, _ in records
  )
  return shape, keys


def _scan(eqn: Any, ins: list[_Val], uses: _Uses) -> list[_Val]:
  """Walks a scan's body once per iteration, a leaf sliced by it getting a depth per slice.

  Depths through a loop body are max-plus affine in the carried depths, so
  once two successive iterations shift every carried depth and every use by
  the same amounts, the remaining iterations are extrapolated instead of
  walked (a scan over 10,000 steps costs a few walks of its body).
  """
  p = eqn.params
  n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
  body = p["jaxpr"].jaxpr
  consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]
  ys: list[list[_Val]] = []
  history: list[tuple[tuple, list[int], list[tuple[_Tag, int]]]] = []
  for t in range(length):
    index = length - 1 - t if p["reverse"] else t
    start = len(uses.records)
    outs = _walk(body, consts + carry + [_slice_val(v, index) for v in xs], uses)
    carry, y = outs[:n_carry], outs[n_carry:]
    ys.append(y)
    records = uses.records[start:]
    numbers = [v.depth for v in carry + y if v.depth is not None] + [d for _, d in records]
    history.append((_signature(carry + y, records, index), numbers, records))
    if len(history) >= 3 and t + 1 < length:
      (s0, n0, _), (s1, n1, _), (s2, n2, _) = history[-3:]
      step = [b - a for a, b in zip(n1, n2)]
      if s0 == s1 == s2 and step == [b - a for a, b in zip(n0, n1)] and min(step, default=0) >= 0:
        carry = _extrapolate(carry, y, step, records, t, length, p["reverse"], uses, ys)
        break
  stacked = [_merge(list(column)) for column in zip(*ys)] if ys else []
  return carry + [_unslice(v) for v in stacked]


def _extrapolate(carry, y, step, records, t, length, reverse, uses, ys) -> list[_Val]:
  """The iterations after `t` of a scan whose depths grow by `step` per iteration."""
  rest = length - 1 - t
  shifts = iter(step)
  grow = lambda v: v._replace(depth=v.depth + rest * next(shifts)) if v.depth is not None else v
  carry = [grow(v) for v in carry]
  last = [grow(v) for v in y]
  ys.append(last)
  record_steps = list(shifts)
  for j in range(1, rest + 1):
    index = length - 1 - (t + j) if reverse else t + j
    for (tag, depth), k in zip(records, record_steps):
      if tag.sliced is not None:  # whole-leaf uses only get deeper: the first one counts
        offset = tag.sliced[1] - (length - 1 - t if reverse else t)
        sliced = (tag.sliced[0], index + offset)
        uses.records.append((tag._replace(sliced=sliced), depth + j * k))
  return carry


def _leaf_depth(records: list[tuple[_Tag, int]], shape: tuple[int, ...]) -> _depths.Depth:
  """One leaf's depth from its uses: an int, or a `StackedDepth` for a sliced leaf."""
  if not records:
    return UNUSED
  axes = {t.sliced[0] if t.sliced is not None else None for t, _ in records}
  if len(axes) != 1 or None in axes:  # used whole (or sliced two ways): its first use
    return min(d for _, d in records)
  axis = axes.pop()
  per_slice = [UNUSED] * shape[axis]
  for tag, depth in records:
    i = tag.sliced[1]
    if 0 <= i < len(per_slice):
      per_slice[i] = depth if per_slice[i] == UNUSED else min(per_slice[i], depth)
  return _depths.StackedDepth(per_slice, axis)


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def infer_depths(
  apply_fn: Callable[..., Any], params: Any, *example_args: Any, **example_kwargs: Any
) -> Any:
  r"""Labels every parameter leaf with the depth at which the forward pass uses it.

  Traces ``apply_fn(params, *example_args, **example_kwargs)`` to a jaxpr once
  (`jax.make_jaxpr`: shapes only, no FLOPs run) and walks it. Each value gets
  a depth: the number of *parameter-consuming* operations on the longest
  chain from the inputs to it, where a parameter-consuming operation applies a
  parameter to data: a matmul (``dot_general``, hence ``einsum`` too), a
  convolution, or a table lookup (``gather`` of an embedding). Then

  $$
  \mathrm{depth}(W) = \max_{x \in \mathrm{data\ inputs\ of\ the\ op}} \mathrm{depth}(x),
  \qquad \mathrm{depth}(\mathrm{out}) = \mathrm{depth}(W) + 1
  $$

  so the first layer is at depth 0, as in `layer_depths`, and a Dense MLP gets
  the same labels from both. Operations that consume no parameter (add, the
  activations, attention scores of two data values) keep the largest depth of
  their inputs, so a residual shortcut sits at the depth of its block, not
  after it, and a transformer's query, key and value projections share one
  depth. A parameter used only elementwise (a bias, a norm's scale and
  offset) joins the layer whose output it acts on: depth ``d - 1`` for a value
  at depth ``d`` (0 at the inputs), so a Dense's bias shares its kernel's
  depth and a BatchNorm after a conv shares the conv's.

  Nested jaxprs are followed: ``pjit`` (`jax.jit`), ``remat`` (`jax.checkpoint`,
  ``nn.remat``), ``custom_jvp``/``custom_vjp`` calls, ``cond`` (every branch;
  a value takes its deepest) and ``while`` (one iteration is counted: its trip
  count is unknown). A ``scan`` is walked iteration by iteration (a few walks,
  then extrapolated once the depths grow by a fixed step), so a leaf that the
  scan slices along an axis (``nn.scan``, `jax.lax.scan` over stacked
  weights) gets one depth per slice, as a `StackedDepth` on that axis, which
  every transform then treats as that many layers. Where the slices cannot be
  told apart (the stack is transposed, reshaped or used whole before the
  scan, or sliced twice as in nested scans) the leaf gets one int: the depth
  of its first use.

  A weight used several times (shared, tied embeddings, a layer applied twice)
  gets the depth of its first use (the smallest). Depths are graph depths, not
  ranks: a depth at which no parameter is first used leaves a gap. A float
  leaf never used gets -1 (``odn.NOT_A_LAYER``: every transform leaves it
  alone) and an `UnusedParamWarning` names it; non-float leaves get -1 too.

  Args:
    apply_fn: ``apply_fn(params, *example_args, **example_kwargs)`` runs the
      forward pass, e.g. ``lambda p, x: model.apply({"params": p}, x)``, or
      ``lambda m, x: m(x)`` for an Equinox model.
    params: the parameter pytree (linen dict, ``nnx.State``, Equinox module,
      ...). Leaves that are not arrays (an Equinox module's functions) are held
      fixed.
    *example_args: example inputs: arrays or `jax.ShapeDtypeStruct`\ s (a
      batch of one suffices); other values are passed as they are. Every
      array input counts as data at depth 0, so close over non-parameter
      state such as BatchNorm statistics in `apply_fn` (as arrays: zeros of
      their shapes will do) instead of passing it here: a norm's scale that
      met the statistics as data would be placed at depth 0.
    **example_kwargs: keyword inputs, likewise (``train=False``).

  Returns:
    A pytree with the structure of `params`: an int per leaf, or a
    `StackedDepth` for a leaf sliced by a scan. Pass it as ``depths=`` to any
    transform; check it with `depth_table`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import optax_depthnorm as odn
    >>> class Residual(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     h = nn.Dense(4, name="fc1")(jax.nn.relu(nn.Dense(4, name="fc0")(x)))
    ...     return nn.Dense(2, name="head")(x + h)
    >>> model = Residual()
    >>> x = jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> depths = odn.infer_depths(lambda p, x: model.apply({"params": p}, x), params, x)
    >>> {k: v["kernel"] for k, v in depths.items()}
    {'fc0': 0, 'fc1': 1, 'head': 2}
  """
  traced = trace(apply_fn, params, *example_args, **example_kwargs)
  return label(params, traced)


class Traced(NamedTuple):
  """A forward pass traced for `infer_depths`: its jaxpr and which leaves it reads."""

  jaxpr: Any  # ClosedJaxpr; its inputs: the traced params, then the traced example args
  traced_params: list[int]  # flat indices of the param leaves that are inputs
  num_args: int


def trace(apply_fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> Traced:
  """`infer_depths`' first step: the jaxpr of the forward pass (shapes only)."""
  flat_params, params_def = jax.tree_util.tree_flatten(params)
  flat_args, args_def = jax.tree_util.tree_flatten((args, kwargs))
  traced_p = [i for i, x in enumerate(flat_params) if _is_array(x)]
  traced_a = [i for i, x in enumerate(flat_args) if _is_array(x)]

  def forward(p_leaves: list[Any], a_leaves: list[Any]) -> Any:
    leaves, inputs = list(flat_params), list(flat_args)
    for i, x in zip(traced_p, p_leaves):
      leaves[i] = x
    for i, x in zip(traced_a, a_leaves):
      inputs[i] = x
    a, kw = jax.tree_util.tree_unflatten(args_def, inputs)
    return apply_fn(jax.tree_util.tree_unflatten(params_def, leaves), *a, **kw)

  closed = jax.make_jaxpr(forward)(
    [_abstract(flat_params[i]) for i in traced_p], [_abstract(flat_args[i]) for i in traced_a]
  )
  return Traced(closed, traced_p, len(traced_a))


def label(params: Any, traced: Traced) -> Any:
  """`infer_depths`' second step: walks the jaxpr and labels the leaves of `params`."""
  flat_params, params_def = jax.tree_util.tree_flatten(params)
  floats = {i for i in traced.traced_params if _tree.is_float_leaf(flat_params[i])}
  ins = [
    _Val(None, frozenset({_Tag(i, 0 if len(flat_params[i].shape) else None, None)}))
    if i in floats
    else _NEUTRAL
    for i in traced.traced_params
  ] + [_Val(0, frozenset())] * traced.num_args
  uses = _Uses()
  _walk(traced.jaxpr.jaxpr, ins, uses)
  by_leaf: dict[int, list[tuple[_Tag, int]]] = {}
  for tag, depth in uses.records:
    by_leaf.setdefault(tag.leaf, []).append((tag, depth))
  labels = [
    _leaf_depth(by_leaf.get(i, []), tuple(x.shape)) if i in floats else UNUSED
    for i, x in enumerate(flat_params)
  ]
  _warn_unused(params, [i for i in sorted(floats) if labels[i] == UNUSED])
  return jax.tree_util.tree_unflatten(params_def, labels)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _warn_unused(params: Any, unused: list[int]) -> None:
  if not unused:
    return
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [_tree.path_name(paths[i][0]) or "<root>" for i in unused]
  shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
  warnings.warn(
    f"infer_depths: the forward pass never uses {len(names)} parameter leaf(s): {shown}. "
    f"They get depth {UNUSED} and every transform leaves them alone; if they are used in "
    "another mode (train=True, another method), trace that one.",
    UnusedParamWarning,
    stacklevel=_order.caller_stacklevel(),
  )
