"""The jaxpr walk behind `infer_depths`: where each parameter meets the data.

Every value of the jaxpr gets a depth: the number of parameter-consuming
operations (matmul, conv, table lookup) on the longest chain from the inputs
to it. Where a parameter meets data the walk records a use: ``(tag, depth,
elementwise)``, ``depth`` being that of the data it meets. `_infer` turns the
uses into labels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jax._src.interpreters import partial_eval as pe
from jax.extend import core as jcore

# An operation that applies a parameter to data, as a layer does. Where one of
# these meets data (depth d) and a parameter, the parameter is at depth d and
# the result at d + 1. Everything else (add, mul, activations, norms, attention
# scores of two data values) keeps the largest depth of its inputs.
_CONSUMING = frozenset({"dot_general", "conv_general_dilated", "ragged_dot", "ragged_dot_general"})
# Table lookups (`Embed`, `eqx.nn.Embedding`): consuming when the table is a parameter.
_LOOKUP = frozenset({"gather", "dynamic_slice"})
# Shape-preserving elementwise ops: a parameter's axes stay where they are.
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


class Tag(NamedTuple):
  """A parameter leaf a value is derived from.

  ``axes``: the leaf axes that are the value's leading axes, as far as known
  (``()``: none known); ``sliced``: ``(leaf axis or None, index, scan)`` for
  each `scan` that sliced the leaf, outermost first (None: an axis that cannot
  be told).
  """

  leaf: int
  axes: tuple[int, ...]
  sliced: tuple[tuple[int | None, int, int], ...]


class Val(NamedTuple):
  """What is known of one jaxpr value.

  ``depth``: parameter-consuming ops on the longest chain from the data to it
  (None: it does not depend on the data); ``tags``: the parameters a
  data-free value is made of.
  """

  depth: int | None
  tags: frozenset[Tag]


NEUTRAL = Val(None, frozenset())
DATA = Val(0, frozenset())


class Use(NamedTuple):
  """A parameter meeting data at `depth`: consumed by a layer, or used elementwise."""

  tag: Tag
  depth: int
  elementwise: bool


class Uses:
  """Every use of a parameter, in the order the walk meets them."""

  def __init__(self) -> None:
    self.records: list[Use] = []

  def add(self, tags: frozenset[Tag], depth: int, elementwise: bool) -> None:
    for tag in sorted(tags, key=_tag_key):
      self.records.append(Use(tag, depth, elementwise))


def _tag_key(tag: Tag) -> tuple:
  return tag.leaf, tag.axes, tuple((-1 if a is None else a, i, s) for a, i, s in tag.sliced)


def walk_closed(closed: Any, ins: list[Val], consts: Val) -> Uses:
  """Walks a `ClosedJaxpr` after dead-code elimination; its consts take the value `consts`."""
  jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)  # consts become the first inputs
  jaxpr, kept = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))  # drops unread inputs too
  uses = Uses()
  walk(jaxpr, [v for v, k in zip([consts] * len(closed.consts) + ins, kept) if k], uses)
  return uses


def walk(jaxpr: Any, ins: list[Val], uses: Uses) -> list[Val]:
  """Propagates values through `jaxpr` (a `Jaxpr`), recording parameter uses."""
  env: dict[Any, Val] = dict(zip(jaxpr.invars, ins))

  def read(v: Any) -> Val:
    return NEUTRAL if isinstance(v, jcore.Literal) else env.get(v, NEUTRAL)

  for eqn in jaxpr.eqns:
    outs = _eqn(eqn, [read(v) for v in eqn.invars], uses)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _merge(vals: list[Val]) -> Val:
  """One value that may be any of `vals` (branches of a `cond`, iterations of a loop)."""
  depths = [v.depth for v in vals if v.depth is not None]
  if depths:
    return Val(max(depths), frozenset())
  return Val(None, frozenset().union(*(v.tags for v in vals)))


def _kept_axes(eqn: Any, index: int, axes: tuple[int, ...]) -> tuple[int, ...]:
  """The leaf axes that stay leading axes of a data-free op's output, from input `index`."""
  name = eqn.primitive.name
  in_shape = tuple(getattr(eqn.invars[index].aval, "shape", ()))
  out_shape = tuple(getattr(eqn.outvars[0].aval, "shape", ())) if eqn.outvars else ()
  if not axes or not in_shape or not out_shape:
    return ()
  if name in _ELEMENTWISE:
    return axes if in_shape == out_shape else ()
  if name == "transpose":
    perm = eqn.params["permutation"]
    kept = []
    for p in perm:
      if p >= len(axes):
        break
      kept.append(axes[p])
    return tuple(kept)
  if name == "reshape" and eqn.params.get("dimensions") is None:
    kept = []  # row-major: equal leading sizes keep each row's elements together
    for i, (a, b) in enumerate(zip(in_shape, out_shape)):
      if a != b or i >= len(axes):
        break
      kept.append(axes[i])
    return tuple(kept)
  return ()


def _param_tags(eqn: Any, ins: list[Val]) -> frozenset[Tag]:
  """Tags of the output of a data-free op (its axes kept only where they are known)."""
  tags: set[Tag] = set()
  for k, v in enumerate(ins):
    tags.update(t._replace(axes=_kept_axes(eqn, k, t.axes)) for t in v.tags)
  return frozenset(tags)


def _sub_jaxpr(eqn: Any) -> Any | None:
  """The one sub-jaxpr of a call-like eqn (pjit, remat, custom_jvp/vjp, ...), if any."""
  found = []
  for value in eqn.params.values():
    if isinstance(value, jcore.ClosedJaxpr):
      found.append(value.jaxpr)
    elif isinstance(value, jcore.Jaxpr):
      found.append(value)
  return found[0] if len(found) == 1 else None


def _eqn(eqn: Any, ins: list[Val], uses: Uses) -> list[Val]:
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  if name == "scan":
    return _scan(eqn, ins, uses)
  if name == "cond":
    branches = [walk(b.jaxpr, ins[1:], uses) for b in eqn.params["branches"]]
    return [_merge(list(outs)) for outs in zip(*branches)]
  if name == "while":
    return _while(eqn, ins, uses)
  sub = _sub_jaxpr(eqn)
  if sub is not None and len(sub.invars) == len(ins):
    outs = walk(sub, ins, uses)
    if len(outs) == n_out:
      return outs
  data = [v.depth for v in ins if v.depth is not None]
  if not data:
    return [Val(None, _param_tags(eqn, ins))] * n_out
  depth = max(data)
  tags = frozenset().union(*(v.tags for v in ins if v.depth is None))
  if not tags:
    return [Val(depth, frozenset())] * n_out
  lookup = name in _LOOKUP and ins[0].depth is None and ins[0].tags
  if name in _CONSUMING or lookup:
    uses.add(tags, depth, elementwise=False)
    return [Val(depth + 1, frozenset())] * n_out
  uses.add(tags, depth, elementwise=True)  # a bias, a norm's scale: `_infer` places it
  return [Val(depth, frozenset())] * n_out


def _while(eqn: Any, ins: list[Val], uses: Uses) -> list[Val]:
  """A while loop counted as one iteration of its body (its trip count is unknown)."""
  p = eqn.params
  cond_n, body_n = p["cond_nconsts"], p["body_nconsts"]
  consts, carry = ins[cond_n : cond_n + body_n], ins[cond_n + body_n :]
  outs = walk(p["body_jaxpr"].jaxpr, consts + carry, uses)
  return [_merge([a, b]) for a, b in zip(carry, outs)]


def _slice_val(v: Val, index: int, scan: int) -> Val:
  """A `scan` slice of `v` along its axis 0, at iteration `index`."""
  if not v.tags:
    return v
  tags = frozenset(
    Tag(t.leaf, t.axes[1:], (*t.sliced, (t.axes[0] if t.axes else None, index, scan)))
    for t in v.tags
  )
  return Val(v.depth, tags)


def _unslice(v: Val) -> Val:
  """A stacked scan output: made of whole leaves as far as anything can tell."""
  return Val(v.depth, frozenset(Tag(t.leaf, (), ()) for t in v.tags))


def _shifted(tag: Tag, scan: int, by: int) -> Tag:
  """`tag` with the index of its slice by `scan` moved by `by`."""
  sliced = tuple((a, i + by, s) if s == scan else (a, i, s) for a, i, s in tag.sliced)
  return tag._replace(sliced=sliced)


def _signature(carry: list[Val], records: list[Use], index: int, scan: int) -> tuple:
  """What must repeat for one scan iteration to predict the next ones."""
  shape = tuple((v.depth is None, v.tags) for v in carry)
  keys = tuple((_shifted(u.tag, scan, -index), u.elementwise) for u in records)
  return shape, keys


def _scan(eqn: Any, ins: list[Val], uses: Uses) -> list[Val]:
  """Walks a scan's body once per iteration, a leaf sliced by it getting a depth per slice.

  Depths through a loop body are max-plus affine in the carried depths, so
  once two successive iterations shift every carried depth and every use by
  the same amounts, the remaining iterations are extrapolated instead of
  walked (a scan over 10,000 steps costs a few walks of its body).
  """
  p = eqn.params
  n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
  body, scan = p["jaxpr"].jaxpr, id(eqn)
  consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]
  ys: list[list[Val]] = []
  history: list[tuple[tuple, list[int]]] = []
  for t in range(length):
    index = length - 1 - t if p["reverse"] else t
    start = len(uses.records)
    outs = walk(body, consts + carry + [_slice_val(v, index, scan) for v in xs], uses)
    carry, y = outs[:n_carry], outs[n_carry:]
    ys.append(y)
    records = uses.records[start:]
    numbers = [v.depth for v in carry + y if v.depth is not None] + [u.depth for u in records]
    history.append((_signature(carry + y, records, index, scan), numbers))
    if len(history) >= 3 and t + 1 < length:
      (s0, n0), (s1, n1), (s2, n2) = history[-3:]
      step = [b - a for a, b in zip(n1, n2)]
      if s0 == s1 == s2 and step == [b - a for a, b in zip(n0, n1)] and min(step, default=0) >= 0:
        carry = _extrapolate(carry, y, step, records, t, length, p["reverse"], scan, uses, ys)
        break
  stacked = [_merge(list(column)) for column in zip(*ys)] if ys else []
  return carry + [_unslice(v) for v in stacked]


def _extrapolate(carry, y, step, records, t, length, reverse, scan, uses, ys) -> list[Val]:
  """The iterations after `t` of a scan whose depths grow by `step` per iteration."""
  rest = length - 1 - t
  shifts = iter(step)
  grow = lambda v: v._replace(depth=v.depth + rest * next(shifts)) if v.depth is not None else v
  carry = [grow(v) for v in carry]
  ys.append([grow(v) for v in y])
  record_steps = list(shifts)
  direction = -1 if reverse else 1
  for j in range(1, rest + 1):
    for use, k in zip(records, record_steps):
      if any(s == scan for _, _, s in use.tag.sliced):  # whole-leaf uses only get deeper
        tag = _shifted(use.tag, scan, direction * j)
        uses.records.append(use._replace(tag=tag, depth=use.depth + j * k))
  return carry
