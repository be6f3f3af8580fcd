"""The one safe reduction (`_reduce`): no overflow, no underflow, one implementation for all."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_depthnorm as odn
from optax_depthnorm import _layers, _reduce
from tests.tolerance import RTOL


def _l2(x, keep=()) -> jax.Array:
  return _reduce.l2([x], [keep], lambda vs: vs[0], _reduce.sums(x, keep))


def _norm64(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.sqrt(np.sum(np.square(x))))


# From 1e-36: XLA flushes float32 subnormals (below 1.2e-38) to zero.
@pytest.mark.parametrize("scale", [1e-36, 1e-30, 1e-22, 1e-19, 1.0, 1e16, 2e16, 1e19, 1e30])
def test_l2_matches_float64_across_float32_range(scale):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)) * scale, jnp.float32)
  got = float(_l2(x).squeeze())
  np.testing.assert_allclose(got, _norm64(x), rtol=RTOL)
  # the careful path, taken where any layer is out of range, agrees where all are in range
  careful = float(_reduce.l2_ranges([x], [()], lambda vs: vs[0]).squeeze())
  np.testing.assert_allclose(careful, _norm64(x), rtol=RTOL)


def test_layer_stats_add_across_pieces_and_segments():
  rng = np.random.default_rng(1)
  shapes = [((3, 4), 1e-25), ((5,), 1e20), ((2, 2), 1.0)]
  parts = [jnp.asarray(rng.normal(size=s) * m, jnp.float32) for s, m in shapes]
  found = [_layers.Leaf(i, str(i), np.zeros((), np.int32)) for i in range(3)]
  whole = np.concatenate([np.reshape(p, -1) for p in parts])
  totals, norm = _layers.layer_stats(parts, found, jnp.zeros(3, jnp.int32), 1)
  np.testing.assert_allclose(float(norm[0]), _norm64(whole), rtol=RTOL)
  assert float(totals.max[0]) == pytest.approx(float(np.max(np.abs(whole))))
  assert int(totals.size[0]) == whole.size
  _, apart = _layers.layer_stats(parts, found, jnp.asarray([0, 1, -1]), 2)
  np.testing.assert_allclose(apart, [_norm64(parts[0]), _norm64(parts[1])], rtol=RTOL)
  _, each = _layers.layer_stats(parts, found)
  np.testing.assert_allclose(each, [_norm64(p) for p in parts], rtol=RTOL)


def test_stacked_slices_are_reduced_apart():
  x = jnp.asarray(np.stack([np.full((4, 4), 1e-25), np.full((4, 4), 1.0)]), jnp.float32)
  found = [_layers.Leaf(0, "w", np.asarray([0, 1], np.int32).reshape(2, 1, 1))]
  _, norm = _layers.layer_stats([x], found)
  np.testing.assert_allclose(norm, [4e-25, 4.0], rtol=RTOL)


@pytest.mark.parametrize("shape", [(1,), (1, 1), (2,)])
@pytest.mark.parametrize("value", [1e-30, 1e-19, 1e20, 1e30])
def test_one_element_leaves_under_jit(shape, value):
  # XLA rewrote (a c)^2 as a^2 c^2 on one-element leaves (no reduction in between)
  x = jnp.full(shape, value, jnp.float32)
  got = jax.jit(_l2)(x)
  np.testing.assert_allclose(np.asarray(got, np.float64).squeeze(), _norm64(x), rtol=RTOL)


def test_big_and_medium_entries_together_on_the_careful_path():
  x = jnp.asarray([5e15, 1e15], jnp.float32)  # 5e15 in the "big" range, 1e15 not
  got = jax.jit(lambda x: _reduce.l2_ranges([x], [()], lambda vs: vs[0]))(x)
  np.testing.assert_allclose(float(got.squeeze()), _norm64(x), rtol=RTOL)


def test_zero_nan_and_inf():
  assert float(_l2(jnp.zeros(4)).squeeze()) == 0.0
  assert np.isnan(_l2(jnp.asarray([1.0, jnp.nan]))).all()
  assert np.isinf(_l2(jnp.asarray([1.0, jnp.inf]))).all()


def test_norm_kinds_and_vector_norm():
  x = jnp.asarray([[3.0, -4.0], [0.0, 1e-30]], jnp.float32)
  s, n = _reduce.sums(x), _l2(x)
  assert float(_reduce.norm(n, s, "l1").squeeze()) == pytest.approx(7.0)
  assert float(_reduce.norm(n, s, "max").squeeze()) == 4.0
  assert float(_reduce.norm(n, s, "rms").squeeze()) == pytest.approx(2.5)
  np.testing.assert_allclose(_reduce.vector_norm(x, axis=-1), [5.0, 1e-30], rtol=RTOL)
  # bounded: the caller's data cannot over- or underflow; a plain sum, no range check
  unit = jnp.asarray([[1.5, -1.0], [0.0, 0.0]], jnp.float32)
  bounded = lambda v: _reduce.vector_norm(v, axis=-1, bounded=True)
  np.testing.assert_allclose(bounded(unit), [np.hypot(1.5, 1.0), 0.0], rtol=RTOL)
  assert "cond" not in str(jax.make_jaxpr(bounded)(unit))
  assert "cond" in str(jax.make_jaxpr(lambda v: _reduce.vector_norm(v, axis=-1))(unit))


def test_huge_gradient_normalizes_to_norm_one():
  grads = {"Dense_0": {"kernel": jnp.full((1000, 1000), 2e16, jnp.float32)}}
  tx = odn.layerwise_normalize()
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_allclose(_norm64(out["Dense_0"]["kernel"]), 1.0, rtol=RTOL)


def test_tiny_gradient_with_tiny_eps_normalizes_to_norm_one():
  grads = {"Dense_0": {"kernel": jnp.full((30, 30), 1e-22, jnp.float32)}}
  for group in ("leaf", "layer"):
    tx = odn.layerwise_normalize(eps=1e-30, group=group)
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_allclose(_norm64(out["Dense_0"]["kernel"]), 1.0, rtol=RTOL)


def test_bgn_of_a_huge_cotangent_has_norm_kappa():
  x = jnp.ones((8, 16), jnp.float32)
  _, pullback = jax.vjp(lambda v: odn.bgn(v, 3.0), x)
  (g,) = pullback(jnp.full((8, 16), 1e20, jnp.float32))
  np.testing.assert_allclose(_norm64(g), 3.0, rtol=RTOL)


def test_gradient_flow_of_huge_and_tiny_layers():
  grads = {
    "Dense_0": {"kernel": jnp.full((1000, 1000), 2e16, jnp.float32)},
    "Dense_1": {"kernel": jnp.full((30, 30), 1e-22, jnp.float32)},
  }
  report = odn.gradient_flow(grads)
  np.testing.assert_allclose(report.norm, [2e19, 3e-21], rtol=RTOL)
