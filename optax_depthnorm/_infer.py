"""Depths from the computation graph: `infer_depths`.

Path labels give a layer's order only where names encode it. `infer_depths`
reads it from the forward computation instead: it traces the model to a jaxpr
once (no FLOPs run) and walks its equations, carrying for each value the
number of parameter-consuming operations (matmul, conv, table lookup) on the
longest chain from the inputs to it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from optax_depthnorm import _blocks, _depths, _graph, _order, _placement, _stack, _tree

UNUSED = _depths.NOT_A_LAYER


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


def infer_depths(
  apply_fn: Callable[..., Any],
  *args: Any,
  granularity: _blocks.Granularity = "layer",
  blocks: _blocks.Blocks = None,
  **example_kwargs: Any,
) -> Any:
  r"""Labels every parameter leaf with the depth at which the forward pass uses it.

  Call it as ``infer_depths(apply_fn, params, *example_args)``, or on a model:
  ``infer_depths(model, *example_args)`` for an NNX module (depths keyed like
  ``nnx.state(model, nnx.Param)``) or an Equinox module (the model is the
  param tree). It traces the forward pass to a jaxpr once (`jax.make_jaxpr`:
  shapes only, no FLOPs run), drops the computations whose results are
  discarded, and walks the rest. Each value gets a depth: the number of
  *parameter-consuming* operations on the longest chain from the inputs to
  it, where a parameter-consuming operation applies a parameter to data: a
  matmul (``dot_general``, hence ``einsum`` too), a convolution, or a table
  lookup (``gather`` of an embedding). Then

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
  offset) acts on a value at depth ``d`` between the layer that made it
  (``d - 1``) and the one that reads it (``d``); it joins the one inside its
  own module scope, looking outward from its parent module (the layer that
  made it where both are): a Dense's bias joins its kernel, a BatchNorm after
  a conv the conv, a block's pre-LayerNorm the block it opens.

  Nested jaxprs are followed: ``pjit`` (`jax.jit`), ``remat`` (`jax.checkpoint`,
  ``nn.remat``), ``custom_jvp``/``custom_vjp`` calls, ``cond`` (every branch;
  a value takes its deepest) and ``while`` (one iteration is counted: its trip
  count is unknown). A ``scan`` is walked iteration by iteration (a few walks,
  then extrapolated once the depths grow by a fixed step), so a leaf that the
  scan slices along an axis (``nn.scan``, `jax.lax.scan` over stacked
  weights) gets one depth per slice, as a `StackedDepth` on that axis, which
  every transform then treats as that many layers; nested scans
  (``nn.remat_scan(lengths=(2, 3))``) give a `StackedDepth` on two axes, one
  depth per layer. Where the slices cannot be told apart (the stack is
  transposed or reshaped before the scan, or used whole as well) the leaf gets
  one int: the depth of its first use.

  With ``granularity="block"`` the unit is a repeated block, as BEiT's and
  MAE's layer-wise LR decay (``get_layer_id_for_vit``) and ELECTRA's
  (``_get_layer_lrs``) count it: every leaf of block ``k`` of ``L`` gets
  ``k + 1``, the leaves that run before the first block (embeddings, ``cls``,
  position embeddings) 0, and those after the last (final norm, pooler,
  head) ``L + 1``. Blocks are found as siblings named with a running index
  (``encoderblock_3``, ``layers/3``, ``blocks_3``, ``ResNetBlock_3``; the
  outermost such group, several groups numbered in the order they run), the
  slices of a stacked leaf (a scan over blocks), or by the `blocks` regex.
  ``optax.chain(optax.adamw(lr), odn.depth_decay(-math.log(0.75),
  reverse=True, depths=odn.infer_depths(..., granularity="block")))`` is then
  MAE's layer decay 0.75: each leaf's update is scaled by
  ``0.75 ** (L + 1 - id)``.

  A weight used several times (shared, tied embeddings, a layer applied twice)
  gets the depth of its first use (the smallest). Depths are graph depths, not
  ranks: a depth at which no parameter is first used leaves a gap. A float
  leaf never used gets -1 (``odn.NOT_A_LAYER``: every transform leaves it
  alone) and an `UnusedParamWarning` names it; non-float leaves get -1 too.

  Args:
    apply_fn: ``apply_fn(params, *example_args, **example_kwargs)`` runs the
      forward pass, e.g. ``lambda p, x: model.apply({"params": p}, x)``, or
      ``lambda m, x: m(x)`` for an Equinox model; or the model itself, an NNX
      or Equinox module, called as ``model(*example_args, **example_kwargs)``.
    *args: ``params, *example_args``, or only ``example_args`` for a model.
      ``params`` is the parameter pytree (linen dict, ``nnx.State``, Equinox
      module, ...); leaves that are not arrays (an Equinox module's functions)
      are held fixed. Example inputs are arrays or `jax.ShapeDtypeStruct`\ s (a
      batch of one suffices); other values are passed as they are. Every
      array input counts as data at depth 0, so close over non-parameter
      state such as BatchNorm statistics in `apply_fn` (as arrays: zeros of
      their shapes will do) instead of passing it here: a norm's scale that
      met the statistics as data would be placed at depth 0. With no array
      input at all, the arrays `apply_fn` closes over are its inputs
      (``infer_depths(lambda p: model.apply({"params": p}, x), params)``).
    granularity: ``"layer"`` (one depth per parameter-consuming layer, the
      default) or ``"block"`` (one id per repeated block, see above).
    blocks: with ``granularity="block"``, a regex searched in each leaf's
      ``'/'``-joined path whose first group captures its block index
      (``r"stage\d+_unit(\d+)/"``); None finds blocks by their names.
    **example_kwargs: keyword inputs, likewise (``train=False``).

  Returns:
    A pytree with the structure of `params` (a nested dict for an NNX model):
    an int per leaf, or a `StackedDepth` for a leaf sliced by a scan. Pass it
    as ``depths=`` to any transform; check it with `depth_table`.

  Raises:
    ValueError: the forward pass reads no input array; `granularity` is not
      ``"layer"`` or ``"block"``; no block is found, or `blocks` matches no
      path.

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

    One id per block, as MAE's layer decay counts (stem 0, blocks 1..L, head L+1):

    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.Dense(4, name="stem")(x)
    ...     for i in range(2):
    ...       x = x + nn.Dense(4, name=f"block_{i}")(nn.LayerNorm(name=f"ln_{i}")(x))
    ...     return nn.Dense(2, name="head")(x)
    >>> params = Net().init(jax.random.key(0), x)["params"]
    >>> blocks = odn.infer_depths(
    ...     lambda p, x: Net().apply({"params": p}, x), params, x, granularity="block")
    >>> {k: v["kernel"] for k, v in blocks.items() if "kernel" in v}
    {'block_0': 1, 'block_1': 2, 'head': 3, 'stem': 0}
  """
  _blocks.check_granularity(granularity, blocks)
  apply_fn, params, example_args, finish = _entry(apply_fn, args)
  traced = trace(apply_fn, params, *example_args, **example_kwargs)
  return finish(label(params, traced, granularity, blocks))


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


def label(params: Any, traced: Traced, granularity: str = "layer", blocks: Any = None) -> Any:
  """`infer_depths`' second step: walks the jaxpr and labels the leaves of `params`."""
  flat_paths, params_def = jax.tree_util.tree_flatten_with_path(params)
  flat_params = [x for _, x in flat_paths]
  floats = {i for i in traced.traced_params if _tree.is_float_leaf(flat_params[i])}
  ins = [
    _graph.Val(None, frozenset({_graph.Tag(i, tuple(range(flat_params[i].ndim)), ())}))
    if i in floats
    else _graph.NEUTRAL
    for i in traced.traced_params
  ] + [_graph.DATA] * traced.num_args
  if not traced.num_args and not traced.jaxpr.consts:
    raise ValueError(
      "infer_depths: the forward pass reads no input array, so no parameter meets data; "
      "pass an example input: `odn.infer_depths(apply_fn, params, x)`."
    )
  # With no array argument, the arrays `apply_fn` closes over are its inputs.
  consts = _graph.NEUTRAL if traced.num_args else _graph.DATA
  uses = _graph.walk_closed(traced.jaxpr, ins, consts)
  by_leaf: dict[int, list[_graph.Use]] = {i: [] for i in floats}
  for use in uses.records:
    by_leaf[use.tag.leaf].append(use)
  leaf_units, axes = {}, {}
  for i in sorted(floats):
    leaf_units[i], axes[i] = _placement.units(by_leaf[i], tuple(flat_params[i].shape), i)
  parts = [_tree.path_parts(p) for p, _ in flat_paths]
  found, where = _placement.layer_labels(parts, list(leaf_units.values()))
  shape = lambda i: tuple(flat_params[i].shape)
  labels = [UNUSED] * len(flat_params)
  positions = [UNUSED] * len(flat_params)
  for i, d, p in zip(leaf_units, found, where):
    labels[i] = _placement.as_label(d, axes[i], shape(i))
    positions[i] = _placement.as_label(p, axes[i], shape(i))
  _warn_unused(params, [i for i in sorted(floats) if _stack.valid_depths(labels[i]) == []])
  if granularity == "block":
    stacks = {i: leaf_units[i][0].stack for i in leaf_units}
    chosen = [i for i in sorted(floats) if _stack.valid_depths(labels[i])]
    ids = _blocks.assign(
      [_blocks.Leaf(parts[i], labels[i], positions[i], stacks[i]) for i in chosen], blocks
    )
    for i, d in zip(chosen, ids):
      labels[i] = d
  return jax.tree_util.tree_unflatten(params_def, labels)


def _entry(first: Any, args: tuple[Any, ...]) -> tuple[Callable, Any, tuple, Callable]:
  """(apply_fn, params, example args, finish) for `infer_depths(fn, params, *args)` or a model.

  An NNX module is split into its `nnx.Param` state and the rest; an Equinox
  module is its own param tree and is called on the example args.
  """
  if _depths._is_nnx_module(first):
    from flax import nnx

    graphdef, params, rest = nnx.split(first, nnx.Param, ...)
    apply = lambda p, *a, **k: nnx.merge(graphdef, p, rest)(*a, **k)
    return apply, params, args, lambda labels: labels.to_pure_dict()
  if _is_equinox_model(first):
    return lambda m, *a, **k: m(*a, **k), first, args, lambda labels: labels
  if not args:
    raise TypeError(
      "infer_depths needs `infer_depths(apply_fn, params, *example_args)`, or a model "
      "(an NNX or Equinox module) and its example args; got no params."
    )
  return first, args[0], args[1:], lambda labels: labels


def _is_equinox_model(x: Any) -> bool:
  """An Equinox module holding floating arrays (an `eqx.Partial` of a function is not)."""
  eqx = sys.modules.get("equinox")
  if eqx is None or not isinstance(x, eqx.Module):
    return False
  return any(_tree.is_float_leaf(leaf) for leaf in jax.tree_util.tree_leaves(x))


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


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
