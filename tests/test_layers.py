"""The package's shape: layers without cycles, no private names across modules, rooms of a
readable size, and `bcd serve` defaults read from one place (docs/layout.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_module

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "breast_cancer_detection"
NAME = PACKAGE.name

MAX_MODULE_LINES = 600
LONG_MODULES = {"data/download.py"}  # the one downloader: every hostile case of two sources
MAX_FUNCTION_LINES = 80
MAX_PREDICTOR_LINES = 400


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (inside functions too), but those under
    ``if TYPE_CHECKING:``, which never run."""
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only]


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """The package's modules -> the package modules they import, and every private name
    (``_x``) one module imports from another, as ``"importer: module._x"``."""
    paths = {_module_name(p, package): p for p in package.rglob("*.py")}
    root = package.name
    edges: dict[str, set[str]] = {m: set() for m in paths}
    private = []
    for module, path in paths.items():
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            else:
                base = (".".join(here[:len(here) - node.level + 1] + [node.module or ""])
                        if node.level else node.module or "").strip(".")
                targets = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in paths
                           else (base, a.name) for a in node.names]
            for target, name in targets:
                if target != root and not target.startswith(root + "."):
                    continue
                while target not in paths and "." in target:
                    target = target.rpartition(".")[0]
                if target == module:
                    continue
                edges[module].add(target)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{module}: {target}.{name}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert private == [], "make the name public where it is defined, or move it down a layer"


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_the_graph_sees_imports_inside_functions_and_private_names(tmp_path):
    # The two checks above must be able to fail.
    package = _fake_package(tmp_path, {
        "a.py": "from .b import _helper\n",
        "b.py": "def f():\n    from . import a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n",
    })
    edges, private = import_graph(package)
    assert cycles(edges) == [["pkg.a", "pkg.b"]]
    assert private == ["pkg.a: pkg.b._helper"]
    assert edges["pkg.c"] == set()


@pytest.mark.slow
def test_the_import_linter_layers_contract_holds():
    need_module("importlinter", 'pip install -e ".[dev]"')
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                          " lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 kept, 0 broken" in run.stdout


def _long_functions(tree: ast.Module, limit: int) -> list[tuple[str, int, int]]:
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_rooms_are_of_a_readable_size():
    too_long, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if rel not in LONG_MODULES and len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        long_functions += [f"{rel}:{line} {name}: {n} lines"
                           for name, line, n in _long_functions(ast.parse(text),
                                                                MAX_FUNCTION_LINES)]
    assert too_long == [], f"modules over {MAX_MODULE_LINES} lines"
    assert long_functions == [], f"functions over {MAX_FUNCTION_LINES} lines"


def test_the_predictor_class_stays_small():
    from breast_cancer_detection.inference import Predictor

    source = Path(sys.modules[Predictor.__module__].__file__).read_text()
    node = next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.ClassDef) and n.name == "Predictor")
    assert node.end_lineno - node.lineno + 1 <= MAX_PREDICTOR_LINES


def test_the_size_check_can_fail():
    tree = ast.parse("def f():\n" + "    x = 1\n" * 90)
    assert _long_functions(tree, MAX_FUNCTION_LINES) == [("f", 1, 91)]


def test_every_bcd_serve_default_is_the_servers_own():
    from breast_cancer_detection.app.limits import ServeLimits
    from breast_cancer_detection.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    defaults = {a.dest: a.default for a in serve._actions}
    limits = ServeLimits()
    for name in ServeLimits.names():
        assert defaults[name] == getattr(limits, name), name
        help_text = next(a.help for a in serve._actions if a.dest == name)
        assert f"default {getattr(limits, name):g}" in help_text, name
