"""Depth labels from parameter paths: `layer_depths` and `depth_table`.

A layer is the set of leaves that share a parent path (a Flax module's
``kernel`` and ``bias``); a leaf addressed by an integer position (``[W0, W1]``)
is a layer of its own. Layers are ordered by path, integer parts compared as
numbers, and a layer's depth is its rank: 0 at the input side.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import jax

from optax_depthnorm import _tree

DepthRule = Union[None, str, "re.Pattern[str]", Mapping[str, int], Callable[[str, Any], int]]
StackAxis = Union[None, Mapping[str, int], Callable[[str, Any], Union[int, None]]]

NOT_A_LAYER = -1
_AUTO_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_(\d+)$")
_FIX = (
  "If this order is wrong, pass depths computed from the dict that `model.init` "
  "returns (it keeps creation order: `depths=odn.layer_depths(variables['params'])`), "
  "or a `rule=` (regex, mapping or callable); check with `odn.depth_table`. "
  "Silence with `warnings.simplefilter('ignore', odn.DepthOrderWarning)`."
)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
  """The `stacklevel` that points a warning at the first frame outside this package."""
  frame, level = sys._getframe(1), 1
  while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
    frame, level = frame.f_back, level + 1
  return level


def _as_index(x: Any) -> int | None:
  """`x` as a Python int if it is an integer (not a bool, not a float array)."""
  if isinstance(x, bool):
    return None
  try:
    return operator.index(x)
  except TypeError:
    return None


class DepthOrderWarning(UserWarning):
  """Warns that layer names alone may not tell the order of layers.

  Flax linen numbers auto-named modules per class, so on a tree with sorted keys
  ``BatchNorm_0`` sorts before ``Conv_0``. Check with `depth_table`, then pass
  depths computed from the dict `model.init` returns, or a rule.

  Example:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> tree = {"BatchNorm_0": {"scale": jnp.ones(2)}, "Conv_0": {"kernel": jnp.ones((3, 2))}}
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   depths = odn.layer_depths(tree)
    >>> [w.category.__name__ for w in caught], depths["BatchNorm_0"]["scale"]
    (['DepthOrderWarning'], 0)
    >>> odn.layer_depths(tree, rule={"Conv_0": 0, "BatchNorm_0": 1})["BatchNorm_0"]["scale"]
    1
  """


@dataclasses.dataclass(frozen=True, init=False)
class StackedDepth:
  """The depths of a leaf that holds several layers along one axis.

  Flax ``nn.scan``, NNX ``vmap`` and Equinox ``filter_vmap`` stack ``L`` layers
  in one leaf of shape ``(L, ...)``. In a depth pytree such a leaf is labelled
  with a `StackedDepth` instead of an int: slice ``i`` along `axis` is a layer
  of its own at depth ``depths[i]`` (-1: not a layer). Every transform then
  treats each slice as its own layer (per-slice norms, decay factors, scales
  and flow statistics), vectorized over the axis. A `StackedDepth` is a pytree
  leaf: it is static data, like the ints beside it.

  Attributes:
    depths: one depth per slice.
    axis: the axis of the leaf that holds the layers.

  Example:
    >>> import optax_depthnorm as odn
    >>> odn.StackedDepth(range(1, 4), axis=0)
    StackedDepth(depths=(1, 2, 3), axis=0)
  """

  depths: tuple[int, ...]
  axis: int

  def __init__(self, depths: Iterable[int], axis: int = 0) -> None:
    values = tuple(_as_index(d) for d in depths)
    if not values or any(d is None or d < NOT_A_LAYER for d in values):
      raise ValueError(
        f"StackedDepth needs one integer depth >= {NOT_A_LAYER} per slice, got {depths!r}."
      )
    if _as_index(axis) is None:
      raise TypeError(f"StackedDepth axis must be an int, got {type(axis).__name__}.")
    object.__setattr__(self, "depths", values)
    object.__setattr__(self, "axis", int(axis))

  def __len__(self) -> int:
    return len(self.depths)

  def map(self, fn: Callable[[int], int]) -> StackedDepth:
    """The same stack with `fn` applied to every depth but -1."""
    return StackedDepth([fn(d) if d != NOT_A_LAYER else d for d in self.depths], self.axis)

  def text(self) -> str:
    """The depths in short: ``1..12`` for a run, ``1,5,..,45`` otherwise."""
    d = self.depths
    if len(d) > 1 and d == tuple(range(d[0], d[0] + len(d))):
      return f"{d[0]}..{d[-1]}"
    shown = [str(x) if x != NOT_A_LAYER else "-" for x in d]
    return ",".join(shown) if len(d) <= 3 else f"{shown[0]},{shown[1]},..,{shown[-1]}"


Depth = Union[int, StackedDepth]


def valid_depths(label: Depth) -> list[int]:
  """The depths (other than -1) of one leaf's label, an int or a `StackedDepth`."""
  values = label.depths if isinstance(label, StackedDepth) else (label,)
  return [d for d in values if d != NOT_A_LAYER]


def deepest(labels: Iterable[Depth]) -> int:
  """The largest depth among labels (ints or `StackedDepth`), -1 if there is none."""
  return max((d for label in labels for d in valid_depths(label)), default=NOT_A_LAYER)


def reverse_labels(labels: list[Depth]) -> list[Depth]:
  """Depths counted from the output: the deepest layer gets 0."""
  top = max(deepest(labels), 0)
  return [
    label.map(lambda d: top - d)
    if isinstance(label, StackedDepth)
    else (top - label if label != NOT_A_LAYER else label)
    for label in labels
  ]


def _natural_key(part: str) -> tuple[Any, ...]:
  pieces = re.split(r"(\d+)", part)
  return tuple(int(p) if i % 2 else p for i, p in enumerate(pieces))


def _auto_classes(names: list[str]) -> set[str]:
  return {m.group(1) for m in map(_AUTO_NAME.match, names) if m}


def _mapping_orders(tree: Any) -> dict[tuple[str, ...], list[str]]:
  """Key order of every mapping in `tree`, by the path of the mapping."""
  orders: dict[tuple[str, ...], list[str]] = {}

  def walk(node: Any, prefix: tuple[str, ...]) -> None:
    if isinstance(node, Mapping):
      keys = list(node.keys())
      orders[prefix] = [str(k) for k in keys]
      for k in keys:
        walk(node[k], (*prefix, str(k)))
    elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      for i, child in enumerate(node):
        walk(child, (*prefix, str(i)))

  walk(tree, ())
  return orders


def _trusted_orders(
  tree: Any, layer_keys: list[tuple[str, ...]]
) -> dict[tuple[str, ...], dict[str, int]]:
  """Creation order of the levels whose names mix auto-named classes.

  Linen names modules per class (``Conv_0, BatchNorm_0, Conv_1``), so sorting
  such names misorders layers. A mapping whose key order differs from the
  sorted order still holds creation order (as `model.init` returns it) and is
  used; where the order is the sorted one, nothing tells, and we warn.
  """
  children: dict[tuple[str, ...], list[str]] = {}
  for key in layer_keys:
    for depth in range(len(key)):
      names = children.setdefault(key[:depth], [])
      if key[depth] not in names:
        names.append(key[depth])
  mapping_orders = _mapping_orders(tree)
  trusted = {}
  for prefix, names in children.items():
    classes = _auto_classes(names)
    if len(classes) < 2:
      continue
    order = [n for n in mapping_orders.get(prefix, []) if n in names]
    if order and order != sorted(order, key=_natural_key):
      trusted[prefix] = {n: i for i, n in enumerate(order)}
    else:
      where = "/".join(prefix) or "<root>"
      warnings.warn(
        f"Layers at {where!r} mix auto-named classes ({', '.join(sorted(classes))}); "
        f"Flax numbers each class separately, so names cannot tell their order and "
        f"depths follow names ({', '.join(sorted(names, key=_natural_key)[:4])}, ...). " + _FIX,
        DepthOrderWarning,
        stacklevel=_caller_stacklevel(),
      )
  return trusted


def _layer_key(path: tuple[Any, ...]) -> tuple[str, ...]:
  keys = _tree.strip_value(path)
  parts = tuple(_tree.key_name(k) for k in keys)
  if len(parts) <= 1 or _tree.is_index_key(keys[-1]):
    return parts
  return parts[:-1]


def _default_depths(tree: Any, paths: list[tuple[Any, ...]]) -> list[int]:
  keys = [_layer_key(p) for p in paths]
  distinct = list(dict.fromkeys(keys))
  trusted = _trusted_orders(tree, distinct)

  def sort_key(key: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(
      (0, trusted[key[:i]][part], ()) if key[:i] in trusted else (1, 0, _natural_key(part))
      for i, part in enumerate(key)
    )

  rank = {key: i for i, key in enumerate(sorted(distinct, key=sort_key))}
  return [rank[k] for k in keys]


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


def _longest_prefix(rule: Mapping[str, Any], path: str) -> str | None:
  """The key of `rule` that is the longest path prefix of `path` (``''`` matches all)."""
  best = None
  for prefix in rule:
    clean = prefix.strip("/")
    if (path == clean or path.startswith(clean + "/") or not clean) and (
      best is None or len(clean) > len(best.strip("/"))
    ):
      best = prefix
  return best


def _prefix_depth(rule: Mapping[str, int], path: str) -> int:
  best = _longest_prefix(rule, path)
  if best is None:
    raise ValueError(
      f"rule has no path prefix for the leaf at {path!r}; add a prefix of it, "
      f"e.g. {path.rsplit('/', 1)[0]!r}, to the mapping (it has {list(rule)[:5]})."
    )
  return rule[best]


def _check_depth(depth: Any, path: str) -> int:
  index = _as_index(depth)
  if index is None or index < 0:
    raise ValueError(
      f"rule gave depth {depth!r} for the leaf at {path!r}; depths must be non-negative integers."
    )
  return index


def _rule_depths(tree: Any, rule: DepthRule, paths: list, leaves: list) -> list[int]:
  names = [_tree.path_name(p) for p in paths]
  if rule is None:
    return _default_depths(tree, paths)
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
  pattern = re.compile(rule)
  if pattern.groups < 1:
    raise ValueError(
      f"rule regex {pattern.pattern!r} has no group; its first group must capture "
      r"the layer index, e.g. r'layers_(\d+)'."
    )
  return pattern


def _check_stack_axis_type(stack_axis: StackAxis) -> None:
  if stack_axis is not None and not isinstance(stack_axis, Mapping) and not callable(stack_axis):
    raise TypeError(
      "stack_axis must be None, a mapping from path prefix to the axis that holds the layers "
      f"(e.g. {{'ScanBlock_0': 0}}), or a callable (path, leaf) -> axis | None; got "
      f"{type(stack_axis).__name__}."
    )


def stack_axes(stack_axis: StackAxis, names: list[str], leaves: list[Any]) -> list[int | None]:
  """The stack axis of each leaf (None: not stacked), checked against its rank.

  Args:
    stack_axis: None, a mapping from path prefix to axis (longest prefix wins),
      or a callable ``(path, leaf) -> axis | None``.
    names: the ``'/'``-joined path of each leaf.
    leaves: the leaves; one without a shape (`optax.MaskedNode`) is never stacked.

  Returns:
    One axis (non-negative) or None per leaf.
  """
  _check_stack_axis_type(stack_axis)
  if stack_axis is None:
    return [None] * len(names)
  if isinstance(stack_axis, Mapping):
    used = {_longest_prefix(stack_axis, n) for n in names}
    unknown = [k for k in stack_axis if k not in used]
    if unknown:
      raise ValueError(
        f"stack_axis names {unknown!r}, which is no prefix of a leaf's path here "
        f"(paths look like {names[:4]})."
      )
  out = []
  for name, leaf in zip(names, leaves):
    shape = getattr(leaf, "shape", None)
    if shape is None or not _tree.is_float_leaf(leaf):
      out.append(None)
      continue
    if isinstance(stack_axis, Mapping):
      key = _longest_prefix(stack_axis, name)
      axis = None if key is None else stack_axis[key]
    else:
      axis = stack_axis(name, leaf)
    if axis is None:
      out.append(None)
      continue
    index, ndim = _as_index(axis), len(shape)
    if index is None or not -ndim <= index < ndim:
      raise ValueError(
        f"stack_axis gave axis {axis!r} for the leaf at {name!r} of shape {tuple(shape)}; "
        f"give an int in [-{ndim}, {ndim}) or None."
      )
    out.append(index % ndim)
  return out


def _expand_stacks(labels: list[int], sizes: list[int | None], axes: list[int | None]) -> list:
  """Gives each slice of a stacked layer a depth of its own.

  A layer labelled ``b`` whose leaves stack ``L`` slices takes depths ``b'``
  to ``b' + L - 1``, where ``b'`` is ``b`` moved down by the extra slices of
  the stacked layers before it; an unstacked leaf of that layer gets ``b'``.
  """
  extra: dict[int, int] = {}
  for label, size in zip(labels, sizes):
    if size is not None:
      extra[label] = max(extra.get(label, 0), size - 1)
  shift = {b: sum(e for a, e in extra.items() if a < b) for b in set(labels)}
  return [
    label + shift[label]
    if size is None
    else StackedDepth(range(label + shift[label], label + shift[label] + size), axis)
    for label, size, axis in zip(labels, sizes, axes)
  ]


def layer_depths(
  tree: Any, rule: DepthRule = None, *, reverse: bool = False, stack_axis: StackAxis = None
) -> Any:
  r"""Labels every leaf of a parameter pytree with the depth of its layer.

  A layer is the set of leaves under one module (same parent path: ``kernel``
  and ``bias``; BatchNorm ``scale`` and ``bias``); a leaf at an integer position
  (a list of arrays) is a layer of its own. Layers are sorted by path with
  integer parts compared as numbers (``Dense_2 < Dense_10``,
  ``Block_1/Conv_1 < Block_2/Conv_0``) and the depth of a layer is its rank among
  layers that hold floating parameters: 0 is the input side. Layers named
  ``layers_0, layers_2`` (``nn.Sequential``) get depths 0, 1.

  Flax linen numbers auto-named modules per class (``Conv_0, BatchNorm_0,
  Conv_1``), so sorting such names misorders layers. Where one level of the tree
  mixes such classes, the key order of the mapping is used if it is not the
  sorted order (the dict `model.init` returns keeps creation order); otherwise a
  :class:`DepthOrderWarning` says so (gradients from `jax.grad` and trees rebuilt
  by `jax.tree.map` have sorted keys: compute depths once from the init dict).

  Leaves that are not floating arrays (ints, empty arrays) get depth -1 and are
  left alone by every transform; `None` leaves stay `None`. A trailing ``value``
  key (Flax NNX ``Variable``) is ignored, so an ``nnx.State`` and the pure dict
  of the same model get the same labels.

  Args:
    tree: any pytree: Flax linen variables, ``nnx.State``, an Equinox module,
      nested dicts, lists and tuples.
    rule: how to place a leaf, given its ``'/'``-joined path. ``None`` for the
      rule above; a regex (str or ``re.Pattern``) searched in the path whose
      first group captures the layer index (indices are ranked, so they need not
      start at 0 nor be contiguous); a mapping from path prefix to depth (the
      longest matching prefix wins; ``''`` matches everything); or a callable
      ``(path, leaf) -> int`` returning the depth. A path the rule cannot place
      raises a ValueError that names it.
    reverse: count depth from the output: the last layer gets 0.
    stack_axis: leaves that hold several layers along one axis (Flax
      ``nn.scan``, a leading layer axis): a mapping from path prefix to that
      axis (``{"ScanBlock_0": 0}``; the longest prefix wins) or a callable
      ``(path, leaf) -> axis | None``. Such a leaf is labelled with a
      `StackedDepth`: its layer's slices take consecutive depths, and the
      layers after it move down by the extra slices.

  Returns:
    A pytree of Python ints (a `StackedDepth` for a stacked leaf) with the
    structure of `tree`.

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
    >>> odn.layer_depths(params, rule={"Dense_0": 0, "": 1})["Dense_7"]["bias"]
    1

    Three layers stacked in one leaf (as `nn.scan` makes them) between two:

    >>> tree = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones((3, 2, 2))}, "c": {"w": jnp.ones(2)}}
    >>> d = odn.layer_depths(tree, stack_axis={"b": 0})
    >>> d["b"]["w"], d["c"]["w"]
    (StackedDepth(depths=(1, 2, 3), axis=0), 4)

  References:
    Kwiatkowski & Chang, "Gradient normalization & depth based decay for deep
    learning" (seed 000): D_gamma(d) needs a depth d per layer.
  """
  _check_stack_axis_type(stack_axis)
  leaves_with_path, treedef = _tree.flatten(tree)
  picked = [(p, x) for p, x in leaves_with_path if _tree.is_param_leaf(x)]
  paths, leaves = [p for p, _ in picked], [x for _, x in picked]
  found: list[Any] = _rule_depths(tree, rule, paths, leaves)
  if stack_axis is not None:
    names = [_tree.path_name(p) for p in paths]
    axes = stack_axes(stack_axis, names, leaves)
    sizes = [None if a is None else x.shape[a] for a, x in zip(axes, leaves)]
    found = _expand_stacks(found, sizes, axes)
  depths = iter(found)
  labels = [next(depths) if _tree.is_param_leaf(x) else NOT_A_LAYER for _, x in leaves_with_path]
  if reverse:
    labels = reverse_labels(labels)
  return jax.tree_util.tree_unflatten(treedef, labels)


def leaf_depths(tree: Any, depths: Any, stack_axis: StackAxis = None) -> list[Depth]:
  """Depth of each leaf of `tree` (flattened as `_tree.flatten` does).

  The one place where every transform reads its `depths` argument.

  Args:
    tree: the pytree being transformed (updates, params).
    depths: ``None`` (label `tree` by its paths), a rule for `layer_depths`, or
      a pytree of depths (ints, `StackedDepth`s) from `layer_depths` or
      `infer_depths` for a tree with the same paths. Leaves are matched by
      path, so an `optax.masked` subtree or the pure dict of an ``nnx.State``
      works.
    stack_axis: leaves that stack layers, see `layer_depths`. With a depth
      pytree, the named leaves must already carry per-slice depths.

  Returns:
    A list with one int (-1 for leaves that are not parameters) or
    `StackedDepth` per leaf.
  """
  if depths is None or _is_rule(depths):
    labelled = layer_depths(tree, depths, stack_axis=stack_axis)
    return [d for _, d in _tree.flatten(labelled)[0]]
  table = depth_lookup(depths)
  flat = _tree.flatten(tree)[0]
  names = [_tree.path_name(p) for p, _ in flat]
  axes = stack_axes(stack_axis, names, [x for _, x in flat])
  out: list[Depth] = []
  for name, (_, leaf), axis in zip(names, flat, axes):
    if not _tree.is_param_leaf(leaf):
      out.append(NOT_A_LAYER)
      continue
    if name not in table:
      raise ValueError(
        f"depths has no entry for the leaf at {name!r}; compute depths with "
        "`odn.layer_depths` on a tree with the same paths as the one transformed."
      )
    label = _check_stacked(table[name], leaf, name)
    if axis is not None and getattr(label, "axis", None) != axis:
      raise ValueError(
        f"stack_axis stacks the leaf at {name!r} along axis {axis}, but depths gives it "
        f"{label!r}; give per-slice depths: `odn.layer_depths(tree, stack_axis=...)` or "
        "`odn.infer_depths`."
      )
    out.append(label)
  return out


def _check_stacked(label: Depth, leaf: Any, name: str) -> Depth:
  """A `StackedDepth` checked against its leaf's shape, its axis made non-negative."""
  shape = getattr(leaf, "shape", None)
  if not isinstance(label, StackedDepth) or shape is None:
    return label
  ndim = len(shape)
  if not -ndim <= label.axis < ndim or shape[label.axis] != len(label):
    raise ValueError(
      f"depths gives {len(label)} per-slice depths along axis {label.axis} for the leaf at "
      f"{name!r}, whose shape is {tuple(shape)}; the axis must hold one slice per depth."
    )
  return label if label.axis >= 0 else StackedDepth(label.depths, label.axis % ndim)


def depth_lookup(depths: Any) -> dict[str, Depth]:
  """Maps each ``'/'``-joined path of a depth pytree to its depth (int or `StackedDepth`)."""
  table: dict[str, Depth] = {}
  for path, depth in _tree.flatten(depths)[0]:
    name = _tree.path_name(path)
    if isinstance(depth, StackedDepth):
      table[name] = depth
      continue
    index = None if isinstance(depth, jax.core.Tracer) else _as_index(depth)
    if index is None:
      raise TypeError(
        f"depths must hold Python ints (static labels), got {type(depth).__name__} at "
        f"{name!r}; build them with `odn.layer_depths`, outside jit."
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
      isinstance(k, str) and not hasattr(v, "shape") and _as_index(v) is not None
      for k, v in depths.items()
    )
  return callable(depths) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(depths))


def depth_table(tree: Any, depths: Any = None, *, stack_axis: StackAxis = None) -> str:
  """A text table of every leaf: path, shape, dtype and depth.

  Print it before training to check how layers were labelled. A stacked leaf
  (`StackedDepth`) shows its per-slice depths (``1..12``) and its stack axis
  after the shape (``(12, 64, 64)@0``).

  Args:
    tree: a parameter pytree.
    depths: ``None`` (label with the default rule), a rule, or a pytree of
      depths as returned by `layer_depths` or `infer_depths`.
    stack_axis: leaves that stack layers, see `layer_depths`.

  Returns:
    The table as a string, one leaf per line, ordered by depth then path.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
    >>> print(odn.depth_table(params))
    depth  path            shape   dtype
    0      Dense_0/kernel  (3, 4)  float32
    1      Dense_1/kernel  (4, 2)  float32
    >>> print(odn.depth_table(params, stack_axis={"Dense_1": 0}))
    depth  path            shape     dtype
    0      Dense_0/kernel  (3, 4)    float32
    1..4   Dense_1/kernel  (4, 2)@0  float32
  """
  leaves = _tree.flatten(tree)[0]
  labels = leaf_depths(tree, depths, stack_axis)
  rows = [
    (
      d.text() if isinstance(d, StackedDepth) else str(d) if d != NOT_A_LAYER else "-",
      _tree.path_name(p) or "<root>",
      str(tuple(getattr(x, "shape", ()))) + (f"@{d.axis}" if isinstance(d, StackedDepth) else ""),
      "masked"
      if not _tree.is_float_leaf(x) and _tree.is_param_leaf(x)
      else str(getattr(x, "dtype", type(x).__name__)),
      min(valid_depths(d), default=None),
    )
    for (p, x), d in zip(leaves, labels)
  ]
  rows.sort(key=lambda r: (r[4] is None, r[4] or 0, _natural_key(r[1])))
  header = ("depth", "path", "shape", "dtype")
  rows = [header, *(r[:4] for r in rows)]
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]) for r in rows]
  return "\n".join(lines)
