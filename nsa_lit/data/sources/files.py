"""``--source files`` (the default when inputs are given): local ``.txt``, ``.jsonl``, ``.jsonl.zst``
and ``.parquet`` files, directories (recursive) and glob patterns.

Documents, in order: each input in the order given; a directory's or a glob's files sorted by path.
A ``.txt`` file is one document (id ``<name>`` or ``<dir>/<relative path>``); a ``.jsonl``
(``.jsonl.zst``: zstandard-compressed, needs ``zstandard``) line is one document (id ``<file>:<line>``,
field ``--text-field``); a ``.parquet`` row is one (id ``<file>:<row>``, column ``--text-field``;
needs ``pyarrow``).

Bad input is never turned into tokens: a binary file (a NUL byte in its first 8 KiB) or a ``.txt``
that is not UTF-8 is skipped whole; a ``.jsonl`` line that is not UTF-8, not JSON, not an object,
lacks the field or holds a non-string is skipped and named ``<file>:<line>``; a null/non-string
Parquet value is skipped and named ``<file>: row <n>`` (all counted; errors under ``--strict``). A
``--text-field`` that the first record of a file does not have is an error (a wrong option, not bad data).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from nsa_lit.data.sources import Document, InputProblems, Source, register

SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")
_SNIFF_BYTES = 8192


def _kind(path: Path) -> str | None:
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """``(file, stable name)`` pairs: files as given, directories and globs expanded in sorted order."""
    files: list[tuple[Path, str]] = []
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text).expanduser()
        if glob.has_magic(text) and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            found = [p for p in matches if p.is_file() and _kind(p) and not p.name.startswith(".")]
            if not found:
                raise FileNotFoundError(f"input {text!r}: the pattern matches no {'/'.join(SUFFIXES)} file")
            base = _glob_base(text)
            files.extend((p, f"{base.name}/{p.relative_to(base).as_posix()}" if base.name else p.as_posix())
                         for p in found)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"input directory {text!r} has no {'/'.join(SUFFIXES)} files")
            files.extend((p, f"{path.name}/{p.relative_to(path).as_posix()}") for p in found)
        elif path.is_file():
            if _kind(path) is None:
                raise ValueError(f"input {text!r}: unsupported file type (expected {', '.join(SUFFIXES)})")
            files.append((path, path.name))
        else:
            raise FileNotFoundError(f"input {text!r} does not exist")
    return files


def _glob_base(pattern: str) -> Path:
    """The directory part of a glob pattern before its first wildcard."""
    parts = Path(os.path.expanduser(pattern)).parts
    keep: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        keep.append(part)
    return Path(*keep) if keep else Path(".")


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head


@register
class LocalFiles(Source):
    name = "files"
    help = "local .txt / .jsonl / .jsonl.zst / .parquet files, directories or globs (the positional inputs)"

    def __init__(self, inputs: Sequence[str | os.PathLike], text_field: str = "text") -> None:
        if not inputs:
            raise ValueError("source 'files' needs input files, directories or globs")
        self.inputs = [os.fspath(p) for p in inputs]
        self.text_field = text_field
        expand_inputs(self.inputs)  # fail early on missing or unsupported inputs

    def documents(self, problems: InputProblems) -> Iterator[Document]:
        for path, name in expand_inputs(self.inputs):
            kind = _kind(path)
            if kind == ".txt":
                yield from self._txt(path, name, problems)
            elif kind == ".jsonl":
                with open(path, "rb") as f:
                    yield from self._jsonl(f, path, name, problems)
            elif kind == ".jsonl.zst":
                yield from self._jsonl_zst(path, name, problems)
            else:
                yield from self._parquet(path, name, problems)

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "inputs": self.inputs, "text_field": self.text_field}

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        parser.add_argument("--text-field", default="text",
                            help="files/hf: JSONL field / Parquet column / dataset column with the text (default: text)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LocalFiles":
        return cls(args.inputs, text_field=args.text_field)

    # ------------------------------------------------------------------------------------ formats
    def _txt(self, path: Path, name: str, problems: InputProblems) -> Iterator[Document]:
        data = path.read_bytes()
        if _is_binary(data[:_SNIFF_BYTES]):
            problems.skip("files", str(path), "binary (NUL bytes), not text")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.skip("files", str(path), f"not UTF-8 (invalid byte at offset {e.start})")
            return
        if text.strip():
            yield name, text

    def _jsonl(self, f: BinaryIO, path: Path, name: str, problems: InputProblems) -> Iterator[Document]:
        field = self.text_field
        first = True
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if first and _is_binary(raw[:_SNIFF_BYTES]):
                problems.skip("files", str(path), "binary (NUL bytes), not JSON lines")
                return
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems.skip("records", where, f"not UTF-8 (invalid byte at offset {e.start})")
                continue
            except json.JSONDecodeError as e:
                problems.skip("records", where, f"not valid JSON ({e})")
                continue
            if not isinstance(record, dict) or field not in record:
                if first and isinstance(record, dict):
                    raise ValueError(f"{where}: no field {field!r} (fields: {sorted(record)}; set --text-field / text_field)")
                problems.skip("records", where, f"no field {field!r}" if isinstance(record, dict) else
                              f"a JSON {type(record).__name__}, not an object")
                first = False
                continue
            first = False
            text = record[field]
            if not isinstance(text, str):
                problems.skip("records", where, f"field {field!r} is {type(text).__name__}, not a string")
                continue
            if text.strip():
                yield f"{name}:{lineno}", text

    def _jsonl_zst(self, path: Path, name: str, problems: InputProblems) -> Iterator[Document]:
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path}: reading .jsonl.zst needs the package 'zstandard' (pip install zstandard)") from None
        with open(path, "rb") as raw:
            reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))  # type: ignore[arg-type]
            try:
                yield from self._jsonl(reader, path, name, problems)
            except zstandard.ZstdError as e:
                problems.skip("files", str(path), f"corrupt zstandard stream, the rest of the file is skipped ({e})")

    def _parquet(self, path: Path, name: str, problems: InputProblems) -> Iterator[Document]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading .parquet inputs needs the package 'pyarrow' (pip install pyarrow)") from None
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            problems.skip("files", str(path), f"not a readable Parquet file ({e})")
            return
        field = self.text_field
        if field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}; set --text-field / text_field)")
        row = 0
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    problems.skip("records", f"{path}: row {row}", f"column {field!r} is {type(text).__name__}, not a string")
                    continue
                if text.strip():
                    yield f"{name}:{row}", text
