"""MkDocs hook: show the doctest examples of docstrings and pages as code blocks.

The API pages render the package's docstrings as Markdown. A doctest written in a docstring's
prose (``>>> x[0]`` followed by its output ``[0.1, 0.2]``) would be read as Markdown text: its
brackets as reference links, which ``mkdocs build --strict`` rejects as unresolved. This hook
adds a Markdown preprocessor (used by the pages and by mkdocstrings alike) that fences every run
of doctest lines, from a ``>>>`` line to the next blank line, as a ``pycon`` code block.
"""

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor

_FENCE = re.compile(r"^\s*(```|~~~)")
_PROMPT = re.compile(r"^(\s*)>>> ")


class _DoctestFences(Preprocessor):
    """Wraps doctest runs that are not already inside a fenced block in a pycon fence."""

    def run(self, lines):
        out, in_fence, in_doctest, indent = [], False, False, ""
        for line in lines:
            if in_doctest and not line.strip():
                out.append(indent + "```")
                in_doctest = False
            if not in_doctest and _FENCE.match(line):
                in_fence = not in_fence
            prompt = _PROMPT.match(line)
            if prompt and not in_fence and not in_doctest:
                indent = prompt.group(1)
                out.extend(["", indent + "```pycon"])
                in_doctest = True
            out.append(line)
        if in_doctest:
            out.append(indent + "```")
        return out


class DoctestFencesExtension(Extension):
    """The Markdown extension that registers `_DoctestFences` ahead of the fenced-code parser."""

    def extendMarkdown(self, md):  # noqa: N802 (Markdown's API name)
        md.preprocessors.register(_DoctestFences(md), "ft_keras_doctest_fences", 40)


def on_config(config):
    """Adds the doctest-fence extension to the site's Markdown extensions."""
    config.markdown_extensions.append(DoctestFencesExtension())
    return config
