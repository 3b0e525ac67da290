"""Tokenize a corpus once into LitData token shards: ``<output>/{train,val,test}`` and ``<output>/meta.json``.

Usage::

    python -m nsa_lit.data.prepare --source python-docs --output data/python-docs
    python -m nsa_lit.data.prepare corpus/ 'shards/*.jsonl.zst' --output data/mine --max-tokens 15B --num-workers 16
    python -m nsa_lit.data.prepare --source hf --hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-100BT \\
        --output data/fw/part0 --max-tokens 15B --shard 0/4          # on machine 0 of 4, then:
    python -m nsa_lit.data.prepare merge data/fineweb-edu data/fw/part0 data/fw/part1 data/fw/part2 data/fw/part3

This module orchestrates; the corpora are :mod:`nsa_lit.data.sources` (one module each), parallel
tokenization is :mod:`nsa_lit.data.tokenize_pool`, the manifest :mod:`nsa_lit.data.manifest`.

Per document, in the source's order: skipped unless its id hashes into this ``--shard``; tokenized
(no special tokens) and followed by ``eos``; put in ``val`` if its id hashes below ``val_fraction``,
in ``test`` if it hashes into ``[val_fraction, val_fraction + test_fraction)`` (so no document is in
two splits), else in ``val`` while it holds fewer than ``val_tokens`` tokens, then in ``test`` while
it holds fewer than ``test_tokens``, else in ``train``, which stops at exactly ``max_tokens`` tokens
(the last document is truncated). Tokens go to flat part files in
``<output>/.prepare_tmp``; each finished part is recorded in ``progress.json`` (rewritten
atomically) with the number of source documents read, so an interrupted run started again with
the same settings keeps the finished parts and reads on from there. Then the parts are written as
LitData chunks and ``meta.json`` last: its presence means the preparation finished.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # offline: no PyPI version check

import numpy as np

from nsa_lit.data.manifest import (FORMAT_VERSION, META_FILENAME, SPLITS, read_meta, split_tokens, token_dtype,
                                   write_json_atomic, write_meta)
from nsa_lit.data.sources import InputProblems, Source, get_source, registry
from nsa_lit.data.tokenize_pool import encode_ordered, start_method
from nsa_lit.data.tokenizer import BPE_FILENAME, DEFAULT_TOKENIZER, Tokenizer, load_tokenizer, parse_bpe_spec, train_bpe

__all__ = ["prepare", "merge", "read_meta", "read_split_tokens", "doc_hash", "shard_of", "split_of", "hashed_split",
           "token_dtype",
           "parse_count", "PYTHON_DOCS", "SOURCES", "META_FILENAME"]

PYTHON_DOCS = "python-docs"
SOURCES = (PYTHON_DOCS,)  # sources the datamodule can prepare by itself (data.source)
META_FORMAT_VERSION = FORMAT_VERSION
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
DEFAULT_PART_TOKENS = 64 * 2**20  # tokens per resumable part (~128 MB of uint16)
_TMP_DIRNAME = ".prepare_tmp"
_PROGRESS = "progress.json"
_ENCODE_BATCH = 64  # documents per tokenization task


# ----------------------------------------------------------------------------------------------- hashing
def _digest(doc_id: str) -> bytes:
    return hashlib.sha256(doc_id.encode("utf-8")).digest()


def doc_hash(doc_id: str) -> float:
    """Deterministic position of a document in [0, 1), from SHA-256 of its id (decides val)."""
    return int.from_bytes(_digest(doc_id)[:8], "big") / 2.0**64


def shard_of(doc_id: str, num_shards: int) -> int:
    """The ``--shard`` a document belongs to, from other bytes of the same hash (independent of val)."""
    return int.from_bytes(_digest(doc_id)[8:16], "big") % num_shards


def split_of(doc_id: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """The split a document's id hashes to, before any ``val_tokens`` / ``test_tokens`` top-up:
    ``val`` below ``val_fraction``, ``test`` in ``[val_fraction, val_fraction + test_fraction)``,
    else ``train``."""
    return hashed_split(doc_hash(doc_id), val_fraction, test_fraction) or "train"


def hashed_split(h: float, val_fraction: float, test_fraction: float) -> str | None:
    """``val`` / ``test`` for a document hash ``h`` in their ranges, ``None`` otherwise (train or a top-up)."""
    if h < val_fraction:
        return "val"
    if h < val_fraction + test_fraction:
        return "test"
    return None


# ----------------------------------------------------------------------------------------------- parsing
def parse_count(value: int | str, name: str = "max_tokens") -> int:
    """``15000000000``, ``"15B"``, ``"1.5M"``, ``"512K"`` (decimal: K = 1e3, M = 1e6, B/G = 1e9, T = 1e12) -> int."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a count such as 15B, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        s = str(value).strip().upper().replace("_", "").replace(",", "")
        scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}.get(s[-1:], 1)
        digits = s[:-1] if scale > 1 else s
        try:
            n = int(digits) * scale if digits.isdigit() else round(float(digits) * scale)
        except ValueError:
            raise ValueError(f"{name}: cannot parse {value!r} (examples: 15B, 100B, 2.5M, 1000000)") from None
    if n < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return n


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


def parse_shard(value: str | tuple[int, int]) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    if isinstance(value, tuple):
        i, n = value
    else:
        try:
            i, n = (int(x) for x in str(value).split("/"))
        except ValueError:
            raise ValueError(f"--shard: expected i/n such as 0/4, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {i}/{n}: need 0 <= i < n")
    return i, n


def share(total: int, i: int, n: int) -> int:
    """Shard ``i`` of ``n``'s exact share of ``total``: the shares sum to ``total``."""
    return total * (i + 1) // n - total * i // n


# ----------------------------------------------------------------------------------------------- shards
def _read_range(dtype: str, item: tuple[str, int, int]) -> Iterator[np.ndarray]:
    """optimize() worker function: tokens [start, end) of a flat token file as one item."""
    path, start, end = item
    itemsize = np.dtype(dtype).itemsize
    yield np.fromfile(path, dtype=dtype, count=end - start, offset=start * itemsize)


def _write_shards(files: list[tuple[Path, int]], out_dir: Path, dtype: np.dtype, chunk_bytes: int) -> None:
    """The flat token files (path, tokens), concatenated in order, as LitData chunks in ``out_dir``.

    One writer process: it only copies bytes (disk-bound), and the chunk layout then does not depend
    on ``num_workers``."""
    from litdata import TokensLoader, optimize

    # Items are slices of the token stream (document boundaries only matter through eos); training
    # reads the chunks as one stream, across chunk boundaries (nsa_lit.data.windows): no token is lost.
    item_tokens = max(1, chunk_bytes // dtype.itemsize // 16)
    inputs = [(str(path), s, min(n, s + item_tokens)) for path, n in files for s in range(0, n, item_tokens)]
    if not inputs:
        return
    # optimize() calls multiprocessing.set_start_method(force=True), which would silently change how
    # later DataLoader workers start: restore the previous method.
    previous = multiprocessing.get_start_method(allow_none=True)
    try:
        optimize(fn=functools.partial(_read_range, dtype.name), inputs=inputs, output_dir=str(out_dir),
                 chunk_bytes=chunk_bytes, item_loader=TokensLoader(), num_workers=1,
                 keep_data_ordered=True, reorder_files=False, start_method=start_method(), verbose=False)
    finally:
        multiprocessing.set_start_method(previous, force=True)


def read_split_tokens(split_dir: str | os.PathLike) -> np.ndarray:
    """All tokens of a prepared split, in stored order, read straight from the chunk files."""
    from nsa_lit.data.windows import TokenStream

    split_dir = Path(split_dir)
    if not (split_dir / "index.json").is_file():
        return np.zeros(0, dtype=np.uint16)
    stream = TokenStream(split_dir)
    try:
        return stream.read(0, stream.num_tokens)
    finally:
        stream.close()


def _split_chunks(split_dir: Path) -> list[dict[str, Any]]:
    index = split_dir / "index.json"
    return json.loads(index.read_text())["chunks"] if index.is_file() else []


# ----------------------------------------------------------------------------------------------- sources
def resolve_source(inputs: Sequence[str | os.PathLike] = (), source: str | Source | None = None, *,
                   text_field: str = "text", max_bytes: int | None = None) -> Source:
    """A :class:`Source` from the Python API's arguments: inputs -> ``files``; a name; or an instance."""
    if isinstance(source, Source):
        if inputs:
            raise ValueError("give either input files/directories or a source, not both")
        return source
    if source is None or source == "files":
        if not inputs:
            raise ValueError("give input files/directories/globs, or a source (--source: "
                             f"{', '.join(registry())})")
        return get_source("files")(inputs, text_field=text_field)  # type: ignore[call-arg]
    if inputs:
        raise ValueError(f"give either input files/directories or source={source!r}, not both")
    if source == PYTHON_DOCS:
        return get_source(PYTHON_DOCS)(max_bytes=max_bytes)  # type: ignore[call-arg]
    raise ValueError(f"source {source!r}: pass a Source instance from the Python API, or use the command line "
                     f"(known sources: {', '.join(registry())})")


# ----------------------------------------------------------------------------------------------- prepare
class _Parts:
    """Flat token files of one run: part ``k`` is ``part-k.train.bin`` + ``part-k.val.bin``, recorded in
    ``progress.json`` once closed, together with how many source documents had been read by then."""

    def __init__(self, tmp: Path, progress: dict[str, Any], dtype: np.dtype) -> None:
        self.tmp, self.progress, self.dtype = tmp, progress, dtype
        self.handles: dict[str, Any] = {}
        self.current = {s: {"tokens": 0, "documents": 0} for s in SPLITS}

    def path(self, k: int, split: str) -> Path:
        return self.tmp / f"part-{k:05d}.{split}.bin"

    def write(self, split: str, ids: np.ndarray, whole_document: bool) -> None:
        if split not in self.handles:
            k = len(self.progress["parts"])
            self.handles = {s: open(self.path(k, s), "wb") for s in SPLITS}
        ids.astype(self.dtype).tofile(self.handles[split])
        self.current[split]["tokens"] += int(ids.size)
        self.current[split]["documents"] += 1
        self.progress["totals"][split]["tokens"] += int(ids.size)
        self.progress["totals"][split]["documents"] += 1
        if not whole_document:
            self.progress["totals"][split]["truncated"] = True

    @property
    def open_tokens(self) -> int:
        return sum(c["tokens"] for c in self.current.values())

    def close(self, documents_read: int, problems: dict[str, Any]) -> None:
        """Finish the open part (if any) and record it with the stream position and the input
        problems counted up to it (``InputProblems.state()``); rewrite progress.json."""
        if self.handles:
            for f in self.handles.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            self.handles = {}
            self.progress["parts"].append({s: dict(self.current[s]) for s in SPLITS})
            self.current = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
        self.progress["documents_read"] = documents_read
        self.progress["problems"] = problems
        write_json_atomic(self.tmp / _PROGRESS, self.progress)

    def discard_open(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles = {}


def _remove(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _batches(documents: Iterator[tuple[str, str]], start: int, shard: tuple[int, int],
             problems: InputProblems) -> Iterator[tuple[tuple[list[str], int, dict], list[str]]]:
    """((doc ids, documents read after the batch, the input problems counted by then), texts) of
    this shard's documents after the first ``start``. The problems are those of the documents up
    to the batch's last: the tokenizer pool reads batches ahead, and a checkpoint of the
    preparation must not count the problems of documents it will read again on resume."""
    read = start
    ids: list[str] = []
    texts: list[str] = []
    for doc_id, text in documents:
        read += 1
        if shard[1] > 1 and shard_of(doc_id, shard[1]) != shard[0]:
            continue
        ids.append(doc_id)
        texts.append(text)
        if len(texts) >= _ENCODE_BATCH:
            yield (ids, read, problems.state()), texts
            ids, texts = [], []
    yield (ids, read, problems.state()), texts  # the last (possibly empty) batch: the final position


def prepare(
    inputs: Sequence[str | os.PathLike] = (),
    output_dir: str | os.PathLike = "data/prepared",
    *,
    source: str | Source | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
    text_field: str = "text",
    val_fraction: float = 0.01,
    val_tokens: int = 0,
    test_fraction: float = 0.0,
    test_tokens: int = 0,
    max_tokens: int | str | None = None,
    shard: str | tuple[int, int] = (0, 1),
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    num_workers: int = 1,
    overwrite: bool = False,
    max_bytes: int | None = None,
    strict: bool = False,
    part_tokens: int = DEFAULT_PART_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (or ``source``) into ``<output_dir>/{train,val,test}`` + ``meta.json``; returns the meta.

    Args:
        inputs: local files, directories or globs (:mod:`nsa_lit.data.sources.files`).
        source: a registered source name (``"python-docs"``) or a :class:`~nsa_lit.data.sources.Source`.
        tokenizer: tokenizer spec (see :func:`nsa_lit.data.load_tokenizer`); ``bpe:<n>`` is trained here.
        text_field: JSONL field / Parquet column holding the text (``files``).
        val_fraction: documents whose id hashes below it go to ``val``.
        val_tokens: ``val`` gets further documents, in source order, while it holds fewer tokens
            (``n`` sequences of ``seq_len`` need ``n * seq_len + 1``); with ``--shard i/n``, shard i's share.
        test_fraction: documents whose id hashes in ``[val_fraction, val_fraction + test_fraction)`` go to
            ``test``, the held-out split of ``main.py test`` (0: no test split; the command line's default is 0.01).
        test_tokens: like ``val_tokens``, for ``test`` (topped up after ``val``).
        max_tokens: exact ``train`` token budget (``"15B"``); the last document is truncated. With
            ``--shard i/n``, shard i's exact share (the shares sum to ``max_tokens``). ``None``: everything.
        shard: ``"i/n"``: only documents whose id hashes to slice ``i`` of ``n`` (combine with :func:`merge`).
        chunk_bytes: LitData chunk size in bytes (int, or a string like ``"64MB"``).
        num_workers: tokenization processes (the output does not depend on it).
        overwrite: replace a finished preparation in ``output_dir`` (an unfinished one is resumed or replaced anyway).
        max_bytes: cap on the embedded corpus' text size (``source="python-docs"``).
        strict: bad input (binary/non-UTF-8 files, bad records) is an error instead of skipped with a warning.
        part_tokens: tokens per resumable part (an interruption loses at most one part's work).
        progress: show a progress bar while tokenizing.
    """
    t0 = time.time()
    src = resolve_source(inputs, source, text_field=text_field, max_bytes=max_bytes)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, got "
                         f"test_fraction={test_fraction}, val_fraction={val_fraction}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    for name, value in (("val_tokens", val_tokens), ("test_tokens", test_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    budget_total = None if max_tokens is None else parse_count(max_tokens, "max_tokens")
    shard_i, shard_n = parse_shard(shard)
    if shard_n > 1 and parse_bpe_spec(tokenizer) is not None:
        raise ValueError(f"--tokenizer {tokenizer} with --shard {shard_i}/{shard_n}: each shard would train its own "
                         "BPE and the shards could not be merged; prepare one dataset with it first and pass its "
                         "<dir>/tokenizer.json as --tokenizer to every shard")
    chunk_bytes = parse_bytes(chunk_bytes)
    budget = None if budget_total is None else share(budget_total, shard_i, shard_n)
    targets = {"val": share(val_tokens, shard_i, shard_n), "test": share(test_tokens, shard_i, shard_n)}
    if part_tokens < 1:
        raise ValueError(f"part_tokens must be >= 1, got {part_tokens}")

    out = Path(output_dir)
    tmp = out / _TMP_DIRNAME
    bpe = parse_bpe_spec(tokenizer) is not None
    if (out / META_FILENAME).exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a prepared dataset ({META_FILENAME}); "
                                  "pass --overwrite (overwrite=True) to replace it")
        _remove([out / META_FILENAME, tmp])
    settings = {"source": src.describe(), "tokenizer": tokenizer, "val_fraction": val_fraction,
                "val_tokens": val_tokens, "test_fraction": test_fraction, "test_tokens": test_tokens,
                "max_tokens": budget_total, "shard": [shard_i, shard_n],
                "strict": strict, "format_version": FORMAT_VERSION}
    state: dict[str, Any] | None = None
    if (tmp / _PROGRESS).is_file():
        try:
            state = json.loads((tmp / _PROGRESS).read_text())
        except json.JSONDecodeError:
            state = None
        if state is None or state.get("settings") != settings:
            warnings.warn(f"{out}: discarding an unfinished preparation made with other settings", stacklevel=2)
            state = None
    if state is None:  # a fresh start: whatever an earlier, unfinished run left goes
        _remove([tmp, *(out / split for split in SPLITS), *([out / BPE_FILENAME] if bpe else [])])
    out.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(exist_ok=True)
    problems = InputProblems(strict=strict)

    def documents() -> Iterator[tuple[str, str]]:
        return src.documents(problems)

    # Tokenizer: bpe:<n> is trained on this shard's train-hash documents first (one extra pass).
    tok: Tokenizer | None = None
    if bpe and state is not None and (out / BPE_FILENAME).is_file():
        tok = load_tokenizer(tokenizer, data_dir=out)
        if tok.sha256() != state.get("tokenizer_sha256"):
            raise RuntimeError(f"{out / BPE_FILENAME} changed since the interrupted run: delete {out} and start again")
    elif bpe:
        problems.muted = True  # counted in the tokenizing pass
        texts = (t for d, t in documents() if split_of(d, val_fraction, test_fraction) == "train")
        tok = train_bpe(tokenizer, texts, out)
        problems.muted = False
    else:
        tok = load_tokenizer(tokenizer, data_dir=out)
    dtype = token_dtype(tok.vocab_size)
    if state is None:
        state = {"settings": settings, "tokenizer_sha256": tok.sha256(), "documents_read": 0, "parts": [],
                 "totals": {s: {"tokens": 0, "documents": 0} for s in SPLITS}, "tokenized": False,
                 "problems": problems.state()}
        write_json_atomic(tmp / _PROGRESS, state)
    elif state["tokenizer_sha256"] != tok.sha256():
        raise RuntimeError(f"tokenizer {tokenizer!r} changed since the interrupted run in {out} "
                           f"(sha256 {state['tokenizer_sha256'][:12]}... -> {tok.sha256()[:12]}...): delete "
                           f"{tmp} to start again")

    parts = _Parts(tmp, state, dtype)
    if not state["tokenized"]:
        # leftovers of an interrupted run: part files that progress.json does not list
        listed = {parts.path(k, s).name for k in range(len(state["parts"])) for s in SPLITS}
        _remove(p for p in tmp.glob("part-*.bin") if p.name not in listed)
        _tokenize(src, documents, problems, state, parts, tok, budget, (val_fraction, test_fraction), targets,
                  part_tokens, num_workers, out, progress)

    totals = state["totals"]
    for split, asked in (("val", val_tokens), ("test", test_tokens)):
        if totals[split]["tokens"] < targets[split]:
            have = sum(totals[s]["tokens"] for s in SPLITS)
            _remove([tmp])
            stop = "--max-tokens reached" if budget is not None and totals["train"]["tokens"] >= budget \
                else "end of the source"
            raise ValueError(f"{split}_tokens={asked:,}: the corpus holds {have:,} tokens in "
                             f"{sum(totals[s]['documents'] for s in SPLITS)} documents, and only "
                             f"{totals[split]['tokens']:,} went to the {split} split before reading stopped ({stop}"
                             f"{f'; shard {shard_i}/{shard_n} needs {targets[split]:,}' if shard_n > 1 else ''}): "
                             f"ask for fewer {split} tokens, or prepare more data")
    if totals["train"]["tokens"] == 0:
        _remove([tmp])
        raise ValueError(f"no training tokens: {src.describe()} gave {totals['val']['documents']} non-empty "
                         f"documents to val, {totals['test']['documents']} to test and none to train "
                         f"(shard {shard_i}/{shard_n})")
    if budget is not None and totals["train"]["tokens"] < budget:
        warnings.warn(f"max_tokens={budget_total:,}: the corpus gave only {totals['train']['tokens']:,} training "
                      f"tokens{f' to shard {shard_i}/{shard_n} (its share: {budget:,})' if shard_n > 1 else ''}",
                      stacklevel=2)

    # LitData shards from the parts (redone whole if an earlier run stopped while writing them).
    for split in SPLITS:
        _remove([out / split])
        files = [(parts.path(k, split), p[split]["tokens"]) for k, p in enumerate(state["parts"])]
        files = [(f, n) for f, n in files if n > 0]
        if files:
            _write_shards(files, out / split, dtype, chunk_bytes)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        chunks = _split_chunks(out / split)
        stored = sum(c["dim"] for c in chunks)
        if stored != totals[split]["tokens"]:
            raise RuntimeError(f"{out / split}: litdata stored {stored} tokens, expected {totals[split]['tokens']}")
        splits[split] = {"documents": totals[split]["documents"], "tokens": stored, "chunks": len(chunks)}
    description = src.describe()
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.spec,
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "sources": [description],
        "source": PYTHON_DOCS if description["source"] == PYTHON_DOCS else description.get("inputs", description),
        "text_field": description.get("text_field"),
        "val_fraction": val_fraction,
        "val_tokens": val_tokens,
        "test_fraction": test_fraction,
        "test_tokens": test_tokens,
        "max_tokens": budget_total,
        "shard": [shard_i, shard_n],
        "chunk_bytes": chunk_bytes,
        "splits": splits,
        "truncated_last_document": bool(totals["train"].get("truncated", False)),
        "skipped": state["problems"]["counts"],
        "skipped_examples": state["problems"]["examples"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0, 2),
        "python": platform.python_version(),
    }
    write_meta(out, meta)  # written last: its presence means "complete"
    _remove([tmp])
    return meta


def _tokenize(src: Source, documents: Any, problems: InputProblems, state: dict[str, Any], parts: _Parts,
              tok: Tokenizer, budget: int | None, fractions: tuple[float, float], targets: dict[str, int],
              part_tokens: int, num_workers: int, out: Path, progress: bool) -> None:
    """Read on from ``state["documents_read"]``, tokenize, write parts; mark ``state["tokenized"]``.

    ``fractions``: (val, test) hash fractions; ``targets``: the least tokens of ``val`` and ``test``."""
    from tqdm.auto import tqdm

    start = int(state["documents_read"])
    problems.load(state.get("problems", {}))
    stream = documents()
    if start:
        problems.muted = True  # already counted by the interrupted run
        for _ in itertools.islice(stream, start):
            pass
        problems.muted = False
    totals = state["totals"]
    bar = tqdm(desc=f"tokenizing ({tok.spec})", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True, total=budget, initial=totals["train"]["tokens"])
    read, counted = start, problems.state()
    done = budget is not None and totals["train"]["tokens"] >= budget
    results = encode_ordered(_batches(stream, start, tuple(state["settings"]["shard"]), problems), tok,
                             num_workers, out)
    try:
        for (doc_ids, read, counted), encoded in results:
            if done:
                break
            before = totals["train"]["tokens"]
            for doc_id, ids in zip(doc_ids, encoded):
                held_out = hashed_split(doc_hash(doc_id), *fractions) or next(
                    (s for s in ("val", "test") if totals[s]["tokens"] < targets[s]), None)
                if held_out is not None:
                    parts.write(held_out, ids, True)
                    continue
                if budget is not None:
                    room = budget - totals["train"]["tokens"]
                    if ids.size >= room:
                        parts.write("train", ids[:room], ids.size == room)
                        done = True
                        break
                parts.write("train", ids, True)
            bar.update(totals["train"]["tokens"] - before)
            if parts.open_tokens >= part_tokens and not done:
                parts.close(read, counted)
    except BaseException:
        parts.discard_open()  # unrecorded: the next run redoes it
        raise
    finally:
        bar.close()
        if hasattr(results, "close"):
            results.close()
    parts.close(read, counted)
    state["tokenized"] = True
    write_json_atomic(parts.tmp / _PROGRESS, state)


# ----------------------------------------------------------------------------------------------- merge
def merge(output_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, overwrite: bool = False) -> dict[str, Any]:
    """Combine prepared datasets (e.g. the ``--shard i/n`` outputs) into one, with one manifest.

    Each split's chunk files are linked (copied across filesystems) in input order and listed in one
    ``index.json``; token streams are concatenated, nothing is re-tokenized. The inputs must share the
    tokenizer (spec and file hash) and dtype; shards of one ``n`` must each appear once.
    """
    out = Path(output_dir)
    if len(inputs) < 1:
        raise ValueError("merge: give at least one prepared dataset")
    metas = []
    for d in inputs:
        if not (Path(d) / META_FILENAME).is_file():
            raise FileNotFoundError(f"merge: {d} is not a finished preparation ({META_FILENAME} is missing)")
        metas.append(read_meta(d))
    first = metas[0]
    for d, m in zip(inputs, metas):
        for key in ("format_version", "tokenizer", "tokenizer_sha256", "vocab_size", "eos_id", "dtype"):
            if m.get(key) != first.get(key):
                raise ValueError(f"merge: {d} has {key}={m.get(key)!r}, but {inputs[0]} has {first.get(key)!r}")
    shards = [tuple(m.get("shard", (0, 1))) for m in metas]
    ns = {n for _, n in shards}
    sharded = len(ns) == 1 and ns != {1}  # the shards of one preparation: options are the same, shares sum up
    if sharded:
        n = shards[0][1]
        seen = sorted(i for i, _ in shards)
        if seen != list(range(n)):
            dupes = sorted({i for i in seen if seen.count(i) > 1})
            missing = sorted(set(range(n)) - set(seen))
            raise ValueError(f"merge: shards of {n} must each appear once (duplicated: {dupes}, missing: {missing})")
    if (out / META_FILENAME).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a prepared dataset ({META_FILENAME}); pass --overwrite")
    _remove([out / META_FILENAME, *(out / split for split in SPLITS)])
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        chunks: list[dict[str, Any]] = []
        config = None
        for m_i, d in enumerate(inputs):
            src_dir = Path(d) / split
            if not (src_dir / "index.json").is_file():
                continue
            index = json.loads((src_dir / "index.json").read_text())
            config = config or index["config"]
            (out / split).mkdir(exist_ok=True)
            for k, c in enumerate(index["chunks"]):
                name = f"chunk-{m_i}-{k}.bin"
                try:
                    os.link(src_dir / c["filename"], out / split / name)
                except OSError:
                    shutil.copyfile(src_dir / c["filename"], out / split / name)
                chunks.append({**c, "filename": name})
        if chunks:
            write_json_atomic(out / split / "index.json", {"chunks": chunks, "config": config,
                                                          "updated_at": str(time.time())})
        # ``test`` is absent from manifests written before the test split existed: empty there
        splits[split] = {"documents": sum(m["splits"].get(split, {}).get("documents", 0) for m in metas),
                         "tokens": sum(c["dim"] for c in chunks), "chunks": len(chunks)}
        expected = sum(split_tokens(m, split) for m in metas)
        if splits[split]["tokens"] != expected:
            raise RuntimeError(f"merge: {split} holds {splits[split]['tokens']} tokens, the inputs' manifests say {expected}")
    if parse_bpe_spec(first["tokenizer"]) is not None:
        shutil.copyfile(Path(inputs[0]) / BPE_FILENAME, out / BPE_FILENAME)
    budgets = [m.get("max_tokens") for m in metas]
    meta = {
        **{k: first.get(k) for k in ("format_version", "tokenizer", "tokenizer_sha256", "vocab_size", "bos_id",
                                     "eos_id", "dtype", "text_field", "val_fraction", "chunk_bytes", "python")},
        "sources": [s for m in metas for s in m.get("sources", [])],
        "source": first.get("source"),
        "val_tokens": first.get("val_tokens", 0) if sharded else sum(m.get("val_tokens", 0) for m in metas),
        "test_fraction": first.get("test_fraction", 0.0),
        "test_tokens": first.get("test_tokens", 0) if sharded else sum(m.get("test_tokens", 0) for m in metas),
        "max_tokens": first.get("max_tokens") if sharded else
        (sum(budgets) if all(b is not None for b in budgets) else None),
        "shard": [0, 1],
        "merged_from": [{"path": str(d), "shard": list(s)} for d, s in zip(inputs, shards)],
        "splits": splits,
        "truncated_last_document": any(m.get("truncated_last_document") for m in metas),
        "skipped": {k: sum(m.get("skipped", {}).get(k, 0) for m in metas) for k in ("files", "records")},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_meta(out, meta)
    return meta


# ----------------------------------------------------------------------------------------------- CLI
MERGE_USAGE = "python -m nsa_lit.data.prepare merge OUTPUT INPUT [INPUT ...] [--overwrite]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nsa_lit.data.prepare",
        description="Tokenize a corpus into LitData token shards (<output>/train, <output>/val, <output>/test, "
                    "<output>/meta.json).",
        epilog=f"Merge prepared datasets (e.g. the --shard outputs) into one: {MERGE_USAGE}. "
               "An interrupted preparation resumes when run again with the same options.",
    )
    p.add_argument("inputs", nargs="*", help="files: .txt (one document each), .jsonl, .jsonl.zst, .parquet files, "
                                             "directories or globs")
    sources = registry()
    p.add_argument("--source", choices=list(sources), default=None,
                   help="; ".join(f"{name}: {cls.help}" for name, cls in sources.items()) + " (default: files)")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="mistral-v1 (default) | path/to/*.model | path/to/tokenizer.json | bpe:<vocab_size> | HF name")
    p.add_argument("--max-tokens", default=None,
                   help="exact number of training tokens, e.g. 15B (K/M/B/T = 1e3/1e6/1e9/1e12); the last document "
                        "is truncated; with --shard i/n, this shard's share (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for validation (default 0.01)")
    p.add_argument("--val-tokens", type=int, default=0,
                   help="at least this many validation tokens: further documents go to val until it holds them")
    p.add_argument("--val-sequences", type=int, default=None,
                   help="at least this many validation sequences of --seq-len (sets --val-tokens to N * seq_len + 1)")
    p.add_argument("--test-fraction", type=float, default=0.01,
                   help="fraction of documents held out for `main.py test`, disjoint from val (default 0.01; 0: none)")
    p.add_argument("--test-tokens", type=int, default=0,
                   help="at least this many test tokens: further documents go to test (after val) until it holds them")
    p.add_argument("--test-sequences", type=int, default=None,
                   help="at least this many test sequences of --seq-len (sets --test-tokens to N * seq_len + 1)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for --val-sequences / --test-sequences")
    p.add_argument("--num-workers", type=int, default=1, help="tokenization processes (default 1)")
    p.add_argument("--shard", default="0/1", help="i/n: prepare only slice i of n of the documents, by id hash")
    p.add_argument("--chunk-bytes", default=str(DEFAULT_CHUNK_BYTES), help="LitData chunk size, e.g. 64MB (default 64MB)")
    p.add_argument("--part-tokens", type=int, default=DEFAULT_PART_TOKENS,
                   help="tokens per resumable part (default 64Mi)")
    p.add_argument("--strict", action="store_true", help="bad input (binary/non-UTF-8 files, bad records) is an error")
    p.add_argument("--overwrite", action="store_true", help="replace an existing preparation in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = p.add_argument_group("source options")
    added: set[str] = set()
    for cls in sources.values():
        before = set(group._option_string_actions)
        cls.add_arguments(_Unique(group, added))
        added |= set(group._option_string_actions) - before
    return p


class _Unique:
    """Passes ``add_argument`` through, skipping an option another source already added (e.g. --text-field)."""

    def __init__(self, group: Any, added: set[str]) -> None:
        self.group, self.added = group, added

    def add_argument(self, *names: str, **kwargs: Any) -> None:
        if not any(n in self.added for n in names):
            self.group.add_argument(*names, **kwargs)


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nsa_lit.data.prepare merge",
                                description="Merge prepared datasets (e.g. --shard outputs) into one, with one manifest.")
    p.add_argument("output", help="output directory")
    p.add_argument("inputs", nargs="+", help="prepared dataset directories, in order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUTPUT")
    return p


def _held_out_tokens(tokens: int, sequences: int | None, seq_len: int | None, split: str) -> int:
    """``--{split}-tokens``, raised to ``--{split}-sequences N`` sequences of ``--seq-len`` (``N * seq_len + 1``)."""
    if sequences is None:
        return tokens
    if seq_len is None or seq_len < 1:
        raise ValueError(f"--{split}-sequences needs --seq-len (the model's sequence length)")
    return max(tokens, sequences * seq_len + 1)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        margs = build_merge_parser().parse_args(argv[1:])
        try:
            meta = merge(margs.output, margs.inputs, overwrite=margs.overwrite)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        s = meta["splits"]
        print(f"wrote {margs.output}: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens, "
              f"test {s['test']['tokens']:,} tokens from {len(margs.inputs)} datasets")
        return 0
    args = build_parser().parse_args(argv)
    try:
        val_tokens = _held_out_tokens(args.val_tokens, args.val_sequences, args.seq_len, "val")
        test_tokens = _held_out_tokens(args.test_tokens, args.test_sequences, args.seq_len, "test")
        name = args.source or "files"
        src = get_source(name).from_args(args)
        chunk_bytes: int | str = int(args.chunk_bytes) if args.chunk_bytes.isdigit() else args.chunk_bytes
        if name != "files" and args.inputs:
            raise ValueError(f"--source {name} takes no positional inputs (got {args.inputs})")
        meta = prepare((), args.output, source=src, tokenizer=args.tokenizer,
                       val_fraction=args.val_fraction, val_tokens=val_tokens, test_fraction=args.test_fraction,
                       test_tokens=test_tokens, max_tokens=args.max_tokens,
                       shard=args.shard, chunk_bytes=chunk_bytes, num_workers=args.num_workers,
                       overwrite=args.overwrite, strict=args.strict, part_tokens=args.part_tokens,
                       progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = meta["splits"]
    skipped = meta["skipped"]
    print(
        f"wrote {args.output}: train {s['train']['documents']} docs / {s['train']['tokens']:,} tokens, "
        f"val {s['val']['documents']} docs / {s['val']['tokens']:,} tokens, "
        f"test {s['test']['documents']} docs / {s['test']['tokens']:,} tokens "
        f"({meta['tokenizer']}, vocab {meta['vocab_size']}, {meta['dtype']}) in {meta['seconds']} s"
        + (f"; skipped {skipped['files']} files, {skipped['records']} records (see warnings)" if any(skipped.values()) else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
