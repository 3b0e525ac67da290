"""``--source python-docs``: the embedded corpus of :mod:`nsa_lit.data.corpus` (help() topics and
standard-library docstrings of this Python installation; nothing is downloaded)."""
from __future__ import annotations

import argparse
import platform
from typing import Any, Iterator

from nsa_lit.data.sources import Document, InputProblems, Source, register


@register
class PythonDocs(Source):
    name = "python-docs"
    help = "the embedded corpus: help() topics and stdlib docstrings of this Python (--max-bytes caps it)"

    def __init__(self, max_bytes: int | None = None) -> None:
        from nsa_lit.data.corpus import DEFAULT_MAX_BYTES

        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes

    def documents(self, problems: InputProblems) -> Iterator[Document]:
        from nsa_lit.data.corpus import python_docs_documents

        return python_docs_documents(max_bytes=self.max_bytes)

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "max_bytes": self.max_bytes, "python": platform.python_version()}

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        parser.add_argument("--max-bytes", type=int, default=None, help="python-docs: cap on the text bytes (default ~4 MB)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PythonDocs":
        return cls(max_bytes=args.max_bytes)
