"""Complex leaves and the range edges: norms of |g|^2, real factors, saturation, precision.

Complex params and gradients are supported wherever a norm is taken: the
norm of a layer is sqrt(sum |g|^2) (NumPy's norm of a complex array), the
factors are real, and a leaf keeps its dtype and its phase. `scale_normalize`,
defined for real weights, rejects a complex weight matrix with a TypeError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from tests.tolerance import assert_close

RNG = np.random.default_rng(0)


def _complex(shape, scale=1.0):
  z = RNG.normal(size=shape) + 1j * RNG.normal(size=shape)
  return (z * scale).astype(np.complex64)


def _tree(scale=1.0):
  return {
    "Dense_0": {"kernel": _complex((3, 4), scale), "bias": _complex((4,), scale)},
    "Dense_1": {"kernel": _complex((4, 2), scale), "bias": _complex((2,), scale)},
  }


def _leaves(tree):
  return [(k, n, tree[k][n]) for k in tree for n in tree[k]]


def _apply(tx, grads, params=None, use_jit=True):
  update = jax.jit(tx.update) if use_jit else tx.update
  return update(grads, tx.init(grads if params is None else params), params)


@pytest.mark.parametrize("use_jit", [True, False])
@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_layerwise_normalize_divides_complex_leaves_by_the_norm_of_their_moduli(scale, use_jit):
  grads = _tree(scale)
  # eps=0: no floor but the smallest normal float, so 1e-30 gradients are normalized too
  out, _ = _apply(odn.layerwise_normalize(target=2.0, eps=0.0), grads, use_jit=use_jit)
  for k, n, g in _leaves(grads):
    g64 = g.astype(np.complex128)
    expected = 2.0 * g64 / np.sqrt(np.sum(np.abs(g64) ** 2))
    assert out[k][n].dtype == jnp.complex64
    assert_close(out[k][n], expected)


def test_layer_group_norm_of_complex_kernel_and_bias_together():
  grads = _tree()
  out, _ = _apply(odn.layerwise_normalize(group="layer"), grads)
  for k in grads:
    parts = [grads[k][n].astype(np.complex128) for n in grads[k]]
    total = np.sqrt(sum(np.sum(np.abs(p) ** 2) for p in parts))
    for n in grads[k]:
      assert_close(out[k][n], grads[k][n].astype(np.complex128) / total)


def test_depth_decay_scales_complex_leaves_by_real_factors():
  grads = _tree()
  out, _ = _apply(odn.depth_decay(0.5, decay="linear"), grads)
  for depth, k in enumerate(grads):
    for n in grads[k]:
      assert out[k][n].dtype == jnp.complex64
      assert_close(out[k][n], grads[k][n].astype(np.complex128) * 0.5**depth)


def test_gradient_flow_and_tracker_measure_complex_layers():
  grads, params = _tree(), _tree(3.0)
  report = odn.gradient_flow(grads, params)
  _, state = _apply(odn.track_gradient_flow(stats="all"), grads, params)
  for i, k in enumerate(grads):
    g = np.concatenate([grads[k][n].astype(np.complex128).ravel() for n in grads[k]])
    w = np.concatenate([params[k][n].astype(np.complex128).ravel() for n in grads[k]])
    norm = np.sqrt(np.sum(np.abs(g) ** 2))
    expected = [norm, np.mean(np.abs(g)), np.max(np.abs(g)), norm / np.sqrt(g.size)]
    expected += [np.sqrt(np.sum(np.abs(w) ** 2))]
    for stats in (report, state.flow):
      got = [stats.norm[i], stats.mean_abs[i], stats.max_abs[i], stats.rms[i], stats.param_norm[i]]
      assert_close(np.asarray(got, np.float64), expected)
      assert stats.norm.dtype == jnp.float32


@pytest.mark.parametrize("cotangent", [1j, 1 + 1j, 1e30 * (1 - 2j), 1e-30j])
def test_bgn_normalizes_a_complex_cotangent_by_its_moduli_and_keeps_its_phase(cotangent):
  x = jnp.ones((2, 4), jnp.complex64)
  g = jnp.full((2, 4), cotangent, jnp.complex64)
  out = jax.vjp(lambda x: odn.bgn(x, kappa=np.sqrt(8.0), eps=0.0), x)[1](g)[0]
  assert out.dtype == jnp.complex64
  # norm sqrt(8) over 8 equal entries: each gets modulus 1 and keeps its phase
  expected = np.full((2, 4), cotangent / abs(cotangent), np.complex128)
  assert_close(out, expected)
  assert_close(jnp.linalg.norm(out), np.sqrt(8.0))


def test_scale_normalize_rejects_a_complex_weight_matrix_and_names_its_path():
  params = _tree()
  tx = odn.scale_normalize("probe")
  with pytest.raises(TypeError, match=r"real weight matrices; the weight at 'Dense_0/kernel'"):
    tx.update(params, tx.init(params), params)


def test_scale_normalize_leaves_out_a_complex_weight_given_fan_in_axes_none():
  params = {
    "Dense_0": {"kernel": _complex((3, 3))},
    "Dense_1": {"kernel": np.eye(3, dtype=np.float32)},
  }
  tx = odn.scale_normalize("probe", fan_in_axes={"Dense_0/kernel": None})
  updates = jax.tree.map(jnp.zeros_like, params)
  out, _ = tx.update(updates, tx.init(params), params)
  np.testing.assert_array_equal(out["Dense_0"]["kernel"], 0)


def test_complex_params_chain_with_optax_adam():
  params = _tree()
  loss = lambda p: sum(jnp.sum(jnp.abs(x) ** 2) for x in jax.tree.leaves(p))
  tx = optax.chain(odn.layerwise_normalize(), odn.depth_decay(0.1), optax.adam(1e-2))
  state = tx.init(params)
  # optax's convention: descend along the conjugate of jax.grad
  grads = jax.tree.map(jnp.conj, jax.grad(loss)(params))
  updates, _ = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert loss(new) < loss(params)
  assert all(x.dtype == jnp.complex64 for x in jax.tree.leaves(new))


# ----------------------------------------------------------------------------- range edges


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_results_beyond_a_low_precision_range_saturate_not_overflow(dtype):
  """A last-layer target of 1.3e5 on a one-entry float16 leaf gives 65504, not Inf."""
  big = float(jnp.finfo(dtype).max) / 2
  grads = {
    "layer_0": {"w": jnp.ones((), dtype)},
    "layer_1": {"w": jnp.full((4,), big, dtype)},  # norm 2 * big > max
  }
  out, _ = _apply(odn.layerwise_normalize(target="last_layer"), grads)
  assert out["layer_0"]["w"].dtype == dtype
  assert float(out["layer_0"]["w"]) == float(jnp.finfo(dtype).max)
  assert bool(jnp.all(jnp.isfinite(out["layer_1"]["w"])))
  inf = {"layer_0": {"w": jnp.full((), jnp.inf, dtype)}, "layer_1": {"w": jnp.ones(1, dtype)}}
  out, _ = _apply(odn.depth_decay(0.1), inf)
  assert bool(jnp.isinf(out["layer_0"]["w"]))  # an Inf in stays an Inf: it is not hidden


@pytest.mark.parametrize("magnitude", [1e-20, 1e20, 1e30, 3e38])
def test_scale_normalize_data_mode_takes_layer_inputs_up_to_float32s_largest(magnitude):
  q = np.linalg.qr(RNG.normal(size=(16, 16)))[0].astype(np.float32)
  params = {"Dense_0": {"kernel": jnp.asarray(3.0 * q)}}
  updates = jax.tree.map(jnp.zeros_like, params)
  inputs = {"Dense_0": jnp.asarray(RNG.uniform(0.1, 1.0, (8, 16)) * magnitude, jnp.float32)}
  tx = odn.scale_normalize("data")
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params, layer_inputs=inputs)
  new = params["Dense_0"]["kernel"] + out["Dense_0"]["kernel"]
  assert_close(new, q, atol=1e-6)  # an orthogonal matrix has scale 1 for every input


@pytest.mark.parametrize("mode", ["data", "probe", "determinant"])
@pytest.mark.parametrize("c", [1e2, 1e5, 1e7, 1e20, 1e30, 1e38])
def test_scale_normalize_error_stays_within_the_stated_rounding_bound(mode, c):
  """|(W + u) - W*/c| <= 2 eps (|W| + |W*|/c) entrywise, the docstring's bound; never NaN."""
  q = np.linalg.qr(RNG.normal(size=(32, 32)))[0]
  w = (q * c).astype(np.float32)
  params = {"Dense_0": {"kernel": jnp.asarray(w)}}
  updates = jax.tree.map(jnp.zeros_like, params)
  tx = odn.scale_normalize(mode, key=0)
  inputs = {"Dense_0": jnp.asarray(RNG.normal(size=(8, 32)), jnp.float32)}
  out, _ = tx.update(updates, tx.init(params), params, layer_inputs=inputs)
  new = np.asarray(optax.apply_updates(params, out)["Dense_0"]["kernel"], np.float64)
  assert np.all(np.isfinite(new))
  target = w.astype(np.float64) / c  # W* = W here; an orthogonal matrix has scale c
  bound = 2 * np.finfo(np.float32).eps * (np.abs(w) + np.abs(target))
  assert np.all(np.abs(new - target) <= bound + 1e-7)
