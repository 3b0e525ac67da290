"""The embedded default corpus: English text that every Python installation carries.

Two sources, read as text and parsed with :mod:`ast` (nothing is imported or executed, nothing is
downloaded):

1. ``pydoc_data/topics.py``: the language-reference topics that ``help()`` shows, one document per topic.
2. The standard library's ``.py`` files: module, class and function docstrings, one document per
   module. Test directories, ``site-packages``, ``idlelib``/``tkinter`` test data and ``encodings``
   (machine-generated codec boilerplate) are skipped.

Documents shorter than ``min_chars`` are dropped; the total is capped at ``max_bytes`` of UTF-8 text.
The order is fixed (topics by name, then modules by path), so a given Python installation always
yields the same corpus. Different Python versions yield somewhat different corpora.
"""
from __future__ import annotations

import ast
import os
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator

DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_MIN_CHARS = 200

# Directory names skipped anywhere below the standard library root.
_SKIP_DIR_NAMES = {
    "site-packages",
    "dist-packages",
    "test",  # Lib/test, tkinter/test, unittest/test, ...
    "tests",
    "idle_test",  # idlelib's test data
    "__pycache__",
    "encodings",
    "pydoc_data",  # read separately, as topics
}


def stdlib_dir() -> Path:
    """The directory of the pure-Python standard library of this interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _topics(root: Path) -> dict[str, str]:
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return {}


def _module_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIR_NAMES and not d.startswith(("test_", "."))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath) / name)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def _docstrings(path: Path, module: str) -> str:
    """Module, class and function docstrings of one file, as one text."""
    try:
        with tokenize.open(path) as f:  # honours PEP 263 coding cookies
            source = f.read()
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    parts: list[str] = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{node.name}"
                d = ast.get_docstring(node, clean=True)
                if d:
                    kind = "class" if isinstance(node, ast.ClassDef) else "def"
                    parts.append(f"{kind} {name}\n\n{d}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{name}.")

    visit(tree.body, f"{module}.")
    return "\n\n".join(parts)


def python_docs_documents(
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    min_chars: int = DEFAULT_MIN_CHARS,
    root: str | os.PathLike | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` of the embedded corpus in a fixed order.

    ``doc_id`` is ``"topics/<name>"`` or ``"stdlib/<relative path>"``. Stops before the document that
    would take the total UTF-8 size over ``max_bytes`` (``None``: no cap).
    """
    base = Path(root) if root is not None else stdlib_dir()
    total = 0

    def candidates() -> Iterator[tuple[str, str]]:
        topics = _topics(base)
        for name in sorted(topics):
            yield f"topics/{name}", topics[name].strip()
        for path in _module_files(base):
            rel = path.relative_to(base).as_posix()
            module = rel[:-3].replace("/", ".")
            if module.endswith(".__init__"):
                module = module[: -len(".__init__")]
            yield f"stdlib/{rel}", _docstrings(path, module)

    for doc_id, text in candidates():
        if len(text) < min_chars:
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            return
        total += size
        yield doc_id, text
