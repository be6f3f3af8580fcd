"""Block granularity: one depth per repeated block, as layer-wise LR decay counts.

BEiT's and MAE's layer decay (``get_layer_id_for_vit``) and ELECTRA's
(``_get_layer_lrs``) give every parameter of transformer block ``i`` the id
``i + 1``, everything that runs before the first block (patch or token
embeddings, ``cls``, position embeddings) 0, and everything after the last
(final norm, pooler, head) ``L + 1``. `assign` turns the labels of either
labeller into those ids: `layer_depths` orders leaves by its ranks,
`infer_depths` by where the forward pass uses them.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple, Union

from optax_depthnorm._stack import NOT_A_LAYER, Depth, StackedDepth

Granularity = str
Blocks = Union[None, str, "re.Pattern[str]"]
GRANULARITIES = ("layer", "block")

# A sibling named with a running index: `encoderblock_3`, `layers_3`, `ResNetBlock_3`,
# or a list position `3`.
_INDEXED = re.compile(r"^(?:(?P<stem>.+)_)?(?P<index>\d+)$")


def check_granularity(granularity: Any, blocks: Any) -> None:
  """Raises for a `granularity` that is not one of `GRANULARITIES`, or `blocks` without it."""
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  if blocks is not None and granularity != "block":
    raise ValueError('blocks= names the blocks of granularity="block"; pass granularity="block".')
  if blocks is not None and not isinstance(blocks, (str, re.Pattern)):
    raise TypeError(
      "blocks must be a regex (str or re.Pattern) whose first group captures the block "
      f"index, e.g. r'layer_(\\d+)/'; got {type(blocks).__name__}."
    )


class Leaf(NamedTuple):
  """What `assign` needs of one parameter leaf.

  ``parts``: its path; ``label``: its depth at layer granularity (int, -1 or
  `StackedDepth`); ``position``: where it runs, the same shape as ``label``
  (odd where a parameter is used only elementwise, between two layers);
  ``stack``: the scanned block it is a slice of (None: not stacked).
  """

  parts: tuple[str, ...]
  label: Depth
  position: Depth
  stack: Hashable | None


def _values(label: Depth) -> list[int]:
  return list(label.flat) if isinstance(label, StackedDepth) else [label]


def _named_members(leaves: Sequence[Leaf]) -> dict[int, tuple[Hashable, int]]:
  """The leaves inside running-index siblings: leaf -> (group, index); the outermost win.

  A group is two or more siblings with one stem (``encoderblock_0``,
  ``encoderblock_1``; list positions). One inside a member of another group
  (a block's ``LayerNorm_0``, ``LayerNorm_1``) or holding stacked leaves (the
  sublayers of a scanned block) is no group. Where some group's members hold
  modules of their own (transformer blocks, ResNet blocks) or leaves are
  stacked, groups of single layers (a head's ``Dense_0``, ``Dense_1``) are no
  blocks; in a plain stack of layers (an MLP) each layer is a block.
  """
  found: dict[tuple[tuple[str, ...], str], set[int]] = {}
  for leaf in leaves:
    for k, part in enumerate(leaf.parts):
      match = _INDEXED.match(part)
      if match:
        found.setdefault((leaf.parts[:k], match["stem"] or ""), set()).add(int(match["index"]))
  groups = {key for key, indices in found.items() if len(indices) >= 2}

  member = lambda leaf, key: _index_in(leaf.parts, key)
  groups -= {k for k in groups for leaf in leaves if leaf.stack and member(leaf, k) is not None}
  outer = {a for a in groups if not any(b != a and _inside(a, b) for b in groups)}
  composite = {
    key
    for key in outer
    for leaf in leaves
    if member(leaf, key) is not None and len(leaf.parts) > len(key[0]) + 2
  }
  if composite or any(leaf.stack is not None for leaf in leaves):
    outer = composite
  out: dict[int, tuple[Hashable, int]] = {}
  for i, leaf in enumerate(leaves):
    for key in outer:
      index = member(leaf, key)
      if index is not None:
        out[i] = (key, index)
  return out


def _zip_interleaved(named: dict[int, tuple[Hashable, int]], leaves: Sequence[Leaf]) -> dict:
  """Sibling groups that run interleaved are one group, by index.

  A flat ``Conv_0, BatchNorm_0, Conv_1, BatchNorm_1`` is blocks
  ``{Conv_i, BatchNorm_i}``; ``Conv_0, Conv_1`` then ``Dense_0, Dense_1`` stay
  two groups, one after the other.
  """
  spans: dict[Hashable, list[int]] = {}
  for i, (key, _) in named.items():
    spans.setdefault(key, []).extend(p for p in _values(leaves[i].position) if p != NOT_A_LAYER)
  by_prefix: dict[tuple[str, ...], list[tuple[int, int, Hashable]]] = {}
  for key, positions in spans.items():
    if positions:
      by_prefix.setdefault(key[0], []).append((min(positions), max(positions), key))
  merged: dict[Hashable, Hashable] = {}
  for prefix, groups in by_prefix.items():
    groups.sort(key=lambda g: (g[0], g[1], g[2][1]))
    runs: list[list[Any]] = []
    for lo, hi, key in groups:
      if runs and lo <= runs[-1][1]:
        runs[-1][1] = max(runs[-1][1], hi)
        runs[-1][2].append(key)
      else:
        runs.append([lo, hi, [key]])
    for _, _, keys in runs:
      for key in keys:
        merged[key] = (prefix, tuple(sorted(k[1] for k in keys)))
  return {i: (merged.get(key, key), index) for i, (key, index) in named.items()}


def _index_in(parts: tuple[str, ...], key: tuple[tuple[str, ...], str]) -> int | None:
  """The index of the member of group `key` (prefix, stem) that `parts` lies under, if any."""
  prefix, stem = key
  if len(parts) <= len(prefix) or parts[: len(prefix)] != prefix:
    return None
  match = _INDEXED.match(parts[len(prefix)])
  return int(match["index"]) if match and (match["stem"] or "") == stem else None


def _inside(a: tuple[tuple[str, ...], str], b: tuple[tuple[str, ...], str]) -> bool:
  """Whether group `a` lies inside a member of group `b`."""
  return _index_in(a[0], b) is not None


def compile_indexed(
  regex: str | re.Pattern[str], arg: str, index: str, example: str
) -> re.Pattern[str]:
  """Compiles the regex of argument `arg`, checking that it has a group for the `index`."""
  pattern = re.compile(regex)
  if pattern.groups < 1:
    raise ValueError(
      f"{arg} regex {pattern.pattern!r} has no group; its first group must capture the "
      f"{index}, e.g. {example}."
    )
  return pattern


def _regex_members(leaves: Sequence[Leaf], blocks: str | re.Pattern[str]) -> dict:
  pattern = compile_indexed(blocks, "blocks", "block index", r"r'layer_(\d+)/'")
  out: dict[int, tuple[Hashable, int]] = {}
  for i, leaf in enumerate(leaves):
    match = pattern.search("/".join(leaf.parts))
    if match is None:
      continue
    if match.group(1) is None or not match.group(1).isdigit():
      raise ValueError(
        f"blocks regex {pattern.pattern!r} matches {'/'.join(leaf.parts)!r} but its first "
        "group captures no block index (digits)."
      )
    out[i] = ("blocks=", int(match.group(1)))
  if not out:
    raise ValueError(
      f"blocks regex {pattern.pattern!r} matches no parameter path (paths look like "
      f"{['/'.join(leaf.parts) for leaf in leaves[:4]]})."
    )
  return out


def _units(leaves: Sequence[Leaf], named: dict) -> list[tuple[int, int, int, Any]]:
  """(leaf, slice, position, block) per used slice; block: (group, index) or None."""
  units = []
  for i, leaf in enumerate(leaves):
    stacked = isinstance(leaf.label, StackedDepth) and leaf.stack is not None and i not in named
    for s, (label, position) in enumerate(zip(_values(leaf.label), _values(leaf.position))):
      if label == NOT_A_LAYER:
        continue
      group = named.get(i)
      if stacked:
        group = ((leaf.stack, leaf.label.shape), s)
      units.append((i, s, position, group))
  return units


def assign(leaves: Sequence[Leaf], blocks: Blocks = None) -> list[Depth]:
  """Block ids: 0 before the first block, ``k + 1`` in block ``k``, ``L + 1`` after the last.

  Blocks are `blocks=` regex matches, or else running-index siblings (see
  `_named_members`) and the slices of stacked leaves. Blocks are numbered by
  their index within a group, groups in the order they run. A leaf outside
  every block is placed by its position: before the first block's layers,
  after the last one's, or else with the last block that starts at or before it.

  Raises:
    ValueError: no block found.
  """
  if blocks is None:
    named = _zip_interleaved(_named_members(leaves), leaves)
  else:
    named = _regex_members(leaves, blocks)
  units = _units(leaves, named)
  spans: dict[tuple[Any, int], list[int]] = {}
  for _, _, position, group in units:
    if group is not None:
      spans.setdefault(group, []).append(position)
  if not spans:
    raise ValueError(
      'granularity="block" found no repeated blocks: no siblings named with a running '
      "index (encoderblock_0, layers/0, ...) and no stacked leaves; name the blocks with "
      r"blocks=, a regex whose first group captures the block index (r'stage(\d+)_')."
    )
  first: dict[Hashable, int] = {}
  for (key, _), positions in spans.items():
    first[key] = min(first.get(key, min(positions)), min(positions))
  order = sorted(spans, key=lambda g: (first[g[0]], repr(g[0]), g[1]))
  number = {group: k for k, group in enumerate(order)}
  # A block spans its layers (even positions) if it has any: an elementwise
  # parameter outside it (a position embedding, a final norm) lies strictly
  # before or after it.
  bounds = []
  for group in order:
    layers = [p for p in spans[group] if p % 2 == 0] or spans[group]
    bounds.append((min(layers), max(layers)))
  n = len(order)
  ids: dict[tuple[int, int], int] = {}
  for leaf, s, position, group in units:
    if group is not None:
      ids[leaf, s] = number[group] + 1
    elif position < bounds[0][0]:
      ids[leaf, s] = 0
    elif position > bounds[-1][1]:
      ids[leaf, s] = n + 1
    else:
      ids[leaf, s] = 1 + max(k for k, (lo, _) in enumerate(bounds) if lo <= position)
  return [
    _label(leaf, [ids.get((i, s), NOT_A_LAYER) for s in range(len(_values(leaf.label)))])
    for i, leaf in enumerate(leaves)
  ]


def from_ranks(
  parts: Sequence[tuple[str, ...]], ranks: Sequence[Depth], stacks: Sequence[Any], blocks: Blocks
) -> list[Depth]:
  """`assign` for `layer_depths`: a layer's rank is its position."""
  twice = lambda d: d.map(lambda x: 2 * x) if isinstance(d, StackedDepth) else 2 * d
  return assign([Leaf(p, d, twice(d), s) for p, d, s in zip(parts, ranks, stacks)], blocks)


def _label(leaf: Leaf, ids: list[int]) -> Depth:
  if not isinstance(leaf.label, StackedDepth) or len(set(ids)) == 1:
    return ids[0]
  return leaf.label.with_flat(ids)
