"""The README's example and the demo run as documented."""

import pathlib
import re

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


def test_notebooks_run_top_to_bottom():
  import json

  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    cells = json.loads(path.read_text())["cells"]
    assert all(not c.get("outputs") for c in cells), f"{path.name}: outputs not stripped"
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    exec(compile(code, str(path), "exec"), {})
