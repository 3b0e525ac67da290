"""The benchmark scripts' CPU-checkable parts: a decode smoke run and argument checks."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention  # noqa: E402
import decode  # noqa: E402


def test_decode_benchmark_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "decode.json"
    decode.main(["--configs", str(ROOT / "configs/tiny.yaml"), "--contexts", "96",
                 "--batches", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--out", str(out)])
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert row["context"] == 96 and row["batch"] == 2 and row["mode"] == "eager"
    assert row["tokens_per_sec"] > 0
    assert row["cache_bytes"] > 0 and "tokens/s" in capsys.readouterr().out


def test_decode_benchmark_refuses_graphs_without_cuda():
    with pytest.raises(SystemExit, match="graph needs CUDA"):
        decode.main(["--device", "cpu", "--modes", "graph"])


def test_attention_benchmark_gives_each_output_a_dense_gradient():
    import torch

    a, b = torch.zeros(2, 3), torch.zeros(4)
    ga, gb = attention.output_grads((a, b))
    assert ga.shape == a.shape and gb.shape == b.shape and ga.stride() == a.stride()
    assert attention.output_grads(a).shape == a.shape


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "--variants", "dkdv_s2,no_such"], "--variants: unknown ['no_such']"),
    (["--variants", "dkdv_s2"], "--variants needs --sweep"),
])
def test_selected_attention_benchmark_names_a_bad_variant(argv, message, capsys):
    """The variant filter fails before any GPU work, naming the bad value."""
    import bench_selected_attention as bench
    with pytest.raises(SystemExit):
        bench._bench_main(argv)
    assert message in capsys.readouterr().err
