"""Depth labels from parameter paths: `layer_depths` and `depth_table`.

A layer is the set of leaves that share a parent path (a Flax module's
``kernel`` and ``bias``); a leaf addressed by an integer position (``[W0, W1]``)
is a layer of its own. Layers are ordered by path, integer parts compared as
numbers, and a layer's depth is its rank: 0 at the input side.
"""

from __future__ import annotations

import operator
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Union

import jax

from optax_depthnorm import _tree

DepthRule = Union[None, str, "re.Pattern[str]", Mapping[str, int], Callable[[str, Any], int]]

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
  """Warns that layer names alone may not tell the order of layers."""


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


def _prefix_depth(rule: Mapping[str, int], path: str) -> int:
  best = None
  for prefix in rule:
    clean = prefix.strip("/")
    if (path == clean or path.startswith(clean + "/") or not clean) and (
      best is None or len(clean) > len(best.strip("/"))
    ):
      best = prefix
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
  names = ["/".join(_tree.path_parts(p)) for p in paths]
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


def layer_depths(tree: Any, rule: DepthRule = None, *, reverse: bool = False) -> Any:
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

  Returns:
    A pytree of Python ints with the structure of `tree`.

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

  References:
    Kwiatkowski & Chang, "Gradient normalization & depth based decay for deep
    learning" (seed 000): D_gamma(d) needs a depth d per layer.
  """
  leaves_with_path, treedef = _tree.flatten(tree)
  picked = [(p, x) for p, x in leaves_with_path if _tree.is_param_leaf(x)]
  paths = [p for p, _ in picked]
  depths = iter(_rule_depths(tree, rule, paths, [x for _, x in picked]))
  labels = [next(depths) if _tree.is_param_leaf(x) else NOT_A_LAYER for _, x in leaves_with_path]
  if reverse:
    deepest = max(labels, default=0)
    labels = [deepest - d if d != NOT_A_LAYER else d for d in labels]
  return jax.tree_util.tree_unflatten(treedef, labels)


def depths_by_path(tree: Any, depths: Any) -> list[int]:
  """Depth of each leaf of `tree` (flattened as `_tree.flatten` does).

  Args:
    tree: the pytree being transformed (updates, params).
    depths: ``None`` (label `tree` by its paths), a rule for `layer_depths`, or
      a pytree of ints from `layer_depths` for a tree with the same paths. Leaves
      are matched by path, so an `optax.masked` subtree or the pure dict of an
      ``nnx.State`` works.

  Returns:
    A list of ints, one per leaf; -1 for leaves that are not parameters.
  """
  if depths is None or _is_rule(depths):
    labelled = layer_depths(tree, depths)
    return [d for _, d in _tree.flatten(labelled)[0]]
  table = depth_lookup(depths)
  out = []
  for path, leaf in _tree.flatten(tree)[0]:
    name = "/".join(_tree.path_parts(path))
    if not _tree.is_param_leaf(leaf):
      out.append(NOT_A_LAYER)
    elif name not in table:
      raise ValueError(
        f"depths has no entry for the leaf at {name!r}; compute depths with "
        "`odn.layer_depths` on a tree with the same paths as the one transformed."
      )
    else:
      out.append(table[name])
  return out


def depth_lookup(depths: Any) -> dict[str, int]:
  """Maps each ``'/'``-joined path of a depth pytree to its (Python int) depth."""
  table = {}
  for path, depth in _tree.flatten(depths)[0]:
    name = "/".join(_tree.path_parts(path))
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


def depth_table(tree: Any, depths: Any = None) -> str:
  """A text table of every leaf: path, shape, dtype and depth.

  Print it before training to check how layers were labelled.

  Args:
    tree: a parameter pytree.
    depths: ``None`` (label with the default rule), a rule, or a pytree of
      depths as returned by `layer_depths`.

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
  """
  leaves = _tree.flatten(tree)[0]
  labels = depths_by_path(tree, depths)
  rows = [
    (
      str(d) if d != NOT_A_LAYER else "-",
      "/".join(_tree.path_parts(p)) or "<root>",
      str(tuple(getattr(x, "shape", ()))),
      "masked"
      if not _tree.is_float_leaf(x) and _tree.is_param_leaf(x)
      else str(getattr(x, "dtype", type(x).__name__)),
    )
    for (p, x), d in zip(leaves, labels)
  ]
  rows.sort(key=lambda r: (r[0] == "-", int(r[0]) if r[0] != "-" else 0, _natural_key(r[1])))
  header = ("depth", "path", "shape", "dtype")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
  lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]) for r in [header, *rows]]
  return "\n".join(lines)
