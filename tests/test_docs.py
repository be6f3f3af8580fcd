"""The documentation: runnable examples everywhere a reader looks, notebooks ready for Colab.

The site itself is built by CI with `mkdocs build --strict` (the README's test command),
which also checks every link and that every page is in the navigation.
"""

import inspect
import json
import pathlib
import re

import pytest

import optax_depthnorm as odn

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _public():
  """(name, object) for every public name: `odn.__all__` and `odn.nnx.__all__`."""
  names = [(f"odn.{n}", getattr(odn, n)) for n in odn.__all__]
  names += [(f"odn.nnx.{n}", getattr(odn.nnx, n)) for n in odn.nnx.__all__]
  # Plain constants (a sentinel int) have no docstring of their own.
  return [(n, o) for n, o in names if inspect.isclass(o) or callable(o) or inspect.ismodule(o)]


@pytest.mark.parametrize(("name", "obj"), _public(), ids=[n for n, _ in _public()])
def test_public_name_has_a_runnable_example(name, obj):
  """Each docstring has an Example section with doctest lines (which --doctest-modules runs)."""
  doc = inspect.getdoc(obj) or ""
  assert doc.splitlines() and doc.splitlines()[0].strip(), f"{name}: no one-line summary"
  match = re.search(r"^Example:\n(.*?)(?=^\S|\Z)", doc, re.S | re.M)
  assert match, f"{name}: no 'Example:' section"
  assert re.search(r"^\s+>>> \S", match.group(1), re.M), f"{name}: its Example has no >>> line"


def test_api_page_renders_all_public_names():
  """The API page renders `optax_depthnorm` filtered by `__all__`, and the nnx module."""
  text = (ROOT / "docs" / "api.md").read_text()
  assert re.search(r"^::: optax_depthnorm\n\s+options:(.|\n)*filters: public", text, re.M)
  assert "::: optax_depthnorm.nnx" in text


def test_getting_started_training_loop_runs(capsys):
  text = (ROOT / "docs" / "getting_started.md").read_text()
  blocks = re.findall(r"<!-- runs in tests -->\n```python\n(.*?)```", text, re.S)
  assert len(blocks) == 1
  namespace: dict = {}
  exec(compile(blocks[0], "docs/getting_started.md", "exec"), namespace)
  out = capsys.readouterr().out
  assert out.splitlines()[0].split() == ["depth", "path", "shape", "dtype"]
  assert "layers_12/kernel" in out  # the head, at depth 6
  assert float(namespace["loss"]) < 0.6  # 0.69 at init


def _links(path):
  for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
    if "://" not in target and not target.startswith(("#", "mailto:")):
      yield target.split("#")[0]


@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md", "benchmarks/README.md"])
def test_repository_links_resolve(page):
  """Links outside docs/ (mkdocs checks those inside) point at files that exist."""
  missing = [t for t in _links(ROOT / page) if not (ROOT / page).parent.joinpath(t).exists()]
  assert not missing, f"{page} links to missing files: {missing}"


def test_every_docs_page_is_in_the_nav():
  nav = (ROOT / "mkdocs.yml").read_text()
  pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
  pages = {p for p in pages if not p.startswith("results/") or p == "results/README.md"}
  assert not [p for p in sorted(pages) if f" {p}\n" not in nav]


# ----------------------------------------------------------------------------- notebooks


def _cells(path):
  return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_stripped(path):
  for cell in _cells(path):
    if cell["cell_type"] == "code":
      assert cell.get("outputs") == [] and cell.get("execution_count") is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_installs_only_on_colab_from_the_documented_url(path):
  """First code cell: `%pip install` under `if "google.colab" in sys.modules`, from REPO."""
  first = "".join(next(c for c in _cells(path) if c["cell_type"] == "code")["source"])
  repo = re.search(r'^REPO = "(.*)"$', first, re.M).group(1)
  assert repo in (ROOT / "docs" / "getting_started.md").read_text()
  assert re.search(
    r'^if "google.colab" in sys.modules:.*\n  %pip install .*git\+\{REPO\}', first, re.M
  )
  assert 'os.environ.get("ODN_NOTEBOOK_QUICK") == "1"' in first


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_a_title(path):
  first = _cells(path)[0]
  assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ")
