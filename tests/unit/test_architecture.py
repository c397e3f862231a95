"""The shape of supervisor/ (docs/architecture.md): no import cycles, no module reaching into
another's private names, and the daemon never imports torch or the trainer side."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "supervisor"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, names imported from it, line) for every import in `path`, including
    imports inside functions (a lazy import is still a dependency)."""
    mod = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = mod.split(".")[: -node.level] if not path.name == "__init__.py" else mod.split(".")
                base = ".".join(pkg + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for target, names, _ in _imports(p):
            for cand in [target] + [f"{target}.{n}" for n in names]:
                if cand in modules and cand != m:
                    graph[m].add(cand)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_supervisor():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    bad = []
    for p in list(PKG.rglob("*.py")) + list((ROOT / "training").rglob("*.py")):
        for target, names, line in _imports(p):
            if target.split(".")[0] not in ("supervisor", "training"):
                continue
            bad += [f"{p.relative_to(ROOT)}:{line}: from {target} import {n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
            bad += [f"{p.relative_to(ROOT)}:{line}: import {target}" for part in target.split(".")
                    if part.startswith("_") and part != "__init__"]
    assert bad == []


def test_supervisor_never_imports_torch_or_the_trainer():
    bad = [f"{p.relative_to(ROOT)}:{line}: {target}" for p in PKG.rglob("*.py") for target, _, line in _imports(p)
           if target.split(".")[0] in ("torch", "torchtitan", "torchft", "training")]
    assert bad == []
