"""ft_keras's modules import each other one way: the import graph has no cycle."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ft_keras")


def _imports(path, top_level_only=False):
    """ft_keras modules imported in a file (anywhere, or at the top level only)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ft_keras."):
                    found.add(alias.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "ft_keras":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("ft_keras."):
                found.add(node.module.split(".")[1])
    return found


def _graph(top_level_only=False):
    modules = {name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py")}
    graph = {}
    for module in sorted(modules - {"__init__"}):
        path = os.path.join(PACKAGE, module + ".py")
        graph[module] = sorted(_imports(path, top_level_only) & modules)
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
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


@pytest.mark.parametrize("module", ["masks", "densities", "schedules", "metrics", "_checks"])
def test_pure_modules_import_no_keras_model_code(module):
    """The pure modules import no other ft_keras module except _checks at load time
    (metrics resolves its deprecated Keras-metric aliases lazily)."""
    assert set(_graph(top_level_only=True)[module]) <= {"_checks"}


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b"], "b": [], "c": ["a"]}) is None
