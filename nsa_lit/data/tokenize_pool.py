"""Tokenize batches of documents in worker processes, results in submission order.

:func:`encode_ordered` takes an iterator of ``(payload, texts)`` and yields ``(payload, token arrays)``
in the same order, whatever worker finishes first: the output of a preparation does not depend on
``num_workers``. At most ``4 * num_workers`` batches are in flight, so a stream of any length is read
lazily (``multiprocessing.Pool.imap`` would read its whole input ahead). Each worker loads the
tokenizer once, from its spec (a trained ``bpe:<n>`` from ``data_dir``).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np

from nsa_lit.data.tokenizer import Tokenizer, load_tokenizer

T = TypeVar("T")
_WORKER_TOKENIZER: Tokenizer | None = None


def start_method() -> str:
    """``fork`` on Linux (a ``spawn``ed worker spends seconds re-importing torch), ``spawn`` elsewhere,
    or ``NSA_LIT_OPTIMIZE_START_METHOD``."""
    forced = os.environ.get("NSA_LIT_OPTIMIZE_START_METHOD")
    if forced:
        return forced
    return "fork" if sys.platform.startswith("linux") else "spawn"


def encode_documents(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids (no special tokens) followed by ``eos``, as int64 arrays; ids checked in range."""
    out = []
    for ids in tok.encode_batch(texts):
        arr = np.asarray(ids + [tok.eos_id], dtype=np.int64)
        if arr.min() < 0 or arr.max() >= tok.vocab_size:
            raise ValueError(f"tokenizer {tok.spec!r} produced ids outside [0, {tok.vocab_size})")
        out.append(arr)
    return out


def _init_worker(spec: str, data_dir: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec, data_dir)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _WORKER_TOKENIZER is not None
    return encode_documents(_WORKER_TOKENIZER, texts)


def encode_ordered(
    batches: Iterable[tuple[T, list[str]]],
    tok: Tokenizer,
    num_workers: int,
    data_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[T, list[np.ndarray]]]:
    """``(payload, texts)`` -> ``(payload, [ids + eos per text])``, in input order; ``num_workers <= 1``: in-process."""
    if num_workers <= 1:
        for payload, texts in batches:
            yield payload, encode_documents(tok, texts)
        return
    ctx = multiprocessing.get_context(start_method())
    pending: deque[tuple[T, Any]] = deque()
    with ctx.Pool(num_workers, initializer=_init_worker,
                  initargs=(tok.spec, None if data_dir is None else str(data_dir))) as pool:
        for payload, texts in batches:
            pending.append((payload, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 4 * num_workers:
                done_payload, result = pending.popleft()
                yield done_payload, result.get()
        while pending:
            done_payload, result = pending.popleft()
            yield done_payload, result.get()
