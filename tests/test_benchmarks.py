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
  assert result["setup"]["leaves"] == 161
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
  assert list(trees) == ["MLP 784-100-100-100-10", "ResNet-50 / 4"]
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
