"""Data pipeline: tokenizers, embedded corpus, preparation into LitData shards, datamodule, resume."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import numpy as np
import pytest
import torch

from nsa_lit.data import TokenDataModule, load_tokenizer
from nsa_lit.data import corpus as corpus_mod
from nsa_lit.data.corpus import python_docs_documents
from nsa_lit.data.prepare import main as prepare_main
from nsa_lit.data.prepare import doc_hash, prepare, read_meta, read_split_tokens, split_of, token_dtype
from nsa_lit.data import tokenizer as tokenizer_mod
from nsa_lit.data.tokenizer import train_bpe
from nsa_lit.data.windows import NUMPY_DTYPE_CODES, TokenWindows, WindowSampler, index_dtype

SAMPLE = "Native Sparse Attention compresses, selects and slides. Ünïcödé, tabs\tand  spaces!\n\nNew paragraph."


def _write_corpus(root: Path, docs: list[str]) -> list[tuple[str, str]]:
    """Half the documents as .txt files in root/corpus/, half as lines of root/docs.jsonl.

    Returns the (doc_id, text) pairs in the order prepare() reads them (corpus dir first, then jsonl).
    """
    txt_dir = root / "corpus"
    (txt_dir / "sub").mkdir(parents=True)
    half = len(docs) // 2
    expected = []
    for i, text in enumerate(docs[:half]):
        rel = f"sub/{i:02d}.txt" if i % 2 else f"{i:02d}.txt"
        (txt_dir / rel).write_text(text, encoding="utf-8")
        expected.append((f"corpus/{rel}", text))
    expected.sort()
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(docs[half:], 1):
            f.write(json.dumps({"text": text, "other": i}) + "\n")
            expected.append((f"docs.jsonl:{i}", text))
    return expected


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [text for _, text in python_docs_documents(max_bytes=60_000)]


def _direct_streams(expected_docs: list[tuple[str, str]], val_fraction: float) -> dict[str, np.ndarray]:
    """Each split's token stream by tokenizing its documents directly (mistral-v1, + eos each)."""
    tok = load_tokenizer("mistral-v1")
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for doc_id, text in expected_docs:
        streams[split_of(doc_id, val_fraction)].extend(tok.encode(text) + [tok.eos_id])
    return {k: np.asarray(v, dtype=np.int64) for k, v in streams.items()}


@pytest.fixture(scope="module")
def prepared_streams(tmp_path_factory, docs) -> tuple[Path, dict[str, np.ndarray]]:
    """A small dataset prepared from .txt + .jsonl inputs (shared, read-only; chunks of 2,048 tokens),
    and its splits' token streams by direct tokenization."""
    root = tmp_path_factory.mktemp("prepared")
    expected_docs = _write_corpus(root, docs)
    out = root / "data"
    prepare([root / "corpus", root / "docs.jsonl"], out, chunk_bytes=4096, val_fraction=0.3, progress=False)
    return out, _direct_streams(expected_docs, 0.3)


@pytest.fixture(scope="module")
def prepared(prepared_streams) -> Path:
    return prepared_streams[0]


# ------------------------------------------------------------------------------------------ corpus
def test_corpus_is_deterministic_and_a_few_mb():
    full = list(python_docs_documents())
    ids = [doc_id for doc_id, _ in full]
    assert len(ids) == len(set(ids)) and ids == [i for i in ids if i.startswith("topics/")] + sorted(
        i for i in ids if i.startswith("stdlib/")
    )
    assert ids[0].startswith("topics/") and any(i.startswith("stdlib/") for i in ids)
    assert not any("/test/" in i or "/tests/" in i or "idle_test" in i or "site-packages" in i for i in ids)
    total = sum(len(text.encode("utf-8")) for _, text in full)
    assert 1_500_000 < total <= 4_000_000
    assert min(len(text) for _, text in full) >= 200
    # a second, capped pass yields exactly a prefix of the first (same order, same texts)
    capped = list(python_docs_documents(max_bytes=1_000_000))
    assert any(i.startswith("stdlib/") for i, _ in capped)
    assert capped == full[: len(capped)]
    assert sum(len(t.encode("utf-8")) for _, t in capped) <= 1_000_000


# ------------------------------------------------------------------------------------------ tokenizers
def test_mistral_v1_round_trip():
    tok = load_tokenizer("mistral-v1")
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2 and tok.spec == "mistral-v1"
    ids = tok.encode(SAMPLE)
    assert ids and all(0 <= i < 32000 for i in ids) and tok.eos_id not in ids
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == SAMPLE


def test_trained_bpe_round_trip(tmp_path, docs):
    tok = train_bpe("bpe:400", iter(docs[:20]), tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer("bpe:400", data_dir=tmp_path)
    assert loaded.vocab_size == tok.vocab_size and 259 < loaded.vocab_size <= 400
    ids = loaded.encode(SAMPLE)
    assert loaded.decode(ids) == SAMPLE  # byte-level: exact, even for unseen characters
    assert loaded.eos_id not in ids and loaded.decode([loaded.eos_id]) == "</s>"


@pytest.mark.parametrize("spec", ["no/such/file.model", "no/such/tokenizer.json", "bpe:abc", "bpe:500", "not-a-known-name-xyz"])
def test_tokenizer_errors_name_the_spec(spec, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError, ImportError)) as err:
        load_tokenizer(spec, data_dir=tmp_path)
    assert spec in str(err.value)


class _FakeAutoTokenizer:
    """Stands in for ``transformers.AutoTokenizer``: records each call, loads nothing."""

    calls: list[dict] = []
    local_result = None

    @classmethod
    def from_pretrained(cls, spec, **kwargs):
        cls.calls.append(kwargs)
        if kwargs.get("local_files_only") and cls.local_result is not None:
            return cls.local_result
        raise OSError(f"no files for {spec} (local_files_only={kwargs.get('local_files_only', False)})")


@pytest.fixture
def fake_transformers(monkeypatch):
    import importlib.machinery
    import types

    module = types.ModuleType("transformers")
    module.__spec__ = importlib.machinery.ModuleSpec("transformers", None)
    module.AutoTokenizer = _FakeAutoTokenizer
    monkeypatch.setitem(sys.modules, "transformers", module)
    _FakeAutoTokenizer.calls, _FakeAutoTokenizer.local_result = [], None
    return _FakeAutoTokenizer


def test_hub_name_offline_fails_at_once_without_a_download_attempt(fake_transformers, monkeypatch):
    monkeypatch.setattr(tokenizer_mod, "_hub_reachable", lambda: False)
    with pytest.raises(ValueError, match="'org/some-tokenizer'.*cannot be reached"):
        load_tokenizer("org/some-tokenizer")
    assert fake_transformers.calls == [{"local_files_only": True}]  # never the retrying download


def test_hub_name_online_downloads_after_the_local_miss(fake_transformers, monkeypatch):
    monkeypatch.setattr(tokenizer_mod, "_hub_reachable", lambda: True)
    with pytest.raises(ValueError, match="'org/some-tokenizer'.*could not load it"):
        load_tokenizer("org/some-tokenizer")
    assert fake_transformers.calls == [{"local_files_only": True}, {}]


def test_hub_name_in_the_local_cache_needs_no_network(fake_transformers, monkeypatch):
    class Cached:
        eos_token_id, bos_token_id = 2, 1

        def __len__(self):
            return 100

        def encode(self, text, add_special_tokens):
            return [3, 4]

        def get_vocab(self):
            return {}

    def no_network():
        raise AssertionError("the hub was probed although the tokenizer is cached")

    fake_transformers.local_result = Cached()
    monkeypatch.setattr(tokenizer_mod, "_hub_reachable", no_network)
    tok = load_tokenizer("org/cached")
    assert (tok.vocab_size, tok.eos_id, tok.encode("x")) == (100, 2, [3, 4])
    assert fake_transformers.calls == [{"local_files_only": True}]


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def test_hub_reachable_honours_offline_and_tries_a_connection(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:  # listening: reachable
        port = server.getsockname()[1]
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert tokenizer_mod._hub_reachable(timeout_s=1.0)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not tokenizer_mod._hub_reachable(timeout_s=1.0)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not tokenizer_mod._hub_reachable(timeout_s=1.0)  # the server is closed: connection refused
    monkeypatch.setenv("HF_ENDPOINT", "not a url")
    assert not tokenizer_mod._hub_reachable(timeout_s=1.0)


def test_hub_reachable_through_the_proxy_the_environment_names(monkeypatch):
    """Behind a proxy the hub's own host may not answer a direct connection: the proxy is probed."""
    for name in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy") + PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # never resolves
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert tokenizer_mod._hub_reachable(timeout_s=1.0)
    assert not tokenizer_mod._hub_reachable(timeout_s=1.0)  # the proxy is gone


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_txt_jsonl_writes_shards_and_meta(tmp_path, docs):
    expected_docs = _write_corpus(tmp_path, docs)
    out = tmp_path / "data"
    meta = prepare([tmp_path / "corpus", tmp_path / "docs.jsonl"], out, chunk_bytes=4096, val_fraction=0.3, progress=False)
    assert meta == read_meta(out)
    assert meta["tokenizer"] == "mistral-v1" and meta["vocab_size"] == 32000 and meta["dtype"] == "uint16"
    assert meta["source"] == [str(tmp_path / "corpus"), str(tmp_path / "docs.jsonl")] and meta["created"]

    streams = _direct_streams(expected_docs, 0.3)
    assert streams["val"].size, "choose documents so that the hash split gives a non-empty val split"
    for split in ("train", "val"):
        stored = read_split_tokens(out / split)
        assert stored.dtype == np.uint16
        assert meta["splits"][split]["tokens"] == stored.size == len(streams[split])
        np.testing.assert_array_equal(stored, streams[split])
        assert meta["splits"][split]["chunks"] > 1  # chunk_bytes=4096 splits the stream
    n_docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert n_docs == len(expected_docs) and meta["splits"]["val"]["documents"] > 0

    with pytest.raises(FileExistsError, match="overwrite"):
        prepare([tmp_path / "corpus"], out, progress=False)
    meta2 = prepare([tmp_path / "corpus"], out, overwrite=True, chunk_bytes=4096, progress=False)
    assert meta2["splits"]["train"]["documents"] + meta2["splits"]["val"]["documents"] == len(docs) // 2


def test_token_dtype():
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_shard_dtype_codes_are_litdatas():
    """Reading shards does not import LitData: its dtype codes are copied in nsa_lit.data.windows."""
    from litdata.constants import _NUMPY_DTYPES_MAPPING

    for code, name in enumerate(NUMPY_DTYPE_CODES):
        assert _NUMPY_DTYPES_MAPPING[code] == np.dtype(name)
        assert index_dtype({"config": {"data_format": [f"no_header_numpy:{code}"]}}) == np.dtype(name)
    with pytest.raises(ValueError, match="not a token shard"):
        index_dtype({"config": {"data_format": ["no_header_tensor:8"]}})


def test_prepare_val_tokens_tops_up_val_in_source_order(tmp_path, docs):
    """val_tokens: besides the documents hashing below val_fraction, the documents read while val holds
    fewer than val_tokens tokens go to val; the streams are exactly those documents' tokens."""
    expected_docs = _write_corpus(tmp_path, docs)
    inputs = [tmp_path / "corpus", tmp_path / "docs.jsonl"]
    tok = load_tokenizer("mistral-v1")
    ids = {doc_id: tok.encode(text) + [tok.eos_id] for doc_id, text in expected_docs}
    want = 3000
    meta = prepare(inputs, tmp_path / "out", val_fraction=0.1, val_tokens=want, chunk_bytes=4096, progress=False)

    val, train, topped_up = [], [], 0
    for d, _ in expected_docs:
        if doc_hash(d) < 0.1 or sum(len(ids[v]) for v in val) < want:
            topped_up += doc_hash(d) >= 0.1
            val.append(d)
        else:
            train.append(d)
    assert topped_up >= 1 and train
    assert meta["val_tokens"] == want and meta["splits"]["val"]["tokens"] == sum(len(ids[d]) for d in val) >= want
    assert meta["splits"]["val"]["documents"] == len(val) and meta["splits"]["train"]["documents"] == len(train)
    np.testing.assert_array_equal(read_split_tokens(tmp_path / "out" / "val"), [t for d in val for t in ids[d]])
    np.testing.assert_array_equal(read_split_tokens(tmp_path / "out" / "train"), [t for d in train for t in ids[d]])

    # more than the corpus can give: an error with the numbers, nothing left behind
    total = sum(len(v) for v in ids.values())
    with pytest.raises(ValueError) as err:
        prepare(inputs, tmp_path / "big", val_tokens=10_000_000, progress=False)
    assert "val_tokens=10,000,000" in str(err.value) and f"holds {total:,} tokens" in str(err.value)
    assert not (tmp_path / "big" / "meta.json").exists() and not (tmp_path / "big" / ".prepare_tmp").exists()


def test_prepare_parquet(tmp_path, docs):
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ImportError, match="pyarrow"):
            (tmp_path / "x.parquet").write_bytes(b"PAR1")
            prepare([tmp_path / "x.parquet"], tmp_path / "out", progress=False)
        pytest.skip("pyarrow not installed (the clear error was checked)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs[:6]}), tmp_path / "x.parquet")
    meta = prepare([tmp_path / "x.parquet"], tmp_path / "out", text_field="body", val_fraction=0.3, progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 6
    assert read_split_tokens(tmp_path / "out" / "train").size == meta["splits"]["train"]["tokens"]


def test_prepare_bpe_and_cli(tmp_path, docs, capsys):
    _write_corpus(tmp_path, docs[:8])
    with pytest.raises(SystemExit) as e:
        prepare_main(["--help"])
    assert e.value.code == 0 and "--val-fraction" in capsys.readouterr().out
    rc = prepare_main([str(tmp_path / "corpus"), str(tmp_path / "docs.jsonl"), "-o", str(tmp_path / "out"),
                       "--tokenizer", "bpe:300", "--val-fraction", "0.3", "--no-progress"])
    assert rc == 0
    meta = read_meta(tmp_path / "out")
    assert meta["tokenizer"] == "bpe:300" and meta["vocab_size"] <= 300 and (tmp_path / "out" / "tokenizer.json").is_file()
    assert load_tokenizer("bpe:300", tmp_path / "out").vocab_size == meta["vocab_size"]
    assert prepare_main([str(tmp_path / "corpus"), "-o", str(tmp_path / "out"), "--no-progress"]) == 2  # exists
    assert "overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ datamodule
def test_batches_shape_dtype_range(prepared):
    dm = TokenDataModule(data_dir=str(prepared), seq_len=32, batch_size=4, num_workers=1, source=None, val_batches=2)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 32000
    train = dm.train_dataloader()
    batches = list(train)
    assert len(batches) == len(train) > 2
    for b in batches:
        assert b.dtype == torch.long and b.shape == (4, 33)
        assert 0 <= int(b.min()) and int(b.max()) < 32000
    val = dm.val_dataloader()
    assert len(val) == 2 and [tuple(b.shape) for b in val] == [(4, 33)] * 2
    # the val split is not shuffled: the same batches every time
    assert all(torch.equal(x, y) for x, y in zip(val, val))
    # every training block is a contiguous window of the stored token stream
    stream = read_split_tokens(prepared / "train").astype(np.int64)
    windows = {stream[i : i + 33].tobytes() for i in range(0, stream.size - 32)}
    assert all(row.numpy().tobytes() in windows for row in batches[0])


@pytest.mark.parametrize("seq_len", [1, 7, 255, 2047, 2048, 2049, 3000, 5791, 8151])
def test_windows_cross_chunk_boundaries_and_use_every_token(prepared_streams, seq_len):
    """Window i is tokens [i * seq_len, i * seq_len + seq_len + 1) of the split's stream, whatever the
    chunks (2,048 tokens here): consecutive windows share one token, and without it they are exactly
    the directly tokenized stream; every token but the first is a target once; < seq_len tokens unused."""
    out, streams = prepared_streams
    for split in ("train", "val"):
        dims = [c["dim"] for c in json.loads((out / split / "index.json").read_text())["chunks"]]
        assert len(dims) >= 3 and sum(dims) == streams[split].size
        windows = TokenWindows(out / split, seq_len)
        stream = streams[split]
        n = len(windows)
        assert n == (stream.size - 1) // seq_len
        with pytest.raises(IndexError):
            windows[n]
        if n == 0:  # val at 8,151: shorter than one window
            continue
        rows = [windows[i].astype(np.int64) for i in range(n)]
        assert all(r.shape == (seq_len + 1,) for r in rows)
        assert all(a[-1] == b[0] for a, b in zip(rows, rows[1:]))
        joined = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])
        np.testing.assert_array_equal(joined, stream[: n * seq_len + 1])
        np.testing.assert_array_equal(np.concatenate([r[1:] for r in rows]), stream[1 : n * seq_len + 1])
        assert 0 <= stream.size - joined.size < seq_len


def test_seq_len_longer_than_a_chunk(prepared_streams):
    """Sequences of 2,500 tokens from chunks of 2,048: batches are the stream's consecutive windows."""
    out, streams = prepared_streams
    dm = TokenDataModule(data_dir=str(out), seq_len=2500, batch_size=1, num_workers=0, shuffle=False, source=None)
    dm.setup("fit")
    for loader, split in ((dm.train_dataloader(), "train"), (dm.val_dataloader(), "val")):
        rows = [b[0] for b in loader]
        assert len(rows) == (streams[split].size - 1) // 2500 >= 2
        for i, row in enumerate(rows):
            assert torch.equal(row, torch.from_numpy(streams[split][i * 2500 : i * 2500 + 2501]))


def test_an_epoch_uses_every_window_once(prepared):
    """Shuffled: each epoch a new permutation of all windows (the last partial batch dropped)."""
    dm = TokenDataModule(data_dir=str(prepared), seq_len=32, batch_size=4, num_workers=2, source=None)
    dm.setup("fit")
    windows = TokenWindows(prepared / "train", 32)
    loader = dm.train_dataloader()
    sampler = loader.sampler
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(windows)))
        batches = list(loader)
        assert len(batches) == len(loader) == len(windows) // 4
        expect = np.stack([windows[i] for i in order[: len(batches) * 4]]).astype(np.int64)
        assert torch.equal(torch.cat(batches), torch.from_numpy(expect))
        orders.append(order)
    assert orders[0] != orders[1]
    unshuffled = TokenDataModule(data_dir=str(prepared), seq_len=32, batch_size=4, shuffle=False, source=None)
    unshuffled.setup("fit")
    assert list(unshuffled.train_dataloader().sampler) == list(range(len(windows)))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_ranks_and_resumes_at_any_world_size(world):
    """Ranks get disjoint, equal shares of the epoch's order; a position saved after k batches of b on
    w ranks (k * b * w windows) resumes on any other world size with no window repeated or skipped
    (but the fewer than world size windows left over), every rank the same number of windows."""
    data = list(range(103))
    order = WindowSampler(data, shuffle=True, seed=5).order(0).tolist()
    shares = [list(WindowSampler(data, shuffle=True, seed=5, num_replicas=world, rank=r)) for r in range(world)]
    assert all(len(s) == 103 // world for s in shares)
    assert sorted(i for s in shares for i in s) == sorted(order[: 103 // world * world])
    assert [s[0] for s in shares] == order[:world]
    k, b = 3, 4
    used = [i for s in shares for i in s[: k * b]]
    for other in (1, 2, 5):
        rest = []
        for r in range(other):
            sampler = WindowSampler(data, shuffle=True, seed=5, num_replicas=other, rank=r)
            sampler.resume(0, k * b * world)
            rest.append(list(sampler))
        assert len({len(share) for share in rest}) == 1  # equal shares: no rank ends early
        rest = [i for share in rest for i in share]
        left = 103 // other * other - k * b * world
        assert sorted(rest) == sorted(order[k * b * world: k * b * world + left // other * other])
        if other == world:
            assert rest == [i for s in shares for i in s[k * b :]]


def test_too_little_data_says_how_many_tokens_are_needed_and_held(prepared):
    tokens = {s: read_meta(prepared)["splits"][s]["tokens"] for s in ("train", "val")}  # 8,152 / 5,792
    cases = [  # (seq_len, batch_size, min_val_sequences, split, sequences needed)
        (1100, 8, None, "train", 8),
        (1000, 8, None, "val", 8),
        (100, 2, 100, "val", 100),
    ]
    for seq_len, batch_size, min_val, split, sequences in cases:
        assert (tokens[split] - 1) // seq_len < sequences
        dm = TokenDataModule(data_dir=str(prepared), seq_len=seq_len, batch_size=batch_size, source=None,
                             min_val_sequences=min_val)
        with pytest.raises(ValueError) as err:
            dm.setup("fit")
        msg = str(err.value)
        needed = sequences * seq_len + 1
        assert f"the {split} split of {prepared} holds {tokens[split]:,} tokens" in msg
        assert f"{sequences:,} x {seq_len} + 1 = {needed:,} tokens" in msg, msg
        if split == "val":
            assert f"--val-tokens {needed}" in msg
        if min_val:
            assert f"data.min_val_sequences={min_val}" in msg
    with pytest.raises(ValueError, match="data.min_val_sequences"):
        TokenDataModule(min_val_sequences=0)


def test_embedded_corpus_val_split_is_sized_in_sequences(tmp_path, monkeypatch):
    """Preparing the embedded corpus, the datamodule holds out enough documents for one batch of
    its seq_len (or min_val_sequences), beyond val_fraction; a longer seq_len later is refused."""
    monkeypatch.setattr(corpus_mod, "DEFAULT_MAX_BYTES", 80_000)
    data = tmp_path / "pd"
    dm = TokenDataModule(data_dir=str(data), seq_len=512, batch_size=4, val_fraction=0.01, min_val_sequences=5,
                         test_fraction=0.0, num_workers=0)  # no test split: this slice keeps its tokens for train
    dm.prepare_data()
    meta = read_meta(data)
    assert meta["val_tokens"] == 5 * 512 + 1 <= meta["splits"]["val"]["tokens"]
    dm.setup("fit")
    assert len(TokenWindows(data / "val", 512)) >= 5  # whole documents: a little more than asked
    assert len(dm.val_dataloader()) >= 1 and next(iter(dm.val_dataloader())).shape == (4, 513)
    longer = TokenDataModule(data_dir=str(data), seq_len=2048, batch_size=4, num_workers=0)
    with pytest.raises(ValueError) as err:
        longer.setup("fit")
    assert f"delete {data}" in str(err.value) and "4 x 2048 + 1 = 8,193 tokens" in str(err.value)


def test_missing_data_dir_names_the_field(tmp_path):
    dm = TokenDataModule(data_dir=str(tmp_path / "nope"), source=None)
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "data.data_dir" in msg and str(tmp_path / "nope") in msg and "python -m nsa_lit.data.prepare" in msg


def test_truncated_or_missing_chunk_is_a_corrupt_shard(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    chunk = sorted((data / "train").glob("chunk-*.bin"))[1]
    chunk.write_bytes(chunk.read_bytes()[:-10])
    dm = TokenDataModule(data_dir=str(data), seq_len=32, batch_size=4, source=None)
    with pytest.raises(ValueError, match="corrupt shard") as err:
        dm.setup("fit")
    assert chunk.name in str(err.value)
    chunk.unlink()
    with pytest.raises(ValueError, match="corrupt shard") as err:
        dm.setup("fit")
    assert chunk.name in str(err.value)
    # a whole split of another preparation: every chunk intact, the token count not meta.json's
    shutil.rmtree(data / "train")
    shutil.copytree(prepared / "val", data / "train")
    with pytest.raises(ValueError, match=r"corrupt shard: .*train/index.json lists [\d,]+ tokens, the "
                                         r"dataset's meta.json [\d,]+ for this split"):
        dm.setup("fit")


def test_tokenizer_mismatch_and_seq_len_errors(prepared):
    dm = TokenDataModule(data_dir=str(prepared), tokenizer="bpe:300", source=None)
    with pytest.raises(ValueError) as err:
        dm.prepare_data()
    assert "data.tokenizer" in str(err.value) and str(prepared) in str(err.value) and "mistral-v1" in str(err.value)
    big = read_meta(prepared)["splits"]["val"]["tokens"]
    dm = TokenDataModule(data_dir=str(prepared), seq_len=big, source=None)
    with pytest.raises(ValueError, match="data.seq_len"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="data.seq_len"):
        TokenDataModule(seq_len=0)


def test_embedded_corpus_is_prepared_once(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "DEFAULT_MAX_BYTES", 80_000)  # a small slice of the embedded corpus
    data = tmp_path / "pd"
    dm = TokenDataModule(data_dir=str(data), seq_len=32, batch_size=2, val_fraction=0.2)
    dm.prepare_data()
    meta = read_meta(data)
    assert meta["source"] == "python-docs" and meta["splits"]["val"]["documents"] > 0
    stamp = (data / "meta.json").stat().st_mtime_ns
    TokenDataModule(data_dir=str(data), seq_len=32, batch_size=2).prepare_data()  # reused, not rebuilt
    assert (data / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="data.tokenizer"):
        TokenDataModule(data_dir=str(data), tokenizer="bpe:1000").prepare_data()
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).shape == (2, 33)


def test_position_state_counts_consumed_batches(prepared):
    """Outside a Trainer: the saved position is the number of batches consumed, not handed out."""

    def make():
        dm = TokenDataModule(data_dir=str(prepared), seq_len=32, batch_size=4, num_workers=1, source=None)
        dm.setup("fit")
        return dm

    dm = make()
    loader = dm.train_dataloader()
    it = iter(loader)
    reference = [next(it) for _ in range(6)]
    loader.consumed_batches = lambda: 3  # e.g. a fetcher that read 3 batches ahead
    state = dm.state_dict()
    assert state["train_loader"]["position"] == 12
    del it

    resumed = make()
    resumed.load_state_dict(state)
    again = list(zip(range(3), resumed.train_dataloader()))
    assert all(torch.equal(b, reference[3 + i]) for i, b in again)


# ------------------------------------------------------------------------------------------ resume
def _fit_and_record(data_dir: Path, root: Path, max_steps: int, ckpt_every: int | None = None, ckpt_path=None,
                    break_restore: bool = False, seq_len: int = 32, num_workers: int = 1) -> list[str]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32000, 8)
            self.head = torch.nn.Linear(8, 8)
            self.seen: list[str] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(hashlib.sha1(batch.numpy().tobytes()).hexdigest())
            return self.head(self.emb(batch[:, :-1])).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.head(self.emb(batch[:, :-1])).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = TokenDataModule(data_dir=str(data_dir), seq_len=seq_len, batch_size=4, num_workers=num_workers, source=None,
                         val_batches=2)
    if break_restore:
        dm.load_state_dict = lambda state: None  # the negative control: position not restored
    callbacks = []
    if ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=root, val_check_interval=4,
                        num_sanity_val_steps=0)
    model = Toy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.fixture(scope="module")
def resume_runs(prepared, tmp_path_factory):
    """An uninterrupted run of N steps and a run stopped after K steps (mid-epoch, with a checkpoint)."""
    root = tmp_path_factory.mktemp("resume")
    n, k = 10, 5
    full = _fit_and_record(prepared, root / "full", n)
    first = _fit_and_record(prepared, root / "first", k, ckpt_every=k)
    ckpt = root / "first" / "ckpt" / f"step={k}.ckpt"
    assert ckpt.is_file()
    return full, first, ckpt, n, k


def test_resume_mid_epoch_sees_the_same_batches(prepared, resume_runs, tmp_path):
    full, first, ckpt, n, k = resume_runs
    dm = TokenDataModule(data_dir=str(prepared), seq_len=32, batch_size=4, source=None)
    dm.setup("fit")
    assert len(dm.train_dataloader()) > n  # the stop at step k and the end at step n are mid-epoch
    assert len(full) == n and first == full[:k]
    resumed = _fit_and_record(prepared, tmp_path, n, ckpt_path=ckpt)
    assert resumed == full[k:]
    # the position is in the datamodule's state, not in Lightning's automatic loader state
    state = torch.load(ckpt, weights_only=False)
    assert state["TokenDataModule"]["train_loader"]["position"] == k * 4
    assert "combined_loader" not in state["loops"]["fit_loop"]["state_dict"]


def test_resume_without_restoring_the_position_differs(prepared, resume_runs, tmp_path):
    """Negative control: if load_state_dict does nothing, the resumed run repeats the first batches."""
    full, first, ckpt, n, k = resume_runs
    resumed = _fit_and_record(prepared, tmp_path, n, ckpt_path=ckpt, break_restore=True)
    assert resumed != full[k:] and resumed[0] == full[0]


def test_resume_with_other_num_workers_is_exact(prepared, resume_runs, tmp_path):
    """The position is in windows of the epoch's order: any num_workers resumes on the same batches."""
    full, first, ckpt, n, k = resume_runs
    for workers in (0, 2):
        assert _fit_and_record(prepared, tmp_path / str(workers), n, ckpt_path=ckpt, num_workers=workers) == full[k:]


def test_resume_across_epochs(prepared, tmp_path):
    """Epochs of 5 batches (22 windows of 360 + 1 tokens): stopped at the end of epoch 0 (step 5) or in
    epoch 1 (step 7), the resumed runs see the uninterrupted run's batches, epoch 2 included."""
    assert (read_meta(prepared)["splits"]["train"]["tokens"] - 1) // 360 == 22
    n = 13
    full = _fit_and_record(prepared, tmp_path / "full", n, seq_len=360)
    assert len(full) == n and len(set(full[:5])) == 5 and set(full[:5]) != set(full[5:10])  # 2 of 22 dropped
    for k in (5, 7):
        first = _fit_and_record(prepared, tmp_path / f"first{k}", k, ckpt_every=k, seq_len=360)
        assert first == full[:k]
        ckpt = tmp_path / f"first{k}" / "ckpt" / f"step={k}.ckpt"
        assert _fit_and_record(prepared, tmp_path / f"resumed{k}", n, ckpt_path=ckpt, seq_len=360) == full[k:], k


# ------------------------------------------------------------------------------------------ benchmark
def test_data_throughput_benchmark_counts_tokens_exactly(tmp_path):
    """``benchmarks/data_throughput.py`` on a slice of the corpus: the tokenization rows count exactly the
    tokens of a direct tokenization (eos included) for any worker count, and the delivery rows' rates
    and margins follow from their batch counts."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import data_throughput

    out = tmp_path / "dt.json"
    data_throughput.main(["--tokenizers", "mistral-v1", "--workers", "1,2", "--max-bytes", "20000",
                          "--loaders", "2x64:0", "2x64:1", "--synthetic-tokens", "20K", "--seconds", "0.5",
                          "--need", "x=1000", "--no-progress", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    tok = load_tokenizer("mistral-v1")
    expected = sum(len(tok.encode(text)) + 1 for _, text in python_docs_documents(max_bytes=20000))
    assert [(r["workers"], r["tokens"]) for r in rows if r["part"] == "tokenize"] == [(1, expected), (2, expected)]
    delivered = [r for r in rows if r["part"] == "deliver"]
    assert [r["num_workers"] for r in delivered] == [0, 1]
    for r in delivered:
        assert r["batches"] >= 2 and r["tokens_per_sec"] == pytest.approx(r["batches"] * 2 * 64 / r["seconds"], rel=2e-3)
        assert r["margin"]["x"]["per_gpu"] == pytest.approx(r["steady_tokens_per_sec"] / 1000, abs=0.06)
        assert r["margin"]["x"]["one_rank_for_node"] == pytest.approx(r["steady_tokens_per_sec"] / 8000, abs=0.06)
    one_process = delivered[0]["steady_tokens_per_sec"]
    assert delivered[1]["margin"]["x"]["per_process_x_workers"] == pytest.approx(one_process / 8000, abs=0.06)


def _fit_windows(data_dir: Path, root: Path, max_steps: int, batch_size: int, ckpt_every=None,
                 ckpt_path=None) -> list[tuple[int, int]]:
    """``(epoch, window index)`` of every sequence a Trainer trained on, in order."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    windows = TokenWindows(Path(data_dir) / "train", 32)
    index = {windows[i].astype(np.int64).tobytes(): i for i in range(len(windows))}

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, int]] = []

        def training_step(self, batch, batch_idx):
            self.seen += [(self.current_epoch, index[row.numpy().tobytes()]) for row in batch]
            return self.p.pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = TokenDataModule(data_dir=str(data_dir), seq_len=32, batch_size=batch_size, num_workers=0,
                         source=None)
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1,
                                 filename="{step}")] if ckpt_every else []
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=root, limit_val_batches=0, num_sanity_val_steps=0)
    model = Toy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("batch_size", [2, 8])
def test_resume_with_another_batch_size_neither_repeats_nor_skips(prepared, tmp_path, batch_size):
    """Stopped after 5 batches of 4 (20 windows) and resumed with batches of 2 or 8: epoch 0 goes on
    with window 20 of its order to the last full batch, epoch 1 starts at its beginning, and a
    checkpoint of the resumed run saves the windows actually used."""
    n = len(TokenWindows(Path(prepared) / "train", 32))
    order = [WindowSampler(list(range(n)), shuffle=True, seed=42).order(e).tolist() for e in (0, 1)]
    first = _fit_windows(prepared, tmp_path / "first", 5, 4, ckpt_every=5)
    assert first == [(0, i) for i in order[0][:20]]
    ckpt = tmp_path / "first" / "ckpt" / "step=5.ckpt"
    rest = (n - 20) // batch_size  # batches left in epoch 0
    resumed = _fit_windows(prepared, tmp_path / "resumed", 5 + rest + 2, batch_size, ckpt_every=5 + 3,
                           ckpt_path=ckpt)
    assert [i for e, i in resumed if e == 0] == order[0][20: 20 + rest * batch_size]
    assert [i for e, i in resumed if e == 1] == order[1][: 2 * batch_size]
    saved = torch.load(tmp_path / "resumed" / "ckpt" / "step=8.ckpt", weights_only=False)
    assert saved["TokenDataModule"]["train_loader"]["position"] == 20 + 3 * batch_size


def test_auto_prepare_too_small_for_the_held_out_splits_names_the_run_fields(tmp_path):
    """The embedded corpus cannot hold 8 validation and 8 test sequences of 65,536 tokens: the error
    says it in the datamodule's fields, not in prepare()'s arguments."""
    dm = TokenDataModule(data_dir=str(tmp_path / "d"), seq_len=65536, batch_size=8, source="python-docs")
    with pytest.raises(ValueError, match=r"^data.seq_len=65536, data.batch_size=8: the python-docs corpus "
                                         r"cannot hold validation and test splits of 8 sequences .*Fix: lower "
                                         r"data.batch_size, model.arch.seq_len"):
        dm.prepare_data()
    assert not (tmp_path / "d" / "meta.json").exists()
