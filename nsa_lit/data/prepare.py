"""Tokenize a corpus once into LitData token shards: ``<output>/train``, ``<output>/val``, ``<output>/meta.json``.

Usage::

    python -m nsa_lit.data.prepare --source python-docs --output data/python-docs
    python -m nsa_lit.data.prepare corpus/ extra.jsonl --output data/mine --tokenizer bpe:8000

Inputs: ``.txt`` files (one document per file), ``.jsonl`` (one document per line, field
``--text-field``), ``.parquet`` (column ``--text-field``; needs ``pyarrow``); directories are expanded
recursively. ``--source python-docs`` uses the embedded corpus (:mod:`nsa_lit.data.corpus`).

Each document is tokenized without special tokens and followed by ``eos``. Documents go to ``train`` or
``val`` by a hash of their id (deterministic): those below ``val_fraction``, then, while ``val`` holds
fewer than ``val_tokens`` tokens (``--val-tokens``), the next ones in hash order; at least one ``val``
document when there are two or more. Tokens are first streamed to a temporary flat file, then written
as LitData chunks with ``litdata.optimize(..., item_loader=TokensLoader())``; ``meta.json`` is written
last, so its presence means the preparation finished. Training reads a split as one token stream,
across chunk boundaries (:mod:`nsa_lit.data.windows`), so the chunk size loses no tokens.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from array import array
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # offline: no PyPI version check

import numpy as np

from nsa_lit.data.tokenizer import DEFAULT_TOKENIZER, BPE_FILENAME, Tokenizer, load_tokenizer, parse_bpe_spec, train_bpe

PYTHON_DOCS = "python-docs"
SOURCES = (PYTHON_DOCS,)
META_FILENAME = "meta.json"
SPLITS = ("train", "val")
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
META_FORMAT_VERSION = 1
_TMP_DIRNAME = ".prepare_tmp"
_ENCODE_BATCH = 64


# ----------------------------------------------------------------------------------------------- inputs
def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """(file, stable name) pairs; directories expanded recursively in sorted order."""
    files: list[tuple[Path, str]] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                raise FileNotFoundError(f"input directory {str(raw)!r} has no {'/'.join(INPUT_SUFFIXES)} files")
            files.extend((p, f"{path.name}/{p.relative_to(path).as_posix()}") for p in found)
        elif path.is_file():
            if path.suffix not in INPUT_SUFFIXES:
                raise ValueError(
                    f"input {str(raw)!r}: unsupported file type {path.suffix!r} (expected {', '.join(INPUT_SUFFIXES)})"
                )
            files.append((path, path.name))
        else:
            raise FileNotFoundError(f"input {str(raw)!r} does not exist")
    return files


def _jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} (set --text-field / text_field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield f"{name}:{lineno}", text


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading .parquet inputs needs the package 'pyarrow' (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}; set --text-field / text_field)"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row}: column {text_field!r} is {type(text).__name__}, not a string")
            yield f"{name}:{row}", text


def iter_documents(
    inputs: Sequence[str | os.PathLike] = (),
    source: str | None = None,
    text_field: str = "text",
    max_bytes: int | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` of the inputs (or of ``source``), streaming; empty documents skipped."""
    if source is not None:
        if source != PYTHON_DOCS:
            raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
        from nsa_lit.data.corpus import DEFAULT_MAX_BYTES, python_docs_documents

        yield from python_docs_documents(max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
        return
    for path, name in _expand_inputs(inputs):
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield name, text
        elif path.suffix == ".jsonl":
            yield from ((i, t) for i, t in _jsonl_documents(path, name, text_field) if t.strip())
        else:
            yield from ((i, t) for i, t in _parquet_documents(path, name, text_field) if t.strip())


# ----------------------------------------------------------------------------------------------- split
def doc_hash(doc_id: str) -> float:
    """Deterministic position of a document in [0, 1), from SHA-256 of its id."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(doc_id: str, val_fraction: float) -> str:
    return "val" if doc_hash(doc_id) < val_fraction else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def parse_bytes(value: int | str) -> int:
    """``67108864``, ``"64MB"``/``"64M"`` (binary units: 1 MB = 2**20 bytes) -> bytes."""
    if isinstance(value, int):
        n = value
    else:
        s = value.strip().upper().removesuffix("B") or "0"
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1], 1)
        try:
            n = int(float(s[:-1] if scale > 1 else s) * scale)
        except ValueError:
            raise ValueError(f"chunk_bytes: cannot parse {value!r} (examples: 67108864, 64MB, 512K)") from None
    if n < 64:
        raise ValueError(f"chunk_bytes must be at least 64 bytes, got {value!r}")
    return n


# ----------------------------------------------------------------------------------------------- shards
def _read_range(dtype: str, item: tuple[str, int, int]) -> Iterator[np.ndarray]:
    """optimize() worker function: tokens [start, end) of a flat token file as one item."""
    path, start, end = item
    itemsize = np.dtype(dtype).itemsize
    yield np.fromfile(path, dtype=dtype, count=end - start, offset=start * itemsize)


def _write_shards(
    ranges: list[tuple[Path, int, int]],
    out_dir: Path,
    dtype: np.dtype,
    chunk_bytes: int,
    num_workers: int,
) -> None:
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    from litdata import TokensLoader, optimize

    # Items are slices of the token stream (document boundaries only matter through eos); small items
    # fill chunks well. The chunks, in index order, hold the ranges' tokens in order: training reads
    # them as one stream, across chunk boundaries (nsa_lit.data.windows), so no token is lost here.
    item_tokens = max(1, chunk_bytes // dtype.itemsize // 16)
    inputs: list[tuple[str, int, int]] = []
    for path, start, end in ranges:
        for s in range(start, end, item_tokens):
            inputs.append((str(path), s, min(end, s + item_tokens)))
    if not inputs:
        return
    # optimize() runs its workers as processes and calls multiprocessing.set_start_method(force=True),
    # which would silently change how later DataLoader workers start: restore the previous method.
    previous = multiprocessing.get_start_method(allow_none=True)
    try:
        optimize(
            fn=functools.partial(_read_range, dtype.name),
            inputs=inputs,
            output_dir=str(out_dir),
            chunk_bytes=chunk_bytes,
            item_loader=TokensLoader(),
            num_workers=max(1, num_workers),
            keep_data_ordered=True,
            reorder_files=False,
            start_method=_optimize_start_method(),
            verbose=False,
        )
    finally:
        multiprocessing.set_start_method(previous, force=True)


def _optimize_start_method() -> str:
    """``fork`` on Linux: the workers only slice a token file, and a ``spawn``ed worker spends seconds
    re-importing torch and litdata. ``spawn`` elsewhere (macOS/Windows), or as set by
    ``NSA_LIT_OPTIMIZE_START_METHOD``."""
    forced = os.environ.get("NSA_LIT_OPTIMIZE_START_METHOD")
    if forced:
        return forced
    return "fork" if sys.platform.startswith("linux") else "spawn"


def read_split_tokens(split_dir: str | os.PathLike) -> np.ndarray:
    """All tokens of a prepared split, in stored order, read straight from the chunk files."""
    split_dir = Path(split_dir)
    index = json.loads((split_dir / "index.json").read_text())
    from nsa_lit.data.windows import index_dtype

    dtype = index_dtype(index)
    parts = []
    for chunk in index["chunks"]:
        header = (1 + chunk["chunk_size"] + 1) * 4
        parts.append(np.fromfile(split_dir / chunk["filename"], dtype=dtype, offset=header, count=chunk["dim"]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


# ----------------------------------------------------------------------------------------------- prepare
def _existing_outputs(out: Path) -> list[Path]:
    names = (*SPLITS, META_FILENAME, BPE_FILENAME, _TMP_DIRNAME)
    return [out / n for n in names if (out / n).exists()]


def _remove(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare(
    inputs: Sequence[str | os.PathLike] = (),
    output_dir: str | os.PathLike = "data/prepared",
    *,
    source: str | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
    text_field: str = "text",
    val_fraction: float = 0.01,
    val_tokens: int = 0,
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    num_workers: int = 1,
    overwrite: bool = False,
    max_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (or the embedded ``source``) into ``<output_dir>/{train,val}`` + ``meta.json``.

    Args:
        inputs: ``.txt`` / ``.jsonl`` / ``.parquet`` files or directories (recursive).
        output_dir: where the shards and ``meta.json`` go.
        source: ``"python-docs"`` for the embedded corpus instead of ``inputs``.
        tokenizer: tokenizer spec (see :func:`nsa_lit.data.load_tokenizer`); ``bpe:<n>`` is trained here.
        text_field: JSONL field / Parquet column holding the text.
        val_fraction: fraction of documents (by id hash) in the validation split.
        val_tokens: at least this many tokens in the validation split: documents are added to it in
            hash order (as if ``val_fraction`` were raised) until it holds them. The datamodule asks for
            ``n * seq_len + 1`` to get ``n`` validation sequences. ``ValueError`` if the corpus is too small.
        chunk_bytes: LitData chunk size in bytes (int, or a string like ``"64MB"``).
        num_workers: processes used by ``litdata.optimize`` to write the shards.
        overwrite: replace an existing preparation in ``output_dir``.
        max_bytes: cap on the embedded corpus' text size (default: its module default, ~4 MB).
        progress: show a tqdm progress bar while tokenizing.

    Returns:
        The contents of ``meta.json``.
    """
    t0 = time.time()
    if (source is None) == (not inputs):
        raise ValueError("give either input files/directories or source='python-docs' (--source), not both/neither")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if isinstance(val_tokens, bool) or not isinstance(val_tokens, int) or val_tokens < 0:
        raise ValueError(f"val_tokens must be an integer >= 0, got {val_tokens!r}")
    chunk_bytes = parse_bytes(chunk_bytes)
    if source is None:
        _expand_inputs(inputs)  # fail early on missing/unsupported inputs

    out = Path(output_dir)
    existing = _existing_outputs(out)
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a prepared dataset ({', '.join(p.name for p in existing)}); "
                "pass --overwrite (overwrite=True) to replace it"
            )
        _remove(existing)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / _TMP_DIRNAME
    tmp.mkdir()

    def documents() -> Iterator[tuple[str, str]]:
        return iter_documents(inputs, source=source, text_field=text_field, max_bytes=max_bytes)

    # Tokenizer: bpe:<n> is trained on the training documents first (one extra streaming pass).
    if parse_bpe_spec(tokenizer) is not None:
        train_texts = (text for doc_id, text in documents() if split_of(doc_id, val_fraction) == "train")
        tok: Tokenizer = train_bpe(tokenizer, train_texts, out)
    else:
        tok = load_tokenizer(tokenizer, data_dir=out)
    dtype = token_dtype(tok.vocab_size)

    # Pass 1: tokenize to flat temporary files, one per split.
    files = {s: tmp / f"{s}.bin" for s in SPLITS}
    handles = {s: open(files[s], "wb") for s in SPLITS}
    n_tokens = {s: 0 for s in SPLITS}
    n_docs = {s: 0 for s in SPLITS}
    # Each train document's hash and start in the train token file (16 bytes a document): documents
    # move to val in hash order when val would be empty or hold fewer than val_tokens tokens.
    train_hashes = array("d")
    train_starts = array("q")
    try:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"tokenizing ({tok.spec})", unit="doc", disable=not progress, dynamic_ncols=True)
        batch: list[tuple[str, str]] = []

        def flush() -> None:
            encoded = tok.encode_batch([t for _, t in batch])
            for (doc_id, _), ids in zip(batch, encoded):
                ids.append(tok.eos_id)
                arr = np.asarray(ids, dtype=np.int64)
                if arr.min() < 0 or arr.max() >= tok.vocab_size:
                    raise ValueError(f"tokenizer {tok.spec!r} produced ids outside [0, {tok.vocab_size}) for {doc_id}")
                h = doc_hash(doc_id)
                split = "val" if h < val_fraction else "train"
                if split == "train":
                    train_hashes.append(h)
                    train_starts.append(n_tokens["train"])
                arr.astype(dtype).tofile(handles[split])
                n_tokens[split] += arr.size
                n_docs[split] += 1
            bar.update(len(batch))
            bar.set_postfix(tokens=n_tokens["train"] + n_tokens["val"], refresh=False)
            batch.clear()

        for doc in documents():
            batch.append(doc)
            if len(batch) >= _ENCODE_BATCH:
                flush()
        if batch:
            flush()
        bar.close()
    finally:
        for h in handles.values():
            h.close()

    total_docs = n_docs["train"] + n_docs["val"]
    if total_docs == 0:
        _remove([tmp])
        raise ValueError(f"no non-empty documents found in {list(map(str, inputs)) or source}")

    # Documents moved from train to val (lowest hash first): enough for val_tokens, and one document
    # if val would otherwise be empty (with two documents or more and val_fraction > 0).
    want = max(val_tokens, 1 if val_fraction > 0 and total_docs >= 2 else 0)
    starts = np.append(np.frombuffer(train_starts, dtype=np.int64), n_tokens["train"])  # + the end
    moved: list[int] = []
    if n_tokens["val"] < want:
        have = n_tokens["val"]
        for d in np.argsort(np.frombuffer(train_hashes, dtype=np.float64), kind="stable")[:-1].tolist():
            moved.append(d)  # at most all train documents but one
            have += int(starts[d + 1] - starts[d])
            if have >= want:
                break
        if have < want:
            _remove([tmp, *([out / BPE_FILENAME] if parse_bpe_spec(tokenizer) is not None else [])])
            raise ValueError(
                f"val_tokens={val_tokens:,}: the corpus holds {n_tokens['train'] + n_tokens['val']:,} tokens in "
                f"{total_docs} documents, and at most {have:,} can go to the validation split while one document "
                "stays in train: ask for fewer validation tokens, or prepare more data"
            )
    moved.sort()
    val_ranges: list[tuple[Path, int, int]] = [(files["val"], 0, n_tokens["val"])]
    train_ranges: list[tuple[Path, int, int]] = []
    prev = 0
    for d in moved:
        start, end = int(starts[d]), int(starts[d + 1])
        train_ranges.append((files["train"], prev, start))
        val_ranges.append((files["train"], start, end))
        n_docs["train"] -= 1
        n_docs["val"] += 1
        prev = end
    train_ranges.append((files["train"], prev, n_tokens["train"]))
    n_tokens = {s: sum(b - a for _, a, b in r) for s, r in (("train", train_ranges), ("val", val_ranges))}

    # Pass 2: LitData shards.
    for split, ranges in (("train", train_ranges), ("val", val_ranges)):
        ranges = [(f, a, b) for f, a, b in ranges if b > a]
        if ranges:
            _write_shards(ranges, out / split, dtype, chunk_bytes, num_workers)
    _remove([tmp])

    splits: dict[str, Any] = {}
    for split in SPLITS:
        index = out / split / "index.json"
        chunks = json.loads(index.read_text())["chunks"] if index.is_file() else []
        stored = sum(c["dim"] for c in chunks)
        if stored != n_tokens[split]:
            raise RuntimeError(f"{out / split}: litdata stored {stored} tokens, expected {n_tokens[split]}")
        splits[split] = {"documents": n_docs[split], "tokens": n_tokens[split], "chunks": len(chunks)}

    meta: dict[str, Any] = {
        "format_version": META_FORMAT_VERSION,
        "tokenizer": tok.spec,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "source": source if source is not None else [str(p) for p in inputs],
        "text_field": text_field if source is None else None,
        "val_fraction": val_fraction,
        "val_tokens": val_tokens,
        "chunk_bytes": chunk_bytes,
        "splits": splits,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0, 2),
        "python": platform.python_version(),
    }
    tmp_meta = out / (META_FILENAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_meta, out / META_FILENAME)  # written last: its presence means "complete"
    return meta


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """``<data_dir>/meta.json`` as a dict."""
    return json.loads((Path(data_dir) / META_FILENAME).read_text())


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nsa_lit.data.prepare",
        description="Tokenize a corpus into LitData token shards (<output>/train, <output>/val, <output>/meta.json).",
    )
    p.add_argument("inputs", nargs="*", help=".txt (one document per file), .jsonl, .parquet files or directories")
    p.add_argument("--source", choices=SOURCES, default=None, help="use an embedded corpus instead of inputs")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="mistral-v1 (default) | path/to/*.model | path/to/tokenizer.json | bpe:<vocab_size> | HF name")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for validation (default 0.01)")
    p.add_argument("--val-tokens", type=int, default=0,
                   help="at least this many validation tokens: more documents (in hash order) go to val until it "
                        "holds them; n sequences of seq_len need n * seq_len + 1 (default 0)")
    p.add_argument("--chunk-bytes", default=str(DEFAULT_CHUNK_BYTES), help="LitData chunk size, e.g. 64MB (default 64MB)")
    p.add_argument("--num-workers", type=int, default=1, help="litdata.optimize worker processes (default 1)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap on the embedded corpus' text bytes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing preparation in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chunk_bytes: int | str = int(args.chunk_bytes) if args.chunk_bytes.isdigit() else args.chunk_bytes
    try:
        meta = prepare(
            args.inputs,
            args.output,
            source=args.source,
            tokenizer=args.tokenizer,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            val_tokens=args.val_tokens,
            chunk_bytes=chunk_bytes,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            max_bytes=args.max_bytes,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = meta["splits"]
    print(
        f"wrote {args.output}: train {s['train']['documents']} docs / {s['train']['tokens']:,} tokens, "
        f"val {s['val']['documents']} docs / {s['val']['tokens']:,} tokens "
        f"({meta['tokenizer']}, vocab {meta['vocab_size']}, {meta['dtype']}) in {meta['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
