"""Checks that the top-level Bazel ``BUILD`` file and the source tree agree, without Bazel.

Starlark is (for a BUILD file) a subset of Python syntax, so the file is parsed with `ast` and the
rule calls are read off the top level. The tree is globbed when the test runs, so adding a module,
test, example or benchmark script without a BUILD target (or deleting a file that BUILD still
lists) makes this test fail until BUILD is updated.

Rules checked:

* every ``ft_keras/**/*.py`` is in the ``srcs`` of some ``py_library``, and every file a
  ``py_library`` lists exists;
* every ``tests/test_*.py`` has exactly one ``py_test`` whose ``srcs`` contain it (and whose
  ``main``, if given, is that file); every ``py_test`` lists the library in ``deps`` and every
  file it lists exists;
* every ``examples/*.py`` and ``bench/*.py`` is in the ``srcs`` of some ``py_binary``, and every
  file a ``py_binary`` lists exists;
* a ``py_test`` / ``py_binary`` without ``main`` has a src named ``<name>.py`` (Bazel's default),
  and a given ``main`` is among its ``srcs``;
* every ``py_*`` rule used is loaded from ``@rules_python``; no two targets share a name.
"""

import ast
import collections
import dataclasses
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).absolute().parent.parent
BUILD_NAME = "BUILD"
PACKAGE_DIR = "ft_keras"
PACKAGE_INIT = f"{PACKAGE_DIR}/__init__.py"
SCRIPT_DIRS = ("examples", "bench")
PY_RULES = ("py_library", "py_test", "py_binary")
RULES_PYTHON_DEFS = "@rules_python//python:defs.bzl"


class NotLiteral(ValueError):
    """An attribute value that is not a plain string / list-of-strings expression."""


@dataclasses.dataclass
class Target:
    kind: str
    name: str
    lineno: int
    attrs: dict  # attribute name -> ast expression node

    def __str__(self):
        return f"{self.kind}(name = {self.name!r}) at line {self.lineno}"


def _literal(node):
    """Value of a string, a list/tuple of strings, or a `+` of those; raises NotLiteral otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(elt) for elt in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left), _literal(node.right)
        if type(left) is not type(right):
            raise NotLiteral("`+` of a string and a list")
        return left + right
    raise NotLiteral(ast.unparse(node))


def parse_build(text, filename=BUILD_NAME):
    """Returns (targets, loads): the top-level rule calls with a ``name``, and the loaded symbols.

    ``loads`` maps each symbol name bound by ``load()`` to the ``.bzl`` file it came from.
    Raises SyntaxError if the text does not parse.
    """
    tree = ast.parse(text, filename=filename)
    targets, loads = [], {}
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            continue
        call = stmt.value
        if not isinstance(call.func, ast.Name):
            continue
        kind = call.func.id
        if kind == "load":
            if not call.args:
                continue
            source = _literal(call.args[0])
            for arg in call.args[1:]:
                loads[_literal(arg)] = source
            for kw in call.keywords:
                loads[kw.arg] = source
            continue
        attrs = {kw.arg: kw.value for kw in call.keywords if kw.arg is not None}
        if "name" in attrs:
            try:
                name = _literal(attrs["name"])
            except NotLiteral:
                name = ast.unparse(attrs["name"])
            targets.append(Target(kind, name, stmt.lineno, attrs))
    return targets, loads


def _label_to_path(label):
    """A source label of the root package ("x/y.py", ":x/y.py", "//:x/y.py") as a relative path."""
    for prefix in ("@@//:", "@//:", "//:", ":"):
        if label.startswith(prefix):
            return label[len(prefix):]
    return label


def discover(root):
    """The files BUILD must cover, globbed now, as sorted relative POSIX paths per kind."""
    root = pathlib.Path(root)

    def rel(paths):
        return sorted(p.relative_to(root).as_posix() for p in paths if p.is_file())

    modules = [
        p
        for p in (root / PACKAGE_DIR).rglob("*.py")
        if not any(part.startswith((".", "__pycache__")) for part in p.relative_to(root).parts)
    ]
    tests = (root / "tests").glob("test_*.py")
    # `__init__.py` is skipped in script folders: Bazel's runfiles may create empty ones there.
    scripts = [p for d in SCRIPT_DIRS for p in (root / d).glob("*.py") if p.name != "__init__.py"]
    return {"modules": rel(modules), "tests": rel(tests), "scripts": rel(scripts)}


def check_build(text, root):
    """Every disagreement between the BUILD text and the tree under `root`, as messages."""
    root = pathlib.Path(root)
    try:
        targets, loads = parse_build(text)
    except SyntaxError as exc:
        return [f"BUILD does not parse: {exc}"]
    problems = []
    files = discover(root)

    # Names.
    lines_by_name = collections.defaultdict(list)
    for t in targets:
        lines_by_name[t.name].append(t.lineno)
    for name, lines in sorted(lines_by_name.items()):
        if len(lines) > 1:
            problems.append(f"duplicate target name {name!r} (lines {lines})")

    # Loads.
    for kind in sorted({t.kind for t in targets if t.kind in PY_RULES}):
        if loads.get(kind) != RULES_PYTHON_DEFS:
            problems.append(f"{kind} is used but not loaded from {RULES_PYTHON_DEFS!r}")

    def attr(t, key, default):
        if key not in t.attrs:
            return default
        try:
            value = _literal(t.attrs[key])
        except NotLiteral as exc:
            problems.append(f"{t}: {key} must be an explicit literal, not {exc}")
            return default
        if type(value) is not type(default):
            problems.append(f"{t}: {key} must be a {type(default).__name__}, got {value!r}")
            return default
        return value

    def srcs_of(t):
        srcs = [_label_to_path(s) for s in attr(t, "srcs", [])]
        for src in srcs:
            if not (root / src).is_file():
                problems.append(f"{t} lists {src}, which does not exist")
        return srcs

    def check_main(t, srcs):
        """Bazel's rule: `main` must be one of `srcs`; without it, a src named <name>.py."""
        main = attr(t, "main", "")
        if main:
            main = _label_to_path(main)
            if main not in srcs:
                problems.append(f"{t}: main {main} is not in its srcs {srcs}")
        elif not any(pathlib.PurePosixPath(s).name == f"{t.name}.py" for s in srcs):
            problems.append(f"{t}: no main given and no src named {t.name}.py")
        return main

    by_kind = collections.defaultdict(list)
    for t in targets:
        by_kind[t.kind].append(t)

    # Library.
    library_srcs = {}  # path -> library target names
    package_libraries = []
    for t in by_kind["py_library"]:
        srcs = srcs_of(t)
        for src in srcs:
            library_srcs.setdefault(src, []).append(t.name)
        if PACKAGE_INIT in srcs:
            package_libraries.append(t.name)
    for module in files["modules"]:
        if module not in library_srcs:
            problems.append(f"{module} is not in the srcs of any py_library")
    if not package_libraries:
        problems.append(f"no py_library has {PACKAGE_INIT} in its srcs")
    library_labels = {
        f"{prefix}{name}" for name in package_libraries for prefix in (":", "//:", "@//:", "@@//:")
    }

    # Tests.
    tests_by_file = collections.defaultdict(list)  # test file -> (target, main)
    for t in by_kind["py_test"]:
        srcs = srcs_of(t)
        main = check_main(t, srcs)
        deps = attr(t, "deps", [])
        if library_labels and not library_labels & set(deps):
            problems.append(f"{t}: deps {deps} do not include the library :{package_libraries[0]}")
        for src in srcs:
            tests_by_file[src].append((t, main))
    for test_file in files["tests"]:
        owners = tests_by_file.get(test_file, [])
        if not owners:
            problems.append(f"{test_file} is not in the srcs of any py_test")
        elif len(owners) > 1:
            names = [t.name for t, _ in owners]
            problems.append(f"{test_file} is in the srcs of {len(owners)} py_test targets {names}")
        else:
            t, main = owners[0]
            if main and main != test_file:
                problems.append(f"{t} has {test_file} in srcs but main = {main!r}")

    # Example and benchmark scripts.
    binary_srcs = set()
    for t in by_kind["py_binary"]:
        srcs = srcs_of(t)
        check_main(t, srcs)
        binary_srcs.update(srcs)
    for script in files["scripts"]:
        if script not in binary_srcs:
            problems.append(f"{script} is not in the srcs of any py_binary")

    return problems


def test_build_file_matches_tree():
    build = REPO_ROOT / BUILD_NAME
    assert build.is_file(), f"missing {build}"
    problems = check_build(build.read_text(), REPO_ROOT)
    assert not problems, (
        f"{BUILD_NAME} and the tree disagree ({len(problems)} problems):\n  "
        + "\n  ".join(problems)
    )


# --- Self-tests of the checker on a synthetic tree, so it provably can fail. ---

_TREE = [
    "ft_keras/__init__.py",
    "ft_keras/core.py",
    "ft_keras/version.py",
    "tests/test_core.py",
    "examples/run.py",
    "bench/speed.py",
]

_GOOD_BUILD = """
load("@rules_python//python:defs.bzl", "py_binary", "py_library", "py_test")

py_library(
    name = "ft_keras",
    srcs = [
        "ft_keras/__init__.py",
        "ft_keras/core.py",
        "ft_keras/version.py",
    ],
    deps = [],
)

py_test(
    name = "test_core",
    size = "medium",
    srcs = ["tests/test_core.py"],
    data = ["BUILD"] + glob(["tests/*.py"]),
    deps = [":ft_keras"],
)

py_binary(name = "run", srcs = ["examples/run.py"], main = "examples/run.py", deps = [":ft_keras"])

py_binary(name = "speed", srcs = ["bench/speed.py"], deps = [":ft_keras"])
"""


@pytest.fixture
def tree(tmp_path):
    for rel in _TREE:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return tmp_path


def test_checker_accepts_matching_build(tree):
    assert check_build(_GOOD_BUILD, tree) == []


def test_checker_reports_missing_module(tree):
    build = _GOOD_BUILD.replace('        "ft_keras/core.py",\n', "")
    assert build != _GOOD_BUILD
    problems = check_build(build, tree)
    assert len(problems) == 1, problems
    assert "ft_keras/core.py" in problems[0]
    assert "py_library" in problems[0]


def test_checker_reports_new_file_in_tree(tree):
    (tree / "ft_keras" / "extra.py").write_text("")
    (tree / "tests" / "test_extra.py").write_text("")
    (tree / "bench" / "other.py").write_text("")
    problems = "\n".join(check_build(_GOOD_BUILD, tree))
    for new in ("ft_keras/extra.py", "tests/test_extra.py", "bench/other.py"):
        assert new in problems


@pytest.mark.parametrize(
    "old, new, expected",
    [
        # A listed file that is not on disk.
        (
            '"ft_keras/core.py",',
            '"ft_keras/core.py", "ft_keras/gone.py",',
            "lists ft_keras/gone.py, which does not exist",
        ),
        (
            'srcs = ["bench/speed.py"]',
            'srcs = ["bench/speed.py", "bench/gone.py"]',
            "lists bench/gone.py, which does not exist",
        ),
        # A test with no target, or with two.
        (
            'srcs = ["tests/test_core.py"]',
            'srcs = ["tests/test_x.py"]',
            "tests/test_core.py is not in the srcs of any py_test",
        ),
        (
            'py_binary(name = "run"',
            'py_test(name = "test_core2", srcs = ["tests/test_core.py"], main = '
            '"tests/test_core.py", deps = [":ft_keras"])\n\npy_binary(name = "run"',
            "in the srcs of 2 py_test",
        ),
        # Test without the library dep; main pointing elsewhere; Bazel default main missing.
        ('    deps = [":ft_keras"],\n)', "    deps = [],\n)", "do not include the library"),
        (
            'srcs = ["tests/test_core.py"],',
            'srcs = ["tests/test_core.py", "ft_keras/core.py"], main = "ft_keras/core.py",',
            "main = 'ft_keras/core.py'",
        ),
        ('name = "test_core"', 'name = "core_test"', "no src named core_test.py"),
        # Script not in any binary; duplicate names; glob in srcs; missing load.
        (
            'srcs = ["examples/run.py"], main = "examples/run.py"',
            "srcs = []",
            "examples/run.py is not in the srcs of any py_binary",
        ),
        ('name = "speed"', 'name = "run"', "duplicate target name 'run'"),
        ('srcs = [\n        "ft_keras/__init__.py",', 'srcs = glob(["ft_keras/*.py"]) + [', "explicit"),
        ('"py_binary", ', "", "py_binary is used but not loaded"),
    ],
)
def test_checker_reports_mismatch(tree, old, new, expected):
    assert old in _GOOD_BUILD
    problems = check_build(_GOOD_BUILD.replace(old, new, 1), tree)
    assert any(expected in p for p in problems), problems


def test_checker_reports_unparsable_build(tree):
    problems = check_build("py_library(name = ", tree)
    assert len(problems) == 1 and "does not parse" in problems[0]


if __name__ == "__main__":  # For `bazel test`, which runs the file as a script.
    raise SystemExit(pytest.main([__file__, "-q"]))
