"""Bad inputs to the gradient-flow tools get a clear error or a defined result (issue 15).

`diagnose` on zero-initialized layers, on things that are not a report and on a
tracker before its first update; `plot_gradient_flow` with one stat as a string;
`plot_flow_heatmap` with a list of reports; params of another tree than the
gradients in `gradient_flow`, the tracker and `flow_from_state`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest

import optax_depthnorm as odn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

INTENDED = "common and intended at init below a zero-initialized layer"
REAL_PROBLEM = "a real problem if still zero after the first few updates"


@pytest.fixture(autouse=True)
def _close_figures():
  yield
  plt.close("all")


def _tree(n=3, shape=(2, 2)):
  return {f"Dense_{i}": {"kernel": jnp.ones(shape), "bias": jnp.ones(shape[-1])} for i in range(n)}


# ----------------------------------------------------------------------------- diagnose: dead


class ZeroHeadMLP(nn.Module):
  """Two hidden layers and a zero-initialized head (big_vision's ``head_zeroinit``)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3, kernel_init=nn.initializers.zeros)(x)


class ZeroScaleBlock(nn.Module):
  """A residual block whose last BatchNorm scale starts at zero (Flax's ResNet example)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x)
    y = nn.relu(nn.Dense(8)(x))
    y = nn.BatchNorm(use_running_average=False, scale_init=nn.initializers.zeros)(nn.Dense(8)(y))
    return nn.Dense(1)(nn.relu(x + y))


def _mlp_problem():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4)), jnp.float32)
  labels = jnp.arange(16) % 3
  model = ZeroHeadMLP()
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return params, jax.grad(loss)


def test_dead_below_a_zero_init_head_at_init_says_it_is_intended():
  params, grad = _mlp_problem()
  flags = odn.diagnose(odn.gradient_flow(grad(params)))
  assert [(f.kind, f.path) for f in flags] == [("dead", "Dense_0"), ("dead", "Dense_1")]
  for flag in flags:
    assert flag.reason.startswith("the gradient is exactly zero; " + INTENDED)
    assert "zero-init head" in flag.reason and "BatchNorm scale" in flag.reason
    assert REAL_PROBLEM in flag.reason and "a layer that never moves" in flag.reason
    assert "\n" not in str(flag)
  # The defined result: once the head has moved, nothing is dead.
  opt = optax.sgd(0.1)
  state = opt.init(params)
  for _ in range(2):
    updates, state = opt.update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
  assert odn.diagnose(odn.gradient_flow(grad(params))) == []


def test_dead_inside_a_residual_block_with_a_zero_init_batchnorm_scale():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4)), jnp.float32)
  model = ZeroScaleBlock()
  variables = model.init(jax.random.key(0), x)

  def loss(p):
    out, _ = model.apply({**variables, "params": p}, x, mutable=["batch_stats"])
    return jnp.mean(out**2)

  depths = odn.layer_depths(variables["params"])  # creation order (the grads' keys are sorted)
  report = odn.gradient_flow(jax.grad(loss)(variables["params"]), depths=depths)
  dead = {f.path for f in odn.diagnose(report) if f.kind == "dead"}
  # The branch below the zero scale gets no gradient; the BatchNorm itself and the skip path do.
  assert dead == {"Dense_1", "Dense_2"}
  assert all(INTENDED in f.reason for f in odn.diagnose(report) if f.kind == "dead")


def test_dead_names_the_tracker_step_and_a_layer_that_never_moves_stays_flagged():
  params, grad = _mlp_problem()
  opt = optax.chain(odn.track_gradient_flow(), optax.sgd(0.1))
  state = opt.init(params)
  reasons = []
  for _ in range(4):
    grads = grad(params)
    grads["Dense_0"] = jax.tree.map(jnp.zeros_like, grads["Dense_0"])  # cut off from the loss
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    reasons.append({f.path: f.reason for f in odn.diagnose(odn.flow_from_state(state, params))})
  assert set(reasons[0]) == {"Dense_0", "Dense_1"}
  assert reasons[0]["Dense_1"].startswith("the gradient is exactly zero at step 0; " + INTENDED)
  assert set(reasons[-1]) == {"Dense_0"}
  assert reasons[-1]["Dense_0"].startswith("the gradient is exactly zero at step 3; ")
  assert REAL_PROBLEM in reasons[-1]["Dense_0"]


def test_diagnose_before_the_first_update_is_a_clear_error():
  state = odn.track_gradient_flow().init(_tree())
  with pytest.raises(ValueError, match=r"no step yet \(step -1: the tracker has seen no update"):
    odn.diagnose(odn.flow_from_state(state))


# ------------------------------------------------------------------------ diagnose: not a report


@pytest.mark.parametrize(
  ("value", "what"),
  [
    ({}, "an empty dict"),
    (_tree(), "dict"),
    (None, "NoneType"),
    ("norm", "str"),
  ],
  ids=["empty-dict", "grads", "none", "str"],
)
def test_diagnose_of_what_is_not_a_report_says_what_it_takes(value, what):
  with pytest.raises(TypeError, match=rf"diagnose takes one FlowReport .*, got {what}; for a"):
    odn.diagnose(value)


def test_diagnose_of_a_list_of_reports_says_to_diagnose_each():
  report = odn.gradient_flow(_tree())
  with pytest.raises(TypeError, match=r"got a list of reports \(diagnose each one\)"):
    odn.diagnose([report, report])


# ----------------------------------------------------------------------------- plots


def test_plot_gradient_flow_takes_one_stat_as_a_string():
  report = odn.gradient_flow(_tree())
  ax = odn.plot_gradient_flow(report, stats="norm")
  assert [line.get_label() for line in ax.get_lines()] == ["L2 norm"]
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), np.asarray(report.norm))
  ax = odn.plot_gradient_flow({"a": report, "b": report}, stats="rms")
  assert [line.get_label() for line in ax.get_lines()] == ["a: rms", "b: rms"]


@pytest.mark.parametrize(
  ("stats", "error", "match"),
  [
    ("nrm", ValueError, r"stat must be one of \('norm', 'mean_abs', .*\), got 'nrm'"),
    (["norm", "l2"], ValueError, r"stat must be one of .*, got 'l2'"),
    ((), ValueError, r"stats is empty; name at least one of \('norm'"),
    ({"norm"}, TypeError, r"stats must be a name or a sequence of names from .*, got set"),
    (None, TypeError, r"stats must be a name or a sequence of names .*, got NoneType"),
  ],
  ids=["bad-name", "bad-in-list", "empty", "set", "none"],
)
def test_plot_gradient_flow_bad_stats_name_the_valid_ones(stats, error, match):
  with pytest.raises(error, match=match):
    odn.plot_gradient_flow(odn.gradient_flow(_tree()), stats=stats)


def test_plot_flow_heatmap_of_a_list_of_reports_is_one_row_per_report():
  reports = [odn.gradient_flow(jax.tree.map(lambda x, s=s: s * x, _tree())) for s in (1, 2, 4)]
  ax = odn.plot_flow_heatmap(reports, stat="max_abs")
  image = ax.images[0].get_array()
  assert image.shape == (3, 3)
  np.testing.assert_allclose(image, np.log10([[1.0] * 3, [2.0] * 3, [4.0] * 3]), rtol=1e-6)
  assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["Dense_0", "Dense_1", "Dense_2"]


def test_plot_flow_heatmap_of_tracker_reports_matches_the_state_history():
  params = _tree()
  opt = optax.chain(odn.track_gradient_flow(history=8), optax.sgd(0.1))
  state, reports = opt.init(params), []
  for scale in (1.0, 3.0, 9.0):
    _, state = opt.update(jax.tree.map(lambda x, s=scale: s * x, params), state, params)
    reports.append(odn.flow_from_state(state, params))
  from_list = odn.plot_flow_heatmap(reports).images[0].get_array()
  plt.close("all")
  ax = odn.plot_flow_heatmap(state, params=params)
  np.testing.assert_array_equal(from_list, ax.images[0].get_array())
  assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]


def test_plot_flow_heatmap_bad_lists_and_mappings_say_what_it_takes():
  report = odn.gradient_flow(_tree())
  with pytest.raises(TypeError, match=r"draws one run: pass one report .*not a mapping of runs"):
    odn.plot_flow_heatmap({"a": report, "b": report})
  with pytest.raises(TypeError, match=r"mixes FlowReports with other values"):
    odn.plot_flow_heatmap([report, {"a": 1.0}])
  with pytest.raises(ValueError, match=r"report 1 has other layers than report 0 \(2 vs 3"):
    odn.plot_flow_heatmap([report, odn.gradient_flow(_tree(2))])
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), report)
  with pytest.raises(ValueError, match=r"report 0 holds arrays of shape \(2, 3\) \(stacked"):
    odn.plot_flow_heatmap([stacked])
  with pytest.raises(ValueError, match=r"report 0 has no 'ratio': pass params to gradient_flow"):
    odn.plot_flow_heatmap([report], stat="ratio")


# ------------------------------------------------------------------------ params of another tree


@pytest.mark.parametrize(
  ("params", "match"),
  [
    (
      {**_tree(), "Dense_0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(2)}},
      r"paths and shapes of grads, but their 'Dense_0/kernel' has shape \(3, 3\), not \(2, 2\)",
    ),
    (
      [_tree()[f"Dense_{i}"] for i in range(3)],
      r"they have no leaf 'Dense_0/bias' \(which grads have\) \(and 11 more paths differ\)",
    ),
    (
      {**_tree(), "extra": {"w": jnp.ones(2)}},
      r"they have a leaf 'extra/w' that grads lack; pass the params the gradient was taken of",
    ),
    (
      {k: v for k, v in _tree().items() if k != "Dense_1"},
      r"they have no leaf 'Dense_1/bias' \(which grads have\) \(and 1 more paths differ\)",
    ),
  ],
  ids=["shape", "list-of-layers", "extra-leaf", "missing-layer"],
)
def test_gradient_flow_params_of_another_tree_name_the_first_path(params, match):
  with pytest.raises(ValueError, match=match):
    odn.gradient_flow(_tree(), params)
  with pytest.raises(ValueError, match=match):
    jax.jit(odn.gradient_flow)(_tree(), params)


def test_gradient_flow_params_of_the_same_tree_still_work():
  grads = _tree()
  params = jax.tree.map(lambda x: 2 * x, grads)
  report = odn.gradient_flow(grads, params)
  np.testing.assert_allclose(report.ratio, [0.5] * 3, rtol=1e-6)


@pytest.mark.parametrize(
  "other",
  [
    {f"layer_{i}": v for i, v in enumerate(_tree().values())},  # renamed
    [_tree()[f"Dense_{i}"] for i in range(3)],  # a list of layers
    {f"Dense_{i}": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)} for i in range(3)},  # leaves renamed
  ],
  ids=["renamed-layers", "list", "renamed-leaves"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_tracker_fed_another_tree_with_as_many_layers_is_a_clear_error(other, jit):
  tx = odn.track_gradient_flow()
  state = tx.init(_tree())
  assert odn.flow_from_state(state).norm.shape == (3,)  # the same number of layers
  update = jax.jit(tx.update) if jit else tx.update
  match = r"the tree given to `update` is not the one given to `init`: 6 leaves it has no depth"
  with pytest.raises(ValueError, match=match):
    update(other, state)
  with pytest.raises(ValueError, match=match):
    update(other, state, other)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_tracker_params_of_another_tree_than_the_updates_name_the_first_path(jit):
  tx = odn.track_gradient_flow()
  state = tx.init(_tree())
  update = jax.jit(tx.update) if jit else tx.update
  wide = {**_tree(), "Dense_2": {"kernel": jnp.ones((2, 5)), "bias": jnp.ones(2)}}
  with pytest.raises(
    ValueError,
    match=r"the params given to `update` must have the paths and shapes of the updates, but "
    r"their 'Dense_2/kernel' has shape \(2, 5\), not \(2, 2\)",
  ):
    update(_tree(), state, wide)
  with pytest.raises(ValueError, match=r"but they have no leaf 'Dense_0/bias' \(which the updates"):
    update(_tree(), state, [_tree()[f"Dense_{i}"] for i in range(3)])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_flow_from_state_with_params_of_another_tree_names_the_first_path(jit):
  params = _tree()
  tx = odn.track_gradient_flow()
  _, state = tx.update(params, tx.init(params), params)
  read = jax.jit(odn.flow_from_state) if jit else odn.flow_from_state
  renamed = {f"layer_{i}": v for i, v in enumerate(params.values())}
  with pytest.raises(
    ValueError,
    match=r"params must have the paths of the params at `init`, but they have no leaf "
    r"'Dense_0/bias' \(which the params at `init` have\) \(and 11 more paths differ\); pass",
  ):
    read(state, renamed)
  with pytest.raises(ValueError, match=r"they have a leaf 'extra/w' that the params at `init`"):
    read(state, {**params, "extra": {"w": jnp.ones(2)}})


def test_flow_from_state_sizes_are_those_of_the_params_passed():
  """The state keeps depths by path, not shapes: same paths, other shapes is a defined result."""
  params = _tree()
  tx = odn.track_gradient_flow()
  _, state = tx.update(params, tx.init(params), params)
  wider = {**params, "Dense_0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
  report = odn.flow_from_state(state, wider)
  assert report.sizes == (12, 6, 6)
  np.testing.assert_array_equal(report.norm, odn.flow_from_state(state, params).norm)
