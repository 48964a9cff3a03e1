"""The package's import graph has no circle: not between subpackages (config <- methods <- inference <- trainers <-
cli, with evaluation below inference), not between modules, counting imports inside functions too."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "diffnnunet"


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: pathlib.Path = ROOT) -> dict:
    """{module: set of diffnnunet modules it imports anywhere in its source}; ``from package import name`` counts
    as an import of ``package.name`` where that is a module, else of ``package``."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict) -> list | None:
    """One circle of ``graph`` as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def subpackage_graph(graph: dict) -> dict:
    def top(m):
        return ".".join(m.split(".")[:2])
    out = {}
    for m, edges in graph.items():
        out.setdefault(top(m), set()).update(top(e) for e in edges if top(e) != top(m))
    return out


def test_the_cycle_finder_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "diffnnunet"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from diffnnunet.b import y\n")  # inside a function counts
    (pkg / "b.py").write_text("from diffnnunet.a import x\ny = 1\n")
    graph = import_graph(pkg)
    assert graph["diffnnunet.a.x"] == {"diffnnunet.b"} and graph["diffnnunet.b"] == {"diffnnunet.a.x"}
    assert find_cycle(graph) == ["diffnnunet.a.x", "diffnnunet.b", "diffnnunet.a.x"]
    assert find_cycle({"p": {"q"}, "q": set()}) is None


@pytest.mark.parametrize("level", ["modules", "subpackages"])
def test_no_import_circle(level):
    graph = import_graph()
    assert "diffnnunet.config" in graph and graph["diffnnunet.config"] <= {"diffnnunet.utils"}  # the leaf
    if level == "subpackages":
        graph = subpackage_graph(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
