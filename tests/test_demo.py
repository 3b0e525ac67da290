"""The CPU demo end to end through ``main.py``: prepare, train, log, checkpoint, resume.

A shortened ``configs/tiny.yaml`` (fewer steps) in a scratch directory.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_STEP = 8 * 256


def fit(cwd: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "main.py"), "fit", "--config", str(ROOT / "configs/tiny.yaml"),
           "--model.optim.token_budget", str(steps * TOKENS_PER_STEP),
           "--model.optim.warmup_steps", "5", "--trainer.val_check_interval", "10", *extra]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tiny_demo_trains_logs_checkpoints_and_resumes(tmp_path):
    """20 steps prepare the data, log every tag, validate at 10 and 20 with a falling loss and
    leave ``last.ckpt``; ``--ckpt_path last`` with a budget of 22 restores step 20 and ends at 22."""
    fit(tmp_path, 20)
    assert (tmp_path / "data/python-docs/meta.json").exists()
    ckpt = tmp_path / "checkpoints/tiny/asa/seed1234/last.ckpt"
    assert ckpt.exists()
    logs = scalars(tmp_path / "logs/tiny/asa/seed1234")
    for tag in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tokens_seen",
                "train/tokens_per_sec", "val/loss", "val/ppl"):
        assert logs.get(tag), f"TensorBoard has no {tag}"
    val = [v for _, v in logs["val/loss"]]
    # ln(4096) = 8.3 untrained: validation after 10 steps is far below, and falls by step 20
    assert len(val) == 2 and val[0] < 7.3 and val[-1] < val[0] - 0.1, f"validation loss: {val}"

    # resume from last.ckpt with a larger budget: continues at step 20, reuses the prepared data
    out = fit(tmp_path, 22, "--ckpt_path", "last")
    assert "Restored all states from the checkpoint" in out.stderr + out.stdout
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 22 and state["tokens_seen"] == 22 * TOKENS_PER_STEP
