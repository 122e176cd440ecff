"""ft_keras's modules import each other one way: the import graph has no cycle, and the core (the
modules directly in ft_keras/) never imports the research harness (ft_keras/harness/)."""

import ast
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO_ROOT, "ft_keras")
HARNESS = "harness"


def _module_names():
    """Every module of the package, named relative to it: ``"training"``, ``"harness.data"``."""
    names = set()
    for folder, prefix in ((PACKAGE, ""), (os.path.join(PACKAGE, HARNESS), HARNESS + ".")):
        for name in os.listdir(folder):
            if name.endswith(".py") and name != "__init__.py":
                names.add(prefix + name[:-3])
    return names


CORE = sorted(name for name in _module_names() if "." not in name)


def _path(module):
    return os.path.join(PACKAGE, *module.split(".")) + ".py"


def _imports(source, top_level_only=False):
    """ft_keras modules (relative names, see `_module_names`) that a source text imports,
    anywhere or at the top level only. Importing the harness package itself counts as
    ``"harness"``."""
    tree = ast.parse(source)
    found = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ft_keras."):
                    found.add(alias.name[len("ft_keras."):])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ft_keras":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("ft_keras."):
                module = node.module[len("ft_keras."):]
                found.add(module)
                if module == HARNESS:
                    found.update(f"{HARNESS}.{alias.name}" for alias in node.names)
    return found


def _graph(top_level_only=False):
    modules = _module_names()
    graph = {}
    for module in sorted(modules):
        with open(_path(module), encoding="utf-8") as handle:
            graph[module] = sorted(_imports(handle.read(), top_level_only) & modules)
    return graph


def _cycle(graph):
    """A cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "active"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "active":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in graph:
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    graph = _graph()
    assert "training" in graph and "masks" in graph["training"]
    assert "training" in graph["harness.recipes"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


@pytest.mark.parametrize("module", ["masks", "densities", "schedules", "harness.metrics",
                                    "_checks"])
def test_pure_modules_import_no_keras_model_code(module):
    """The pure modules import no other ft_keras module except _checks at load time."""
    assert set(_graph(top_level_only=True)[module]) <= {"_checks"}


def test_core_does_not_import_the_harness_statically():
    offenders = {}
    for module in CORE:
        with open(_path(module), encoding="utf-8") as handle:
            harness = sorted(m for m in _imports(handle.read())
                             if m == HARNESS or m.startswith(HARNESS + "."))
        if harness:
            offenders[module] = harness
    assert "training" in CORE and "free_tickets" in CORE and "data" not in CORE
    assert not offenders, f"core modules import the harness: {offenders}"


def test_core_does_not_load_the_harness_at_runtime():
    """In a fresh interpreter, importing the package and every core module loads no harness
    module; the first use of ``ftk.data`` does."""
    code = "\n".join(
        ["import sys", "import ft_keras as ftk"]
        + [f"import ft_keras.{module}" for module in CORE]
        + ["print(sorted(m for m in sys.modules if m.startswith('ft_keras.harness')))",
           "ftk.data",
           "print(sorted(m for m in sys.modules if m.startswith('ft_keras.harness')))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = out.stdout.strip().splitlines()[-2:]
    assert before == "[]"
    assert after == "['ft_keras.harness', 'ft_keras.harness.data', 'ft_keras.harness.data_files']"


def test_import_finder_sees_every_form():
    source = "\n".join([
        "import ft_keras.harness.data",
        "from ft_keras.harness import recipes, models",
        "from ft_keras.harness.metrics import ece",
        "from ft_keras import training",
        "def f():",
        "    from ft_keras import harness",
    ])
    assert _imports(source) == {"harness.data", "harness", "harness.recipes", "harness.models",
                                "harness.metrics", "training"}
    assert _imports(source, top_level_only=True) == _imports(source)
    assert "harness" not in _imports("def f():\n    from ft_keras import harness",
                                     top_level_only=True)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b"], "b": [], "c": ["a"]}) is None
