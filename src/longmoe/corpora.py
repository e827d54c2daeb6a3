"""Text that longmoe can train on or hide needles in without downloading anything: what ships with Python, and two
held-out haystacks shipped in the package (src/longmoe/data/haystacks, built by recipes/bundled/make_haystacks.py
from Debian's Perl modules, which the bundled model never saw). A leaf module: train and eval both read it."""

from __future__ import annotations

import gzip
import sysconfig
from functools import lru_cache
from pathlib import Path

CODE_SUFFIXES = {
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".rb", ".sh", ".md",
    ".rst", ".txt", ".toml", ".cfg", ".json", ".yaml", ".yml", ".html", ".css", ".sql", ".tex", ".pl", ".pm",
}  # fmt: skip
DATA = Path(__file__).with_name("data")
HAYSTACKS = {  # name -> (description, is code)
    "python-docs": ("the English documentation shipped with Python (pydoc_data)", False),
    "perl-docs": ("English prose: the documentation of Perl's core modules (Debian perl-modules-5.36)", False),
    "perl-code": ("Perl source code of the same modules, documentation removed", True),
}


def source_files(root: Path) -> list[Path]:
    """The text and source files under a directory, in a fixed (sorted) order."""
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in CODE_SUFFIXES)


@lru_cache(maxsize=1)
def python_docs_text() -> tuple[str, ...]:
    """English documentation text shipped with CPython (pydoc_data.topics): ~460K characters, 90 topics."""
    import pydoc_data.topics

    return tuple(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def python_stdlib_files() -> list[str]:
    """The Python source files of this interpreter's standard library, without its test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    return sorted(str(f) for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))


@lru_cache(maxsize=4)
def builtin_haystack(name: str) -> str:
    """The text of a named haystack (HAYSTACKS)."""
    if name == "python-docs":
        return "\n".join(python_docs_text())
    if name not in HAYSTACKS:
        raise ValueError(f"no built-in haystack {name!r}; choose from {', '.join(HAYSTACKS)} or give a file/dir")
    return gzip.decompress((DATA / "haystacks" / f"{name}.txt.gz").read_bytes()).decode()
