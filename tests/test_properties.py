"""Property tests: norms, decays and jit on random pytrees (hypothesis).

Trees are nested dicts and lists of small float32 arrays whose norm is either
exactly 0 or at least 1e-3 (far above the default eps). Keys share one stem
with running numbers (``layer_0`` .. ``layer_3``), so their sorted order (the
one `jax.tree.map` leaves) is the layer order and no `DepthOrderWarning` is
raised.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optax_depthnorm as odn
from tests.tolerance import assert_close

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NORMS = {
  "l2": lambda v: np.sqrt(np.sum(v * v)),
  "l1": lambda v: np.sum(np.abs(v)),
  "max": lambda v: np.max(np.abs(v)),
  "rms": lambda v: np.sqrt(np.mean(v * v)),
}


@st.composite
def leaves(draw: st.DrawFn) -> np.ndarray:
  """A float32 array of 1 to 16 entries, all zero or with L2 norm >= 1e-3."""
  shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
  if draw(st.integers(0, 3)) == 0:
    return np.zeros(shape, np.float32)
  elements = st.floats(-10, 10, width=32, allow_subnormal=False)
  x = np.array(draw(hnp.arrays(np.float32, shape, elements=elements)))
  if np.sqrt(np.sum(np.square(x, dtype=np.float64))) < 1e-3:
    x.reshape(-1)[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([1e-3, -0.5, 2.0]))
  return x


def trees() -> st.SearchStrategy[Any]:
  keys = st.sampled_from([f"layer_{i}" for i in range(4)])
  return st.recursive(
    leaves(),
    lambda children: (
      st.lists(children, min_size=1, max_size=3)
      | st.dictionaries(keys, children, min_size=1, max_size=3)
    ),
    max_leaves=8,
  ).map(lambda tree: jax.tree.map(jnp.asarray, tree))


# Always tried: a zero leaf next to a nonzero one in the same layer, and a list.
ZERO_AND_LIST = {
  "layer_0": {"b": jnp.zeros((2, 2)), "c": jnp.array([3.0, 4.0])},
  "layer_1": [jnp.array(0.5), jnp.zeros(3)],
}


def _flat(tree: Any) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _depths(tree: Any, **kwargs: Any) -> list[int]:
  return jax.tree.leaves(odn.layer_depths(tree, **kwargs))


def _assert_finite_and_shaped(updates: Any, grads: Any) -> None:
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert u.shape == g.shape and u.dtype == g.dtype
    assert np.isfinite(np.asarray(u)).all()


def _update(tx, grads: Any) -> Any:
  updates, _ = tx.update(grads, tx.init(grads), grads)
  return updates


# ----------------------------------------------------------------------------- normalize


@SETTINGS
@given(tree=trees(), target=st.floats(0.1, 10.0), norm=st.sampled_from(list(NORMS)))
@example(tree=ZERO_AND_LIST, target=1.0, norm="l2")
def test_normalize_gives_each_nonzero_leaf_norm_target(tree, target, norm):
  updates = _update(odn.layerwise_normalize(target=target, norm=norm), tree)
  _assert_finite_and_shaped(updates, tree)
  for u, g in zip(_flat(updates), _flat(tree)):
    if not g.any():
      assert not u.any()  # exactly zero
    else:
      np.testing.assert_allclose(NORMS[norm](u), target, rtol=1e-5)
      np.testing.assert_allclose(u, g * (target / NORMS[norm](g)), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(tree=trees(), target=st.floats(0.1, 10.0), norm=st.sampled_from(list(NORMS)))
@example(tree=ZERO_AND_LIST, target=2.0, norm="l2")
def test_normalize_by_layer_gives_each_nonzero_layer_norm_target(tree, target, norm):
  updates = _update(odn.layerwise_normalize(target=target, norm=norm, group="layer"), tree)
  _assert_finite_and_shaped(updates, tree)
  layers: dict[int, list[int]] = defaultdict(list)
  for i, d in enumerate(_depths(tree)):
    layers[d].append(i)
  us, gs = _flat(updates), _flat(tree)
  for block in layers.values():
    u = np.concatenate([us[i].ravel() for i in block])
    g = np.concatenate([gs[i].ravel() for i in block])
    if not g.any():
      assert not u.any()
    else:
      np.testing.assert_allclose(NORMS[norm](u), target, rtol=1e-5)
      # one factor for the whole layer: zero leaves in it stay zero
      np.testing.assert_allclose(u, g * (target / NORMS[norm](g)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- decay


def _expected_factor(gamma: float, d: int, deepest: int, decay: str, normalize: bool) -> float:
  x = d / deepest if normalize and deepest > 0 else d
  gamma = float(np.float32(gamma))  # the transform computes in float32
  return (1.0 - gamma) ** x if decay == "linear" else float(np.exp(-gamma * x))


@SETTINGS
@given(
  tree=trees(),
  gamma=st.floats(0.0, 1.0),
  decay=st.sampled_from(["linear", "exponential"]),
  reverse=st.booleans(),
  normalize_depth=st.booleans(),
)
@example(tree=ZERO_AND_LIST, gamma=1.0, decay="linear", reverse=False, normalize_depth=False)
def test_depth_decay_never_increases_a_norm(tree, gamma, decay, reverse, normalize_depth):
  tx = odn.depth_decay(gamma, decay=decay, reverse=reverse, normalize_depth=normalize_depth)
  updates = _update(tx, tree)
  _assert_finite_and_shaped(updates, tree)
  depths = _depths(tree, reverse=reverse)
  deepest = max(depths)
  for u, g, d in zip(_flat(updates), _flat(tree), depths):
    assert (np.abs(u) <= np.abs(g)).all()
    assert NORMS["l2"](u) <= NORMS["l2"](g)
    factor = _expected_factor(gamma, d, deepest, decay, normalize_depth)
    np.testing.assert_allclose(u, g * factor, rtol=1e-5, atol=1e-30)


# ----------------------------------------------------------------------------- jit


TRANSFORMS = {
  "layerwise_normalize": lambda: odn.layerwise_normalize(target=2.0, group="layer"),
  "depth_decay": lambda: odn.depth_decay(0.3, decay="linear", reverse=True),
  "depth_normalized": lambda: odn.depth_normalized(0.2, target="last_layer"),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@SETTINGS
@given(tree=trees())
def test_jit_matches_eager(name, tree):
  tx = TRANSFORMS[name]()
  state = tx.init(tree)
  eager, eager_state = tx.update(tree, state, tree)
  jitted, jit_state = jax.jit(tx.update)(tree, state, tree)
  _assert_finite_and_shaped(jitted, tree)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    assert_close(a, b)  # jit reorders the sums
  assert jax.tree.structure(jit_state) == jax.tree.structure(eager_state)
  for a, b in zip(jax.tree.leaves(jit_state), jax.tree.leaves(eager_state)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- extreme magnitudes


@st.composite
def scaled_leaves(draw: st.DrawFn) -> np.ndarray:
  """A float32 array of magnitude 10**e, e in [-30, 30]: squares under/overflow float32."""
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5))
  mantissa = draw(hnp.arrays(np.float64, shape, elements=st.floats(1.0, 9.99)))
  signs = np.where(draw(hnp.arrays(np.bool_, shape)), -1.0, 1.0)
  return (signs * mantissa * 10.0 ** draw(st.integers(-30, 30))).astype(np.float32)


@SETTINGS
@given(arrays=st.lists(scaled_leaves(), min_size=1, max_size=4))
@example(arrays=[np.full(2, 1e-30, np.float32), np.full((3, 3), -9.99e30, np.float32)])
@example(arrays=[np.full(1, 1e20, np.float32)])  # one-element leaves: found by CI's hypothesis
@example(arrays=[np.full(1, 1e-19, np.float32)])
@example(arrays=[np.asarray([1e-10], np.float32), np.asarray([5e15, 1e15], np.float32)])
def test_norms_hold_from_1e_minus_30_to_1e30(arrays):
  tree = {f"layer_{i}": {"w": jnp.asarray(a)} for i, a in enumerate(arrays)}  # numbered: in order
  exact = [np.linalg.norm(a.astype(np.float64)) for a in arrays]
  updates = _update(odn.layerwise_normalize(eps=1e-35), tree)
  _assert_finite_and_shaped(updates, tree)
  for u, g in zip(_flat(updates), _flat(tree)):
    if g.any():
      np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-5)
  for a in arrays:  # backward: the cotangent comes out with norm kappa
    _, vjp = jax.vjp(lambda x: odn.bgn(x, kappa=2.0, eps=1e-38), jnp.zeros(a.shape))
    (cotangent,) = vjp(jnp.asarray(a))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(cotangent, np.float64)), 2.0, rtol=1e-5)
  report = odn.gradient_flow(tree)
  np.testing.assert_allclose(np.asarray(report.norm, np.float64), exact, rtol=1e-5)
