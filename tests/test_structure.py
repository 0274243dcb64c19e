"""The package structure (issue 14): the import graph of the project's modules has no cycle, imports go down the
layers of docs/architecture.md only, and library code never imports the CLI (`vlm.cli`) or the test helpers
(`vlm.testing`).

The graph is read from the source with `ast`, so it holds every import: module-level ones and those inside
functions (a function-local import still closes a cycle; it only hides it until run time).
Run against another checkout: `python tests/test_structure.py PATH`.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("vlm", "eval", "encoders", "connectors")
REPO = Path(__file__).resolve().parents[1]

# docs/architecture.md, "Packages and layers": a module may import from its own layer or a smaller one. The longest
# matching prefix gives a module's layer; a module no prefix matches is an error (add it here and to the doc).
LAYERS = {
    "vlm.errors": 0, "vlm.io": 0, "vlm.registry": 0, "vlm.config": 0, "vlm.world": 0, "vlm.world.zoo": 0,
    "vlm.world.synth": 0,
    "encoders": 1, "connectors": 1, "vlm.model": 1,
    "vlm.recipe": 2,
    "vlm.data": 3,
    "eval": 4,
    "vlm.train": 5, "vlm.loading": 5, "eval.lm_eval_adapter": 5, "eval.lm_eval_cli": 5,
    "vlm.grid": 6, "vlm.plan": 6,
    "vlm.report": 7,
    "vlm.world.demo": 8,
    "vlm.cli": 9, "vlm.__main__": 9, "vlm": 9,  # the package itself: its lazy `load_vlm` reaches vlm.loading
    "vlm.testing": 10,
}
EXACT = {"vlm"}  # this entry names the package's __init__ only, not every module under it


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages under `root`."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The project modules one import statement loads (`from pkg import name` is `pkg.name` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] not in PACKAGES:
        return []
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
    rest = [a for a in node.names if f"{target}.{a.name}" not in modules]
    return subs + ([target] if rest else [])


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (resolved to modules that exist)."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _imported(node, name, path.name == "__init__.py", modules):
                while target not in modules and "." in target:  # `import a.b.attr` style: the longest module
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan, iterative over an explicit work stack
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def _is_cli(module: str) -> bool:
    return module == "vlm.__main__" or module == "vlm.cli" or module.startswith("vlm.cli.")


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """Library modules (all but the CLI and `vlm.testing` itself) that import `vlm.cli*` or `vlm.testing`."""
    bad = []
    for module, targets in sorted(graph.items()):
        if _is_cli(module) or module == "vlm.testing":
            continue
        for t in sorted(targets):
            if _is_cli(t) or t == "vlm.testing":
                bad.append(f"{module} imports {t}")
    return bad


def layer_of(module: str) -> int | None:
    prefixes = [p for p in LAYERS if module == p or (p not in EXACT and module.startswith(p + "."))]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a higher layer than the importer's (and modules that have no layer)."""
    bad = []
    for module, targets in sorted(graph.items()):
        if layer_of(module) is None:
            bad.append(f"{module} has no layer in tests/test_structure.py LAYERS (and docs/architecture.md)")
            continue
        for t in sorted(targets):
            if layer_of(t) is not None and layer_of(t) > layer_of(module):
                bad.append(f"{module} (layer {layer_of(module)}) imports {t} (layer {layer_of(t)})")
    return bad


def problems(root: Path) -> list[str]:
    graph = import_graph(root)
    return [" -> ".join(c) for c in find_cycles(graph)] + forbidden_imports(graph) + upward_imports(graph)


# ---------------------------------------------------------------- tests


def test_no_import_cycles():
    cycles = find_cycles(import_graph(REPO))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_library_never_imports_cli_or_testing():
    bad = forbidden_imports(import_graph(REPO))
    assert not bad, "\n".join(bad)


def test_imports_go_down_the_layers():
    bad = upward_imports(import_graph(REPO))
    assert not bad, "\n".join(bad)


def test_checker_finds_cycles_and_forbidden_imports(tmp_path):
    """The checker itself, on a hand-made tree: a function-level cycle, a relative import, a CLI import."""
    files = {
        "vlm/__init__.py": "",
        "vlm/a.py": "from vlm.b import f\n",
        "vlm/b.py": "def f():\n    from . import c\n",
        "vlm/c.py": "import vlm.a\n",
        "vlm/d.py": "from vlm import cli\n",
        "vlm/cli/__init__.py": "from vlm import d\n",
        "vlm/e.py": "from vlm.testing import tiny\n",
        "vlm/testing.py": "from vlm import a\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    for pkg in PACKAGES[1:]:
        (tmp_path / pkg).mkdir()
    graph = import_graph(tmp_path)
    assert graph["vlm.b"] == {"vlm.c"} and graph["vlm.d"] == {"vlm.cli"}
    cycles = find_cycles(graph)
    assert sorted(map(tuple, cycles)) == [("vlm.a", "vlm.b", "vlm.c", "vlm.a"), ("vlm.cli", "vlm.d", "vlm.cli")]
    assert forbidden_imports(graph) == ["vlm.d imports vlm.cli", "vlm.e imports vlm.testing"]
    assert upward_imports({"vlm.model.vlm": {"vlm.recipe.schema", "vlm.io"}, "vlm.recipe.keys": {"vlm.model"}}) == [
        "vlm.model.vlm (layer 1) imports vlm.recipe.schema (layer 2)"]
    assert "vlm.nowhere has no layer" in upward_imports({"vlm.nowhere": set()})[0]


if __name__ == "__main__":
    found = problems(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
    print("\n".join(found) or "no import cycles, no upward imports; library code imports neither vlm.cli nor vlm.testing")
    sys.exit(1 if found else 0)
