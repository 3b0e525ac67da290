"""The benchmark scripts' CPU-checkable parts: FLOP counting helpers and a decode smoke run."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention  # noqa: E402
import decode  # noqa: E402


@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_visible_key_counts_match_brute_force(T):
    assert attention.visible_window(T, 16) == pytest.approx(
        sum(min(t + 1, 16) for t in range(T)) / T)
    assert attention.visible_causal(T) == pytest.approx(sum(t + 1 for t in range(T)) / T)
    assert attention.visible_compressed(T, 32, 16) == pytest.approx(
        sum(len([i for i in range(T) if i * 16 + 31 <= t]) for t in range(T)) / T)
    selected = sum(len([s for s in range(t + 1) if s // 64 >= t // 64 - 15]) if t // 64 < 16
                   else 15 * 64 + t % 64 + 1 for t in range(T)) / T
    assert attention.visible_selected(T, 64, 16) == pytest.approx(selected)


def test_decode_benchmark_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "decode.json"
    decode.main(["--configs", str(ROOT / "configs/tiny.yaml"), "--contexts", "96",
                 "--batches", "2", "--steps", "2", "--warmup", "2", "--device", "cpu",
                 "--out", str(out)])
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert row["context"] == 96 and row["batch"] == 2 and row["mode"] == "eager"
    assert row["tokens_per_sec"] > 0
    assert row["cache_bytes"] > 0 and "tokens/s" in capsys.readouterr().out


def test_decode_benchmark_refuses_graphs_without_cuda():
    with pytest.raises(SystemExit, match="graph needs CUDA"):
        decode.main(["--device", "cpu", "--modes", "graph"])
    with pytest.raises(SystemExit, match="--warmup must be >= 2"):
        decode.main(["--device", "cpu", "--warmup", "1"])
