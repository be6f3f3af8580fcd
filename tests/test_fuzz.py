"""Fuzz: every public transform x dtype x magnitude x leaf shape (hypothesis).

One param tree holds every kind of leaf at once: a 0-size leaf, a scalar, a
matrix with its bias, a stacked leaf of two layers (by ``stack_axis``) and a
head. Hypothesis draws each leaf's magnitude (10^-30 to 10^30, cut to the
dtype's finite range), its signs and mantissas, or an all-zero leaf, for the
updates, the params and the layer inputs. The properties: finite inputs give
finite outputs (updates, states, reports, cotangents), every leaf keeps its
dtype, and an unsupported input (a complex weight matrix for
`scale_normalize`) raises the documented TypeError. The tree's structure is
fixed per dtype, so each transform compiles once per dtype and the examples
only change values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optax_depthnorm as odn

EXAMPLES = 200
SETTINGS = settings(
  max_examples=EXAMPLES,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
  database=None,
)
DTYPES = ("bfloat16", "float16", "float32", "float64", "complex64")
SHAPES = {  # creation order is the layer order
  "embed": {"embedding": (0, 4)},  # 0-size: not a layer
  "scale_0": {"scale": ()},  # a scalar
  "Dense_0": {"kernel": (3, 4), "bias": (4,)},  # a matrix
  "blocks": {"kernel": (2, 4, 4), "bias": (2, 4)},  # two stacked layers
  "head": {"kernel": (4, 2), "bias": (2,)},
}
STACK = {"blocks": 0}
INPUT_SHAPES = {"Dense_0": (5, 3), "blocks": (2, 5, 4), "head": (5, 4)}


def _tree_map(fn: Callable, tree: dict) -> dict:
  """`fn` on every leaf of nested dicts, keeping their insertion (layer) order.

  `jax.tree.map` would sort the keys, and sorted keys are not the layer order.
  """
  return {k: _tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


@st.composite
def arrays(draw: st.DrawFn, shape: tuple[int, ...], dtype: str) -> np.ndarray:
  """Entries of one magnitude 10^k (k in [-30, 30]) with random signs and mantissas, or 0."""
  size = int(np.prod(shape))
  if draw(st.integers(0, 5)) == 0:
    return np.zeros(shape, jnp.dtype(dtype))
  exponent = draw(st.integers(-30, 30))
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  parts = 2 if dtype.startswith("complex") else 1
  values = rng.uniform(0.5, 2.0, (parts, size)) * rng.choice([-1.0, 1.0], (parts, size))
  values = values * 10.0**exponent
  real = jnp.finfo(dtype).dtype
  top = float(jnp.finfo(real).max) / 4
  values = np.clip(values, -top, top)
  out = values[0] + 1j * values[1] if parts == 2 else values[0]
  return out.reshape(shape).astype(jnp.dtype(dtype))


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dict, dict, dict]:
  """A dtype and updates, params and layer inputs of that dtype."""
  dtype = draw(st.sampled_from(DTYPES))
  trees = [
    _tree_map(lambda s: draw(arrays(s, dtype)), shapes) for shapes in (SHAPES, SHAPES, INPUT_SHAPES)
  ]
  return (dtype, *trees)


def _finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def _check_updates(updates: Any, out: Any) -> None:
  assert jax.tree.structure(out) == jax.tree.structure(updates)
  for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(out)):
    assert y.dtype == x.dtype and y.shape == x.shape
  assert _finite(out), out


TRANSFORMS = {
  "depth_decay_linear": lambda: odn.depth_decay(0.3, decay="linear", stack_axis=STACK),
  "depth_decay_exp_reverse_normalized": lambda: odn.depth_decay(
    2.0, reverse=True, normalize_depth=True, stack_axis=STACK
  ),
  "depth_normalized": lambda: odn.depth_normalized(0.1, stack_axis=STACK),
  "layerwise_normalize": lambda: odn.layerwise_normalize(stack_axis=STACK),
  "layerwise_normalize_last_layer_layer_rms": lambda: odn.layerwise_normalize(
    target="last_layer", group="layer", norm="rms", stack_axis=STACK
  ),
  "layerwise_normalize_max_target_10": lambda: odn.layerwise_normalize(
    target=10.0, norm="max", stack_axis=STACK
  ),
  "track_gradient_flow": lambda: odn.track_gradient_flow(history=2, stack_axis=STACK, stats="all"),
  "scale_normalize_probe": lambda: odn.scale_normalize("probe", key=0, stack_axis=STACK),
  "scale_normalize_data": lambda: odn.scale_normalize("data", stack_axis=STACK),
  "scale_normalize_determinant": lambda: odn.scale_normalize("determinant", stack_axis=STACK),
}
_JITTED: dict[tuple[str, str], tuple[optax.GradientTransformation, Callable]] = {}


def _jitted(name: str, dtype: str) -> tuple[optax.GradientTransformation, Callable]:
  """One transform and its jitted update per (transform, dtype): compiled once."""
  if (name, dtype) not in _JITTED:
    tx = TRANSFORMS[name]()
    _JITTED[name, dtype] = tx, jax.jit(tx.update)
  return _JITTED[name, dtype]


def _run(name: str, dtype: str, updates: dict, params: dict, inputs: dict) -> None:
  tx, update = _jitted(name, dtype)
  extra = {"layer_inputs": inputs} if name == "scale_normalize_data" else {}
  state = tx.init(params)
  if name.startswith("scale_normalize") and dtype.startswith("complex"):
    with pytest.raises(TypeError, match="rescales real weight matrices"):
      update(updates, state, params, **extra)
    return
  out, state = update(updates, state, params, **extra)
  _check_updates(updates, out)
  if isinstance(state, odn.GradientFlowState):
    _check_flow(state.flow)
    state = state._replace(flow=None, flow_history=None)
  assert _finite(state), state


def _check_flow(stats: odn.FlowStats | odn.FlowReport) -> None:
  """Every statistic finite, but the ratio: infinite exactly where ||g|| / ||w|| is.

  The documented ratio of a nonzero gradient to zero weights is inf, and so is
  a quotient beyond the float range (a 1e30 gradient on 1e-30 weights).
  """
  for field in ("norm", "mean_abs", "max_abs", "rms", "param_norm"):
    assert np.all(np.isfinite(np.asarray(getattr(stats, field)))), (field, stats)
  norm, param_norm = (np.asarray(getattr(stats, f), np.float64) for f in ("norm", "param_norm"))
  ratio = np.asarray(stats.ratio)
  with np.errstate(divide="ignore", invalid="ignore"):
    beyond = (param_norm == 0) & (norm > 0) | (norm / param_norm > np.finfo(ratio.dtype).max)
  assert not np.any(np.isnan(ratio)), stats
  np.testing.assert_array_equal(np.isinf(ratio), beyond)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_finite_inputs_give_finite_updates_of_the_same_dtypes(name):
  @SETTINGS
  @given(case=cases())
  def check(case):
    dtype, updates, params, inputs = case
    with jax.enable_x64(dtype == "float64"):
      updates, params, inputs = (_tree_map(jnp.asarray, t) for t in (updates, params, inputs))
      _run(name, dtype, updates, params, inputs)

  check()


# resolved outside jit, from a tree in layer order (jit sorts the keys)
DEPTHS = odn.layer_depths(_tree_map(lambda s: np.zeros(s, np.float32), SHAPES), stack_axis=STACK)
_gradient_flow = jax.jit(lambda grads, params: odn.gradient_flow(grads, params, DEPTHS))


@SETTINGS
@given(case=cases())
def test_gradient_flow_reports_are_finite(case):
  dtype, grads, params, _ = case
  with jax.enable_x64(dtype == "float64"):
    grads, params = _tree_map(jnp.asarray, grads), _tree_map(jnp.asarray, params)
    report = _gradient_flow(grads, params)
    assert len(report.norm) == 5  # scale_0, Dense_0, two blocks, head
    _check_flow(report)


_BGN_SHAPES = ((0, 3), (), (4, 8), (2, 3, 5))


@st.composite
def bgn_cases(draw: st.DrawFn) -> tuple[str, np.ndarray, np.ndarray, bool]:
  dtype = draw(st.sampled_from(DTYPES))
  shape = draw(st.sampled_from(_BGN_SHAPES))
  return dtype, draw(arrays(shape, dtype)), draw(arrays(shape, dtype)), draw(st.booleans())


_BGN_VJP: dict[tuple, Callable] = {}


def _bgn_cotangent(x: jax.Array, g: jax.Array, per_example: bool) -> jax.Array:
  key = (x.dtype, x.shape, per_example)
  if key not in _BGN_VJP:
    _BGN_VJP[key] = jax.jit(
      lambda x, g: jax.vjp(lambda y: odn.bgn(y, per_example=per_example), x)[1](g)[0]
    )
  return _BGN_VJP[key](x, g)


@SETTINGS
@given(case=bgn_cases())
def test_bgn_cotangents_are_finite_and_keep_dtype(case):
  dtype, x, g, per_example = case
  if per_example and x.ndim == 0:
    per_example = False
  with jax.enable_x64(dtype == "float64"):
    x, g = jnp.asarray(x), jnp.asarray(g)
    out = _bgn_cotangent(x, g, per_example)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out)))
