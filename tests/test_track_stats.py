"""The tracker's `stats=` and `every_k_steps=`, `FlowReport.scalars` and `flow_heatmap_image`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from tests.tolerance import RTOL


def _params():
  rng = np.random.default_rng(0)
  return {
    "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.ones(4)},
    "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
  }


def _grads(step):
  """Distinct float32 gradients for each step (NumPy: no compiles per shape)."""
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(
    lambda p: jnp.asarray((step + 1) * rng.normal(size=p.shape), jnp.float32), _params()
  )


def _numpy_stats(grads, params=None):
  """Float64 statistics of the two layers, by hand."""
  layers = [("Dense_0", ("kernel", "bias")), ("Dense_1", ("kernel",))]
  out = {k: [] for k in ("norm", "mean_abs", "max_abs", "rms", "param_norm", "ratio")}
  for name, leaves in layers:
    g = np.concatenate([np.asarray(grads[name][k], np.float64).ravel() for k in leaves])
    out["norm"].append(np.sqrt(np.sum(g**2)))
    out["mean_abs"].append(np.mean(np.abs(g)))
    out["max_abs"].append(np.max(np.abs(g)))
    out["rms"].append(np.sqrt(np.mean(g**2)))
    if params is not None:
      w = np.concatenate([np.asarray(params[name][k], np.float64).ravel() for k in leaves])
      out["param_norm"].append(np.sqrt(np.sum(w**2)))
      out["ratio"].append(out["norm"][-1] / out["param_norm"][-1])
  return {k: np.array(v) for k, v in out.items() if v}


# ----------------------------------------------------------------------------- stats=


def test_default_records_norm_and_rms_only():
  params, grads = _params(), _grads(0)
  tx = odn.track_gradient_flow()
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, updates, grads)  # passed through, bit for bit
  report = odn.flow_from_state(state, params)
  expected = _numpy_stats(grads)
  np.testing.assert_allclose(report.norm, expected["norm"], rtol=RTOL)
  np.testing.assert_allclose(report.rms, expected["rms"], rtol=RTOL)
  for field in ("mean_abs", "max_abs", "param_norm", "ratio"):
    assert np.isnan(getattr(report, field)).all(), field
  assert report.table().splitlines()[0].split() == ["depth", "path", "size", "norm", "rms"]
  assert sorted(report.scalars()) == [
    "grad_flow/Dense_0/norm",
    "grad_flow/Dense_0/rms",
    "grad_flow/Dense_1/norm",
    "grad_flow/Dense_1/rms",
  ]


@pytest.mark.parametrize(
  ("stats", "recorded"),
  [
    ("all", ("norm", "mean_abs", "max_abs", "rms", "param_norm", "ratio")),
    (("max_abs",), ("norm", "max_abs", "rms")),
    ("mean_abs", ("norm", "mean_abs", "rms")),
    (("ratio",), ("norm", "rms", "param_norm", "ratio")),  # the two weight statistics together
  ],
)
def test_stats_picks_what_is_recorded(stats, recorded):
  params, grads = _params(), _grads(1)
  tx = odn.track_gradient_flow(stats=stats)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  report = odn.flow_from_state(state, params)
  expected = _numpy_stats(grads, params)
  for field in odn.FlowStats._fields:
    if field in recorded:
      np.testing.assert_allclose(getattr(report, field), expected[field], rtol=RTOL, err_msg=field)
    else:
      assert np.isnan(getattr(report, field)).all(), field
  assert report._recorded() == [f for f in odn.FlowStats._fields if f in recorded]


def test_zero_layer_is_zero_without_max_abs():
  # Without max |g| a zero layer takes the careful path of the safe norm: still exactly 0.
  params = _params()
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["Dense_1"]["kernel"] = jnp.full((4, 2), 1e-30, jnp.float32)  # squares underflow
  tx = odn.track_gradient_flow()
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(state.flow.norm, [0.0, np.sqrt(8) * 1e-30], rtol=RTOL)
  flags = odn.diagnose(odn.flow_from_state(state, params))
  assert (flags[0].kind, flags[0].path) == ("dead", "Dense_0")  # from the norm
  with pytest.raises(ValueError, match=r"holds no 'mean_abs'.*stats=\('mean_abs',\)"):
    odn.diagnose(odn.flow_from_state(state, params), stat="mean_abs")


@pytest.mark.parametrize("bad", ["median", ("norm", "p99"), 3])
def test_bad_stats_are_rejected(bad):
  with pytest.raises(ValueError, match="stats must be 'all' or names from"):
    odn.track_gradient_flow(stats=bad)


# ----------------------------------------------------------------------------- every_k_steps


def test_every_k_steps_records_steps_0_k_2k_in_the_ring():
  params = _params()
  tx = optax.chain(odn.track_gradient_flow(history=3, every_k_steps=2, stats="all"), optax.sgd(0.0))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(8):
    updates, state = update(_grads(t), state, params)
    jax.tree.map(np.testing.assert_array_equal, updates, jax.tree.map(jnp.zeros_like, params))
  past = odn.flow_from_state(state, params, history=True)
  np.testing.assert_array_equal(past.step, [2, 4, 6])  # step 7 was skipped; 0 left the ring
  for row, t in enumerate(past.step):
    expected = _numpy_stats(_grads(int(t)), params)
    for field, values in expected.items():
      np.testing.assert_allclose(getattr(past, field)[row], values, rtol=RTOL, err_msg=field)
  latest = odn.flow_from_state(state, params)
  assert int(latest.step) == 6 and int(state[0].count) == 8
  np.testing.assert_allclose(latest.norm, _numpy_stats(_grads(6))["norm"], rtol=RTOL)


def test_skipped_steps_read_no_gradient_outside_the_cond():
  params = _params()
  tx = odn.track_gradient_flow(every_k_steps=4, stats="all")
  state = tx.init(params)
  closed = jax.make_jaxpr(tx.update)(_grads(0), state, params)
  n_grads = len(jax.tree.leaves(params))
  grad_vars = closed.jaxpr.invars[:n_grads]
  conds = [e for e in closed.jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == 1
  assert [v for v in conds[0].invars if any(v is g for g in grad_vars)]  # the cond reads them
  for eqn in closed.jaxpr.eqns:  # only the cond reads the gradients (and only on its steps)
    if eqn.primitive.name != "cond":
      assert not [v for v in eqn.invars if any(v is g for g in grad_vars)], eqn
  assert closed.jaxpr.outvars[:n_grads] == closed.jaxpr.invars[:n_grads]  # passed through
  # The branch that skips holds no reduction at all.
  skip = conds[0].params["branches"][0].jaxpr
  assert not [e for e in skip.eqns if "reduce" in e.primitive.name]


def test_every_k_steps_can_be_a_hyperparameter():
  params = _params()
  make = optax.inject_hyperparams(odn.track_gradient_flow, static_args=("history", "stats"))
  tx = make(history=2, every_k_steps=3)
  state = tx.init(params)
  for t in range(4):
    _, state = jax.jit(tx.update)(_grads(t), state, params)
  np.testing.assert_array_equal(odn.flow_from_state(state, params, history=True).step, [0, 3])
  with pytest.raises(ValueError, match="every_k_steps must be >= 1"):
    odn.track_gradient_flow(every_k_steps=0)


# ----------------------------------------------------------------------------- scalars


def test_scalars_are_every_recorded_statistic_of_every_layer():
  params, grads = _params(), _grads(2)
  report = odn.gradient_flow(grads, params)
  scalars = report.scalars()
  expected = _numpy_stats(grads, params)
  assert len(scalars) == 2 * 6
  for field, values in expected.items():
    for name, value in zip(("Dense_0", "Dense_1"), values):
      got = scalars[f"grad_flow/{name}/{field}"]
      assert type(got) is float
      np.testing.assert_allclose(got, value, rtol=RTOL, err_msg=field)
  assert set(report.scalars(prefix="")) == {k.removeprefix("grad_flow/") for k in scalars}
  assert set(report.scalars(prefix="train/flow/")) == {f"train/flow/{k[10:]}" for k in scalars}
  assert "grad_flow/Dense_0/param_norm" not in odn.gradient_flow(grads).scalars()


def test_scalars_keep_a_nan_and_tell_same_named_layers_apart():
  grads = {"Dense_0": jnp.array([jnp.nan, 1.0]), "Dense_1": jnp.ones(2)}
  report = odn.gradient_flow(grads)
  assert np.isnan(report.scalars()["grad_flow/Dense_0/norm"])
  twice = odn.FlowReport(("x", "x"), (0, 1), (2, 2), "gradient", *(jnp.ones(2),) * 4)
  assert sorted(twice.scalars(prefix=""))[:2] == ["x@0/max_abs", "x@0/mean_abs"]


def test_scalars_need_one_concrete_step():
  report = odn.gradient_flow({"w": jnp.ones(2)})
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), report)
  with pytest.raises(ValueError, match=r"scalars\(\) logs one step"):
    stacked.scalars()
  with pytest.raises(TypeError, match=r"FlowReport.scalars\(\) needs concrete values"):
    jax.jit(lambda g: odn.gradient_flow(g).scalars())({"w": jnp.ones(2)})


# ----------------------------------------------------------------------------- heat map image


def test_heatmap_image_is_an_rgb_array_of_the_plot():
  pytest.importorskip("matplotlib")
  import matplotlib.pyplot as plt

  params = _params()
  tx = odn.track_gradient_flow(history=4)
  state = tx.init(params)
  for t in range(4):
    _, state = jax.jit(tx.update)(_grads(t), state, params)
  figures = plt.get_fignums()
  image = odn.flow_heatmap_image(state, params=params, size=(4, 3), dpi=40, title="flow")
  assert image.shape == (120, 160, 3) and image.dtype == np.uint8
  assert image.std() > 10  # something is drawn
  assert plt.get_fignums() == figures  # pyplot's figures untouched
  reports = [odn.gradient_flow(_grads(t)) for t in range(3)]
  assert odn.flow_heatmap_image(reports, stat="rms", size=(2, 2), dpi=30).shape == (60, 60, 3)
  with pytest.raises(ValueError, match="stat must be one of"):
    odn.flow_heatmap_image(reports, stat="p99")


# ----------------------------------------------------------------------------- scale_normalize


@pytest.mark.parametrize("mode", ["probe", "determinant", "data"])
def test_scale_normalize_skipped_steps_build_no_matrix_or_probe(mode):
  # Everything that reads W* = W + u (the matrices, the probes, the scales) is inside the cond.
  params = _params()
  tx = odn.scale_normalize(mode, every_k_steps=10)
  inputs = {"Dense_0": jnp.ones((5, 3)), "Dense_1": jnp.ones((5, 4))}
  extra = {"layer_inputs": inputs} if mode == "data" else {}
  update = lambda u, s, p: tx.update(u, s, p, **extra)
  closed = jax.make_jaxpr(update)(_grads(0), tx.init(params), params)
  top = [e.primitive.name for e in closed.jaxpr.eqns]
  assert top.count("cond") == 1
  for name in ("dot_general", "random_bits", "threefry2x32", "qr", "svd", "reduce_sum"):
    assert name not in top, name
  skip = next(e for e in closed.jaxpr.eqns if e.primitive.name == "cond").params["branches"][0]
  assert len(skip.jaxpr.eqns) <= 2  # ones for the two kernels' scales
  _, state = update(_grads(0), tx.init(params), params)  # step 0 normalizes, step 1 skips
  updates, _ = update(_grads(1), state, params)
  jax.tree.map(np.testing.assert_array_equal, updates, _grads(1))
