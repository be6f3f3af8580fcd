"""The documentation: runnable examples everywhere a reader looks, notebooks ready for Colab.

The site itself is built by CI with `mkdocs build --strict` (the README's test command),
which also checks every link and that every page is in the navigation.
"""

import inspect
import json
import pathlib
import re
import sys

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


API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))


def _documented():
  """{identifier: page} for every `::: identifier` directive on the API pages."""
  found = {}
  for page in API_PAGES:
    for name in re.findall(r"^::: (\S+)$", page.read_text(), re.M):
      assert name not in found, f"{name} is rendered on {found[name]} and on {page.name}"
      found[name] = page.name
  return found


def test_every_public_name_is_on_an_api_page():
  """Each name of `odn.__all__` and `odn.nnx.__all__` has its own `:::` entry (optax's check).

  A name added to `__all__` without an entry on a docs/api/ page fails here: add it to the
  page of its topic.
  """
  documented = _documented()
  public = [f"optax_depthnorm.{n}" for n in odn.__all__]
  public += [f"optax_depthnorm.nnx.{n}" for n in odn.nnx.__all__]
  missing = [n for n in public if n not in documented]
  assert not missing, f"public names on no page of docs/api/: {missing}"
  # ... and nothing on the pages that is not public (a renamed or removed name).
  extra = [n for n in documented if n not in public and n != "optax_depthnorm.linen"]
  assert not extra, f"docs/api/ renders names that are not in __all__: {extra}"


def test_api_pages_are_in_the_nav_by_topic():
  nav = (ROOT / "mkdocs.yml").read_text()
  names = [p.stem for p in API_PAGES]
  assert sorted(names) == ["bgn", "depths", "diagnostics", "index", "plotting", "transforms"]
  assert all(f" api/{n}.md\n" in nav for n in names)


def test_home_page_example_prints_what_the_page_shows(capsys):
  """docs/index.md's ten lines run and print the output written under them."""
  text = (ROOT / "docs" / "index.md").read_text()
  code, shown = re.search(
    r"<!-- runs in tests[^\n]*-->\n```python\n(.*?)```\n.*?```text\n(.*?)```", text, re.S
  ).groups()
  assert len(code.strip().splitlines()) <= 12
  exec(compile(code, "docs/index.md", "exec"), {})
  assert capsys.readouterr().out == shown


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


def _pyproject():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _repository():
  return _pyproject()["project"]["urls"]["Repository"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_installs_only_on_colab_from_the_repository(path):
  """First code cell: on Colab only, pip installs from REPO (pyproject's URL), extras that
  pyproject defines and no pins of its own, and stops with a message when pip fails."""
  first = "".join(next(c for c in _cells(path) if c["cell_type"] == "code")["source"])
  repo = re.search(r'^REPO = "(.*)"$', first, re.M).group(1)
  assert repo == _repository()
  assert re.search(r'^if "google.colab" in sys.modules:', first, re.M)
  spec = re.search(
    r'^  pip = \[sys\.executable, "-m", "pip", "install", "-q", '
    r'f"optax_depthnorm\[([\w,]+)\] @ git\+\{REPO\}"\]$',
    first,
    re.M,
  )
  assert spec, "the install is not `optax_depthnorm[extras] @ git+{REPO}` alone"
  extras = _pyproject()["project"]["optional-dependencies"]  # the pins live there
  assert all(e in extras for e in spec.group(1).split(","))
  assert re.search(r"if result.returncode != 0:\n.*\n    raise RuntimeError\(", first)
  assert 'os.environ.get("ODN_NOTEBOOK_QUICK") == "1"' in first


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_an_open_in_colab_badge(path):
  title = "".join(_cells(path)[0]["source"])
  slug = _repository().split("github.com/")[1]
  link = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name}"
  assert (
    f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({link})" in title
  )


def test_the_repository_url_is_the_one_in_pyproject():
  """No placeholder left, and every link to the project's repository is pyproject's URL."""
  repo = _repository()
  files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *NOTEBOOKS, *(ROOT / "docs").rglob("*.md")]
  for path in files:
    text = path.read_text()
    assert "github.com/OWNER" not in text, path
    for url in re.findall(r"https://github\.com/[\w.-]+/optax_depthnorm", text):
      assert url == repo, f"{path.relative_to(ROOT)}: {url} is not {repo}"
  pytest.importorskip("mkdocs")  # the [docs] extra
  sys.path.insert(0, str(ROOT / "docs"))
  try:
    import _hooks
  finally:
    sys.path.remove(str(ROOT / "docs"))
  assert _hooks.repository_url() == repo  # the site's repo_url


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_a_title(path):
  first = _cells(path)[0]
  assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ")
