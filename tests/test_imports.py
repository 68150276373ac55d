"""The package's import structure: no circles, and shared modules never import a family's own modules.

Every `import` / `from ... import` in dsalite/ (module level and inside functions alike) is an edge from the
importing module to the module it names (`from pkg import sub` names the submodule when one exists). A cycle in
that graph is a design error even where Python happens to resolve it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dsalite

ROOT = Path(dsalite.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    out.add(sub)
                elif base in known:
                    out.add(base)
    out.discard(me)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(p, known) for m, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports():
    g = graph()
    assert "dsalite.config" in g["dsalite.model"] and "dsalite.families" in g["dsalite.config"]
    assert "dsalite.families.deepseek_v4.config" in g["dsalite.families.deepseek_v4"]  # `from pkg import sub`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_shared_modules_never_import_a_family():
    """Family packages (dsalite/families/<name>/) import the shared modules; the reverse goes through the registry."""
    bad = []
    for m, deps in graph().items():
        for d in deps:
            fam = d.split(".")[2] if d.startswith("dsalite.families.") else None
            if fam and not m.startswith(f"dsalite.families.{fam}"):
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(bad)
