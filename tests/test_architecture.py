"""Architecture rules, read from the source with ``ast`` (nothing is imported).

* ``dlseg`` never imports ``preprocess`` (``preprocess`` is a thin command line over ``dlseg``);
* no import cycle between our modules, counting imports inside functions too;
* no import of our own modules inside a function (that is how a cycle gets hidden); third-party lazy imports of
  optional dependencies stay allowed;
* no module longer than ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dlseg", "preprocess")
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    """One imported module of ours: where the import statement is, and whether it runs inside a function."""

    source: str          # importing module, dotted
    target: str          # imported module, dotted (the longest prefix that is one of our modules)
    path: Path
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under the packages (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is one of our modules (None: not ours)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load: ``from pkg import x`` is ``pkg.x`` (x a module) or ``pkg``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def _walk(node: ast.AST, in_function: bool = False):
    """Every import statement below ``node``, with whether it sits inside a function."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def find_imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    """Every import of one of our modules by one of our modules."""
    modules = find_modules(root, packages)
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in _walk(tree):
            names = _imported_names(node, module, path.name == "__init__.py")
            for target in dict.fromkeys(_owner(name, modules) for name in names):   # once per statement
                if target is not None and target != module:
                    found.append(Import(module, target, path.relative_to(root), node.lineno, in_function))
    return found


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """One import cycle per strongly connected component of the module graph (Tarjan), as its import edges."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        graph.setdefault(imp.source, {}).setdefault(imp.target, imp)
        graph.setdefault(imp.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(sorted(c)[0], set(c), graph) for c in components]


def _cycle_through(start: str, members: set[str], graph: dict[str, dict[str, Import]]) -> list[Import]:
    """The shortest path of imports from ``start`` back to itself inside one component (breadth first)."""
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, imp in sorted(graph[v].items()):
                if w == start:
                    return paths[v] + [imp]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [imp]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start}: no cycle inside its component")


def describe(cycle: list[Import]) -> str:
    return " -> ".join(f"{imp.source} ({imp.where()})" for imp in cycle) + f" -> {cycle[0].source}"


def upward_imports(imports: list[Import]) -> list[str]:
    """``dlseg`` modules importing ``preprocess``."""
    return [f"{imp.where()}: {imp.source} imports {imp.target}" for imp in imports
            if imp.source.split(".")[0] == "dlseg" and imp.target.split(".")[0] == "preprocess"]


def function_level_imports(imports: list[Import]) -> list[str]:
    """Our modules imported inside a function."""
    return [f"{imp.where()}: {imp.source} imports {imp.target} inside a function" for imp in imports if imp.in_function]


IMPORTS = find_imports(REPO)


def test_dlseg_never_imports_preprocess():
    bad = upward_imports(IMPORTS)
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    cycles = find_cycles(IMPORTS)
    assert not cycles, "\n".join(describe(c) for c in cycles)


def test_own_modules_are_imported_at_module_level():
    bad = function_level_imports(IMPORTS)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in find_modules(REPO).values()), ids=str)
def test_module_length(path):
    """Fails per file, naming it: a long module holds more than one concern (split it, do not cram lines)."""
    lines = len((REPO / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path}: {lines} lines (at most {MAX_LINES})"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checks_catch_planted_violations(tmp_path):
    """A cycle hidden by a function-level relative import, and one through ``preprocess``, are found."""
    _write(tmp_path, {
        "dlseg/__init__.py": "",
        "dlseg/sub/__init__.py": "",
        "dlseg/a.py": "import numpy\nfrom dlseg.sub import b\n",
        "dlseg/sub/b.py": "def f():\n    from ..a import numpy\n    import json\n",
        "dlseg/c.py": "from dlseg import a\nfrom preprocess.cli import main\n",
        "preprocess/__init__.py": "",
        "preprocess/cli.py": "import dlseg.c\n",
    })
    imports = find_imports(tmp_path)
    assert {(i.source, i.target, i.line, i.in_function) for i in imports} == {
        ("dlseg.a", "dlseg.sub.b", 2, False), ("dlseg.sub.b", "dlseg.a", 2, True),
        ("dlseg.c", "dlseg.a", 1, False), ("dlseg.c", "preprocess.cli", 2, False),
        ("preprocess.cli", "dlseg.c", 1, False),
    }
    cycles = find_cycles(imports)
    assert sorted(describe(c) for c in cycles) == [
        "dlseg.a (dlseg/a.py:2) -> dlseg.sub.b (dlseg/sub/b.py:2) -> dlseg.a",
        "dlseg.c (dlseg/c.py:2) -> preprocess.cli (preprocess/cli.py:1) -> dlseg.c",
    ]
    assert upward_imports(imports) == ["dlseg/c.py:2: dlseg.c imports preprocess.cli"]
    assert function_level_imports(imports) == ["dlseg/sub/b.py:2: dlseg.sub.b imports dlseg.a inside a function"]


def test_console_scripts_point_at_entry_points():
    """Every ``dlseg-*`` script of pyproject.toml names a ``main`` that exists (pip would install a broken one)."""
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"dlseg-preprocess", "dlseg-train", "dlseg-predict", "dlseg-evaluate", "dlseg-bench",
                            "dlseg-cv"}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
