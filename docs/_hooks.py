"""MkDocs hook: the repository URL, KaTeX, the notebooks and links for the site.

- The repository URL is written once, in pyproject.toml's ``[project.urls]``; the site's
  ``repo_url`` (the link in the header) is read from there.
- Maths is typeset by KaTeX, in the browser, from files on this machine: the Debian package
  ``libjs-katex`` (``apt-get install libjs-katex``), or the KaTeX folder named by the
  ``ODN_KATEX_DIR`` environment variable (``ODN_KATEX_DIR=`` builds without it). They are
  copied into the built site, so the pages need no network. Without them the build still
  succeeds, says so, and the pages show the LaTeX source.
- The notebooks (``notebooks/*.ipynb``, stored without outputs) become pages through
  mkdocs-jupyter. The test suite writes an executed copy of each to ``build/notebooks/``
  (tests/test_examples.py); where one is there and its code is the notebook's, the page shows
  its outputs, otherwise the notebook as stored. A note on each page says which.
- The Markdown files link to each other as they lie in the repository, so the links work
  when browsing the repository; a few of them point outside ``docs/`` at files that the
  site shows as pages (``docs/benchmarks.md`` includes ``benchmarks/README.md``). This hook
  rewrites those links to the site's pages.
- The committed experiment records (``docs/results/*/results.md``) keep the titles they were
  written with, some naming the seed documents by number; their pages name the papers.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import posixpath
import re
import shutil

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXECUTED = ROOT / "build" / "notebooks"  # written by tests/test_examples.py

# repository path -> the docs page that shows it
SITE_PAGES = {
  "benchmarks/README.md": "benchmarks.md",
  "CHANGELOG.md": "changelog.md",
  **{f"notebooks/{p.name}": f"notebooks/{p.name}" for p in NOTEBOOKS},
}
_LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?P<anchor>#[^)\s]*)?\)")

# The seed documents (shared/seeds/README.md), as the pages name them.
PAPERS = {
  "000": "Kwiatkowski & Chang",
  "001": "the normalization tutorial",
  "002": "the vanishing-gradient report",
  "003": "Cabana & Lago-Fernández",
  "004": "Lo, Amaral & Ding",
}
_SEED = re.compile(r"\bseed[\s-]+(00[0-4])\b", re.I)

KATEX_DIRS = ("/usr/share/javascript/katex", "/usr/share/nodejs/katex/dist")
KATEX_SITE = "assets/katex"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"

# Outside the "mkdocs" logger tree: a missing KaTeX is reported, but does not fail --strict
# (CI installs it, and docs/_browser_check.py fails where the maths is not typeset).
_log = logging.getLogger("optax_depthnorm.docs")
_katex: pathlib.Path | None = None


def repository_url() -> str:
  """The ``Repository`` entry of pyproject.toml's ``[project.urls]``."""
  text = (ROOT / "pyproject.toml").read_text()
  section = re.search(r"^\[project\.urls\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
  match = section and re.search(r'^Repository\s*=\s*"([^"]+)"', section.group(1), re.M)
  if not match:
    raise ValueError("pyproject.toml: no Repository entry in [project.urls]")
  return match.group(1)


def find_katex() -> pathlib.Path | None:
  """A folder holding katex.min.js, katex.min.css, contrib/auto-render.js and fonts/."""
  env = os.environ.get("ODN_KATEX_DIR")  # where set, the only folder looked in
  for folder in [env] if env is not None else KATEX_DIRS:
    path = pathlib.Path(folder)
    if all((path / f).exists() for f in ("katex.min.js", "katex.min.css", "fonts")) and (
      _auto_render(path) is not None
    ):
      return path
  return None


def _auto_render(path: pathlib.Path) -> pathlib.Path | None:
  for name in ("auto-render.min.js", "auto-render.js"):
    if (path / "contrib" / name).exists():
      return path / "contrib" / name
  return None


def on_config(config, **kwargs):
  """Sets ``repo_url`` from pyproject.toml and adds KaTeX's files where they are found."""
  global _katex
  url = repository_url()
  config.repo_url = config.repo_url or url
  if not config.repo_name:
    config.repo_name = "/".join(url.rstrip("/").split("/")[-2:])
  _katex = find_katex()
  if _katex is None:
    _log.warning(
      "KaTeX not found (looked in %s): the maths is shown as LaTeX "
      "source. Install it with `apt-get install libjs-katex`.",
      os.environ.get("ODN_KATEX_DIR", ", ".join(KATEX_DIRS)) or "$ODN_KATEX_DIR, empty",
    )
    return config
  config.extra_css.insert(0, f"{KATEX_SITE}/katex.min.css")
  scripts = [f"{KATEX_SITE}/katex.min.js", f"{KATEX_SITE}/contrib/auto-render.js"]
  config.extra_javascript[:0] = scripts
  return config


@event_priority(100)  # before mkdocs-jupyter's, which turns .ipynb files into pages
def on_files(files, config, **kwargs):
  """Adds each notebook as ``notebooks/NAME.ipynb``: its executed copy where it is current."""
  for path in NOTEBOOKS:
    src_dir = EXECUTED.parent if _is_current(EXECUTED / path.name, path) else ROOT
    files.append(
      File(
        f"notebooks/{path.name}",
        src_dir=str(src_dir),
        dest_dir=config.site_dir,
        use_directory_urls=config.use_directory_urls,
      )
    )
  return files


def _code(path: pathlib.Path) -> list[str]:
  cells = json.loads(path.read_text())["cells"]
  return ["".join(c["source"]) for c in cells]


def _is_current(executed: pathlib.Path, notebook: pathlib.Path) -> bool:
  """Whether `executed` exists and has the cells of `notebook` (with outputs added)."""
  try:
    return _code(executed) == _code(notebook)
  except (OSError, ValueError, KeyError):
    return False


def on_page_markdown(markdown, page, **kwargs):
  """Points links at `SITE_PAGES` files to their pages; names the papers in the records."""
  page_dir = posixpath.dirname(page.file.src_uri)

  def rewrite(match):
    target = match.group("target")
    if "://" in target:
      return match.group(0)
    in_repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
    if in_repo not in SITE_PAGES:
      return match.group(0)
    new = posixpath.relpath(SITE_PAGES[in_repo], page_dir or ".")
    return f"]({new}{match.group('anchor') or ''})"

  markdown = _LINK.sub(rewrite, markdown)
  if page.file.src_uri.startswith("results/"):
    markdown = _SEED.sub(lambda m: PAPERS[m.group(1)], markdown)
    if page.file.src_uri != "results/README.md":  # a record: its wide tables get the room
      page.meta.setdefault("hide", ["navigation", "toc"])
  return markdown


_MATHJAX = re.compile(
  r"<script[^>]*>[^<]*MathJax[^<]*</script>|<script[^>]*mathjax[^>]*></script>", re.I
)


def on_page_content(html, page, config, **kwargs):
  """Notebook pages: a note on their outputs, the local Colab badge, no MathJax from a CDN."""
  src = page.file.abs_src_path or ""
  if not src.endswith(".ipynb"):
    return html
  html = _MATHJAX.sub("", html)  # KaTeX typesets the notebooks' maths too
  badge = posixpath.relpath("assets/colab-badge.svg", posixpath.dirname(page.file.dest_uri))
  html = html.replace(COLAB_BADGE, badge)
  name = pathlib.Path(src).name
  if pathlib.Path(src).parent == EXECUTED:
    note = (
      "The outputs below are from the test suite's run of this notebook "
      "(<code>ODN_NOTEBOOK_QUICK=1</code>: a few training steps per model, so the numbers "
      "and curves are those of a short run). Open it in Colab, or run it locally, for the "
      "full run."
    )
  else:
    note = (
      "Shown as stored, without outputs: this build found no current executed copy in "
      "<code>build/notebooks/</code>, which the test suite writes "
      "(<code>python3 -m pytest tests/test_examples.py -k notebook</code>)."
    )
  source = f"{config.repo_url.rstrip('/')}/blob/main/notebooks/{name}"
  note += f' The notebook\'s source: <a href="{source}"><code>notebooks/{name}</code></a>.'
  admonition = (
    f'<div class="admonition note"><p class="admonition-title">Note</p><p>{note}</p></div>'
  )
  # Under the title and the Colab badge (the first Markdown cell), else at the top.
  at = html.find("</p>", html.find(badge)) if badge in html else -1
  if at < 0:
    return admonition + html
  at += len("</p>")
  return html[:at] + admonition + html[at:]


def on_post_build(config, **kwargs):
  """Copies KaTeX's script, style sheet and fonts (woff2) into the site."""
  if _katex is None:
    return
  out = pathlib.Path(config.site_dir) / KATEX_SITE
  (out / "contrib").mkdir(parents=True, exist_ok=True)
  (out / "fonts").mkdir(exist_ok=True)
  for name in ("katex.min.js", "katex.min.css"):
    shutil.copyfile(_katex / name, out / name)
  shutil.copyfile(_auto_render(_katex), out / "contrib" / "auto-render.js")
  fonts = sorted((_katex / "fonts").glob("*.woff2")) or sorted((_katex / "fonts").iterdir())
  for font in fonts:
    shutil.copyfile(font, out / "fonts" / font.name)
