"""Preparation at scale: exact token budget, parallel tokenization, --shard + merge, resume after an
interruption; every check against a direct tokenization of the same small local files."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import numpy as np
import pytest

from nsa_lit.data import tokenize_pool
from nsa_lit.data.prepare import (doc_hash, main as prepare_main, merge, parse_count, prepare, read_meta,
                                  read_split_tokens, shard_of)
from nsa_lit.data.sources import InputProblems
from nsa_lit.data.sources.files import LocalFiles
from nsa_lit.data.tokenizer import load_tokenizer

WORDS = "attention sparse latent window block select compress token query key value head layer".split()
VAL_FRACTION = 0.2


def _write_docs(root: Path, n: int = 90, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` documents of 5-60 random words as lines of root/docs.jsonl; returns (doc_id, text) in order."""
    rng = random.Random(seed)
    docs = []
    with open(root / "docs.jsonl", "w") as f:
        for i in range(1, n + 1):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + f" #{i}"
            f.write(json.dumps({"text": text}) + "\n")
            docs.append((f"docs.jsonl:{i}", text))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    docs = _write_docs(root)
    tok = load_tokenizer("mistral-v1")
    ids = {d: tok.encode(t) + [tok.eos_id] for d, t in docs}
    return root, docs, ids, tok.eos_id


def _documents(stream: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    """A split's stream cut into documents at eos (mistral-v1 never encodes eos inside a text)."""
    cuts = np.flatnonzero(stream == eos)
    return [tuple(int(t) for t in d) for d in np.split(stream, cuts + 1) if d.size]


def _prep(root: Path, out: Path, **kw):
    kw.setdefault("val_fraction", VAL_FRACTION)
    return prepare([root / "docs.jsonl"], out, chunk_bytes=2048, progress=False, **kw)


def test_parse_count():
    assert parse_count("15B") == 15 * 10**9 and parse_count("100b") == 10**11 and parse_count("2.5M") == 2_500_000
    assert parse_count("512K") == 512_000 and parse_count(1234) == 1234 and parse_count("1_000") == 1000
    for bad in ("abc", "0", "-5", "1.5.2B", True):
        with pytest.raises(ValueError, match="max_tokens"):
            parse_count(bad)


@pytest.mark.parametrize("budget", [1, 137, 1000])
def test_budget_stops_at_exactly_max_tokens(corpus, tmp_path, budget):
    """train holds exactly max_tokens tokens: the train documents' stream, in order, cut at the budget
    (the last document truncated); val holds the val documents read before the budget was reached."""
    root, docs, ids, _ = corpus
    meta = _prep(root, tmp_path / "out", max_tokens=budget)
    train, val = [], []
    for d, _ in docs:
        if doc_hash(d) < VAL_FRACTION:
            val += ids[d]
        else:
            train += ids[d]
            if len(train) >= budget:
                break
    assert meta["splits"]["train"]["tokens"] == budget == read_split_tokens(tmp_path / "out" / "train").size
    np.testing.assert_array_equal(read_split_tokens(tmp_path / "out" / "train"), train[:budget])
    np.testing.assert_array_equal(read_split_tokens(tmp_path / "out" / "val"), val)
    assert meta["max_tokens"] == budget and meta["truncated_last_document"] == (len(train) > budget)


def test_budget_larger_than_the_corpus_warns(corpus, tmp_path):
    root, docs, ids, _ = corpus
    total_train = sum(len(ids[d]) for d, _ in docs if doc_hash(d) >= VAL_FRACTION)
    with pytest.warns(UserWarning, match=f"only {total_train:,} training tokens"):
        meta = _prep(root, tmp_path / "out", max_tokens="1M")
    assert meta["splits"]["train"]["tokens"] == total_train


def test_workers_give_the_same_output(corpus, tmp_path, monkeypatch):
    """Tokenizing in 3 processes (12 batches of 8 documents, results in order) writes the same streams."""
    root, docs, ids, _ = corpus
    monkeypatch.setattr("nsa_lit.data.prepare._ENCODE_BATCH", 8)
    one = _prep(root, tmp_path / "one", max_tokens=2000, num_workers=1)
    three = _prep(root, tmp_path / "three", max_tokens=2000, num_workers=3)
    for split in ("train", "val"):
        assert one["splits"][split] == three["splits"][split] and three["splits"][split]["documents"] > 8
        np.testing.assert_array_equal(read_split_tokens(tmp_path / "one" / split),
                                      read_split_tokens(tmp_path / "three" / split))


def test_shards_and_merge_lose_and_duplicate_no_document(corpus, tmp_path):
    """3 shards (by id hash) merged hold exactly the single run's documents, each once; the budget's
    shares sum to max_tokens exactly."""
    root, docs, ids, eos = corpus
    single = _prep(root, tmp_path / "single")
    parts = [tmp_path / f"s{i}" for i in range(3)]
    for i, out in enumerate(parts):
        meta = _prep(root, out, shard=f"{i}/3")
        shard_docs = [d for d, _ in docs if shard_of(d, 3) == i]
        assert 0 < meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(shard_docs)
    assert prepare_main(["merge", str(tmp_path / "merged"), *map(str, parts)]) == 0
    merged = read_meta(tmp_path / "merged")
    assert merged["shard"] == [0, 1] and [m["shard"] for m in merged["merged_from"]] == [[0, 3], [1, 3], [2, 3]]
    for split in ("train", "val"):
        assert merged["splits"][split]["documents"] == single["splits"][split]["documents"]
        assert merged["splits"][split]["tokens"] == single["splits"][split]["tokens"]
        got = sorted(_documents(read_split_tokens(tmp_path / "merged" / split), eos))
        want = sorted(tuple(ids[d]) for d, _ in docs if (doc_hash(d) < VAL_FRACTION) == (split == "val"))
        assert got == want and len(set(got)) == len(got)  # every document once (texts are unique: "#i")
        # the merged stream is the shards' streams, in order
        np.testing.assert_array_equal(read_split_tokens(tmp_path / "merged" / split),
                                      np.concatenate([read_split_tokens(p / split) for p in parts]))

    # with a budget: shard i gets its exact share, the merged train split exactly max_tokens
    budgeted = [tmp_path / f"b{i}" for i in range(3)]
    shares = [_prep(root, out, shard=(i, 3), max_tokens=1001)["splits"]["train"]["tokens"] for i, out in enumerate(budgeted)]
    assert shares == [333, 334, 334]
    assert merge(tmp_path / "bm", budgeted)["splits"]["train"]["tokens"] == 1001

    with pytest.raises(ValueError, match=r"duplicated: \[1\], missing: \[2\]"):
        merge(tmp_path / "dup", [parts[0], parts[1], parts[1]])
    with pytest.raises(FileExistsError, match="overwrite"):
        merge(tmp_path / "merged", parts)


def test_merge_refuses_other_tokenizers(corpus, tmp_path):
    root, *_ = corpus
    _prep(root, tmp_path / "a")
    prepare([root / "docs.jsonl"], tmp_path / "b", tokenizer="bpe:300", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="BPE"):
        prepare([root / "docs.jsonl"], tmp_path / "c", tokenizer="bpe:300", shard="0/2", progress=False)


class _Interrupted(LocalFiles):
    """The files source, stopped by an exception after ``fail_after`` documents (a killed run)."""

    fail_after: int | None = None

    def documents(self, problems: InputProblems):
        for n, doc in enumerate(super().documents(problems)):
            if self.fail_after is not None and n == self.fail_after:
                raise KeyboardInterrupt
            yield doc


def test_interrupted_preparation_resumes_without_redoing_work(corpus, tmp_path, monkeypatch):
    """Killed after 70 of 90 documents, with parts of ~200 tokens recorded: the next run with the same
    options keeps the finished parts (same files), tokenizes only the documents after the last
    recorded one, and writes exactly the uninterrupted run's streams."""
    root, docs, ids, _ = corpus
    monkeypatch.setattr("nsa_lit.data.prepare._ENCODE_BATCH", 8)  # parts close between batches
    reference = _prep(root, tmp_path / "ref", max_tokens=2500, part_tokens=200)
    out = tmp_path / "out"
    src = _Interrupted([root / "docs.jsonl"])
    src.fail_after = 70
    with pytest.raises(KeyboardInterrupt):
        prepare(source=src, output_dir=out, val_fraction=VAL_FRACTION, max_tokens=2500, part_tokens=200,
                chunk_bytes=2048, progress=False)
    progress = json.loads((out / ".prepare_tmp" / "progress.json").read_text())
    assert not (out / "meta.json").exists() and len(progress["parts"]) >= 3
    read = progress["documents_read"]
    assert 0 < read <= 70
    kept = {p.name: p.stat().st_mtime_ns for p in (out / ".prepare_tmp").glob("part-*.bin")}
    assert len(kept) >= 2 * len(progress["parts"])  # + the unrecorded part that was being written

    tokenized: list[str] = []
    real = tokenize_pool.encode_documents
    monkeypatch.setattr(tokenize_pool, "encode_documents", lambda tok, texts: tokenized.extend(texts) or real(tok, texts))
    recorded = {f"part-{k:05d}.{s}.bin" for k in range(len(progress["parts"])) for s in ("train", "val")}
    mtimes: dict[str, int] = {}
    real_write = __import__("nsa_lit.data.prepare", fromlist=["_write_shards"])._write_shards

    def spy_write(files, *args, **kwargs):  # the kept parts are the very files of the first run
        mtimes.update({f.name: f.stat().st_mtime_ns for f, _ in files if f.name in recorded})
        return real_write(files, *args, **kwargs)

    monkeypatch.setattr("nsa_lit.data.prepare._write_shards", spy_write)
    src.fail_after = None
    meta = prepare(source=src, output_dir=out, val_fraction=VAL_FRACTION, max_tokens=2500, part_tokens=200,
                   chunk_bytes=2048, progress=False)
    assert tokenized and tokenized[0] == docs[read][1]  # resumed right after the last recorded document
    assert all(text not in tokenized for _, text in docs[:read])
    assert mtimes and all(kept[name] == t for name, t in mtimes.items())
    for split in ("train", "val"):
        assert meta["splits"][split] == reference["splits"][split]
        np.testing.assert_array_equal(read_split_tokens(out / split), read_split_tokens(tmp_path / "ref" / split))
    assert not (out / ".prepare_tmp").exists()


def test_an_unfinished_run_with_other_options_does_not_block(corpus, tmp_path, monkeypatch):
    root, docs, ids, _ = corpus
    monkeypatch.setattr("nsa_lit.data.prepare._ENCODE_BATCH", 8)
    out = tmp_path / "out"
    src = _Interrupted([root / "docs.jsonl"])
    src.fail_after = 50
    with pytest.raises(KeyboardInterrupt):
        prepare(source=src, output_dir=out, val_fraction=VAL_FRACTION, part_tokens=100, progress=False)
    (out / "train").mkdir()  # debris of a run killed while writing shards
    with pytest.warns(UserWarning, match="discarding an unfinished preparation"):
        meta = _prep(root, out, val_fraction=0.5)
    assert meta["val_fraction"] == 0.5 and meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 90


def test_cli_budget_shard_val_sequences(corpus, tmp_path, capsys):
    root, *_ = corpus
    rc = prepare_main([str(root / "docs.jsonl"), "-o", str(tmp_path / "o"), "--max-tokens", "1.5K", "--shard", "1/2",
                       "--val-sequences", "3", "--seq-len", "64", "--val-fraction", "0", "--num-workers", "2",
                       "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    meta = read_meta(tmp_path / "o")
    assert meta["splits"]["train"]["tokens"] == 750 and meta["shard"] == [1, 2]
    assert meta["val_tokens"] == 3 * 64 + 1 and meta["splits"]["val"]["tokens"] >= (3 * 64 + 1) // 2
    assert prepare_main([str(root / "docs.jsonl"), "-o", str(tmp_path / "p"), "--val-sequences", "3"]) == 2
    assert "--seq-len" in capsys.readouterr().err


def test_a_resumed_preparation_counts_each_bad_record_once(corpus, tmp_path, monkeypatch):
    """With tokenizer workers the documents are read ahead of what is written; a checkpoint of the
    preparation records the input problems of the documents up to its position only, so the
    resumed run's ``skipped`` counts equal an uninterrupted run's."""
    root, docs, ids, _ = corpus
    monkeypatch.setattr("nsa_lit.data.prepare._ENCODE_BATCH", 4)
    lines = (root / "docs.jsonl").read_text().splitlines()
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    # a broken record after every 5th document: 18 of them among the 90 documents
    (noisy / "docs.jsonl").write_text("\n".join(
        x for i, line in enumerate(lines) for x in ([line, "{broken"] if i % 5 == 4 else [line])) + "\n")
    reference = prepare([noisy / "docs.jsonl"], tmp_path / "ref", val_fraction=VAL_FRACTION, part_tokens=150,
                        chunk_bytes=2048, num_workers=2, progress=False)
    assert reference["skipped"]["records"] == 18
    src = _Interrupted([noisy / "docs.jsonl"])
    src.fail_after = 70
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(source=src, output_dir=out, val_fraction=VAL_FRACTION, part_tokens=150, chunk_bytes=2048,
                num_workers=2, progress=False)
    progress = json.loads((out / ".prepare_tmp" / "progress.json").read_text())
    read = progress["documents_read"]
    # the broken records after the first `read` documents but the one right after the last
    assert 0 < read < 70 and progress["problems"]["counts"]["records"] == (read - 1) // 5
    src.fail_after = None
    meta = prepare(source=src, output_dir=out, val_fraction=VAL_FRACTION, part_tokens=150, chunk_bytes=2048,
                   num_workers=2, progress=False)
    assert meta["skipped"] == reference["skipped"]
    assert meta["splits"] == reference["splits"]
