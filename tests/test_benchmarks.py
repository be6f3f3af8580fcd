"""The benchmark scripts run (smallest settings); no timing is asserted."""

import importlib
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  return lambda name: importlib.import_module(name)


TINY = ["--quick", "--rounds", "1", "--steps", "1", "--warmup", "0"]


def test_transform_overhead_reports_every_variant(bench, tmp_path, capsys):
  result = bench("transform_overhead").main([*TINY, "--json", str(tmp_path / "r.json")])
  names = [r["variant"] for r in result["results"]]
  assert names[0] == "adam" and len(names) == 5 and "track_gradient_flow+adam" in names
  assert result["results"][0]["ratio"] == 1.0
  assert result["setup"]["leaves"] == 53  # --quick: one block per stage
  assert (tmp_path / "r.json").stat().st_size > 0
  assert "| adam |" in capsys.readouterr().out


def test_bgn_overhead_reports_four_ways(bench):
  result = bench("bgn_overhead").main([*TINY, "--depth", "3", "--batch", "8"])
  assert [r["variant"] for r in result["results"]] == ["plain", "bgn", "bn", "bn+bgn"]
  assert all(r["median_ms"] > 0 for r in result["results"])


def test_bad_counts_are_rejected(bench):
  with pytest.raises(SystemExit):
    bench("bgn_overhead").main(["--rounds", "0"])
  assert "benchmarks" in sys.modules["bgn_overhead"].__file__


def test_scale_overhead_times_every_mode_on_both_trees(bench, capsys):
  result = bench("scale_overhead").main([*TINY, "--batch", "4"])
  trees = result["trees"]
  assert list(trees) == ["MLP 784-100-100-100-10", "ResNet-50 / 4, 1 block per stage"]
  assert trees["MLP 784-100-100-100-10"]["params"] == 784 * 100 + 2 * 100 * 100 + 100 * 10 + 310
  for tree in trees.values():
    names = [r["variant"] for r in tree["results"]]
    assert names == [
      "sgd",
      *(f"sgd+scale_normalize({m})" for m in ("data", "probe", "determinant")),
    ]
    assert tree["results"][0]["ratio"] == 1.0
  assert "| sgd+scale_normalize(determinant) |" in capsys.readouterr().out.split("Side by side")[1]


def test_norm_check_cost_times_every_way_and_they_agree(bench):
  module = bench("norm_check_cost")
  result = module.main(TINY)
  assert [r["variant"] for r in result["results"]] == ["adam", *module.KINDS]
  import jax.numpy as jnp
  import numpy as np

  leaves = [jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32), jnp.ones(4)]
  plain = module._norms("plain", leaves)
  for kind in module.KINDS[1:]:
    np.testing.assert_allclose(module._norms(kind, leaves), plain, rtol=1e-5)
  tiny = [jnp.full((3,), 1e-25, jnp.float32)]
  np.testing.assert_allclose(module._norms("global_cond", tiny), [np.sqrt(3) * 1e-25], rtol=1e-5)


def test_transform_overhead_picks_variants_and_the_transformer_tree(bench):
  module = bench("transform_overhead")
  args = module.parse_args(["--variant", "track_gradient_flow(every_k_steps=10)+adam"])
  assert args.variants == ["adam", "track_gradient_flow(every_k_steps=10)+adam"]
  assert module.parse_args(["--variant", "all"]).variants == list(module.variants())
  with pytest.raises(SystemExit):
    module.parse_args(["--variant", "nope"])
  params = module.transformer_params(__import__("jax").random.key(0), width_divisor=8, layers=2)
  assert params["Transformer"]["blocks"]["Mlp_0"]["Dense_0"]["kernel"].shape == (2, 64, 256)
  result = module.main([*TINY, "--tree", "transformer", "--variant", "track_gradient_flow+adam"])
  assert [r["variant"] for r in result["results"]] == ["adam", "track_gradient_flow+adam"]
  assert result["setup"]["tree"] == "transformer"


def test_scale_train_step_times_every_variant_on_both_networks(bench, capsys):
  result = bench("scale_train_step").main(TINY)
  assert list(result["networks"]) == ["MLP 784-100-100-100-10", "small CNN"]
  for network in result["networks"].values():
    names = [r["variant"] for r in network["results"]]
    assert names[0] == "sgd" and "determinant(every_k_steps=10)" in names
  assert "| data | <= 1.15x |" in capsys.readouterr().out


def test_device_suite_plans_every_benchmark_and_writes_its_tables(bench, tmp_path, capsys):
  module = bench("device_suite")
  plan = module.main(["--out", str(tmp_path), "--dry-run"])["plan"]
  assert [p[1] for p in plan] == [m for _, m, _ in module.PLAN]
  assert not any("--quick" in p[2] for p in plan)  # full size by default
  quick = module.plan(True, None)
  assert all("--quick" in argv for _, _, argv in quick)
  with pytest.raises(SystemExit):
    module.parse_args(["--dry-run"])  # --out is required
  summary = module.main(["--out", str(tmp_path), "--quick", "--only", "bgn_overhead"])
  assert [r["status"] for r in summary["runs"]] == ["ok"]
  assert "| plain |" in (tmp_path / "bgn_overhead.md").read_text()
  assert (tmp_path / "bgn_overhead.json").stat().st_size > 0
  assert "bgn_overhead" in (tmp_path / "summary.md").read_text()
  skipped = module.run(tmp_path / "b", module.plan(True, ["infer_time"]), budget_s=-1)
  assert skipped["runs"][0]["status"].startswith("skipped")


def test_transform_overhead_notes_a_period_that_a_round_splits(bench):
  notes = bench("transform_overhead").period_notes
  k10 = "track_gradient_flow(every_k_steps=10)+adam"
  assert notes(["adam", k10], 10) == notes([k10], 20) == []
  (note,) = notes(["adam", k10], 5)
  assert note.startswith(f"note: {k10} records every 10 steps but a round has 5; use --steps 10")
