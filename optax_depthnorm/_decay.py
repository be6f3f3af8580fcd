"""Depth-based decay of updates: `depth_decay` and `depth_normalized`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from optax_depthnorm import _depths, _normalize, _tree

Decay = Union[str, Callable[[jax.Array, jax.Array], jax.Array]]
DECAYS = ("linear", "exponential")


class DepthDecayState(NamedTuple):
  """State of `depth_decay`: the step count that drives a gamma schedule.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
    >>> tx = odn.depth_decay(optax.linear_schedule(0.0, 0.5, 10))  # gamma by step count
    >>> state = tx.init(params)
    >>> state
    DepthDecayState(count=Array(0, dtype=int32))
    >>> _, state = tx.update(params, state)
    >>> int(state.count)
    1
  """

  count: jax.Array  # int32 scalar


def _linear(gamma: jax.Array, d: jax.Array) -> jax.Array:
  return jnp.power(1.0 - gamma, d)


def _exponential(gamma: jax.Array, d: jax.Array) -> jax.Array:
  return jnp.exp(-gamma * d)


_DECAY_FNS = {"linear": _linear, "exponential": _exponential}


def _check_args(gamma: Any, decay: Decay) -> None:
  if isinstance(decay, str):
    if decay not in DECAYS:
      raise ValueError(
        f"decay must be one of {DECAYS} or a callable (gamma, d) -> factor, got {decay!r}."
      )
  elif not callable(decay):
    raise TypeError(f"decay must be a string or a callable, got {type(decay).__name__}.")
  if not _tree.is_concrete_number(gamma):
    return
  if not gamma >= 0:
    raise ValueError(f"gamma must be a non-negative number, got {gamma!r}.")
  if decay == "linear" and gamma > 1:
    raise ValueError(f"gamma must be in [0, 1] for decay='linear' ((1 - gamma)^d), got {gamma!r}.")


def _effective_depths(labels: list[_depths.Depth], normalize_depth: bool) -> dict[int, float]:
  """Depth d (or d / max depth) for each distinct layer depth."""
  distinct = sorted({d for label in labels for d in _depths.valid_depths(label)})
  deepest = max(distinct, default=0)
  scale = 1.0 / deepest if normalize_depth and deepest > 0 else 1.0
  return {d: d * scale for d in distinct}


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

  .. math::

    u_d \leftarrow D_\gamma(d) \, u_d, \qquad
    D_\gamma(d) = (1 - \gamma)^d \ \text{(linear, eq. 2)} \quad\text{or}\quad
    e^{-\gamma d} \ \text{(exponential, eq. 3)}

  with ``d`` the layer's depth (0 at the input; at the output with
  ``reverse=True``), or ``d / max depth`` with ``normalize_depth=True``. The
  paper's linear gamma = 0.5 halves the update at every layer: on a 50-layer
  net the last layers' updates are 2^-50 smaller than the first, so that value
  only makes sense on a shallow net or with ``normalize_depth=True`` (then
  ``D`` falls from 1 to 1 - gamma across the whole network).

  Where the factor goes matters. Placed *after* the optimizer it scales each
  layer's step, a per-layer learning rate. Placed *before* an adaptive
  optimizer (Adam, RMSProp, ...) it is mostly cancelled, since those divide
  by a running gradient scale; before SGD it is the paper's rule (eq. 1, see
  `depth_normalized`).

  With ``reverse=True`` and exponential decay, after the optimizer, this is the
  layer-wise learning-rate decay (LLRD) used to fine-tune transformers: the
  head learns at the full rate and layer ``k`` below it at ``exp(-gamma)^k``.

  Args:
    gamma: the decay rate gamma >= 0 (<= 1 for linear): a number or an optax
      schedule of the step count. Works under `optax.inject_hyperparams`.
    decay: ``"exponential"`` (default), ``"linear"`` or a callable
      ``decay(gamma, d) -> factor`` that takes float32 arrays (``d`` holds the
      depths of all layers at once). Under `optax.inject_hyperparams` list a
      callable in ``static_args=("decay",)``, or it is taken for a schedule.
    depths: ``None`` (labels from the updates' paths at trace time, see
      `layer_depths`), a rule for `layer_depths`, or a precomputed pytree
      (from `layer_depths` or `infer_depths`). A `StackedDepth` leaf gets one
      factor per slice, broadcast along its stack axis; a leaf labelled -1
      (not a layer, or unused in `infer_depths`) is left alone.
    reverse: count depth from the output layer.
    normalize_depth: use ``d / max depth`` (in [0, 1]) instead of ``d``.
    stack_axis: leaves that hold several layers along one axis, see
      `layer_depths`. Under `optax.inject_hyperparams` list a callable in
      ``static_args``.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state counts steps.

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
    the head), with depths checked once on the init params:

    >>> import math
    >>> depths = odn.layer_depths(params, reverse=True)
    >>> llrd = optax.chain(optax.adamw(1e-4),
    ...                    odn.depth_decay(-math.log(0.9), depths=depths))
    >>> state = llrd.init(params)
    >>> updates, state = llrd.update(params, state, params)
    >>> ratio = updates["layer_0"]["w"] / updates["layer_2"]["w"]
    >>> print(f"{float(ratio[0]):.2f}")
    0.81

  References:
    Kwiatkowski & Chang, "Gradient normalization & depth based decay for deep
    learning" (seed 000), eq. (1)-(3).
    Clark et al., "ELECTRA", 2020 (layer-wise learning-rate decay),
    https://arxiv.org/abs/2003.10555
  """
  _check_args(gamma, decay)
  _depths._check_stack_axis_type(stack_axis)
  decay_fn = _DECAY_FNS[decay] if isinstance(decay, str) else decay
  depth_spec = depths

  def init_fn(params: Any) -> DepthDecayState:
    del params
    return DepthDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    labels = _depths.leaf_depths(updates, depth_spec, stack_axis)
    if reverse:
      labels = _depths.reverse_labels(labels)
    effective = _effective_depths(labels, normalize_depth)
    g = gamma(state.count) if callable(gamma) else gamma
    d = jnp.asarray(list(effective.values()), jnp.float32)
    factors = decay_fn(jnp.asarray(g).astype(jnp.float32), d)
    position = {depth: i for i, depth in enumerate(effective)}
    position[_depths.NOT_A_LAYER] = -1

    def scaled(x: Any, label: _depths.Depth) -> Any:
      if not _tree.is_float_leaf(x) or label == _depths.NOT_A_LAYER:
        return x
      if isinstance(label, _depths.StackedDepth):
        f = _tree.block_values(factors, [position[k] for k in label.depths])
        return _tree.scale_leaf(x, _tree.along(f, label.axis, x.ndim))
      return _tree.scale_leaf(x, factors[position[label]])

    leaves, treedef = _tree.flatten(updates)
    out = [scaled(x, label) for (_, x), label in zip(leaves, labels)]
    new_state = DepthDecayState(count=optax.safe_increment(state.count))
    return jax.tree_util.tree_unflatten(treedef, out), new_state

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
  r"""Seed 000's whole rule: normalize each block, then decay it with depth.

  .. math::

    g_d \leftarrow N \, D_\gamma(d) \, \frac{g_d}{\|g_d\|}

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
    learning" (seed 000), eq. (1)-(3).
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
