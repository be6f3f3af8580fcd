"""MkDocs hook: links to repository files that the site shows as pages of its own.

The Markdown files link to each other as they lie in the repository, so the links work
when browsing the repository; a few of them point outside ``docs/`` at files that the
site includes as pages (``docs/benchmarks.md`` includes ``benchmarks/README.md``). This
hook rewrites those links to the site's pages.
"""

import posixpath
import re

# repository path -> the docs page that shows it
SITE_PAGES = {
  "benchmarks/README.md": "benchmarks.md",
  "CHANGELOG.md": "changelog.md",
}
_LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown, page, **kwargs):
  """Points links at `SITE_PAGES` files to their pages, relative to this page."""
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

  return _LINK.sub(rewrite, markdown)
