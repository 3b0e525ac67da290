"""meta.json as a manifest: its fields, and the datamodule's checks of it against the model."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import pytest

from nsa_lit.data import TokenDataModule
from nsa_lit.data.manifest import FORMAT_VERSION, check_compatible, read_meta
from nsa_lit.data.prepare import prepare, read_split_tokens
from nsa_lit.data.tokenizer import mistral_v1_path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    (root / "d.jsonl").write_text("".join(json.dumps({"text": f"token {i} " * 30}) + "\n" for i in range(20)))
    prepare([root / "d.jsonl"], root / "data", val_fraction=0.2, max_tokens=900, chunk_bytes=1024, progress=False)
    return root / "data"


def _with_model(dm: TokenDataModule, vocab_size: int, seq_len: int) -> TokenDataModule:
    """Attach a trainer-like object whose module has ``arch`` (what the datamodule looks at)."""
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0,
                                 lightning_module=SimpleNamespace(arch=SimpleNamespace(vocab_size=vocab_size, seq_len=seq_len)))
    return dm


def test_manifest_fields(prepared):
    meta = read_meta(prepared)
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["tokenizer"] == "mistral-v1" and meta["vocab_size"] == 32000 and meta["dtype"] == "uint16"
    assert meta["tokenizer_sha256"] == hashlib.sha256(mistral_v1_path().read_bytes()).hexdigest()
    assert meta["sources"][0]["source"] == "files" and meta["max_tokens"] == 900 and meta["shard"] == [0, 1]
    for split in ("train", "val"):
        assert meta["splits"][split]["tokens"] == read_split_tokens(prepared / split).size
    assert meta["splits"]["train"]["tokens"] == 900 and meta["splits"]["val"]["documents"] > 0
    assert meta["skipped"] == {"files": 0, "records": 0}


def test_model_vocab_smaller_than_the_tokenizer_is_a_clear_error(prepared):
    dm = _with_model(TokenDataModule(data_dir=str(prepared), seq_len=16, batch_size=2, source=None), 1000, 16)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "32,000 tokens" in msg and "model.arch.vocab_size=1,000" in msg and str(prepared) in msg
    _with_model(dm, 32000, 16).setup("fit")  # equal: fine
    _with_model(dm, 32768, 16).setup("fit")  # larger (padded) embedding: fine


def test_seq_len_mismatch_and_too_few_tokens_for_one_sequence(prepared):
    dm = _with_model(TokenDataModule(data_dir=str(prepared), seq_len=16, batch_size=2, source=None), 32000, 32)
    with pytest.raises(ValueError, match=r"data.seq_len=16 but model.arch.seq_len=32"):
        dm.setup("fit")
    dm = _with_model(TokenDataModule(data_dir=str(prepared), seq_len=900, batch_size=1, source=None), 32000, 900)
    with pytest.raises(ValueError, match=r"holds 900 tokens, fewer than one sequence of data.seq_len=900 .*901 tokens"):
        dm.setup("fit")


def test_tokenizer_file_changed_or_newer_format(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    meta = read_meta(data)
    meta["tokenizer_sha256"] = "0" * 64
    (data / "meta.json").write_text(json.dumps(meta))
    dm = TokenDataModule(data_dir=str(data), seq_len=16, batch_size=2, source=None)
    with pytest.raises(ValueError, match=r"not the one .* was prepared with \(sha256 000000000000"):
        dm.setup("fit")
    meta = read_meta(prepared)
    with pytest.raises(ValueError, match="format_version 3 is newer"):
        check_compatible({**meta, "format_version": 3}, data)
    with pytest.raises(ValueError, match="cannot hold ids"):
        check_compatible({**meta, "vocab_size": 70000}, data)
