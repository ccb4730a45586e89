"""The walls between the packages, checked by reading every import statement (ast), including
imports inside functions (they run too, only later):

- protocol/ is data: it imports neither broker/, gpu_worker/, zmq nor torch;
- broker/ never imports torch, diffusers or gpu_worker/ (the broker process stays light);
- gpu_worker/ never imports broker/;
- no import cycles between the project's modules (module-level imports: a cycle there breaks
  or half-initialises a module depending on which side is imported first).

The checker is tested on a small fake tree first, so a wall that is broken is seen as broken.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("protocol", "broker", "gpu_worker", "runtime", "clients", "gateway")


@dataclass(frozen=True)
class Import:
    importer: str        # dotted module name of the file
    target: str          # dotted name imported (a module, or a module.attribute)
    top_level: bool      # a module-level statement (not inside a function or class body)
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[Import]:
    name = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, top_level, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:   # relative: resolve against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[:len(package) - (child.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                found.extend(Import(name, f"{base}.{alias.name}" if base else alias.name,
                                    top_level, child.lineno) for alias in child.names)
                found.append(Import(name, base, top_level, child.lineno))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue   # typing-only imports never run
            else:
                visit(child, top_level and not isinstance(child, ast.ClassDef))
    visit(tree, True)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def all_imports(root: Path, packages=PROJECT_PACKAGES) -> list[Import]:
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            found.extend(imports_of(path, root))
    return found


def touches(target: str, forbidden: str) -> bool:
    return target == forbidden or target.startswith(forbidden + ".")


def wall_breaches(imports: list[Import], package: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted({f"{i.importer}:{i.line} imports {i.target}" for i in imports
                   if touches(i.importer, package) and any(touches(i.target, f) for f in forbidden)})


def import_cycles(imports: list[Import], modules: set[str]) -> list[list[str]]:
    """Cycles in the module-level import graph between `modules` (a target that names an
    attribute of a module counts as importing that module)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if not i.top_level or i.importer not in graph:
            continue
        target = i.target
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != i.importer and not touches(i.importer, target):
            graph[i.importer].add(target)   # a package's own __init__ is not a cycle edge
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def project_modules(root: Path, packages=PROJECT_PACKAGES) -> set[str]:
    return {module_name(p, root) for package in packages if (root / package).is_dir()
            for p in (root / package).rglob("*.py")}


# --- the checker catches what it should ------------------------------------------------------
def test_the_checker_sees_breaches_and_cycles_in_a_fake_tree(tmp_path):
    files = {
        "protocol/__init__.py": "",
        "protocol/a.py": "import zmq\nfrom . import b\n",
        "protocol/b.py": "from protocol.a import thing\n",              # a <-> b cycle
        "broker/__init__.py": "",
        "broker/x.py": "def later():\n    import torch\n",             # lazy, still a breach
        "broker/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gpu_worker\n",
        "gpu_worker/__init__.py": "",
        "gpu_worker/w.py": "from broker import x\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    imports = all_imports(tmp_path)
    assert wall_breaches(imports, "protocol", ("broker", "gpu_worker", "zmq", "torch")) == [
        "protocol.a:1 imports zmq"]
    assert wall_breaches(imports, "broker", ("torch", "diffusers", "gpu_worker")) == [
        "broker.x:2 imports torch"]                                         # y's is typing-only
    assert wall_breaches(imports, "gpu_worker", ("broker",)) == [
        "gpu_worker.w:1 imports broker", "gpu_worker.w:1 imports broker.x"]
    assert import_cycles(imports, project_modules(tmp_path)) == [
        ["protocol.a", "protocol.b", "protocol.a"]]


# --- the walls of this project ----------------------------------------------------------------
IMPORTS = all_imports(ROOT)


def test_protocol_imports_neither_broker_gpu_worker_zmq_nor_torch():
    assert wall_breaches(IMPORTS, "protocol", ("broker", "gpu_worker", "zmq", "torch")) == []


def test_broker_imports_no_torch_diffusers_or_gpu_worker():
    assert wall_breaches(IMPORTS, "broker", ("torch", "diffusers", "gpu_worker")) == []


def test_gpu_worker_imports_no_broker():
    assert wall_breaches(IMPORTS, "gpu_worker", ("broker",)) == []


def test_no_import_cycles_between_project_modules():
    assert import_cycles(IMPORTS, project_modules(ROOT)) == []


def test_the_walls_cover_the_real_tree():
    """The checks above read real files (a wrong root would make them pass vacuously)."""
    importers = {i.importer.split(".")[0] for i in IMPORTS}
    assert {"protocol", "broker", "gpu_worker"} <= importers
    assert any(i.importer == "broker.core" and i.target == "broker.routing" for i in IMPORTS)
