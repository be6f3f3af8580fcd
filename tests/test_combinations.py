"""The `combinations` experiment: its quick preset on generated data, and its optimizers.

The run is checked for structure and sanity (never for which method wins); the
optimizers it builds are checked where the experiment's claims rest on them:
gamma 0 turns depth_decay off (scale_steps 0 turning scale_normalize off is
tests/test_scale.py's skipped steps), and layerwise_normalize's SGD step has
norm lr in every layer.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_depthnorm.experiments import cli, combinations, data, models, report
from tests.tolerance import assert_close


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  writer = report.Writer(tmp_path_factory.mktemp("out"), combinations.NAME)
  cfg = combinations.PRESETS["quick"]
  return cfg, combinations.run(cfg, data.generated_dataset(600, 128), writer, quiet=True), writer


def _in_unit(x):
  x = np.asarray(x, np.float64)
  return bool(np.all(np.isfinite(x)) and np.all((x >= 0) & (x <= 1)))


def test_quick_preset_results(quick):
  cfg, out, writer = quick
  assert cli.EXPERIMENTS["combinations"] is combinations
  assert set(out["parts"]) == {"bgn_depth_decay", "bgn_vs_layerwise", "scale_normalize"}
  assert len(out["parts"]["bgn_depth_decay"]) == 6 and len(out["parts"]["bgn_vs_layerwise"]) == 3
  named = {n for names in out["parts"].values() for n in names}
  assert named == set(out["variants"])
  steps = (cfg.train_size // cfg.batch_size) * cfg.epochs
  for v in out["variants"].values():
    n_lr, n_seed = len(v["lrs"]), len(cfg.seeds)
    assert np.shape(v["val_acc_runs"]) == np.shape(v["test_acc_runs"]) == (n_seed, n_lr)
    assert _in_unit(v["val_acc_runs"]) and _in_unit(v["test_acc_runs"]) and _in_unit(v["test_acc"])
    assert _in_unit(v["val_acc_by_lr"]) and _in_unit(v["test_acc_by_epoch"])
    assert len(v["test_acc_by_epoch"]) == cfg.epochs and v["best_lr"] in v["lrs"]
    best = v["lrs"].index(v["best_lr"])
    assert v["val_acc_by_lr"][best] == np.max(v["val_acc_by_lr"])  # picked on validation
    assert math.isclose(v["mean"], np.mean(v["test_acc_runs"][:, best]))
    assert v["steps"] == steps and v["examples"] == steps * cfg.batch_size
    assert v["seeds"] == list(cfg.seeds) and v["steps_per_s"] > 0
    assert len(v["diverged_by_lr"]) == n_lr and v["diverged"] == v["diverged_by_lr"][best]
    assert v["diverged"] == 0 and np.all(np.isfinite(v["step_loss_mean"]))
  cmp = out["bgn_vs_layerwise"]
  assert len(cmp["gap_by_epoch"]) == cfg.epochs
  a, b = (out["variants"][n] for n in out["parts"]["bgn_vs_layerwise"][:2])
  assert_close(cmp["gap_by_epoch"], np.subtract(a["test_acc_by_epoch"], b["test_acc_by_epoch"]))
  assert cmp["verdict"] in ("alike", "differ", "inconclusive", "both at chance")
  if cmp["verdict"] != "both at chance":
    assert (abs(cmp["final_gap"]) > cmp["tolerance"]) == (cmp["verdict"] == "differ")
  assert combinations.compare(a, a)["verdict"] in ("alike", "both at chance")
  noisy = dict(a, mean=0.5, std=0.2, test_acc_by_epoch=[0.5] * cfg.epochs)
  assert combinations.compare(noisy, dict(noisy, mean=0.3, std=0.0))["verdict"] == "inconclusive"
  assert (
    combinations.compare(dict(noisy, std=0.01), dict(noisy, mean=0.3, std=0.01))["verdict"]
    == "differ"
  )
  captions = [c for c, _ in out["tables"]]
  assert [c.split(":")[0] for c in captions[:3]] == ["Part 1", "Part 2", "Part 3"]
  assert all(t.startswith("| ") and t.count("\n") >= 3 for _, t in out["tables"])
  assert writer.figures == ["curves.png"] and (writer.dir / "curves.png").stat().st_size > 0
  assert out["notes"] and len(out["groups"]) == 5  # the shared plain SGD / Adam train once


def _tree(depth):
  model = models.DeepMLP(depth, 4)
  params = model.init(jax.random.key(0), jnp.zeros((2, 784)))["params"]
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
  return params, grads, combinations.model_depths(model)


def test_depth_decay_with_gamma_0_is_adam_and_reverse_keeps_the_head_at_full_rate():
  params, grads, depths = _tree(3)
  tx = optax.inject_hyperparams(combinations.make_tx("adam", depths))(
    learning_rate=1e-2, gamma_forward=0.0, gamma_reverse=0.0
  )
  update, state, plain = jax.jit(tx.update), tx.init(params), optax.adam(1e-2)
  plain_state = plain.init(params)
  for k in (1.0, -2.0):  # gamma 0: Adam's updates, step after step
    g = jax.tree.map(lambda x, k=k: k * x, grads)
    (out, state), (ref, plain_state) = update(g, state, params), plain.update(g, plain_state)
    assert_close(out, ref)
  state.hyperparams["gamma_reverse"] = jnp.asarray(1.0)  # the same program, another number
  g = jax.tree.map(lambda x: 0.5 * x, grads)
  (out, _), (ref, _) = update(g, state, params), plain.update(g, plain_state)
  assert_close(out["head"], ref["head"])  # depth 0 from the output: factor 1
  assert_close(out["layer_0"], jax.tree.map(lambda u: u * math.exp(-1.0), ref["layer_0"]))
  for i in range(2):  # hidden layers 1, 2 of 3: d / d_max = (3 - 1 - i) / 3
    f = math.exp(-(2 - i) / 3)
    assert_close(
      out["layer_1_on"]["dense"]["kernel"][i], f * ref["layer_1_on"]["dense"]["kernel"][i]
    )


def test_layerwise_normalized_sgd_step_has_norm_lr_in_every_layer():
  params, grads, depths = _tree(4)
  tx = optax.inject_hyperparams(combinations.make_tx("ln-sgd", depths))(learning_rate=0.3)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  stacked = u["layer_1_on"]["dense"]
  norms = [jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(u[k]))) for k in ("layer_0", "head")]
  norms += list(
    jnp.sqrt(jnp.sum(stacked["kernel"] ** 2, (1, 2)) + jnp.sum(stacked["bias"] ** 2, 1))
  )
  assert len(norms) == 5
  assert_close(jnp.stack(norms), jnp.full(5, 0.3))
