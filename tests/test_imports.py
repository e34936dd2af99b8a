"""The project's modules form a one-way stack: no module imports one that imports it back, directly or through
others, counting imports inside functions too (they hide cycles rather than remove them). And none of their names
shadows an installed distribution's module: run from the repository root, ours would be imported in its place."""
import ast
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_imports():
    """{module: set of project modules it imports} for the top-level .py files."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
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


def top_level_names(root):
    """What `import NAME` finds in root first: each .py file and each folder with an __init__.py. A folder without one
    is a namespace portion, which Python ranks below an installed regular package, so it shadows nothing."""
    return {p.stem for p in root.glob("*.py")} | {p.parent.name for p in root.glob("*/__init__.py")}


def shadowed(root, distributions):
    """{our top-level name: [installed distributions that also provide it]}."""
    return {name: distributions[name] for name in sorted(top_level_names(root)) if name in distributions}


def test_no_top_level_name_shadows_an_installed_package():
    clashes = shadowed(ROOT, importlib.metadata.packages_distributions())
    assert not clashes, f"top-level names of ours that installed distributions also provide (rename ours): {clashes}"


def test_shadow_check_finds_a_planted_package(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "deform_attn.cu").write_text("")  # sources only: a namespace portion, shadows nothing
    (tmp_path / "mmfs.py").write_text("")
    installed = {"kernels": ["kernels"], "numpy": ["numpy"]}
    assert shadowed(tmp_path, installed) == {}
    (tmp_path / "kernels" / "__init__.py").write_text("")  # now a regular package: `import kernels` finds ours
    assert shadowed(tmp_path, installed) == {"kernels": ["kernels"]}
    (tmp_path / "numpy.py").write_text("")
    assert shadowed(tmp_path, installed) == {"kernels": ["kernels"], "numpy": ["numpy"]}
