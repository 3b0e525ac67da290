"""``<data_dir>/meta.json``: the manifest of a prepared dataset, and the checks a consumer makes on it.

Written last by the preparation (and by ``merge``), atomically: its presence means the dataset is
complete. Fields (format version 2; docs/data.md has the table): ``format_version``, ``tokenizer``
(spec), ``tokenizer_sha256`` (of its model/vocabulary file), ``vocab_size``, ``bos_id``, ``eos_id``,
``dtype``, ``sources`` (each source's description), ``splits.{train,val,test}.{documents,tokens,chunks}``
(``test`` is absent from preparations made before the test split existed: :func:`split_tokens` reads
it as empty), ``max_tokens``, ``shard``, ``skipped`` (bad input counts) and the preparation options.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

META_FILENAME = "meta.json"
FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """``<data_dir>/meta.json`` as a dict."""
    return json.loads((Path(data_dir) / META_FILENAME).read_text())


def split_tokens(meta: dict[str, Any], split: str) -> int:
    """Tokens of ``split`` in a manifest; 0 for a split it does not list (``test`` before it existed)."""
    return int(meta.get("splits", {}).get(split, {}).get("tokens", 0))


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_meta(data_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json_atomic(Path(data_dir) / META_FILENAME, meta)


def check_compatible(meta: dict[str, Any], data_dir: str | os.PathLike, *, vocab_size: int | None = None,
                     seq_len: int | None = None, field: str = "data.data_dir") -> None:
    """Raise ``ValueError`` if a model of ``vocab_size`` / ``seq_len`` cannot train on this dataset
    (``field``: the config field that names ``data_dir``, in the messages).

    Checked: a known ``format_version``; ``dtype`` holds every id of ``vocab_size`` (meta's);
    the tokenizer's vocabulary is not larger than the model's (ids would index past the embedding);
    the train split holds at least one sequence of ``seq_len + 1`` tokens.
    """
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{data_dir}/{META_FILENAME}: format_version {version!r} is newer than this code reads "
                         f"({FORMAT_VERSION}): update nsa-lit or prepare the data again")
    data_vocab = int(meta["vocab_size"])
    if np.iinfo(np.dtype(meta["dtype"])).max < data_vocab - 1:
        raise ValueError(f"{data_dir}/{META_FILENAME}: dtype {meta['dtype']} cannot hold ids of vocab_size {data_vocab}")
    if vocab_size is not None and data_vocab > vocab_size:
        raise ValueError(
            f"{field}={str(data_dir)!r} was prepared with tokenizer {meta.get('tokenizer')!r} of "
            f"{data_vocab:,} tokens (meta.json vocab_size), more than the model's vocabulary, "
            f"model.arch.vocab_size={vocab_size:,}: ids >= {vocab_size:,} have no embedding. Set "
            f"model.arch.vocab_size >= {data_vocab}, or prepare the data with the model's tokenizer"
        )
    if seq_len is not None:
        tokens = int(meta["splits"]["train"]["tokens"])
        if tokens < seq_len + 1:
            raise ValueError(
                f"{field}={str(data_dir)!r}: the train split holds {tokens:,} tokens, fewer than one sequence "
                f"of data.seq_len={seq_len} (= model.arch.seq_len; seq_len + 1 = {seq_len + 1:,} tokens): prepare "
                "more data or lower the sequence length"
            )
