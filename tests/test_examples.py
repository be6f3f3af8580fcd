"""The README's example, the demo and the notebooks run as documented."""

import os
import pathlib
import re

import pytest

from optax_depthnorm import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs(capsys):
  readme = (ROOT / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)
  table = capsys.readouterr().out.splitlines()
  assert table[0].split() == ["depth", "path", "shape", "dtype"]
  # 11 Dense layers (activations take indices but are not layers): depths 0..10.
  assert [line.split()[0] for line in table[1::2]] == [str(d) for d in range(11)]
  assert "layers_20/kernel" in table[-1]
  assert namespace["state"] is not None


def test_readme_ci_marker_names_a_test_command():
  lines = (ROOT / "README.md").read_text().splitlines()
  marker = next(i for i, line in enumerate(lines) if "ci:test-command" in line)
  assert lines[marker + 1] == "```bash" and "pytest" in lines[marker + 2]


def test_demo_prints_a_row_per_optimizer(capsys):
  demo.main(["--depth", "3", "--steps", "3"])
  out = capsys.readouterr().out
  for name in demo.optimizers(0.1):
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    loss, accuracy = map(float, row.split()[-3:-1])
    assert 0 < loss < 5 and 0 <= accuracy <= 1
  assert "||grad first layer|| / ||grad last layer||" in out


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXECUTED = ROOT / "build" / "notebooks"  # executed copies, for the docs site
# Warnings a notebook shows on purpose (and explains in its text).
EXPECTED_WARNINGS = ("DepthOrderWarning",)


def test_there_are_four_notebooks():
  assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
  """Executes the notebook in a fresh Jupyter kernel, as Colab would, with a few steps."""
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  monkeypatch.setenv("ODN_NOTEBOOK_QUICK", "1")  # the kernel inherits the environment
  # A few steps each: compiling dominates, and XLA's CPU backend compiles about a third
  # faster without its expensive LLVM passes.
  monkeypatch.setenv(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  )
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
  )
  client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
  # The docs site shows this executed copy (docs/_hooks.py; build/ is git-ignored).
  EXECUTED.mkdir(parents=True, exist_ok=True)
  partial = EXECUTED / f".{path.name}.{os.getpid()}"
  nbformat.write(notebook, partial)
  partial.replace(EXECUTED / path.name)
  stderr = [
    out["text"]
    for cell in notebook.cells
    for out in cell.get("outputs", [])
    if out.get("name") == "stderr"
  ]
  unexpected = [
    text for text in stderr if "Warning" in text and not any(w in text for w in EXPECTED_WARNINGS)
  ]
  assert not unexpected, f"{path.name} shows warnings: {unexpected}"
  images = [
    out
    for cell in notebook.cells
    for out in cell.get("outputs", [])
    if "image/png" in out.get("data", {})
  ]
  assert images, f"{path.name} drew no figure"
