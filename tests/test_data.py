"""Data pipeline: tokenizers, embedded corpus, preparation into LitData shards, datamodule, resume."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
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
from nsa_lit.data.prepare import prepare, read_meta, read_split_tokens, split_of, token_dtype
from nsa_lit.data.tokenizer import train_bpe

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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, docs) -> Path:
    """A small dataset prepared from .txt + .jsonl inputs (shared, read-only)."""
    root = tmp_path_factory.mktemp("prepared")
    _write_corpus(root, docs)
    out = root / "data"
    prepare([root / "corpus", root / "docs.jsonl"], out, chunk_bytes=4096, val_fraction=0.3, progress=False)
    return out


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


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_txt_jsonl_writes_shards_and_meta(tmp_path, docs):
    expected_docs = _write_corpus(tmp_path, docs)
    out = tmp_path / "data"
    meta = prepare([tmp_path / "corpus", tmp_path / "docs.jsonl"], out, chunk_bytes=4096, val_fraction=0.3, progress=False)
    assert meta == read_meta(out)
    assert meta["tokenizer"] == "mistral-v1" and meta["vocab_size"] == 32000 and meta["dtype"] == "uint16"
    assert meta["source"] == [str(tmp_path / "corpus"), str(tmp_path / "docs.jsonl")] and meta["created"]

    tok = load_tokenizer("mistral-v1")
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for doc_id, text in expected_docs:
        streams[split_of(doc_id, 0.3)].extend(tok.encode(text) + [tok.eos_id])
    assert streams["val"], "choose documents so that the hash split gives a non-empty val split"
    for split in ("train", "val"):
        stored = read_split_tokens(out / split)
        assert stored.dtype == np.uint16
        assert meta["splits"][split]["tokens"] == stored.size == len(streams[split])
        np.testing.assert_array_equal(stored, np.asarray(streams[split]))
        assert meta["splits"][split]["chunks"] > 1  # chunk_bytes=4096 splits the stream
    n_docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert n_docs == len(expected_docs) and meta["splits"]["val"]["documents"] > 0

    with pytest.raises(FileExistsError, match="overwrite"):
        prepare([tmp_path / "corpus"], out, progress=False)
    meta2 = prepare([tmp_path / "corpus"], out, overwrite=True, chunk_bytes=4096, progress=False)
    assert meta2["splits"]["train"]["documents"] + meta2["splits"]["val"]["documents"] == len(docs) // 2


def test_token_dtype():
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_prepare_at_least_one_val_document(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(f"document number {i} " * 20)
    meta = prepare([tmp_path / "0.txt", tmp_path / "1.txt"], tmp_path / "out", val_fraction=1e-12, progress=False)
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 1
    assert read_split_tokens(tmp_path / "out" / "val").size == meta["splits"]["val"]["tokens"] > 0


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
    assert state["train_loader"]["num_samples_yielded"] == 12
    del it

    resumed = make()
    resumed.load_state_dict(state)
    again = list(zip(range(3), resumed.train_dataloader()))
    assert all(torch.equal(b, reference[3 + i]) for i, b in again)


# ------------------------------------------------------------------------------------------ resume
def _fit_and_record(data_dir: Path, root: Path, max_steps: int, ckpt_every: int | None = None, ckpt_path=None,
                    break_restore: bool = False) -> list[str]:
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

    dm = TokenDataModule(data_dir=str(data_dir), seq_len=32, batch_size=4, num_workers=1, source=None, val_batches=2)
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
    assert state["TokenDataModule"]["train_loader"]["num_samples_yielded"] == k * 4
    assert "combined_loader" not in state["loops"]["fit_loop"]["state_dict"]


def test_resume_without_restoring_the_position_differs(prepared, resume_runs, tmp_path):
    """Negative control: if load_state_dict does nothing, the resumed run repeats the first batches."""
    full, first, ckpt, n, k = resume_runs
    resumed = _fit_and_record(prepared, tmp_path, n, ckpt_path=ckpt, break_restore=True)
    assert resumed != full[k:] and resumed[0] == full[0]
