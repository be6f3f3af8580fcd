// Typesets the maths with KaTeX (copied into the site by docs/_hooks.py; no network).
// Markdown pages: pymdownx.arithmatex (generic mode) wraps each formula in an .arithmatex
// element as \( ... \) or \[ ... \]. Notebook pages (mkdocs-jupyter) keep $ ... $ and
// $$ ... $$ in their Markdown cells.
document$.subscribe(({ body }) => {
  if (typeof renderMathInElement === "undefined") return; // KaTeX not installed: LaTeX shown
  const brackets = [
    { left: "\\(", right: "\\)", display: false },
    { left: "\\[", right: "\\]", display: true },
  ];
  const dollars = [
    { left: "$$", right: "$$", display: true },
    { left: "$", right: "$", display: false },
  ];
  for (const el of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(el, { delimiters: brackets, throwOnError: false });
  }
  for (const el of body.querySelectorAll(".jupyter-wrapper .jp-MarkdownOutput")) {
    renderMathInElement(el, { delimiters: dollars.concat(brackets), throwOnError: false });
  }
});
