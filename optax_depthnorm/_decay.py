"""Depth-based decay of updates: `depth_decay` and `depth_normalized`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_depthnorm import _checks, _depths, _layers, _normalize, _tree

Decay = Union[str, Callable[[jax.Array, jax.Array], jax.Array]]
DECAYS = ("linear", "exponential")
GAMMA_ACCEPTS = "a number, a scalar array or an optax schedule (a callable of the step count)"
DECAY_RESULT_MSG = (
  "decay(gamma, d) must return the factor of every depth: an array of d's shape {shape} (d "
  "holds the depths of all layers at once, as {dtype}, and gamma is a scalar; use jnp "
  "operations, it is traced under jit), or one number for every layer; got {got}."
)


class DepthDecayState(NamedTuple):
  """State of `depth_decay`: the step count (for a gamma schedule) and the depths.

  ``depths`` maps each parameter leaf's ``'/'``-joined path to its depth as an
  int32 array, resolved once at `init` (per-slice depths for a stacked leaf;
  -1: left alone). The factors $D_\\gamma(d)$ are computed from it at every step.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
    >>> tx = odn.depth_decay(optax.linear_schedule(0.0, 0.5, 10))  # gamma by step count
    >>> state = tx.init(params)
    >>> int(state.count), {path: int(d) for path, d in state.depths.items()}
    (0, {'Dense_0/kernel': 0, 'Dense_1/kernel': 1})
    >>> _, state = tx.update(params, state)
    >>> int(state.count)
    1
  """

  count: jax.Array  # int32 scalar
  depths: Any  # dict[str, int32 array], see `_layers`


def _linear(gamma: jax.Array, d: jax.Array) -> jax.Array:
  return jnp.power(1.0 - gamma, d)


def _exponential(gamma: jax.Array, d: jax.Array) -> jax.Array:
  return jnp.exp(-gamma * d)


_DECAY_FNS = {"linear": _linear, "exponential": _exponential}


def _gamma_range(decay: Decay) -> tuple[_checks.Range, str]:
  """The valid gamma for this decay, and what the message adds to the range."""
  if isinstance(decay, str) and decay == "linear":
    return _checks.UNIT, " for decay='linear' ((1 - gamma)^d)"
  return _checks.NON_NEGATIVE, ""


def _check_args(gamma: Any, decay: Decay) -> bool:
  """Raises for a bad decay or static gamma; returns whether gamma is static."""
  if isinstance(decay, str):
    if decay not in DECAYS:
      raise ValueError(
        f"decay must be one of {DECAYS} or a callable (gamma, d) -> factor, got {decay!r}."
      )
  elif not callable(decay):
    raise TypeError(f"decay must be a string or a callable, got {type(decay).__name__}.")
  if callable(gamma):  # a schedule: its values are bounded at use
    return False
  valid, context = _gamma_range(decay)
  return _checks.check("gamma", gamma, valid, GAMMA_ACCEPTS, context)


def _factors(decay_fn: Callable, gamma: jax.Array, d: jax.Array) -> jax.Array:
  """``decay_fn(gamma, d)``, checked to give one real factor per depth (or one for all)."""
  out = decay_fn(gamma, d)
  if not _checks.is_real(out) or np.shape(out) not in ((), d.shape):
    error = ValueError if _checks.is_real(out) else TypeError
    raise error(DECAY_RESULT_MSG.format(shape=d.shape, dtype=d.dtype, got=_checks.describe(out)))
  return jnp.asarray(out)


def _effective_depths(
  d: jax.Array, top: jax.Array, reverse: bool, normalize: bool, dtype: Any
) -> jax.Array:
  """Depth d of every slice in `dtype`, with `top` the deepest depth of the tree.

  From the output with `reverse`, d / top with `normalize`; -1 (not a layer)
  stays negative.
  """
  d = jnp.where(d >= 0, top - d, -1) if reverse else d
  eff = d.astype(dtype)
  if normalize:
    eff = eff / jnp.maximum(top, 1).astype(dtype)
  return eff


def depth_decay(
  gamma: float | jax.Array | optax.Schedule,
  *,
  decay: Decay = "exponential",
  depths: Any = None,
  reverse: bool = False,
  normalize_depth: bool = False,
  stack_axis: _depths.StackAxis = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies each layer's update by a factor that decays with its depth.

  $$
  u_d \leftarrow D_\gamma(d) \, u_d, \qquad
  D_\gamma(d) = (1 - \gamma)^d \ \text{(linear, eq. 2)} \quad\text{or}\quad
  e^{-\gamma d} \ \text{(exponential, eq. 3)}
  $$

  with $d$ the layer's depth (0 at the input; at the output with
  ``reverse=True``), or $d / d_{\max}$ with ``normalize_depth=True`` (then $D$
  falls from 1 to $D_\gamma(1)$ across the whole network, whatever its depth).

  Placed *after* the optimizer it scales each layer's step: a per-layer
  learning rate. With ``reverse=True`` that is the layer-wise learning-rate
  decay (LLRD) used to fine-tune transformers: the head learns at the full
  rate and the layer $k$ below it at $e^{-\gamma k}$. Placed *before* an
  adaptive optimizer (Adam) it mostly cancels; before SGD it is the rule of
  Kwiatkowski & Chang (eq. 1, see `depth_normalized`).

  Depths are resolved once, from the tree given to `init`, and kept in the
  state: pass `init` the tree that knows the layer order (the dict an unjitted
  ``model.init`` returns, an Equinox module) or pass ``depths=``.

  The factors are computed in float32, or in float64 when a leaf is float64
  (with x64 on), and each leaf is scaled in float32 or wider and keeps its dtype
  (a complex leaf is scaled by the real factor).

  Args:
    gamma: the decay rate $\gamma \ge 0$, finite ($\le 1$ for linear): a
      number, a scalar array or an optax schedule of the step count. A static
      value out of range is a ValueError; a traced one (under
      `optax.inject_hyperparams`, which it works under) and a schedule's
      values are clipped into the range at use (a NaN stays NaN).
    decay: ``"exponential"`` (default), ``"linear"`` or a callable
      ``decay(gamma, d) -> factors`` of a scalar ``gamma`` and a vector ``d``
      holding the depths of all layers at once (float32 arrays, float64 if a
      leaf is float64), traced under jit; it returns an array of ``d``'s
      shape (one factor per depth) or one number for every layer. Under
      `optax.inject_hyperparams` list a callable in
      ``static_args=("decay",)``, or it is taken for a schedule.
    depths: ``None`` (the order of the tree given to `init`, see
      `layer_depths`), a rule for `layer_depths`, an NNX module, or a
      precomputed pytree (from `layer_depths` or `infer_depths`). A
      `StackedDepth` leaf gets one factor per slice, broadcast along its stack
      axis; a leaf labelled -1 (not a layer, or unused in `infer_depths`) is
      left alone.
    reverse: count depth from the output layer.
    normalize_depth: use $d / d_{\max}$ (in [0, 1]) instead of $d$.
    stack_axis: leaves that hold several layers along one axis, see
      `layer_depths`. Under `optax.inject_hyperparams` list a callable in
      ``static_args``.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state is a
    `DepthDecayState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {f"layer_{i}": {"w": jnp.ones(2)} for i in range(3)}
    >>> tx = odn.depth_decay(0.5, decay="linear")
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> [float(updates[f"layer_{i}"]["w"][0]) for i in range(3)]
    [1.0, 0.5, 0.25]

    Layer-wise learning-rate decay for fine-tuning (factor 0.9 per layer below
    the head):

    >>> import math
    >>> llrd = optax.chain(optax.adamw(1e-4), odn.depth_decay(-math.log(0.9), reverse=True))
    >>> state = llrd.init(params)
    >>> updates, state = llrd.update(params, state, params)
    >>> ratio = updates["layer_0"]["w"] / updates["layer_2"]["w"]
    >>> print(f"{float(ratio[0]):.2f}")
    0.81

  References:
    Kwiatkowski & Chang, "Gradient normalization & depth based decay for deep
    learning", eq. (1)-(3).
    Clark et al., "ELECTRA", 2020 (layer-wise learning-rate decay),
    https://arxiv.org/abs/2003.10555
  """
  static = _check_args(gamma, decay)
  _depths.check_stack_axis_type(stack_axis)
  decay_fn = _DECAY_FNS[decay] if isinstance(decay, str) else decay
  valid, _ = _gamma_range(decay)

  def init_fn(params: Any) -> DepthDecayState:
    stored, _ = _layers.init_depths(params, depths, stack_axis)
    return DepthDecayState(count=jnp.zeros([], jnp.int32), depths=stored)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef, found = _layers.read(updates, state.depths)
    g = gamma(state.count) if callable(gamma) else gamma
    if not static:
      g = _checks.bounded("gamma", g, valid)
    # Factors in float32, or in float64 where a leaf is float64 (cast back per leaf).
    dtype = _tree.acc_dtype(*(leaves[leaf.index].dtype for leaf in found))
    d = _layers.concat([leaf.depth for leaf in found]).astype(jnp.int32)
    eff = _effective_depths(d, _layers.deepest(state.depths), reverse, normalize_depth, dtype)
    factors = jnp.where(eff >= 0, _factors(decay_fn, jnp.asarray(g).astype(dtype), eff), 1)
    for leaf, f in zip(found, _layers.split(factors, [leaf.depth for leaf in found])):
      leaves[leaf.index] = _tree.scale_leaf(leaves[leaf.index], f)
    new_state = DepthDecayState(count=optax.safe_increment(state.count), depths=state.depths)
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def depth_normalized(
  gamma: float | jax.Array | optax.Schedule,
  *,
  decay: Decay = "exponential",
  target: _normalize.Target = 1.0,
  norm: str = "l2",
  eps: float | jax.Array = 1e-8,
  group: str = "leaf",
  depths: Any = None,
  reverse: bool = False,
  normalize_depth: bool = False,
  stack_axis: _depths.StackAxis = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Kwiatkowski & Chang's whole rule: normalize each block, then decay it with depth.

  $$
  g_d \leftarrow N \, D_\gamma(d) \, \frac{g_d}{\|g_d\|}
  $$

  so that ``optax.chain(depth_normalized(gamma), optax.sgd(lr))`` is eq. (1):
  ``w_d <- w_d - lr N D_gamma(d) g_d / ||g_d||``. It is
  ``optax.chain(layerwise_normalize(...), depth_decay(...))``; see those two for
  the arguments and for which readings of the paper we take.

  Args:
    gamma: decay rate (number or schedule), see `depth_decay`.
    decay: ``"exponential"``, ``"linear"`` or a callable, see `depth_decay`.
    target: N, see `layerwise_normalize`.
    norm: block norm, see `layerwise_normalize`.
    eps: norm floor, see `layerwise_normalize`.
    group: ``"leaf"`` or ``"layer"``, see `layerwise_normalize`.
    depths: layer labels shared by both steps, see `layer_depths`.
    reverse: count depth from the output, see `depth_decay`.
    normalize_depth: use d / max depth, see `depth_decay`.
    stack_axis: leaves that stack layers, see `layer_depths`.

  Returns:
    An `optax.GradientTransformationExtraArgs` (an `optax.chain`).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> grads = {f"layer_{i}": {"w": jnp.array([3.0, 4.0])} for i in range(2)}
    >>> tx = optax.chain(odn.depth_normalized(0.5, decay="linear"), optax.sgd(1.0))
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> print(updates["layer_0"]["w"], updates["layer_1"]["w"])
    [-0.6 -0.8] [-0.3 -0.4]

  References:
    Kwiatkowski & Chang, "Gradient normalization & depth based decay for deep
    learning", eq. (1)-(3).
  """
  return optax.chain(
    _normalize.layerwise_normalize(
      target=target, norm=norm, eps=eps, group=group, depths=depths, stack_axis=stack_axis
    ),
    depth_decay(
      gamma,
      decay=decay,
      depths=depths,
      reverse=reverse,
      normalize_depth=normalize_depth,
      stack_axis=stack_axis,
    ),
  )
