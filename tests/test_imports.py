"""The project's modules form a one-way stack: no module imports one that imports it back, directly or through
others, counting imports inside functions too (they hide cycles rather than remove them)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_imports():
    """{module: set of project modules it imports} for the top-level .py files and the kernels package."""
    files = {p.stem: p for p in ROOT.glob("*.py")} | {"kernels": ROOT / "kernels" / "__init__.py"}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module.split(".")[0])
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph):
    state, stack = {}, []  # state: 1 = on the current path, 2 = done

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[n] = 2
        stack.pop()
        return None
    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_no_import_cycle():
    graph = project_imports()
    assert {"mmi", "generate", "llm", "vit", "unet", "mmfs"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
