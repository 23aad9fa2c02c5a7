"""MkDocs hook: the README's sections as the site's guide pages, made at build time.

README.md stays the one source. The text before its first ``## `` heading becomes the home
page (index.md); each ``## `` section becomes a page (``guides/<slug>.md``) with its headings
raised one level, so the section's title is the page's title. The nav entry named "Guides" in
mkdocs.yml is filled with those pages, in the README's order. Links are rewritten for the
site: ``docs/...`` paths lose their ``docs/`` prefix; ``#anchor`` links to another section
point at that section's page; a link to another file of the repo (an image, a JSON result)
points at a copy of it under ``files/``, and one to a folder or a Markdown file outside docs/
becomes its text and the path. A link to nothing that exists fails the strict build.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files
from pymdownx.slugs import slugify

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES_NAV = "Guides"
GUIDES_DIR = "guides"
FILES_DIR = "files"

_slug = slugify(case="lower")  # the slugs of mkdocs.yml's toc: GitHub's, so README anchors hold
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\s+\"[^\"]*\")?\)")


def _heading_text(markdown: str) -> str:
    """A heading as plain text: code spans and links keep only their text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    return text.replace("`", "").strip()


def _lines_outside_code(lines: list[str]):
    """Yield (index, line, in_code) for each line, tracking fenced code blocks."""
    fence = None
    for i, line in enumerate(lines):
        match = _FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
                yield i, line, True
                continue
            if line.strip().startswith(fence):
                fence = None
                yield i, line, True
                continue
        yield i, line, fence is not None


def split_readme(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The README as (home page, [(title, path, page)]), one page per ``## `` section."""
    lines = text.splitlines()
    starts = [
        i for i, line, code in _lines_outside_code(lines) if not code and line.startswith("## ")
    ]
    bounds = [*starts, len(lines)]
    home = "\n".join(lines[: bounds[0]]) + "\n"
    sections = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        title = _heading_text(lines[start][3:])
        body = lines[start:end]
        raised = []
        for _, line, code in _lines_outside_code(body):
            match = None if code else _HEADING.match(line)
            if match and len(match.group(1)) > 1:
                line = "#" * (len(match.group(1)) - 1) + " " + match.group(2)
            raised.append(line)
        sections.append((title, f"{GUIDES_DIR}/{_slug(title, '-')}.md", "\n".join(raised) + "\n"))
    return home, sections


def _anchors(page: str) -> set[str]:
    lines = page.splitlines()
    return {
        _slug(_heading_text(m.group(2)), "-")
        for _, line, code in _lines_outside_code(lines)
        if not code and (m := _HEADING.match(line))
    }


def _relink(page: str, path: str, anchors: dict[str, str], copies: set[str]) -> str:
    """Rewrite the links of one page, at ``path``, for its place in the site; the repo files
    it links to outside docs/ are added to ``copies``."""
    depth = path.count("/")
    up = "../" * depth

    def fix(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return match.group(0)  # a URL or an absolute path: as it is
        file = ROOT / target.partition("#")[0]
        if target.startswith("#"):
            owner = anchors.get(target[1:])
            if owner is not None and owner != path:
                target = up + owner + target
        elif target.startswith("docs/"):
            target = up + target[len("docs/") :]
        elif file.is_file() and file.suffix != ".md":
            copies.add(target.partition("#")[0])
            target = f"{up}{FILES_DIR}/{target}"
        elif file.exists() and not match.group(1).startswith("!"):
            text = match.group(1)[1:-2]
            return f"{text} (`{target}`)"
        return f"{match.group(1)}{target}{match.group(3) or ''})"

    out = []
    for _, line, code in _lines_outside_code(page.splitlines()):
        out.append(line if code else _LINK.sub(fix, line))
    return "\n".join(out) + "\n"


def readme_pages(
    text: str,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """The pages made from README text: [(path, content)], [(title, path)] for the nav, and the
    repo files the pages link to, to copy under ``files/``."""
    home, sections = split_readme(text)
    pages = [("index.md", home)] + [(path, page) for _, path, page in sections]
    anchors: dict[str, str] = {}
    for path, page in pages:
        for anchor in _anchors(page):
            anchors.setdefault(anchor, path)
    copies: set[str] = set()
    pages = [(path, _relink(page, path, anchors, copies)) for path, page in pages]
    return pages, [(title, path) for title, path, _ in sections], sorted(copies)


_PAGES: list[tuple[str, str]] = []
_COPIES: list[str] = []


def on_config(config):
    pages, nav, copies = readme_pages(README.read_text(encoding="utf-8"))
    _PAGES[:], _COPIES[:] = pages, copies
    entries = [e for e in config["nav"] or [] if isinstance(e, dict) and GUIDES_NAV in e]
    if not entries:
        raise ValueError(f"mkdocs.yml's nav needs a '{GUIDES_NAV}' entry for the README's pages")
    entries[0][GUIDES_NAV] = [{title: path} for title, path in nav]
    config["watch"].append(str(README))
    return config


def on_files(files: Files, config) -> Files:
    for path, content in _PAGES:
        if files.get_file_from_path(path) is not None:
            raise ValueError(f"docs/{path} would hide the page made from README.md")
        files.append(File.generated(config, path, content=content))
    for path in _COPIES:
        files.append(File.generated(config, f"{FILES_DIR}/{path}", abs_src_path=str(ROOT / path)))
    return files
