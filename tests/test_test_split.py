"""The held-out test split: prepared apart from train and val, read by ``TokenDataModule.test_dataloader``,
scored by ``main.py test`` (``test/loss``, ``test/ppl``); ``main.py predict`` is refused."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nsa_lit.cli import NSALightningCLI, cli_main
from nsa_lit.data import TokenDataModule, load_tokenizer
from nsa_lit.data import corpus as corpus_mod
from nsa_lit.data.prepare import doc_hash, main as prepare_main, merge, prepare, read_meta, read_split_tokens
from nsa_lit.data.windows import TokenWindows
from nsa_lit.lit_module import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
VAL_FRACTION, TEST_FRACTION = 0.15, 0.2


def _documents(n: int = 80) -> list[str]:
    """``n`` distinct documents of 5-30 words (their first words say which one they are)."""
    rng = np.random.default_rng(3)
    return [f"document {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    root = tmp_path_factory.mktemp("corpus")
    docs = _documents()
    with open(root / "docs.jsonl", "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    return root / "docs.jsonl", [(f"docs.jsonl:{i}", text) for i, text in enumerate(docs, 1)]


def _split_documents(split_dir: Path, eos: int) -> list[tuple[int, ...]]:
    """The documents of a prepared split: its token stream cut after each ``eos``."""
    stream = read_split_tokens(split_dir).tolist()
    docs, current = [], []
    for t in stream:
        if t == eos:
            docs.append(tuple(current))
            current = []
        else:
            current.append(t)
    assert not current, "a split ends with eos"
    return docs


def test_no_document_is_in_two_splits_and_hashed_ones_stay_in_theirs(corpus, tmp_path):
    path, docs = corpus
    tok = load_tokenizer("mistral-v1")
    ids = {doc_id: tuple(tok.encode(text)) for doc_id, text in docs}
    val_tokens, test_tokens = 150, 120
    meta = prepare([path], tmp_path / "out", val_fraction=VAL_FRACTION, val_tokens=val_tokens,
                   test_fraction=TEST_FRACTION, test_tokens=test_tokens, chunk_bytes=512, progress=False)
    got = {s: _split_documents(tmp_path / "out" / s, tok.eos_id) for s in ("train", "val", "test")}
    sets = {s: set(d) for s, d in got.items()}
    assert len(set(ids.values())) == len(docs)  # distinct documents: a set of token tuples identifies them
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(ids.values())
    for split in ("train", "val", "test"):
        assert meta["splits"][split]["documents"] == len(got[split]) > 0
        assert meta["splits"][split]["tokens"] == sum(len(d) + 1 for d in got[split])
    # hashed documents are in their split whatever the top-ups
    for doc_id, _ in docs:
        h = doc_hash(doc_id)
        if h < VAL_FRACTION:
            assert ids[doc_id] in sets["val"], doc_id
        elif h < VAL_FRACTION + TEST_FRACTION:
            assert ids[doc_id] in sets["test"], doc_id
    # the streams, by tokenizing directly: top-ups in source order, val first, then test
    held = {"val": val_tokens, "test": test_tokens}
    streams: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for doc_id, _ in docs:
        h = doc_hash(doc_id)
        split = "val" if h < VAL_FRACTION else "test" if h < VAL_FRACTION + TEST_FRACTION else next(
            (s for s in ("val", "test") if len(streams[s]) < held[s]), "train")
        streams[split] += [*ids[doc_id], tok.eos_id]
    for split, stream in streams.items():
        np.testing.assert_array_equal(read_split_tokens(tmp_path / "out" / split), stream)
    assert len(streams["val"]) >= val_tokens and len(streams["test"]) >= test_tokens
    assert meta["test_fraction"] == TEST_FRACTION and meta["test_tokens"] == test_tokens


def test_shards_merge_to_the_single_runs_test_split(corpus, tmp_path):
    path, _ = corpus
    kw = dict(val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, chunk_bytes=512, progress=False)
    single = prepare([path], tmp_path / "single", **kw)
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, out in enumerate(shards):
        prepare([path], out, shard=(i, 2), **kw)
    merged = merge(tmp_path / "merged", shards)
    eos = single["eos_id"]
    for split in ("train", "val", "test"):
        assert sorted(_split_documents(tmp_path / "merged" / split, eos)) == \
            sorted(_split_documents(tmp_path / "single" / split, eos))
        assert merged["splits"][split]["tokens"] == single["splits"][split]["tokens"]


def test_merge_accepts_a_preparation_made_before_test_splits(corpus, tmp_path):
    path, _ = corpus
    prepare([path], tmp_path / "new", val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, progress=False)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    _make_old(old)
    merged = merge(tmp_path / "merged", [tmp_path / "new", old])
    new_meta = read_meta(tmp_path / "new")
    assert merged["splits"]["test"] == new_meta["splits"]["test"]
    assert merged["splits"]["train"]["tokens"] == 2 * new_meta["splits"]["train"]["tokens"]


def test_cli_test_sequences_and_bad_fractions(corpus, tmp_path, capsys):
    path, _ = corpus
    rc = prepare_main([str(path), "-o", str(tmp_path / "out"), "--val-fraction", "0.1", "--test-fraction", "0.1",
                       "--test-sequences", "3", "--seq-len", "16", "--no-progress"])
    assert rc == 0
    meta = read_meta(tmp_path / "out")
    assert meta["test_tokens"] == 3 * 16 + 1 <= meta["splits"]["test"]["tokens"]
    assert "test" in capsys.readouterr().out
    assert prepare_main([str(path), "-o", str(tmp_path / "x"), "--test-sequences", "3", "--no-progress"]) == 2
    assert "--test-sequences needs --seq-len" in capsys.readouterr().err
    with pytest.raises(ValueError, match="test_fraction"):
        prepare([path], tmp_path / "y", val_fraction=0.6, test_fraction=0.4, progress=False)
    with pytest.raises(ValueError, match="data.test_fraction"):
        TokenDataModule(val_fraction=0.5, test_fraction=0.5)


def _make_old(data: Path) -> None:
    """Turn a preparation into one made before test splits existed: no ``test/``, no ``splits.test``."""
    meta = read_meta(data)
    for key in ("test_fraction", "test_tokens"):
        meta.pop(key)
    meta["splits"].pop("test")
    (data / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(data / "test", ignore_errors=True)


def test_a_dataset_without_a_test_split_trains_and_says_how_to_make_one(corpus, tmp_path):
    path, _ = corpus
    data = tmp_path / "old"
    prepare([path], data, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, progress=False)
    _make_old(data)
    dm = TokenDataModule(data_dir=str(data), seq_len=16, batch_size=2, num_workers=0, source=None)
    dm.setup("fit")  # training and validation do not need it
    assert next(iter(dm.train_dataloader())).shape == (2, 17)
    with pytest.raises(ValueError) as err:
        dm.setup("test")
    msg = str(err.value)
    assert "has no test split" in msg and str(data) in msg
    assert "python -m nsa_lit.data.prepare" in msg and "--test-fraction" in msg and "--seq-len 16" in msg
    too_few = TokenDataModule(data_dir=str(tmp_path / "few"), seq_len=16, batch_size=64, num_workers=0, source=None)
    prepare([path], tmp_path / "few", val_fraction=0.0, test_fraction=0.01, test_tokens=30, progress=False)
    with pytest.raises(ValueError, match=r"the test split of .* holds .* tokens.*--test-tokens 1025"):
        too_few.setup("test")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/tiny.yaml trained 2 steps by ``main.py fit`` on a slice of the embedded corpus, which the
    datamodule prepares with a test split; returns (run directory, data directory, last.ckpt)."""
    root = tmp_path_factory.mktemp("tiny")
    mp = pytest.MonkeyPatch()
    mp.setattr(corpus_mod, "DEFAULT_MAX_BYTES", 80_000)
    mp.chdir(root)
    try:
        cli_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), *TINY_ARGS,
                  "--trainer.max_steps", "2", "--model.optim.token_budget", "null",
                  "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"])
    finally:
        mp.undo()
    [ckpt] = (root / "checkpoints").rglob("last.ckpt")
    return root, root / "data", ckpt


TINY_ARGS = ["--data.data_dir", "data", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_main_py_test_scores_the_test_split_exactly(tiny_run, monkeypatch):
    root, data, ckpt = tiny_run
    meta = read_meta(data)
    one_batch = 8 * 256 + 1  # tiny.yaml: batch 8 x seq_len 256
    assert meta["test_tokens"] == meta["val_tokens"] == one_batch <= meta["splits"]["test"]["tokens"]
    monkeypatch.chdir(root)
    cli = cli_main(["test", "--config", str(ROOT / "configs/tiny.yaml"), *TINY_ARGS, "--ckpt_path", str(ckpt)])
    metrics = cli.trainer.callback_metrics
    # directly: every full batch of the test split's windows, in order, mean cross-entropy over all targets
    model = LanguageModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    windows = TokenWindows(data / "test", 256)
    n = len(windows) // 8 * 8
    assert n >= 8
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, 8):
            batch = torch.stack([torch.as_tensor(windows[i].astype(np.int64)) for i in range(start, start + 8)])
            logits = model.model(batch[:, :-1]).float()
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
    expected = total / (n * 256)
    assert float(metrics["test/loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["test/ppl"]) == pytest.approx(math.exp(expected), rel=1e-5)
    # the validation split gives another number: the test split really is another set of tokens
    val = cli_main(["validate", "--config", str(ROOT / "configs/tiny.yaml"), *TINY_ARGS, "--ckpt_path", str(ckpt)])
    assert float(val.trainer.callback_metrics["val/loss"]) != pytest.approx(expected, rel=1e-4)


def test_main_py_test_on_data_without_a_test_split_is_a_clear_error(tiny_run, tmp_path, monkeypatch):
    _, data, ckpt = tiny_run
    old = tmp_path / "data"
    shutil.copytree(data, old)
    _make_old(old)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        cli_main(["test", "--config", str(ROOT / "configs/tiny.yaml"), *TINY_ARGS, "--ckpt_path", str(ckpt)])
    assert "has no test split" in str(err.value) and f"delete {old.name}" in str(err.value)


def test_predict_is_not_a_subcommand(capsys):
    assert set(NSALightningCLI.subcommands()) == {"fit", "validate", "test"}
    for argv in (["predict", "--config", str(ROOT / "configs/tiny.yaml")],
                 ["--config", str(ROOT / "configs/tiny.yaml"), "predict"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "`predict` is not a subcommand" in err and "python -m nsa_lit.generate" in err
