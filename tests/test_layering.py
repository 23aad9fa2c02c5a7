"""Imports flow down only (DESIGN.md, "Layers"): the support packages below the applications
never import them, read from the sources so that a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "multihead"

# package → the layers above it that none of its modules may import
ABOVE = {
    "viz": ("multihead.apps", "multihead.models", "multihead.cli"),
    "training": ("multihead.apps", "multihead.models", "multihead.cli"),
    "models": ("multihead.apps", "multihead.cli"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Absolute names of every module that ``source`` (the module ``module``) imports,
    relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
            # `from .. import apps` names the module in the alias.
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def test_imported_modules_resolves_relative_and_lazy_imports() -> None:
    source = (
        "from . import views\n"
        "import multihead.models\n"
        "def show():\n"
        "    from ..apps.show import run_show\n"
        "    from .. import apps\n"
    )
    names = imported_modules(source, "multihead.viz.cli")
    assert {"multihead.viz.views", "multihead.models", "multihead.apps.show"} <= names
    assert "multihead.apps" in names
    assert "multihead.viz.capture" in imported_modules(
        "from .capture import capture_attention", "multihead.viz", is_package=True
    )


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_no_upward_imports(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files, f"no modules found under {PACKAGE / package}"
    upward = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in sorted(
            imported_modules(
                path.read_text(encoding="utf-8"),
                _module_name(path),
                is_package=path.name == "__init__.py",
            )
        )
        if any(name == above or name.startswith(above + ".") for above in ABOVE[package])
    ]
    assert not upward, "imports must flow down only:\n" + "\n".join(upward)
