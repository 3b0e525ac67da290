"""Perplexity by context length (nsa_lit/eval/perplexity.py, ``python -m nsa_lit.eval ppl``)
against a direct computation: one unbatched forward per window, full log-softmax."""
import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch

from nsa_lit.checkpoint import load_checkpoint
from nsa_lit.data.prepare import prepare
from nsa_lit.eval import perplexity
from nsa_lit.eval.__main__ import main
from nsa_lit.model import Transformer
from test_decode import train_tiny_checkpoint
from test_model import config

WORDS = "alpha beta gamma delta river stone light shadow quick slow runs falls over under".split()


def write_docs(root, seed, n=60):
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n")
    return root / "docs.jsonl"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl_data")
    prepare([write_docs(root / "src", 0)], root / "data", tokenizer="bpe:300", val_fraction=0.4,
            progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "bpe:300", data_dir, vocab_size=320,
                                 seq_len=64, steps=1)[0]


@torch.no_grad()
def direct_position_nll(model, stream, length, windows):
    """Mean NLL per position over ``windows`` windows, one window per forward (float64)."""
    rows = []
    for i in range(windows):
        w = torch.from_numpy(stream[i * length: i * length + length + 1].astype(np.int64))
        logp = model(w[None, :-1])[0].double().log_softmax(-1)
        rows.append(-logp.gather(-1, w[1:, None])[:, 0])
    return torch.stack(rows).mean(0).numpy()


def test_matches_direct_computation_and_extrapolates(checkpoint, data_dir):
    model, _ = load_checkpoint(checkpoint)
    model = model.double()
    stream = perplexity.read_split(data_dir, "val")
    assert len(stream) > 3 * 128  # several windows at every length
    records = perplexity.evaluate(model, stream, [16, 64, 128], batch_size=4, max_tokens=160,
                                  first_bucket=8)
    longer = Transformer(dataclasses.replace(model.cfg, seq_len=128)).double().eval()
    longer.load_state_dict(model.state_dict())
    for r, length, net in zip(records, [16, 64, 128], [model, model, longer]):
        windows = (160 - 1) // length
        assert r["windows"] == windows and r["tokens"] == windows * length
        assert r["extrapolated"] == (length > 64)
        direct = direct_position_nll(net, stream, length, windows)
        assert r["nll"] == pytest.approx(direct.mean(), abs=1e-9)
        assert r["ppl"] == pytest.approx(math.exp(direct.mean()), rel=1e-9)
        assert r["tail"]["nll"] == pytest.approx(direct[length // 2:].mean(), abs=1e-9)
        edges = [0, 8, 16, 32, 64, 128]
        expected = [(a, b) for a, b in zip(edges, edges[1:]) if a < length]
        assert [(b["start"], b["end"]) for b in r["buckets"]] == \
            [(a, min(b, length)) for a, b in expected]
        for b in r["buckets"]:
            assert b["nll"] == pytest.approx(direct[b["start"]: b["end"]].mean(), abs=1e-9)
    # the batch size does not change the numbers; the model itself is left as it was
    again = perplexity.evaluate(model, stream, [128, 16], batch_size=3, max_tokens=160)
    assert again[0]["nll"] == pytest.approx(records[2]["nll"], abs=1e-9)
    assert again[1]["nll"] == pytest.approx(records[0]["nll"], abs=1e-9)
    assert model.cfg.seq_len == 64


def test_logits_in_chunks_equal_all_at_once():
    torch.manual_seed(0)
    model = Transformer(config("nsa")).double().eval()
    tokens = torch.randint(0, 97, (2, 65))
    full = perplexity.window_nll(model, tokens, chunk=1000)
    assert torch.allclose(perplexity.window_nll(model, tokens, chunk=7), full, atol=1e-12)
    logp = model(tokens[:, :-1]).log_softmax(-1)
    assert torch.allclose(full, -logp.gather(-1, tokens[:, 1:, None])[..., 0], atol=1e-12)


def test_too_few_tokens_and_bad_lengths():
    model = Transformer(config("asa", seq_len=64)).eval()
    stream = np.arange(100) % 97
    with pytest.raises(ValueError, match=r"length 128 needs 129 tokens .* holds 100"):
        perplexity.evaluate(model, stream, [16, 128])
    with pytest.raises(ValueError, match="length 0"):
        perplexity.evaluate(model, stream, [0])


def test_buckets_double_and_end_at_the_length():
    assert perplexity.buckets(5, 8) == [(0, 5)]
    assert perplexity.buckets(40, 8) == [(0, 8), (8, 16), (16, 32), (32, 40)]


def test_default_lengths_reach_twice_the_training_length():
    from nsa_lit.eval.__main__ import default_lengths

    assert default_lengths(256) == [64, 128, 256, 512]  # the CPU demo
    assert default_lengths(8192) == [1024, 2048, 4096, 8192, 16384]


def test_command_writes_json_and_tensorboard(checkpoint, data_dir, tmp_path):
    out = tmp_path / "ppl.json"
    result = main(["ppl", "--ckpt_path", str(checkpoint), "--lengths", "32,128",
                   "--max_tokens", "260", "--first_bucket", "16", "--output_path", str(out),
                   "--tb_dir", str(tmp_path / "tb"), "--device", "cpu", "--no_progress"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["length"] for r in saved["lengths"]] == [32, 128]
    assert [r["extrapolated"] for r in saved["lengths"]] == [False, True]
    assert saved["meta"]["data_dir"] == str(data_dir) and saved["meta"]["split"] == "val"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalar = events.Scalars("eval/ppl/len_128")[0]
    assert scalar.value == pytest.approx(saved["lengths"][1]["ppl"], rel=1e-6)
    assert scalar.step == torch.load(checkpoint, weights_only=False)["global_step"] == 1
    assert "eval/ppl/len_32/pos_16_32" in events.Tags()["scalars"]


def test_refuses_data_of_another_tokenizer(checkpoint, tmp_path):
    other = tmp_path / "other"
    prepare([write_docs(tmp_path / "src", 1)], other, tokenizer="bpe:260", val_fraction=0.4,
            progress=False)
    with pytest.raises(ValueError, match="tokenized with 'bpe:260', the checkpoint was trained "
                                         "with 'bpe:300'"):
        main(["ppl", "--ckpt_path", str(checkpoint), "--data_dir", str(other), "--lengths", "16",
              "--no_progress", "--device", "cpu", "--output_path", str(tmp_path / "x.json")])
    same_spec = tmp_path / "same_spec"
    prepare([write_docs(tmp_path / "src2", 2)], same_spec, tokenizer="bpe:300", val_fraction=0.4,
            progress=False)
    with pytest.raises(ValueError, match="differs from the checkpoint's tokenizer"):
        main(["ppl", "--ckpt_path", str(checkpoint), "--data_dir", str(same_spec), "--lengths",
              "16", "--no_progress", "--device", "cpu", "--output_path", str(tmp_path / "y.json")])
