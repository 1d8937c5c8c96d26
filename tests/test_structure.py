"""The structure of xfer/ and tune/, read from their source: the module import graph has no cycle
(imports inside functions count), xfer never imports tune or Ray, `xfer results` and `xfer report`
load neither torch nor Ray, and no function is longer than MAX_FUNCTION_LINES."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("xfer", "tune")
MAX_FUNCTION_LINES = 80


def modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, for its __init__)."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(name: str, path: Path) -> list[str]:
    """The dotted names a module imports, wherever the import statement stands (module level, inside
    a function or a class, under a condition), relative imports resolved; `from A import B` as A.B
    (`import_graph` resolves it to the module A.B when there is one, else to A)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names += [f"{mod}.{a.name}" for a in node.names]
    return names


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of the packages it imports (the deepest module each name points at)."""
    mods = modules(root, packages)
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imported in imported_names(name, path):
            parts = imported.split(".")
            while parts and ".".join(parts) not in mods:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One closed path through a component, for the message: a -> b -> ... -> a."""
    members, start = set(comp), comp[0]
    seen, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while seen[path[-1]] is not None:
                    path.append(seen[path[-1]])
                return path[::-1] + [start]
            if w not in seen:
                seen[w] = v
                queue.append(w)
    return comp


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    files = {
        "p/__init__.py": "def __getattr__(name):\n    from . import a\n    return a\n",
        "p/a.py": "import json\n\ndef f():\n    from .sub.b import g\n    return g\n",
        "p/sub/__init__.py": "",
        "p/sub/b.py": "from .. import c\nfrom ..c import NAME\n\ndef g():\n    pass\n",
        "p/c.py": "if True:\n    import p.sub.b as b\nNAME = 1\n",
        "p/d.py": "import p.a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("p",))
    assert graph == {"p": {"p.a"}, "p.a": {"p.sub.b"}, "p.sub": set(), "p.sub.b": {"p.c"}, "p.c": {"p.sub.b"},
                     "p.d": {"p.a"}}
    assert cycles(graph) == [["p.c", "p.sub.b"]]
    assert cycle_path(graph, ["p.c", "p.sub.b"]) == ["p.c", "p.sub.b", "p.c"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_xfer_and_tune():
    graph = import_graph()
    found = []
    for comp in cycles(graph):
        found.append("a cycle: " + " -> ".join(cycle_path(graph, comp)) + "; its component's imports:")
        found += [f"  {m} -> {', '.join(sorted(graph[m] & set(comp)))}" for m in comp]
    assert not found, "import cycles in xfer/ and tune/:\n" + "\n".join(found)


def test_xfer_never_imports_tune_or_ray():
    bad = []
    for name, path in modules().items():
        if name.split(".")[0] != "xfer":
            continue
        for imported in imported_names(name, path):
            if imported.split(".")[0] in ("tune", "ray"):
                bad.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not bad, "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("module", ["xfer.results", "xfer.report", "xfer.sweep_files"])
def test_results_and_report_load_no_torch_and_no_ray(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"import {module} loads {out.stdout.strip()}"


def test_no_function_longer_than_the_limit():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
