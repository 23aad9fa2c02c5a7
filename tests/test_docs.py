"""The API reference: every public name has a docstring, every public module has a reference
page, and `mkdocs build --strict` (what `make docs` runs) passes with nothing undocumented.

The build test needs the ``docs`` extra (`make test` installs it); without it the test skips,
except under CI, where it fails.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Protocol

import pytest

import multihead

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "multihead"
API_PAGES = ROOT / "docs" / "api"

# The modules the reference documents: each must appear as `::: module` in docs/api/.
PUBLIC_MODULES = [
    "multihead",
    "multihead.attention_config",
    "multihead.cache",
    "multihead.compat",
    "multihead.decoding",
    "multihead.distributed",
    "multihead.functional",
    "multihead.integrations.convert",
    "multihead.integrations.huggingface",
    "multihead.kernels",
    "multihead.kernels.weights",
    "multihead.masks",
    "multihead.models",
    "multihead.multi_head_attention",
    "multihead.positional",
    "multihead.report",
    "multihead.score_mods",
    "multihead.training",
    "multihead.transformer",
    "multihead.varlen",
    "multihead.viz",
]
# Top-level modules that are not library API: the programs, and helpers they share.
NOT_API = {"cli", "apps", "layer_demo", "safe_files"}


def _own_docstring(obj: object) -> str:
    """The docstring written on ``obj`` itself: not a base class's, nor the signature that
    dataclasses put where there is none."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    doc = (doc or "").strip()
    generated = dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "(")
    if inspect.isclass(obj) and generated:
        return ""
    return doc


def _attribute_docstrings(module: object) -> dict[str, str]:
    """Module-level ``NAME = ...`` followed by a string: the docstrings griffe reads."""
    tree = ast.parse(Path(inspect.getsourcefile(module)).read_text(encoding="utf-8"))
    docs: dict[str, str] = {}
    for stmt, after in zip(tree.body, [*tree.body[1:], None], strict=True):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                docs[target.id] = after.value.value if is_doc else ""
    return docs


def _members(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties ``cls`` defines itself."""
    found = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            value = value.fget
        elif isinstance(value, classmethod | staticmethod):
            value = value.__func__
        if inspect.isfunction(value):
            found.append((name, value))
    return found


def _documented_elsewhere(cls: type, name: str, module: object) -> bool:
    """A member documented by what it implements: a base class's member of the same name, or
    a Protocol of the module that has the member, documented on it or named in the Protocol's
    docstring (a Protocol may describe its members there)."""
    if any(name in vars(base) for base in cls.__mro__[1:] if base is not Protocol):
        return True
    for other in vars(module).values():
        if inspect.isclass(other) and Protocol in other.__mro__[1:] and name in vars(other):
            if re.search(rf"`{name}\b", _own_docstring(other)):
                return True
            member = vars(other)[name]
            fget = member.fget if isinstance(member, property) else member
            if other is not cls and (getattr(fget, "__doc__", None) or "").strip():
                return True
    return False


def _public_paths(obj: object) -> set[str]:
    """Where the reference documents ``obj``: where it is defined, and each documented module
    that lists it in ``__all__``."""
    paths = {f"{obj.__module__}.{obj.__qualname__}"}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        paths |= {f"{module_name}.{n}" for n in module.__all__ if getattr(module, n) is obj}
    return paths


def _public_objects():
    """(qualified name, object, module) for every public name of the documented modules."""
    seen = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        yield module_name, module, module
        names = getattr(module, "__all__", None)
        assert names is not None, f"{module_name} needs an __all__ listing its public names"
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                home = importlib.import_module(obj.__module__)
                key = f"{obj.__module__}.{obj.__qualname__}"
                if key in seen:
                    continue
                seen.add(key)
                yield key, obj, home
                if inspect.isclass(obj):
                    for member_name, member in _members(obj):
                        if not _documented_elsewhere(obj, member_name, home):
                            yield f"{key}.{member_name}", member, home
            elif not inspect.ismodule(obj) and not name.startswith("__"):
                yield f"{module_name}.{name}", ("attribute", name), module


def test_every_public_name_has_a_docstring():
    missing = []
    for qualname, obj, module in _public_objects():
        if isinstance(obj, tuple):
            docs = _attribute_docstrings(module)
            if not docs.get(obj[1], "").strip():
                missing.append(f"{qualname} (a string right after its assignment)")
        elif not _own_docstring(obj):
            missing.append(qualname)
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def _args_section(doc: str) -> list[str]:
    """The names a Google-style ``Args:`` section documents ("key, value: ..." is two)."""
    lines = inspect.cleandoc(doc).splitlines()
    names: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() not in ("Args:", "Arguments:", "Parameters:"):
            continue
        base = len(line) - len(line.lstrip())
        entry_indent = None
        for entry in lines[i + 1 :]:
            if not entry.strip():
                continue
            indent = len(entry) - len(entry.lstrip())
            if indent <= base:
                break
            entry_indent = indent if entry_indent is None else entry_indent
            if indent == entry_indent:
                match = re.match(r"\s*([\w*][\w*, ]*?)\s*(\([^)]*\))?:(\s|$)", entry)
                assert match, f"cannot read this Args entry: {entry.strip()!r}"
                names += [n.strip().lstrip("*") for n in match.group(1).split(",")]
    return names


def test_documented_parameters_exist():
    """What griffe's warn_unknown_params would check, with "a, b:" entries read as two names."""
    wrong = []
    for qualname, obj, _ in _public_objects():
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or not obj.__doc__:
            continue
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            continue
        docs = [obj.__doc__] + ([target.__doc__ or ""] if inspect.isclass(obj) else [])
        for name in [n for doc in docs for n in _args_section(doc)]:
            if name not in params:
                wrong.append(f"{qualname}: documents {name!r}, not a parameter")
    assert not wrong, "\n".join(wrong)


def _reference_targets() -> set[str]:
    targets = set()
    for page in API_PAGES.glob("*.md"):
        targets |= set(re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M))
    return targets


def test_every_public_module_has_a_reference_page():
    targets = _reference_targets()
    assert sorted(set(PUBLIC_MODULES) - targets) == [], "modules missing from docs/api/*.md"
    unknown = [t for t in targets if not t.startswith("multihead")]
    assert unknown == []


def test_every_top_level_module_is_documented_or_not_api():
    """A new module under src/multihead/ gets a reference page or is named here as not API."""
    top = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
    }
    top.discard("__init__")
    documented = {m.split(".")[1] for m in PUBLIC_MODULES if m.count(".")}
    assert sorted(top - documented - NOT_API) == []


def test_the_package_names_are_in_the_reference():
    """Each name of `multihead.__all__` is on a page: its module's, a documented package's that
    exports it, or its own."""
    targets = _reference_targets()
    for name in multihead.__all__:
        obj = getattr(multihead, name)
        if inspect.ismodule(obj):
            assert obj.__name__ in targets, name
        elif inspect.isclass(obj) or inspect.isfunction(obj):
            homes = {path.rpartition(".")[0] for path in _public_paths(obj) - {f"multihead.{name}"}}
            assert homes & targets or f"multihead.{name}" in targets, name
    # docs/api/index.md's table says on which page each of them is.
    overview = (API_PAGES / "index.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(\w+)`", overview))
    assert sorted(set(multihead.__all__) - listed - {"__version__"}) == []


def _inventory(path: Path) -> set[str]:
    header, _, body = path.read_bytes().partition(b"zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2")
    return {line.split()[0] for line in zlib.decompress(body).decode().splitlines() if line}


def _readme_sections() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"^## (.+)$", text, re.M)


def test_docs_build_strict(tmp_path):
    """`make docs`'s build, warnings as errors; then what it rendered."""
    missing = [m for m in ("mkdocs", "mkdocstrings", "material") if not _importable(m)]
    if missing:
        why = f"the docs extra is not installed ({', '.join(missing)})"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; make test installs it")
        pytest.skip(f"{why}: pip install -e .[docs]")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log, log

    rendered = _inventory(site / "objects.inv")
    not_rendered = []
    for qualname, obj, _ in _public_objects():
        if inspect.ismodule(obj):
            found = qualname in rendered
        elif inspect.isclass(obj) or (inspect.isfunction(obj) and "." not in obj.__qualname__):
            found = bool(_public_paths(obj) & rendered)
        else:
            continue
        if not found:
            not_rendered.append(qualname)
    assert not_rendered == [], f"public names missing from the built reference: {not_rendered}"

    assert (site / "index.html").exists()
    guides = sorted(p.parent.name for p in (site / "guides").glob("*/index.html"))
    assert len(guides) == len(_readme_sections()), (guides, _readme_sections())
    assert (site / "images").is_dir()


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_readme_pages_split_and_relink():
    """docs/readme_pages.py: one page per `## ` section (not one inside a code block), headings
    raised a level, docs/ paths, #anchors and repo files rewritten for the page's place in the
    site; a link to nothing is left for the strict build to refuse."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("pymdownx")
    spec = importlib.util.spec_from_file_location("readme_pages", ROOT / "docs" / "readme_pages.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    readme = "\n".join(
        [
            "# proj",
            "intro, see [the masks](#masks-and-more)",
            "## Usage `x`",
            "```python",
            "## not a heading",
            "# nor this",
            "```",
            "### Detail",
            "![plot](docs/images/a.png) [here](#detail) [web](https://example.org/#masks)",
            "## Masks and more",
            "[the recipes](Makefile#L1), [tests](tests/), [nothing](no/such.png)",
        ]
    )
    pages, nav, copies = hook.readme_pages(readme)
    assert nav == [("Usage x", "guides/usage-x.md"), ("Masks and more", "guides/masks-and-more.md")]
    pages = dict(pages)
    assert pages["index.md"].startswith("# proj\nintro, see [the masks](guides/masks-and-more.md#")
    usage = pages["guides/usage-x.md"].splitlines()
    assert usage[0] == "# Usage `x`"
    assert usage[2:5] == ["## not a heading", "# nor this", "```"]
    assert usage[5] == "## Detail"
    assert usage[6] == (
        "![plot](../images/a.png) [here](#detail) [web](https://example.org/#masks)"
    )
    assert pages["guides/masks-and-more.md"] == (
        "# Masks and more\n"
        "[the recipes](../files/Makefile#L1), tests (`tests/`), [nothing](no/such.png)\n"
    )
    assert copies == ["Makefile"]
