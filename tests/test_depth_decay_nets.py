"""`depth-decay-nets`: the DenseNet and row-LSTM models, their depths, the optimizers, the CLI run.

The CLI run is the quick preset on the generated data set: outputs are checked
for structure and finite numbers, never for whether a method wins.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from optax_depthnorm.experiments import cli, data, report
from optax_depthnorm.experiments import depth_decay_nets as ddn
from optax_depthnorm.experiments import models_extra as mx
from tests.tolerance import assert_close


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_densenet_blocks_add_layers_times_growth_channels():
  model = mx.DenseNet(blocks=3, layers=2, growth=3, compression=0.5)
  x = np.random.default_rng(0).uniform(size=(2, 12, 12)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  logits, inter = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
  assert logits.shape == (2, 10)
  shapes = [inter["intermediates"][f"block_{b}"][0].shape for b in range(3)]
  c0 = 2 * 3 + 2 * 3  # stem 2 * growth, then layers * growth
  c1 = int(0.5 * c0) + 2 * 3
  c2 = int(0.5 * c1) + 2 * 3
  assert shapes == [(2, 12, 12, c0), (2, 6, 6, c1), (2, 3, 3, c2)]


def test_lstm_reads_28_rows_of_28_and_matches_a_numpy_recurrence():
  model = mx.RowLSTM(hidden=5, layers=2)
  x = np.random.default_rng(1).uniform(size=(3, 28, 28)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  assert params["lstm_00"]["w_ih"].shape == (28, 20) and params["lstm_01"]["w_ih"].shape == (5, 20)
  assert params["lstm_00"]["w_hh"].shape == (5, 20) and params["dense_02"]["kernel"].shape == (
    5,
    10,
  )
  hs = np.asarray(x, np.float64)
  for name in ("lstm_00", "lstm_01"):
    p = {k: np.asarray(v, np.float64) for k, v in params[name].items()}
    h, c, out = np.zeros((3, 5)), np.zeros((3, 5)), []
    for t in range(28):  # one step per row
      i, f, g, o = np.split(hs[:, t] @ p["w_ih"] + h @ p["w_hh"] + p["bias"], 4, axis=-1)
      c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
      h = _sigmoid(o) * np.tanh(c)
      out.append(h)
    hs = np.stack(out, 1)
  head = params["dense_02"]
  expected = hs[:, -1] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  assert_close(jax.jit(model.apply)({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


def _check_depths(params, depths, want_max):
  table = odn.depth_table(params, depths)
  print(table)
  rows = [line.split() for line in table.splitlines()[1:]]
  by_layer = {}
  for depth, path, *_ in rows:
    by_layer.setdefault(path.split("/")[0], set()).add(int(depth))
  assert all(len(d) == 1 for d in by_layer.values())  # one depth per layer
  order = sorted(by_layer, key=lambda k: int(k.rsplit("_", 1)[1]))
  seq = [by_layer[k].pop() for k in order]
  assert seq == sorted(seq) and seq[0] == 0 and seq[-1] == want_max  # input to head
  weights = [d for k, d in zip(order, seq) if not k.startswith("bn_")]
  assert weights == list(range(want_max + 1))  # each weight layer one deeper
  return dict(zip(order, seq))


def test_depths_increase_from_input_to_head():
  x = np.zeros((1, 14, 14), np.float32)
  params = jax.eval_shape(mx.DenseNet(3, 2, 2).init, jax.random.key(0), x)["params"]
  of = _check_depths(params, mx.index_depths(params), 3 * 2 + 3)
  assert of["conv_00"] == 0 and of["bn_01"] == of["conv_02"] == 1  # BN at the conv it feeds
  assert of[max(k for k in of if k.startswith("bn_"))] == 9  # the final BN at the head's depth
  x = np.zeros((1, 28, 28), np.float32)
  params = jax.eval_shape(mx.RowLSTM(4, 3).init, jax.random.key(0), x)["params"]
  of = _check_depths(params, mx.index_depths(params), 3)
  assert of == {"lstm_00": 0, "lstm_01": 1, "lstm_02": 2, "dense_03": 3}


def test_lstm_variant_steps_have_norm_lr_times_head_weight_norm_times_decay():
  cfg = ddn.PRESETS["quick"]
  model = mx.RowLSTM(4, 2)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 28, 28), np.float32))["params"]
  depths = mx.index_depths(params)
  variant = ddn.VARIANTS["lstm"]["exponential 0.001 to last weights"]
  tx = ddn.make_tx_factory("lstm", variant, depths, cfg)(learning_rate=0.1)
  grads = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params)  # clipped, then normalized
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  head = params["dense_02"]
  n = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(head)))
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    d = int(path[0].key.rsplit("_", 1)[1])
    assert_close(float(jnp.linalg.norm(u)), 0.1 * n * np.exp(-0.001 * d))
  base = ddn.make_tx_factory("lstm", ddn.VARIANTS["lstm"]["baseline"], depths, cfg)(0.1)
  updates, _ = jax.jit(base.update)(grads, base.init(params), params)
  assert_close(float(optax.tree.norm(updates)), 0.1 * cfg.clip)


def test_first_epoch():
  assert ddn.first_epoch([0.1, 0.5, 0.4, 0.6], 0.5, True) == 2
  assert ddn.first_epoch([2.0, 1.0, np.nan], 0.5, False) is None
  assert ddn.first_epoch([2.0, 1.0, 0.4], 1.0, False) == 2


def test_quick_preset_on_generated_data(tmp_path, capsys):
  """`run` and the writer as the CLI calls them (the CLI's speed probe left out: CPU time)."""
  assert cli.main(["depth-decay-nets", "--quick", "--list"]) is None
  assert (
    "lstm_variants = ('baseline', 'exponential 0.001 to last weights')" in capsys.readouterr().out
  )
  cfg = ddn.PRESETS["quick"]
  writer = report.Writer(tmp_path, ddn.NAME)
  out = ddn.run(cfg, data.generated_dataset(128, 64), writer, quiet=True)
  tables, notes = out.pop("tables"), out.pop("notes")
  writer.finish(
    title=ddn.TITLE, results={"data": {"generated": True}, **out}, tables=tables, notes=notes
  )
  folder = tmp_path / "depth-decay-nets"
  on_disk = json.loads((folder / "results.json").read_text())  # allow_nan=False: no NaN left
  assert set(on_disk["paper_claims"]) == {"densenet", "lstm"}
  for net, key in (("densenet", "test_acc"), ("lstm", "test_loss")):
    res = out["nets"][net]
    labels = cfg.dense_variants if net == "densenet" else cfg.lstm_variants
    assert list(res["variants"]) == ["baseline", *[v for v in labels if v != "baseline"]]
    assert (folder / f"depths_{net}.txt").read_text().startswith("depth")
    for v in res["variants"].values():
      assert v["chosen_lr"] in v["lrs"] and len(v["by_lr"]) == 2
      for name in ddn.CURVES:
        assert np.shape(v[name]) == (cfg.epochs, len(cfg.seeds))
        assert np.all(np.isfinite(v[name]))
      assert v["speed"]["steps_per_s"] > 0 and v["speed"]["runs"] == 4
      assert set(v["reach_epoch"]) == {k for k, _ in ddn.REACH[net]}
    assert res["variants"]["baseline"]["reach_epoch"][key] in (1, 2)
    assert np.isfinite(res["targets"][key])
  md = (folder / "results.md").read_text()
  assert "| variant | chosen LR (grid) |" in md and "Every LR of every sweep" in md
  assert "GENERATED data" in md and on_disk["figures"] == ["test_curves.png", "lr_sweep.png"]


@pytest.mark.parametrize("bad", ["nets=resnet", "dense_variants=nope"])
def test_unknown_net_or_variant_is_an_error(tmp_path, bad):
  cfg = cli.configure(ddn, "quick", [bad], cli.build_parser().parse_args(["depth-decay-nets"]))
  with pytest.raises(ValueError, match=r"nets are|unknown densenet variants"):
    ddn.run(cfg, data.generated_dataset(64, 32), report.Writer(tmp_path, "x"), quiet=True)
