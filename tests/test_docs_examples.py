"""Every ```python block of README.md and docs/*.md runs as written.

Each page is one test: its blocks run in order in one fresh namespace (a later block may use
what an earlier one defined), in a process of its own, in a temporary working folder (examples
write under ``out/``).
Two HTML comments, invisible on the rendered page, steer a run:

* ``<!-- skip: reason -->`` on the line before a ```python fence: the block does not run. Every
  skip is listed in `EXPECTED_SKIPS`, so a new one fails this test until it is added there.
* ``<!-- needs: fashion_mnist -->`` anywhere on a page: the page reads Fashion-MNIST, so its test
  is marked ``real_data`` and skips (saying how to provide the data) where it is missing.

A fence whose language looks like Python but is not exactly ``python`` (```py, ```pycon,
```python title="...") must carry a skip, so that no Python example goes untested by accident.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, needs_fashion_mnist, script_env

DOCS_DIR = os.path.join(REPO_ROOT, "docs")
#: Data a page can declare with ``<!-- needs: NAME -->``, and the marks that skip without it.
NEEDS = {"fashion_mnist": needs_fashion_mnist}
#: Every block that does not run: (page, reason). Keep in step with the pages.
EXPECTED_SKIPS = ()

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)(.*)$")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(.*?)\s*-->\s*$")
_NEEDS = re.compile(r"<!--\s*needs:\s*([\w-]+)\s*-->")


def pages():
    """README.md and every docs/*.md, as paths relative to the repository root."""
    docs = sorted(f"docs/{name}" for name in os.listdir(DOCS_DIR) if name.endswith(".md"))
    return ["README.md"] + docs


def parse(text, page="<text>"):
    """The fenced blocks of a markdown text that matter here.

    Returns ``(blocks, skips, needs)``: ``blocks`` the ``(line, source)`` of each block to run
    (1-based line of its first source line), ``skips`` the ``(line, reason)`` of each skipped
    Python block, ``needs`` the data sets the page declares.

    Raises:
        ValueError: a Python-like fence without a skip, an empty skip reason, an unclosed
            fence, or a skip comment that is not followed by a Python fence.
    """
    lines = text.splitlines()
    blocks, skips, pending_skip = [], [], None
    i = 0
    while i < len(lines):
        skip = _SKIP.match(lines[i])
        if skip:
            if not skip.group(1):
                raise ValueError(f"{page}:{i + 1}: a skip comment needs a reason")
            pending_skip = (i + 1, skip.group(1))
            i += 1
            continue
        fence = _FENCE.match(lines[i])
        if not fence:
            if lines[i].strip() and pending_skip:
                raise ValueError(f"{page}:{pending_skip[0]}: a skip comment must come right "
                                 "before a ```python fence")
            i += 1
            continue
        indent, marks, language, rest = fence.groups()
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(marks)
                                        and not lines[end].strip().strip(marks[0])):
            end += 1
        if end == len(lines):
            raise ValueError(f"{page}:{i + 1}: unclosed code fence")
        is_python = language.lower() in ("python", "py", "python3", "pycon")
        if pending_skip:
            if not is_python:
                raise ValueError(f"{page}:{pending_skip[0]}: a skip comment must come right "
                                 "before a ```python fence")
            skips.append((i + 1, pending_skip[1]))
        elif is_python:
            if language != "python" or rest.strip():
                raise ValueError(
                    f"{page}:{i + 1}: the fence {lines[i].strip()!r} is Python but would not "
                    "run: write ```python, or put <!-- skip: reason --> before it")
            body = [line[len(indent):] if line.startswith(indent) else line
                    for line in lines[i + 1:end]]
            blocks.append((i + 2, "\n".join(body) + "\n"))
        pending_skip = None
        i = end + 1
    needs = tuple(sorted(set(_NEEDS.findall(text))))
    unknown = [name for name in needs if name not in NEEDS]
    if unknown:
        raise ValueError(f"{page}: unknown <!-- needs: --> data set(s) {unknown}; "
                         f"known: {sorted(NEEDS)}")
    return blocks, skips, needs


def _read(page):
    with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as handle:
        return handle.read()


def _params():
    params = []
    for page in pages():
        blocks, _, needs = parse(_read(page), page)
        if not blocks:
            continue
        marks = [mark for name in needs for mark in _marks_of(NEEDS[name])]
        params.append(pytest.param(page, id=page, marks=marks))
    return params


def _marks_of(decorator):
    """The pytest marks a conftest ``needs_*`` decorator applies (to a named function: pytest
    takes a lambda for a mark argument, not for the function to mark)."""

    def probe():
        pass

    return list(getattr(decorator(probe), "pytestmark", []))


#: Runs one page's blocks in order in one namespace (in a process of its own: a page may create
#: a tf.distribute strategy or set a global policy, which must not leak into other tests).
_RUN_PAGE = """
import sys
from tests.test_docs_examples import parse, _read
page = sys.argv[1]
namespace = {"__name__": "docs_example"}
for line, source in parse(_read(page), page)[0]:
    exec(compile(source, f"{page}:{line}", "exec"), namespace)
"""


@pytest.mark.parametrize("page", _params())
def test_page_examples_run_as_written(page, tmp_path):
    process = subprocess.run([sys.executable, "-c", _RUN_PAGE, page], cwd=tmp_path,
                             env=script_env(data_path=True), capture_output=True, text=True,
                             timeout=600, check=False)
    assert process.returncode == 0, (
        f"{page}: an example failed\n{process.stdout[-2000:]}\n{process.stderr[-6000:]}")


def test_skipped_blocks_are_exactly_the_expected_ones():
    found = tuple((page, reason) for page in pages() for _, reason in parse(_read(page), page)[1])
    assert found == EXPECTED_SKIPS


def test_pages_that_need_data_carry_its_marks():
    marks = {param.id: {mark.name for mark in param.marks} for param in _params()}
    assert marks["README.md"] == {"real_data", "skipif"}
    assert marks["docs/serving.md"] == set()


def test_every_page_with_examples_is_run():
    # The pages that hold Python blocks; a page whose blocks all moved elsewhere drops out here.
    with_blocks = [page for page in pages() if parse(_read(page), page)[0]]
    assert "README.md" in with_blocks
    assert len(with_blocks) == len(_params())


def test_readme_is_a_landing_page():
    text = _read("README.md")
    assert len(text.splitlines()) <= 200
    first_screen = "\n".join(text.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen


# ------------------------------------------------------------------ the parser, on hand cases
def test_parse_runs_python_blocks_in_order_and_ignores_other_languages():
    text = ("# t\n```python\na = 1\n```\n\n```sh\nmake test\n```\n"
            "    ```python\n    b = a + 1\n    ```\n")
    blocks, skips, needs = parse(text)
    assert blocks == [(3, "a = 1\n"), (10, "b = a + 1\n")]
    assert skips == [] and needs == ()


def test_parse_counts_a_skip_with_its_reason():
    text = "<!-- skip: needs a TF Serving server -->\n```python\nserve()\n```\n```python\nx = 1\n```\n"
    blocks, skips, _ = parse(text)
    assert blocks == [(6, "x = 1\n")]
    assert skips == [(2, "needs a TF Serving server")]


@pytest.mark.parametrize("text, message", [
    ("```py\nx = 1\n```\n", "would not run"),
    ("```pycon\n>>> x = 1\n```\n", "would not run"),
    ('```python title="a.py"\nx = 1\n```\n', "would not run"),
    ("<!-- skip: -->\n```python\nx = 1\n```\n", "needs a reason"),
    ("<!-- skip: later -->\ntext\n```python\nx = 1\n```\n", "right before"),
    ("<!-- skip: shell -->\n```sh\nls\n```\n", "right before"),
    ("```python\nx = 1\n", "unclosed"),
    ("<!-- needs: imagenet -->\n```python\nx = 1\n```\n", "unknown"),
])
def test_parse_refuses_untested_python_and_bad_markers(text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_parse_reads_the_page_needs():
    _, _, needs = parse("<!-- needs: fashion_mnist -->\n```python\nx = 1\n```\n")
    assert needs == ("fashion_mnist",)


# ------------------------------------------- the site's doctest hook (mkdocs_hooks.py), by hand
def test_doctest_hook_fences_prose_doctests_and_leaves_fenced_code_alone():
    markdown = pytest.importorskip("markdown")
    import mkdocs_hooks  # pylint: disable=import-outside-toplevel

    source = ("Text.\n\n>>> plan.learning_rate(0)\n[0.1, 0.01]\n\nMore text.\n\n"
              "```python\n>>> inside_a_fence\n```\n\n    >>> indented\n    (1, 2)\n")
    lines = mkdocs_hooks._DoctestFences(None).run(source.splitlines())  # pylint: disable=protected-access
    assert lines == [
        "Text.", "", "", "```pycon", ">>> plan.learning_rate(0)", "[0.1, 0.01]", "```", "",
        "More text.", "", "```python", ">>> inside_a_fence", "```", "",
        "", "    ```pycon", "    >>> indented", "    (1, 2)", "    ```",
    ]
    html = markdown.markdown(source, extensions=["fenced_code",
                                                 mkdocs_hooks.DoctestFencesExtension()])
    assert "<code" in html and "[0.1, 0.01]" in html and "<a " not in html
