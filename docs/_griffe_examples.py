"""Griffe extension for the API reference: reads a Google-style ``Example:`` section.

Griffe's Google parser knows ``Examples:`` (plural) as the section of doctests and renders
any other title, ``Example:`` included, as an admonition of Markdown text, where ``>>>``
lines become block quotes. The docstrings here say ``Example:`` (the project's style), so
this extension renames the section before the docstrings are parsed.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)


class ExampleSections(griffe.Extension):
  """Renames ``Example:`` to ``Examples:`` in every docstring griffe loads."""

  def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
    """Rewrites the object's docstring in place, before it is parsed."""
    if obj.docstring is not None:
      obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
