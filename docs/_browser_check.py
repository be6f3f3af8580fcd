"""Loads the built site in headless Chromium, as a reader would, and checks what it shows.

Run after ``mkdocs build`` (CI does: see README.md's test command)::

  python3 docs/_browser_check.py [--site build/site] [--out build/screenshots]

It serves the site on localhost (no other address is reached: every request off the site
fails the page) and, on each key page, checks that

- the page loads with no failed request and no script error;
- the maths is typeset: every formula is a KaTeX element, none is a KaTeX error, and no
  ``\\frac``, ``\\text`` or ``.. math::`` is left in the visible text;
- every image has loaded (``naturalWidth > 0``);
- no seed document is named by its number ("seed 002") instead of its paper;
- no Markdown table is left as raw pipes (a visible line that starts with ``|`` and holds
  `` | ``);
- nothing wide is cut off: a table, code block, image or formula wider than the page sits
  in a box that scrolls;

and on the home page that the repository link, the dark-mode toggle and the search work.
It saves a screenshot of each page (the first screen, and the whole page) to the ``--out``
folder, git-ignored, for a person to look at, and prints its path.

Chromium is Debian's (``apt-get install chromium``), driven by playwright (PyPI; its own
browser download is never used). Without chromium it says so and exits 0, except under CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import pathlib
import shutil
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The one request off the site a page may make: the header's repository facts (stars,
# latest release), which the theme asks GitHub for and leaves out when it cannot reach it.
OPTIONAL = ("https://api.github.com/repos/",)
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")

# (page, what it must show): the pages a new user reads first, one of each kind.
PAGES = [
  ("", "home"),
  ("getting_started/", "getting-started"),
  ("depth_labels/", "depth-labels"),
  ("methods/", "methods"),
  ("methods/layerwise_normalize/", "method-layerwise-normalize"),
  ("methods/depth_decay/", "method-depth-decay"),
  ("methods/bgn/", "method-bgn"),
  ("methods/scale_normalize/", "method-scale-normalize"),
  ("gradient_flow/", "gradient-flow"),
  ("design/", "design"),
  ("notebooks/", "notebooks"),
  ("notebooks/01_quickstart/", "notebook-01"),
  ("notebooks/02_bgn/", "notebook-02"),
  ("notebooks/03_diagnose_and_fix/", "notebook-03"),
  ("notebooks/04_scale_normalize/", "notebook-04"),
  ("api/", "api"),
  ("api/transforms/", "api-transforms"),
  ("api/bgn/", "api-bgn"),
  ("api/depths/", "api-depths"),
  ("api/diagnostics/", "api-diagnostics"),
  ("api/plotting/", "api-plotting"),
  ("results/", "results"),
  ("results/vgg-flow/results/", "results-vgg-flow"),
  ("results/bgn-table/results/", "results-bgn-table"),
  ("changelog/", "changelog"),
]
# Pages that must have typeset maths (a formula at least).
WITH_MATHS = {
  "methods/layerwise_normalize/",
  "methods/bgn/",
  "methods/scale_normalize/",
  "api/transforms/",
  "api/diagnostics/",
  "notebooks/02_bgn/",
}

# Runs in the page: what a reader sees, and what is wrong with it.
INSPECT = r"""
() => {
  const problems = [];
  const article = document.querySelector("article") || document.body;
  // The visible text, without code (which may hold anything) and without KaTeX's MathML copy
  // of each formula (its TeX source, hidden from view).
  const hidden = [...article.querySelectorAll("pre, code, .katex-mathml, script, style")];
  const displays = hidden.map((el) => el.style.display);
  hidden.forEach((el) => (el.style.display = "none"));
  const text = article.innerText;
  hidden.forEach((el, i) => (el.style.display = displays[i]));
  for (const raw of ["\\frac", "\\text", ".. math::", "\\mathrm", "\\left", "\\|", "$$"]) {
    const at = text.indexOf(raw);
    if (at >= 0) {
      problems.push(`raw LaTeX ${raw} in the text: "${text.slice(Math.max(0, at - 40), at + 40)}"`);
    }
  }
  const seed = text.match(/.{0,40}\bseed[\s-]+00[0-4]\b.{0,20}/i);
  if (seed) problems.push(`a seed document named by its number, not its paper: "${seed[0]}"`);
  for (const line of text.split("\n")) {
    if (line.trim().startsWith("|") && line.includes(" | ")) {
      problems.push(`a Markdown table left as text: "${line.slice(0, 100)}"`);
    }
  }
  const maths = [...article.querySelectorAll(".arithmatex")];
  const untypeset = maths.filter((el) => !el.querySelector(".katex"));
  if (untypeset.length) {
    problems.push(`${untypeset.length} of ${maths.length} formulas not typeset, e.g. ` +
                  `"${untypeset[0].textContent.slice(0, 80)}"`);
  }
  for (const el of article.querySelectorAll(".katex-error")) {
    problems.push(`KaTeX error: ${el.title || el.textContent.slice(0, 80)}`);
  }
  for (const img of document.querySelectorAll("img")) {
    if (!img.complete || img.naturalWidth === 0) {
      problems.push(`image not loaded: ${img.getAttribute("src").slice(0, 100)}`);
    }
  }
  // Wide content must scroll in its own box, not run off the page.
  const right = (document.querySelector(".md-content") || article).getBoundingClientRect().right;
  const wide = article.querySelectorAll(
    "table, pre, img, svg, .katex-display, .jp-OutputArea-output");
  for (const el of wide) {
    if (el.closest(".katex") && !el.classList.contains("katex-display")) continue;
    if (el.getBoundingClientRect().right <= right + 1) continue;
    let box = el.parentElement, scrolls = false;
    while (box && box !== document.body) {
      const overflow = getComputedStyle(box).overflowX;
      if ((overflow === "auto" || overflow === "scroll") &&
          box.getBoundingClientRect().right <= right + 1) { scrolls = true; break; }
      box = box.parentElement;
    }
    if (!scrolls) {
      problems.push(`cut off on the right: <${el.tagName.toLowerCase()} class="${el.className}">`);
    }
  }
  if (document.documentElement.scrollWidth > window.innerWidth + 1) {
    problems.push(`the page scrolls sideways (${document.documentElement.scrollWidth} px wide)`);
  }
  return {
    problems,
    formulas: article.querySelectorAll(".katex").length,
    images: document.querySelectorAll("img").length,
  };
}
"""


def find_chromium() -> str | None:
  """Debian's chromium (or $CHROMIUM)."""
  for path in [os.environ.get("CHROMIUM"), *CHROMIUM, shutil.which("chromium")]:
    if path and os.access(path, os.X_OK):
      return path
  return None


def serve(site: pathlib.Path) -> tuple[http.server.ThreadingHTTPServer, str]:
  """Serves `site` on a free localhost port, in a thread."""

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  handler = functools.partial(Quiet, directory=str(site))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://127.0.0.1:{server.server_address[1]}/"


def check_page(page, base: str, path: str, name: str, out: pathlib.Path) -> list[str]:
  """Loads one page; returns what is wrong with it, and saves its screenshots."""
  failed: list[str] = []
  page.on(
    "requestfailed",
    lambda r: r.url.startswith(OPTIONAL) or failed.append(f"request failed: {r.url}"),
  )
  page.on("response", lambda r: r.status >= 400 and failed.append(f"HTTP {r.status}: {r.url}"))
  page.on("pageerror", lambda e: failed.append(f"script error: {e}"))
  response = page.goto(base + path, wait_until="load")
  if response is None or response.status != 200:
    return [f"HTTP {response.status if response else '?'}"]
  page.wait_for_function("document.fonts.status === 'loaded'")  # and KaTeX has run
  found = page.evaluate(INSPECT)
  problems = failed + found["problems"]
  if path in WITH_MATHS and found["formulas"] == 0:
    problems.append("no typeset formula on a page that has maths")
  page.screenshot(path=out / f"{name}.png")
  page.screenshot(path=out / f"{name}-full.png", full_page=True)
  return problems


def check_home(page, base: str, out: pathlib.Path) -> list[str]:
  """The repository link, the dark-mode toggle and the search, on the home page."""
  problems = []
  page.goto(base, wait_until="networkidle")
  repo = page.locator("a.md-source")
  expected = _repository_url()
  if repo.count() == 0 or repo.first.get_attribute("href") != expected:
    problems.append(f"no repository link to {expected} in the header")
  toggle = page.locator("form[data-md-component=palette] label:visible")
  if toggle.count() == 0:
    problems.append("no dark-mode toggle")
  else:
    toggle.first.click()
    page.wait_for_timeout(300)
    scheme = page.evaluate("document.body.getAttribute('data-md-color-scheme')")
    if scheme != "slate":
      problems.append(f"the toggle gave the colour scheme {scheme!r}, not the dark 'slate'")
    page.screenshot(path=out / "home-dark.png")
  page.goto(base, wait_until="networkidle")
  page.locator("input.md-search__input").click()
  page.keyboard.type("depth_decay")
  try:
    page.locator(".md-search-result__item").first.wait_for(timeout=10_000)
  except Exception:  # playwright's TimeoutError
    problems.append("the search for 'depth_decay' found nothing")
  page.screenshot(path=out / "home-search.png")
  return problems


def _repository_url() -> str:
  sys.path.insert(0, str(ROOT / "docs"))
  from _hooks import repository_url

  return repository_url()


def main(argv: list[str] | None = None) -> int:
  """Checks the built site; returns the exit status (0: every page passed)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--site", type=pathlib.Path, default=ROOT / "build" / "site")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "build" / "screenshots")
  args = parser.parse_args(argv)
  chromium = find_chromium()
  if chromium is None:
    print("browser check: no chromium (apt-get install chromium)", file=sys.stderr)
    return 1 if os.environ.get("CI") else 0
  if not (args.site / "index.html").exists():
    print(f"browser check: no site at {args.site}: run mkdocs build first", file=sys.stderr)
    return 1
  from playwright.sync_api import sync_playwright

  args.out.mkdir(parents=True, exist_ok=True)
  for old in args.out.glob("*.png"):
    old.unlink()
  start = time.perf_counter()
  server, base = serve(args.site.resolve())
  report: dict[str, list[str]] = {}
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
      context = browser.new_context(viewport={"width": 1280, "height": 900})
      context.set_default_timeout(15_000)
      # The site must work offline: any request off it fails the page.
      context.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith(base) else route.abort(),
      )
      for path, name in PAGES:
        page = context.new_page()
        report[path or "/"] = check_page(page, base, path, name, args.out)
        page.close()
      page = context.new_page()
      report["/ (header, dark mode, search)"] = check_home(page, base, args.out)
      # A narrow screen (a phone): nothing may run off the page.
      narrow = browser.new_context(viewport={"width": 390, "height": 844})
      narrow.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith(base) else route.abort(),
      )
      for path, name in [("", "home"), ("results/vgg-flow/results/", "results-vgg-flow")]:
        page = narrow.new_page()
        report[f"{path or '/'} (390 px wide)"] = check_page(
          page, base, path, f"{name}-narrow", args.out
        )
      browser.close()
  finally:
    server.shutdown()
  bad = {k: v for k, v in report.items() if v}
  for path, problems in report.items():
    print(f"{'FAIL' if problems else 'ok  '} {path}")
    for problem in problems:
      print(f"       {problem}")
  seconds = time.perf_counter() - start
  print(f"browser check: {len(report) - len(bad)} of {len(report)} pages passed in {seconds:.0f} s")
  print(f"screenshots: {args.out}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
