"""`plot_gradient_flow` and `plot_flow_heatmap` render headless (Agg) to PNG."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest

import optax_depthnorm as odn

matplotlib.use("Agg")
import matplotlib.image
import matplotlib.pyplot as plt


@pytest.fixture(autouse=True)
def _close_figures():
  yield
  plt.close("all")


def _grads(n, scale, seed=0):
  """Layer i gets |g| ~ scale**i: vanishing (scale < 1) or flat (scale = 1)."""
  rng = np.random.default_rng(seed)
  return {
    f"Dense_{i}": {"kernel": jnp.asarray(rng.standard_normal((4, 4)) * scale ** (n - 1 - i))}
    for i in range(n)
  }


def _assert_png(path, min_bytes=10_000):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes, len(data)
  return matplotlib.image.imread(path)


def test_importing_the_package_does_not_import_matplotlib():
  code = "import sys, optax_depthnorm; print('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_runs_overlaid_with_a_legend_render_to_png(tmp_path):
  reports = {name: odn.gradient_flow(_grads(6, s)) for name, s in [("plain", 0.1), ("bgn", 1.0)]}
  reports["dead head"] = odn.gradient_flow({**_grads(6, 1.0), "Dense_5": {"kernel": jnp.zeros(3)}})
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  assert odn.plot_gradient_flow(reports, ax=ax, title="at init") is ax
  assert len(ax.get_lines()) == 3 * 2  # mean and max per run
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend[:2] == ["plain: mean |g|", "plain: max |g|"] and len(legend) == 6
  assert ax.get_yscale() == "log" and ax.get_title() == "at init"
  assert [t.get_text() for t in ax.get_xticklabels()] == [f"Dense_{i}" for i in range(6)]
  assert ax.get_xlabel() == "layer (input → output)"
  assert ax.get_ylabel() == "gradient per layer (log scale)"
  y = ax.get_lines()[0].get_ydata()
  np.testing.assert_allclose(y, np.asarray(reports["plain"].mean_abs), rtol=1e-6)
  assert np.isnan(ax.get_lines()[4].get_ydata()[-1])  # a dead layer is a gap on a log scale
  fig.savefig(tmp_path / "flow.png")
  assert _assert_png(tmp_path / "flow.png").shape[:2] == (400, 600)


def test_many_layers_are_numbered_by_depth_and_stats_are_selectable(tmp_path):
  reports = [odn.gradient_flow(_grads(40, 0.7)), odn.gradient_flow(_grads(40, 1.0))]
  ax = odn.plot_gradient_flow(reports, stats=("norm",), labels=["sigmoid", "bgn"])
  assert len(ax.get_lines()) == 2
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sigmoid: L2 norm", "bgn: L2 norm"]
  assert ax.get_xlabel() == "depth (0 = input)"
  ticks = [t.get_text() for t in ax.get_xticklabels()]
  assert ticks == [str(d) for d in range(0, 40, 5)]
  single = odn.plot_gradient_flow(odn.gradient_flow(_grads(3, 1.0)), ax=plt.figure().gca())
  assert [t.get_text() for t in single.get_legend().get_texts()] == ["mean |g|", "max |g|"]
  ax.figure.savefig(tmp_path / "many.png")
  _assert_png(tmp_path / "many.png")


def test_heatmap_of_stacked_reports_and_of_a_tracker_state(tmp_path):
  params = _grads(5, 1.0)

  def step(scale, _):
    grads = jax.tree.map(lambda p: scale * p, params)
    return scale * 0.5, odn.gradient_flow(grads)

  _, history = jax.lax.scan(step, jnp.float32(1.0), length=12)
  ax = odn.plot_flow_heatmap(history, title="training")
  image = ax.images[0].get_array()
  assert image.shape == (12, 5) and len(ax.figure.axes) == 2  # the image and its colour bar
  np.testing.assert_allclose(image[3], np.log10(np.asarray(history.norm[3])), rtol=1e-5)
  assert ax.get_ylabel() == "training step" and ax.get_xlabel() == "layer (input → output)"
  assert ax.get_yticklabels()[0].get_text() == "0"
  ax.figure.savefig(tmp_path / "heat.png")
  _assert_png(tmp_path / "heat.png", min_bytes=5_000)

  opt = optax.chain(odn.track_gradient_flow(history=4), optax.sgd(0.1))
  state = opt.init(params)
  update = jax.jit(opt.update)
  for i in range(6):
    _, state = update(jax.tree.map(lambda p, i=i: p * (i + 1.0), params), state, params)
  ax = odn.plot_flow_heatmap(state, stat="mean_abs", params=params)
  assert ax.images[0].get_array().shape == (4, 5)
  assert [t.get_text() for t in ax.get_yticklabels()] == ["2", "3", "4", "5"]
  assert ax.figure.axes[1].get_ylabel() == "log10 mean |g|"


@pytest.mark.parametrize(
  ("call", "error", "match"),
  [
    (lambda r, s: odn.plot_gradient_flow(r, stats=("l2",)), ValueError, "stat must be one of"),
    (lambda r, s: odn.plot_gradient_flow([r, r], labels=["a"]), ValueError, "got 1 labels for 2"),
    (lambda r, s: odn.plot_gradient_flow(3), TypeError, "reports must be a FlowReport"),
    (lambda r, s: odn.plot_gradient_flow([r, 3]), TypeError, "run 1 is a int, not a FlowReport"),
    (lambda r, s: odn.plot_gradient_flow([]), ValueError, "no report to plot"),
    (lambda r, s: odn.plot_gradient_flow(s), ValueError, r"holds arrays of shape \(2, 3\)"),
    (lambda r, s: odn.plot_gradient_flow(r, stats=("ratio",)), ValueError, "pass params"),
    (lambda r, s: odn.plot_flow_heatmap(r), ValueError, r"needs 'norm' of shape \(steps"),
    (lambda r, s: odn.plot_flow_heatmap(s, stat="ratio"), ValueError, "got None"),
  ],
)
def test_plot_errors(call, error, match):
  report = odn.gradient_flow(_grads(3, 1.0))
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), report)
  with pytest.raises(error, match=match):
    call(report, stacked)


def test_heatmap_of_an_empty_history():
  params = _grads(2, 1.0)
  state = odn.track_gradient_flow().init(params)
  with pytest.raises(ValueError, match="the history is empty"):
    odn.plot_flow_heatmap(state)


def test_the_example_renders_its_figure(tmp_path, capsys, monkeypatch):
  """examples/gradient_flow.py with tiny settings: every panel drawn, the PNG saved."""
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gradient_flow.py"
  spec = importlib.util.spec_from_file_location("gradient_flow_example", path)
  example = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, example)  # linen modules are dataclasses
  spec.loader.exec_module(example)
  out = tmp_path / "flow.png"
  result = example.main(["--depth", "3", "--width", "4", "--steps", "4", "--out", str(out)])
  printed = capsys.readouterr().out
  assert printed.startswith("machine: ") and f"saved {out}" in printed
  assert set(result["results"]) == {"plain", "BGN", "layerwise_normalize"}
  axes = result["figure"].axes
  assert [len(ax.get_lines()) for ax in axes[:3]] == [6, 2, 6]
  assert sum(len(ax.images) for ax in axes) == 3
  _assert_png(out, min_bytes=50_000)
