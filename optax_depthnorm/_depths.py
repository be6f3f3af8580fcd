"""Depth labels: `layer_depths`, the labels every transform reads, and `depth_table`.

A layer is the set of leaves that share a parent path (a Flax module's
``kernel`` and ``bias``); a leaf addressed by an integer position (``[W0, W1]``)
is a layer of its own, a ``(W, b)`` tuple one layer. Layers are ranked in the
order the tree tells (see `_order`), and a layer's depth is its rank: 0 at the
input side.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, Union

import jax
import optax

from optax_depthnorm import _blocks, _order, _stack, _tree
from optax_depthnorm._order import DepthOrderWarning
from optax_depthnorm._stack import (
  NOT_A_LAYER,
  Depth,
  StackAxis,
  StackedDepth,
  check_stack_axis_type,
  deepest,
  reverse_labels,
  valid_depths,
)

__all__ = [  # the names other modules read from here
  "NOT_A_LAYER",
  "Depth",
  "DepthOrderWarning",
  "StackAxis",
  "StackedDepth",
  "check_stack_axis_type",
  "deepest",
  "reverse_labels",
  "valid_depths",
]

DepthRule = Union[None, str, "re.Pattern[str]", Mapping[str, int], Callable[[str, Any], int]]


def layer_key(path: tuple[Any, ...]) -> tuple[str, ...]:
  """The key of the layer a leaf belongs to: its parent path, or its own for a list slot."""
  keys = _tree.strip_value(path)
  parts = tuple(_tree.key_name(k) for k in keys)
  if len(parts) <= 1 or _tree.is_index_key(keys[-1]):
    return parts
  return parts[:-1]


def layer_name(path: tuple[Any, ...]) -> str:
  """A layer's name in tables and reports: its ``'/'``-joined key."""
  return "/".join(layer_key(path)) or "<root>"


def _order_keys(paths: list[tuple[Any, ...]], keys: list[tuple[str, ...]]) -> dict:
  """The key each layer is ordered by among its siblings.

  A module that holds parameters of its own and submodules too (a MAP head's
  ``probe`` beside its attention) is ordered where its first own leaf sits.
  """
  inner = {k[:i] for k in keys for i in range(1, len(k))}
  out: dict[tuple[str, ...], tuple[str, ...]] = {}
  for path, key in zip(paths, keys):
    if key not in out:
      parts = _tree.path_parts(path)
      out[key] = parts[: len(key) + 1] if key in inner and len(parts) > len(key) else key
  return out


def _default_depths(tree: Any, paths: list[tuple[Any, ...]], in_order: bool = False) -> list[int]:
  pairs = _tree.weight_bias_paths(tree)
  keys = [
    _tree.path_parts(p)[:-1] if _tree.path_parts(p)[:-1] in pairs else layer_key(p) for p in paths
  ]
  order_keys = _order_keys(paths, keys)
  ranks = _order.layer_ranks(tree, list(dict.fromkeys(order_keys.values())), in_order=in_order)
  return [ranks[order_keys[k]] for k in keys]


def _regex_depths(pattern: re.Pattern[str], paths: list[str]) -> list[int]:
  indices = []
  for path in paths:
    match = pattern.search(path)
    if match is None or match.group(1) is None or not match.group(1).isdigit():
      raise ValueError(
        f"rule {pattern.pattern!r} cannot place the leaf at {path!r}: the regex must "
        "match the path and its first group must capture the layer index (digits)."
      )
    indices.append(int(match.group(1)))
  rank = {index: i for i, index in enumerate(sorted(set(indices)))}
  return [rank[i] for i in indices]


def _prefix_depth(rule: Mapping[str, int], path: str) -> int:
  best = _stack.longest_prefix(rule, path)
  if best is None:
    raise ValueError(
      f"rule has no path prefix for the leaf at {path!r}; add a prefix of it, "
      f"e.g. {path.rsplit('/', 1)[0]!r}, to the mapping (it has {list(rule)[:5]})."
    )
  return rule[best]


def _check_depth(depth: Any, path: str) -> int:
  index = _stack.as_index(depth)
  if index is None or index < 0:
    raise ValueError(
      f"rule gave depth {depth!r} for the leaf at {path!r}; depths must be non-negative integers."
    )
  return index


def _rule_depths(
  tree: Any, rule: DepthRule, paths: list, leaves: list, in_order: bool = False
) -> list[int]:
  names = [_tree.path_name(p) for p in paths]
  if rule is None:
    return _default_depths(tree, paths, in_order)
  if isinstance(rule, (str, re.Pattern)):
    return _regex_depths(compile_rule(rule), names)
  if isinstance(rule, Mapping):
    return [_check_depth(_prefix_depth(rule, n), n) for n in names]
  if callable(rule):
    return [_check_depth(rule(n, leaf), n) for n, leaf in zip(names, leaves)]
  raise TypeError(
    "rule must be None, a regex (str or re.Pattern) whose first group is the layer "
    f"index, a mapping from path prefix to depth, or a callable (path, leaf) -> int; "
    f"got {type(rule).__name__}."
  )


def compile_rule(rule: str | re.Pattern[str]) -> re.Pattern[str]:
  """Compiles a regex rule, checking that it has a group for the layer index."""
  return _blocks.compile_indexed(rule, "rule", "layer index", r"r'layers_(\d+)'")


def _is_nnx_module(tree: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")  # not imported here: only an imported NNX makes modules
  return nnx is not None and isinstance(tree, nnx.Module)


def layer_depths(
  tree: Any,
  rule: DepthRule = None,
  *,
  reverse: bool = False,
  stack_axis: StackAxis = None,
  granularity: _blocks.Granularity = "layer",
  blocks: _blocks.Blocks = None,
) -> Any:
  r"""Labels every leaf of a parameter pytree with the depth of its layer.

  A layer is the set of leaves under one module (same parent path: ``kernel``
  and ``bias``; BatchNorm ``scale`` and ``bias``); a leaf at an integer position
  (a list of arrays) is a layer of its own, but a ``(W, b)`` tuple of a matrix
  and a vector (the JAX tutorials' ``[(W0, b0), (W1, b1)]``) is one layer. The
  depth of a layer is its rank
  among the layers, 0 at the input side, in the order the tree tells:

  - a dict whose key order is not the sorted one keeps creation order (the
    dict an unjitted linen ``model.init`` returns, a hand-built dict): that
    order is used, whatever the names;
  - lists, tuples and Equinox modules are ordered as they are; an NNX module
    passed as `tree` is read in the order its attributes were defined;
  - siblings in sorted order (``jax.jit``, ``jax.grad``, ``jax.eval_shape``,
    an ``nnx.State``) are ordered by their running numbers where those decide
    (``Dense_2 < Dense_10``, list items); where they do not (``encoder``,
    ``head``) depths follow sorted names and a `DepthOrderWarning`
    names the siblings and the fix.

  ``nn.Sequential`` names ``layers_0, layers_2`` get depths 0, 1. Leaves that
  are not real or complex floating arrays (ints, empty arrays) get depth -1 and are left alone
  by every transform; `None` leaves stay `None`. A trailing ``value`` key (an
  NNX ``Variable``) is ignored, so an ``nnx.State`` and the pure dict of the
  same model get the same labels.

  Args:
    tree: a parameter pytree (Flax linen variables, ``nnx.State``, an Equinox
      module, nested dicts, lists and tuples) or an NNX module (then the
      result is keyed like ``nnx.state(module, nnx.Param)``).
    rule: how to place a leaf, given its ``'/'``-joined path. ``None`` for the
      order above; a regex (str or ``re.Pattern``) searched in the path whose
      first group captures the layer index (indices are ranked, so they need not
      start at 0 nor be contiguous); a mapping from path prefix to depth (the
      longest matching prefix wins; ``''`` matches everything); or a callable
      ``(path, leaf) -> int`` returning the depth. A path the rule cannot place
      raises a ValueError that names it.
    reverse: count depth from the output: the last layer gets 0.
    stack_axis: leaves that hold several layers along one axis (Flax
      ``nn.scan``): a mapping from path prefix to that axis
      (``{"ScanBlock_0": 0}``; the longest prefix wins; the leaves under one
      key form one scanned block) or a callable ``(path, leaf) -> axis | None``
      (the stacked layers of one parent module form a block). Such a leaf is
      labelled with a `StackedDepth`: the slices of a block's sublayers
      interleave (slice ``i`` of sublayer ``j`` of ``J`` is at
      ``base + i J + j``), and the layers after it move down.
    granularity: ``"layer"`` (a depth per layer, as above) or ``"block"``: one
      id per repeated block, as BEiT's and MAE's layer-wise LR decay count
      (see `infer_depths`): 0 for the layers before the first block, ``k + 1``
      for every leaf of block ``k``, ``L + 1`` after the last of ``L`` blocks.
    blocks: with ``granularity="block"``, a regex searched in each leaf's
      ``'/'``-joined path whose first group captures its block index; None
      finds the blocks by their names (see `infer_depths`).

  Returns:
    A pytree of Python ints (a `StackedDepth` for a stacked leaf) with the
    structure of `tree` (a nested dict for an NNX module).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    ...           for i in range(12)}
    >>> depths = odn.layer_depths(params)
    >>> depths["Dense_2"]["kernel"], depths["Dense_10"]["bias"]
    (2, 10)
    >>> odn.layer_depths(params, reverse=True)["Dense_11"]["kernel"]
    0
    >>> named = {n: {"kernel": jnp.ones(2)} for n in ("stem", "body", "head")}
    >>> d = odn.layer_depths(named)  # creation order, whatever the names
    >>> d["stem"]["kernel"], d["body"]["kernel"], d["head"]["kernel"]
    (0, 1, 2)

    A scanned block of two Dense layers, three times (as `nn.scan` stacks it):

    >>> tree = {"blocks": {"Dense_0": {"kernel": jnp.ones((3, 2, 2))},
    ...                    "Dense_1": {"kernel": jnp.ones((3, 2, 2))}}}
    >>> d = odn.layer_depths(tree, stack_axis={"blocks": 0})["blocks"]
    >>> d["Dense_0"]["kernel"].depths, d["Dense_1"]["kernel"].depths
    ((0, 2, 4), (1, 3, 5))

    One id per block, as BEiT's and MAE's layer decay count (0 before, L+1 after):

    >>> dense, norm = {"kernel": jnp.ones((2, 2))}, {"scale": jnp.ones(2)}
    >>> block = lambda: {"LayerNorm_0": norm, "Dense_0": dense}
    >>> vit = {"embedding": dense, "block_0": block(), "block_1": block(), "head": dense}
    >>> ids = odn.layer_depths(vit, granularity="block")
    >>> ids["embedding"]["kernel"], ids["block_1"]["LayerNorm_0"]["scale"], ids["head"]["kernel"]
    (0, 2, 3)

  References:
    Kwiatkowski & Chang, "Gradient normalization & depth based decay for deep
    learning": the depth decay D_gamma(d) needs a depth d per layer.
  """
  _blocks.check_granularity(granularity, blocks)
  in_order = _is_nnx_module(tree)  # definition order is known, even where it is sorted
  if in_order:
    tree = _order.nnx_ordered_params(tree)
  check_stack_axis_type(stack_axis)
  leaves_with_path, treedef = _tree.flatten(tree)
  picked = [(p, x) for p, x in leaves_with_path if _tree.is_param_leaf(x)]
  paths, leaves = [p for p, _ in picked], [x for _, x in picked]
  found: list[Any] = _rule_depths(tree, rule, paths, leaves, in_order)
  axes = _stack.stack_axes(stack_axis, [_tree.path_name(p) for p in paths], leaves)
  if stack_axis is not None:
    found = _stack.expand_stacks(found, [layer_key(p) for p in paths], leaves, axes)
  if granularity == "block":
    groups = [
      None if a is None else _stack.stack_group(a, layer_key(p)) for p, a in zip(paths, axes)
    ]
    found = _blocks.from_ranks([_tree.path_parts(p) for p in paths], found, groups, blocks)
  depths = iter(found)
  labels = [next(depths) if _tree.is_param_leaf(x) else NOT_A_LAYER for _, x in leaves_with_path]
  if reverse:
    labels = reverse_labels(labels)
  return jax.tree_util.tree_unflatten(treedef, labels)


def leaf_depths(tree: Any, depths: Any, stack_axis: StackAxis = None) -> list[Depth]:
  """Depth of each leaf of `tree` (flattened as `_tree.flatten` does).

  The one place where a `depths=` argument is read (every transform reads it
  in `init`, the diagnostics when they are called).

  Args:
    tree: the pytree being labelled (params at `init`, gradients).
    depths: ``None`` (label `tree` by its order, see `layer_depths`), a rule
      for `layer_depths`, an NNX module, or a pytree of depths (ints,
      `StackedDepth`s) from `layer_depths` or `infer_depths` for a tree with the
      same paths. Leaves are matched by path, so an `optax.masked` subtree or
      the pure dict of an ``nnx.State`` works.
    stack_axis: leaves that stack layers, see `layer_depths`. With a depth
      pytree, the named leaves must already carry per-slice depths.

  Returns:
    A list with one int (-1 for leaves that are not parameters) or
    `StackedDepth` per leaf.
  """
  if depths is None or _is_rule(depths):
    labelled = layer_depths(tree, depths, stack_axis=stack_axis)
    return [d for _, d in _tree.flatten(labelled)[0]]
  if _is_nnx_module(depths):
    depths = layer_depths(depths, stack_axis=stack_axis)
  table = depth_lookup(depths)
  flat = _tree.flatten(tree)[0]
  names = [_tree.path_name(p) for p, _ in flat]
  axes = _stack.stack_axes(stack_axis, names, [x for _, x in flat])
  out: list[Depth] = []
  for name, (_, leaf), axis in zip(names, flat, axes):
    if not _tree.is_param_leaf(leaf):
      out.append(NOT_A_LAYER)
      continue
    if name not in table and isinstance(leaf, optax.MaskedNode):
      under = [d for k, d in table.items() if k.startswith(name + "/")]
      if under:
        out.append(deepest(under))  # a subtree `optax.masked` hid whole: its deepest layer
        continue
    if name not in table:
      raise ValueError(
        f"depths has no entry for the leaf at {name!r}; compute depths with "
        "`odn.layer_depths` on a tree with the same paths as the one transformed "
        f"(depths has paths like {list(table)[:4]})."
      )
    label = _stack.check_stacked(table[name], leaf, name)
    if axis is not None and getattr(label, "axis", None) != axis[0]:
      raise ValueError(
        f"stack_axis stacks the leaf at {name!r} along axis {axis[0]}, but depths gives it "
        f"{label!r}; give per-slice depths: `odn.layer_depths(tree, stack_axis=...)` or "
        "`odn.infer_depths`."
      )
    out.append(label)
  known = set(names)
  hidden = tuple(n + "/" for n, (_, x) in zip(names, flat) if isinstance(x, optax.MaskedNode))
  extra = [  # a -1 entry may label what the tree filters out (an Equinox model's non-arrays)
    k for k, d in table.items() if k not in known and not k.startswith(hidden) and d != NOT_A_LAYER
  ]
  if extra:
    raise ValueError(
      f"depths has entries for paths the tree does not have: {extra[:4]}; depths were "
      "computed for another tree (compute them on the params this transform updates)."
    )
  return out


def depth_lookup(depths: Any) -> dict[str, Depth]:
  """Maps each ``'/'``-joined path of a depth pytree to its depth (int or `StackedDepth`)."""
  table: dict[str, Depth] = {}
  for path, depth in _tree.flatten(depths)[0]:
    name = _tree.path_name(path)
    if isinstance(depth, StackedDepth):
      table[name] = depth
      continue
    index = None if isinstance(depth, jax.core.Tracer) else _stack.as_index(depth)
    if index is None:
      raise TypeError(
        f"depths must hold Python ints (static labels), got {type(depth).__name__} at "
        f"{name!r}; build them with `odn.layer_depths`, outside jit."
      )
    if index < NOT_A_LAYER:
      raise ValueError(
        f"depths gives {index} for the leaf at {name!r}; a depth is an int >= 0, or "
        f"{NOT_A_LAYER} (odn.NOT_A_LAYER) for a leaf every transform leaves alone."
      )
    table[name] = index
  return table


def _is_rule(depths: Any) -> bool:
  """Tells a rule from a pytree of depths.

  An Equinox module of depths is callable, so a callable counts as a rule only
  if it is a pytree leaf (a function), never by `callable` alone. A flat
  ``{name: int}`` mapping reads the same either way (exact paths are prefixes).
  """
  if isinstance(depths, (str, re.Pattern)):
    return True
  if isinstance(depths, Mapping):
    return all(
      isinstance(k, str) and not hasattr(v, "shape") and _stack.as_index(v) is not None
      for k, v in depths.items()
    )
  if _is_nnx_module(depths):
    return False
  return callable(depths) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(depths))
