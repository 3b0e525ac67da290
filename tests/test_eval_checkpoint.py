"""A checkpoint that does not load (nsa_lit.checkpoint.load_checkpoint): a one-line
CheckpointLoadError naming the path and what was expected, for each way it can fail, and the
eval commands print it without a traceback and exit with code 2."""
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nsa_lit.checkpoint import EXPECTED_CHECKPOINT, CheckpointLoadError, load_checkpoint
from nsa_lit.model import Transformer
from test_model import config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    cfg = config("asa", vocab_size=97, seq_len=64)
    model = Transformer(cfg)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"arch": asdict(cfg)}, "global_step": 3,
            "datamodule_hyper_parameters": {"tokenizer": "bpe:300"}}
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    torch.save(ckpt, path)
    return path, ckpt, model


def load_error(path) -> str:
    with pytest.raises(CheckpointLoadError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text, text
    return text


def test_a_good_checkpoint_loads(good):
    path, _, model = good
    loaded, data = load_checkpoint(path)
    assert data == {"tokenizer": "bpe:300"} and not loaded.training
    for (k, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_path(tmp_path):
    text = load_error(tmp_path / "nope.ckpt")
    assert "does not exist" in text and EXPECTED_CHECKPOINT in text


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are notes, not weights\n")
    text = load_error(path)
    assert "is not a PyTorch checkpoint file" in text and EXPECTED_CHECKPOINT in text
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "is empty (0 bytes)" in load_error(empty)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_file(good, tmp_path, keep):
    data = good[0].read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * keep)])
    text = load_error(path)
    assert "is truncated or corrupt" in text and EXPECTED_CHECKPOINT in text


def test_unknown_formats(good, tmp_path):
    _, ckpt, model = good
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    text = load_error(bare)
    assert "unknown format: no hyper_parameters.arch and no state_dict" in text
    assert "a bare state_dict" in text and EXPECTED_CHECKPOINT in text
    other = tmp_path / "other.ckpt"
    torch.save({"epoch": 1, "weights": [1, 2]}, other)
    text = load_error(other)
    assert "no hyper_parameters.arch and no state_dict" in text and "keys epoch, weights" in text
    no_arch = tmp_path / "no_arch.ckpt"
    torch.save({**ckpt, "hyper_parameters": {"lr": 1e-3}}, no_arch)
    assert "unknown format: no hyper_parameters.arch;" in load_error(no_arch)
    empty = tmp_path / "empty_dict.ckpt"
    torch.save({}, empty)
    assert "it holds an empty dict" in load_error(empty)
    a_list = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], a_list)
    assert "holds a list, not a checkpoint dict" in load_error(a_list)


def test_weights_that_do_not_fit_the_arch(good, tmp_path):
    _, ckpt, _ = good
    arch = ckpt["hyper_parameters"]["arch"]
    wider = tmp_path / "wider.ckpt"
    torch.save({**ckpt, "hyper_parameters": {"arch": {**arch, "mlp_hidden": 96}}}, wider)
    text = load_error(wider)
    assert "weights do not fit its model.arch" in text and "of another shape" in text
    deeper = tmp_path / "deeper.ckpt"
    torch.save({**ckpt, "hyper_parameters": {"arch": {**arch, "n_layers": 4}}}, deeper)
    extra = set(Transformer(config("asa", vocab_size=97, seq_len=64, n_layers=4)).state_dict()) \
        - {k.removeprefix("model.") for k in ckpt["state_dict"]}
    assert f"{len(extra)} missing (blocks.2." in load_error(deeper)
    bad_arch = tmp_path / "bad_arch.ckpt"
    torch.save({**ckpt, "hyper_parameters": {"arch": {**arch, "no_such_field": 1}}}, bad_arch)
    assert "invalid model.arch" in load_error(bad_arch)


def test_a_directory_that_is_not_a_sharded_checkpoint(good, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.link(good[0], run_dir / "last.ckpt")
    text = load_error(run_dir)
    assert "not a sharded checkpoint directory" in text
    assert "holds last.ckpt: pass one of them" in text


def test_eval_commands_print_one_line_and_exit_2(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint\n")
    done = subprocess.run([sys.executable, "-m", "nsa_lit.eval", "niah", "--ckpt_path", str(path),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {path} is not a PyTorch")


def test_generate_reports_a_bad_checkpoint_in_one_line(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    done = subprocess.run([sys.executable, "-m", "nsa_lit.generate", "--ckpt_path", str(tmp_path / "missing.ckpt"),
                           "--prompt_file", str(prompt)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error:") and "missing.ckpt" in done.stderr
