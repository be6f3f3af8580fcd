"""The experiments package: IDX loader, fallback data, vmapped trainer, CLI, every subcommand.

Each subcommand runs on a tiny MNIST-format folder written here (so CI needs no
data set), with the smallest settings; outputs are checked for shape and
sanity, never for timings or for whether a method wins.
"""

import gzip
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from optax_depthnorm.experiments import cli, data, depth_decay, models, train
from tests.tolerance import RTOL


def _write_folder(folder, n_train=96, n_test=40, gz=True):
  ds = data.generated_dataset(n_train, n_test, seed=1)
  suffix = ".gz" if gz else ""
  for split, x, y in (("train", ds.x_train, ds.y_train), ("t10k", ds.x_test, ds.y_test)):
    data.write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", (x * 255).astype(np.uint8))
    data.write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", y.astype(np.uint8))
  return folder


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return _write_folder(tmp_path_factory.mktemp("idx"))


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", ["a.idx3-ubyte.gz", "a.idx3-ubyte"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, name, dtype):
  array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
  if dtype == np.uint8:
    array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
  data.write_idx(tmp_path / name, array)
  back = data.read_idx(tmp_path / name)
  assert back.dtype == array.dtype and back.shape == (2, 3, 5)
  np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_mnist_magic(tmp_path):
  data.write_idx(tmp_path / "l", np.array([3, 1, 4], np.uint8))
  assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])


def test_idx_bad_magic_and_bad_size_are_clear_errors(tmp_path):
  bad = tmp_path / "bad.gz"
  with gzip.open(bad, "wb") as f:
    f.write(b"\x1f\x8b\x08\x00 not idx")
  with pytest.raises(ValueError, match="is not an IDX file: it should start with two zero bytes"):
    data.read_idx(bad)
  short = tmp_path / "short"
  short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
  with pytest.raises(ValueError, match=r"the IDX header says shape \(9,\)"):
    data.read_idx(short)
  with pytest.raises(ValueError, match="IDX cannot hold dtype"):
    data.write_idx(tmp_path / "x", np.zeros(2, np.complex64))


def test_load_idx_folder_plain_files(tmp_path):
  folder = _write_folder(tmp_path, n_train=20, n_test=10, gz=False)
  ds = data.load_dataset(folder)
  assert not ds.generated and ds.name == folder.name
  assert ds.x_train.shape == (20, 28, 28) and ds.x_test.shape == (10, 28, 28)
  assert ds.x_train.dtype == np.float32 and ds.x_train.min() >= 0 and ds.x_train.max() <= 1
  assert ds.describe()["train"] == 20 and ds.num_classes <= 10


def test_missing_folder_falls_back_to_generated_data_and_says_how_to_get_data(tmp_path, capsys):
  ds = data.load_dataset(tmp_path)
  assert ds.generated and ds.name == "generated"
  err = capsys.readouterr().err
  assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err
  assert str(tmp_path) in err and "GENERATED" in err
  with pytest.raises(FileNotFoundError, match="does not hold the four MNIST-format IDX files"):
    data.load_idx_folder(tmp_path)


def test_mismatched_images_and_labels_are_rejected(tmp_path):
  folder = _write_folder(tmp_path, n_train=8, n_test=4)
  data.write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
  with pytest.raises(
    ValueError, match=r"train images \(8, 28, 28\) and labels \(5,\) do not match"
  ):
    data.load_idx_folder(folder)


def test_split_and_pool():
  ds = data.generated_dataset(100, 30)
  parts = data.split(ds, train_size=50, val_size=20, test_size=10, flatten=True)
  assert parts["train"][0].shape == (50, 784) and len(parts["val"][1]) == 20
  assert len(parts["test"][1]) == 10
  np.testing.assert_array_equal(parts["val"][1], ds.y_train[80:])
  pooled = data.pool_images(data.split(ds, train_size=None, val_size=0), 14)
  assert pooled["train"][0].shape == (100, 14, 14)
  np.testing.assert_allclose(pooled["train"][0][0, 0, 0], ds.x_train[0, :2, :2].mean(), rtol=RTOL)


# ----------------------------------------------------------------------------- trainer


def test_vmapped_runs_match_separate_runs():
  """Two learning rates trained at once give what each gives alone."""
  parts = data.split(data.generated_dataset(64, 16), train_size=None, val_size=0, flatten=True)
  model = models.DeepMLP(3, 8, "tanh", bn=True, bgn=True)
  make_tx = lambda learning_rate: optax.adam(learning_rate)
  kw = dict(epochs=2, batch_size=16, quiet=True)
  both = train.train_group(
    train.Group(model, make_tx, {"learning_rate": [1e-3, 1e-2]}, [0, 0]), parts, **kw
  )
  alone = train.train_group(
    train.Group(model, make_tx, {"learning_rate": [1e-2]}, [0]), parts, **kw
  )
  assert both.step_loss.shape == (2 * 4, 2) and both.epochs["test_acc"].shape == (2, 2)
  np.testing.assert_allclose(both.step_loss[:, 1], alone.step_loss[:, 0], rtol=2e-4, atol=1e-5)
  assert not np.allclose(both.step_loss[-1, 0], both.step_loss[-1, 1])
  looped = train.train_group(
    train.Group(model, make_tx, {"learning_rate": [1e-3, 1e-2]}, [0, 0], vmap=False), parts, **kw
  )
  np.testing.assert_allclose(looped.step_loss, both.step_loss, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(looped.epochs["test_loss"], both.epochs["test_loss"], rtol=1e-2)


def test_conv_depths_give_batchnorm_its_conv_depth():
  import jax

  model = models.ResNet(1, 2)
  params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8), np.float32))["params"]
  depths = models.conv_depths(params)
  assert depths["conv_00"]["kernel"] == 0 and depths["bn_01"]["scale"] == 0
  assert depths["conv_02"]["kernel"] == 1 and max(jax.tree.leaves(depths)) == 9


def test_speed_probe_measures_steps_per_second_per_run():
  speed = train.speed_probe(depth=3, runs=2, steps=4, batch_size=8)
  assert speed["steps"] == 4 and speed["runs"] == 2 and speed["depth"] == 3
  assert speed["steps_per_s"] == pytest.approx(4 / speed["train_s"])
  assert speed["compile_s"] > 0


def test_batch_larger_than_training_set_is_an_error():
  parts = data.split(data.generated_dataset(10, 4), train_size=None, val_size=0, flatten=True)
  group = train.Group(
    models.MLP((4,)), lambda learning_rate: optax.sgd(learning_rate), {"learning_rate": [0.1]}, [0]
  )
  with pytest.raises(ValueError, match=r"batch_size 64 is larger than the training set \(10"):
    train.train_group(group, parts, epochs=1, batch_size=64, quiet=True)


# ----------------------------------------------------------------------------- CLI


def _run(idx_dir, tmp_path, *args, generated=False):
  results = cli.main(
    [*args, "--quick", "--quiet", "--out", str(tmp_path), "--data-dir", str(idx_dir)]
  )
  folder = tmp_path / results["experiment"]
  on_disk = json.loads((folder / "results.json").read_text())
  assert on_disk["experiment"] == results["experiment"] and on_disk["preset"] == "quick"
  assert on_disk["data"]["generated"] is generated
  assert on_disk["data"]["name"] == ("generated" if generated else idx_dir.name)
  assert on_disk["wall_s"] > 0 and on_disk["machine"]["backend"] == "cpu"
  assert on_disk["harness_speed"]["steps_per_s"] > 0 and on_disk["harness_speed"]["depth"] == 8
  assert on_disk["command"].startswith(f"optax-depthnorm {results['experiment']} ")
  for name in on_disk["figures"]:
    image = matplotlib.image.imread(folder / name)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  md = (folder / "results.md").read_text()
  assert "harness speed on this machine:" in md and "steps/s per run" in md
  return on_disk, md


def _table_rows(markdown, header_start):
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  rows = []
  for line in lines[start + 2 :]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip("|").split("|")])
  return rows


def _in_unit(x):
  return all(0 <= v <= 1 for v in np.ravel(x))


def test_bgn_table(idx_dir, tmp_path, capsys):
  out, md = _run(
    idx_dir,
    tmp_path,
    "bgn-table",
    "--set",
    "depths=2",
    "--set",
    "activations=relu",
    "--set",
    "width=8",
    "--set",
    "train_size=64",
    "--set",
    "batch_size=32",
    "--set",
    "lrs=0.001,0.01",
    "--seeds",
    "0,1",
  )
  cells = out["cells"]
  assert len(cells) == 4 and {(c["bn"], c["bgn"]) for c in cells} == {
    (False, False),
    (False, True),
    (True, False),
    (True, True),
  }
  for c in cells:
    assert len(c["test_acc"]) == 2 and _in_unit(c["test_acc"]) and _in_unit(c["val_acc_by_lr"])
    assert c["best_lr"] in (0.001, 0.01) and c["sweep_runs"] == 4 and c["sweep_train_s"] > 0
    assert math.isclose(c["mean"], np.mean(c["test_acc"]))
  rows = _table_rows(md, "| activation | BN | BGN | 2 ours")
  assert len(rows) == 4 and rows[0][:3] == ["relu", "False", "False"] and rows[0][4] == "-"
  assert sum("**" in r[3] for r in rows) >= 1
  assert out["figures"] == ["accuracy_vs_depth.png"]
  # The console shows the Markdown tables and the folder, not the results dict.
  printed = capsys.readouterr().out
  assert "| activation | BN | BGN | 2 ours" in printed and "array(" not in printed
  assert printed.rstrip().endswith("figures)") and str(tmp_path / "bgn-table") in printed


def test_console_script_returns_none(monkeypatch, capsys):
  """`optax-depthnorm` hands its return value to sys.exit, which would print it."""
  pyproject = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
  assert 'optax-depthnorm = "optax_depthnorm.experiments.cli:entry"' in pyproject
  monkeypatch.setattr(sys, "argv", ["optax-depthnorm", "bgn-table", "--list"])
  assert cli.entry() is None
  assert "epochs = 3" in capsys.readouterr().out


def test_scale_norm_on_the_generated_fallback(tmp_path, capsys):
  """No data in --data-dir: a generated data set, said so in stderr and in the outputs."""
  empty = tmp_path / "nothing"
  empty.mkdir()
  out, md = _run(
    empty,
    tmp_path,
    "scale-norm",
    "--set",
    "widths=8,8",
    "--set",
    "train_size=60",
    "--set",
    "batch_size=20",
    "--set",
    "val_size=16",
    generated=True,
  )
  assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
  assert "GENERATED data: not comparable" in md
  assert list(out["methods"]) == ["glorot", "orthonormal", "determinant", "scale", "scale-1"]
  assert out["steps_per_epoch"] == 3
  for method in out["methods"].values():
    r = method["0.05"]
    assert len(r["step_loss_mean"]) == 6 and len(r["train_loss_by_epoch"]) == 2
    assert all(math.isfinite(v) and v > 0 for v in r["step_loss_mean"])
    assert _in_unit(r["final_test_acc"])
  rows = _table_rows(md, "| method | lr |")
  assert [r[0] for r in rows][:2] == ["Glorot init", "orthonormal init"] and len(rows) == 5
  assert len(out["figures"]) == 3


def test_depth_decay(idx_dir, tmp_path):
  settings = ["models=mlp", "mlp_depth=3", "mlp_width=8", "train_size=64", "batch_size=16"]
  settings += ["val_size=32", "lrs=0.01,0.1,1.0", "seeds=0,1", "only=linear 0.5"]
  out, md = _run(
    idx_dir, tmp_path, "depth-decay", *[a for s in settings for a in ("--set", s)], "--epochs", "2"
  )
  variants = out["models"]["mlp3"]["variants"]
  assert list(variants) == ["baseline", "linear 0.5"]
  for v in variants.values():
    assert np.shape(v["test_acc_by_epoch"]) == (2, 2) and _in_unit(v["test_acc_by_epoch"])
    assert v["reach_epoch"] in (None, 1, 2) and v["steps"] == 2 * (64 // 16)
    # every variant's own sweep: its rate is the argmax of its mean validation accuracy
    assert v["selected_on"] == "val_acc" and len(v["val_acc_by_lr"]) == 3
    assert v["best_lr"] == [0.01, 0.1, 1.0][int(np.argmax(v["val_acc_by_lr"]))]
    assert v["best_lr_at_grid_edge"] == (v["best_lr"] != 0.1)
  assert variants["baseline"]["reach_epoch"] is not None
  rows = _table_rows(md, "| model | variant | best lr |")
  assert [r[1] for r in rows] == list(variants)
  sweep = _table_rows(md, "| model | variant | 0.01 | 0.1 | 1 |")
  assert [sum("**" in c for c in r[2:]) for r in sweep] == [1, 1]


def test_depth_decay_depths_count_weight_layers_from_the_input():
  """ResNet-8: 8 weight layers deep (0..7); its 1x1 projections run beside a conv, not after."""
  x = jnp.ones((1, 14, 14, 1))
  cfg = depth_decay.Config(blocks=1, width=2, mlp_depth=3, mlp_width=4)
  for kind, deepest in (("resnet", 7),):  # the MLP's depths: test_depth_decay trains with them
    _, model = depth_decay._model(kind, cfg)
    depths = depth_decay._depths(kind, model, x)
    params = model.init(jax.random.key(0), x)["params"]
    rows = [line.split() for line in odn.depth_table(params, depths).splitlines()[1:]]
    by_path = {r[1]: r[0] for r in rows}
    assert rows[-1][0] == str(deepest) and rows[-1][1].endswith("kernel"), rows
    if kind == "resnet":  # (1, 1) kernels: the projections, at the depth of the block's 1st conv
      projections = [r for r in rows if r[2:6] == ["(1,", "1,", "2,", "4)"]]
      assert [r[0] for r in projections] == [by_path["conv_06/kernel"]] == ["3"]


def test_vgg_flow(idx_dir, tmp_path):
  out, md = _run(
    idx_dir,
    tmp_path,
    "vgg-flow",
    "--set",
    "variants=shallow,deep BN + RC",
    "--set",
    "blocks=1",
    "--set",
    "filters=2",
    "--set",
    "image_size=8",
    "--set",
    "train_size=40",
    "--set",
    "batch_size=20",
    "--set",
    "val_size=16",
  )
  assert list(out["variants"]) == ["VGG08", "VGG14 BN + RC"]
  for v in out["variants"].values():
    assert len(v["flow_init_mean_abs"]) == len(v["flow_end_mean_abs"]) == len(v["flow_layers"])
    assert all(x >= 0 for x in v["flow_end_mean_abs"])
    assert _in_unit([v["final"]["train_acc"], v["final"]["val_acc"], v["final"]["test_acc"]])
  assert len(out["variants"]["VGG08"]["flow_layers"]) == 8
  rows = _table_rows(md, "| model | LR |")
  assert rows[0][0] == "VGG08" and rows[0][-1].startswith("1.74 / 51.59") and rows[1][-1] == "-"
  assert out["figures"] == ["flow_vgg08.png", "flow_vgg14_bn_rc.png", "flow_all.png"]


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["nope"], "invalid choice: 'nope'"),
    (["bgn-table", "--set", "colour=red"], "--set wants field=value with a field of bgn-table"),
    (["bgn-table", "--set", "depths=two"], "cannot read 'two' as tuple"),
    (["bgn-table", "--set", "depths"], "--set wants field=value"),
    (["scale-norm", "--epochs", "0"], "must be >= 1, got 0"),
    (["vgg-flow", "--preset", "huge"], "invalid choice: 'huge'"),
    ([], "the following arguments are required: EXPERIMENT"),
  ],
)
def test_cli_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_cli_list_shows_the_preset_with_overrides(capsys):
  assert cli.main(["depth-decay", "--preset", "full", "--list", "--seeds", "3,4"]) is None
  out = capsys.readouterr().out
  assert (
    "epochs = 50" in out
    and "seeds = (3, 4)" in out
    and "models = ('resnet', 'plain', 'mlp')" in out
  )


def test_importing_the_library_does_not_import_the_experiments():
  code = (
    "import sys, optax_depthnorm\n"
    "bad = [m for m in sys.modules if m.startswith(('optax_depthnorm.experiments', 'matplotlib',"
    " 'tqdm'))]\n"
    "assert not bad, bad\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True)
