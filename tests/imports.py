"""The project's own import graph, read with `ast` (every import statement, also those inside functions:
a lazy import still runs when its code does). Used by the layering and DVC-deps tests."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("milora", "flows")


def module_file(module: str) -> Path | None:
    """The source file of a project module (`milora.core.io` -> milora/core/io.py), or None."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def all_modules() -> list[str]:
    """Every module of the project's packages."""
    out = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_pkg = module_file(module) is not None and module_file(module).name == "__init__.py"
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports_of(module: str) -> frozenset[str]:
    """The project modules `module` imports directly (`from pkg import name` counts `pkg.name` when that is a
    module, else `pkg`)."""
    path = module_file(module)
    if path is None:
        return frozenset()
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # A package's PEP 562 `__getattr__` imports only when code reads that attribute (`milora.init_adapter`);
    # the stages import what they use from its module, so those imports are not counted here.
    # `if TYPE_CHECKING:` blocks never run.
    lazy = {id(n) for f in tree.body
            if (isinstance(f, ast.FunctionDef) and f.name == "__getattr__")
            or (isinstance(f, ast.If) and isinstance(f.test, ast.Name) and f.test.id == "TYPE_CHECKING")
            for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [f"{target}.{a.name}" if module_file(f"{target}.{a.name}") else target for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES and module_file(name):
                out.add(name)
    return frozenset(out - {module})


def parents(module: str) -> list[str]:
    """The packages whose `__init__` runs before `module` (`a.b.c` -> `a`, `a.b`)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(*roots: str) -> set[str]:
    """Every project module that importing `roots` executes (their imports, transitively, and the packages'
    `__init__` modules on the way)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(parents(m))
        todo.extend(imports_of(m))
    return seen


def files(modules: set[str]) -> set[str]:
    """The source files of `modules`, relative to the project root (posix)."""
    return {module_file(m).relative_to(ROOT).as_posix() for m in modules}
