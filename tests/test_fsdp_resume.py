"""A real ``main.py fit`` over 2 FSDP2 processes (gloo, CPU) on a prepared dataset: a rank killed
with SIGKILL takes the whole job down, and ``--ckpt_path last`` resumes from the sharded
checkpoint it left, training on exactly the batches, with exactly the losses, of the run that was
never interrupted, across the epoch boundary.

The hard case is a kill right after the checkpoint of an epoch's last batch: Lightning saves that
checkpoint before it closes the epoch, so the resume must start the next epoch (its own
permutation, from its first batch) rather than finish the old one or skip into the new one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PER_RANK_BATCH, SEQ_LEN = 2, 128


def _config(tmp: Path, data_dir: Path, max_steps: int, callbacks: list[dict]) -> Path:
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "fsdp2", "precision": "32-true",
            "max_steps": max_steps, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "logs", "name": "resume", "version": "run"}},
            "callbacks": [{"class_path": "nsa_lit.checkpoint.RunCheckpoint",
                           "init_args": {"every_n_train_steps": 1, "save_last": True}},
                          *callbacks],
        },
        "model": {
            "arch": dict(vocab_size=32768, n_layers=2, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2,
                         mlp_hidden=64, seq_len=SEQ_LEN, latent_dim=16, rope_dim=4, window=16,
                         compress_block=16, compress_stride=8, select_block=16, top_n=3,
                         num_local_blocks=1, q_share=4, kernel_backend="reference", layer_pattern="LG"),
            "optim": {"lr": 1e-2, "warmup_steps": 1, "token_budget": None},
            "fsdp": {"param_dtype": "float32"},
        },
        "data": {"data_dir": str(data_dir), "source": None, "batch_size": PER_RANK_BATCH,
                 "num_workers": 0, "seed": 3},
    }
    path = tmp / f"config-{len(list(tmp.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(tmp: Path, config: Path, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "LITDATA_DISABLE_VERSION_CHECK": "1"}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "fit", "--config", str(config), *extra],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(log_dir: Path) -> dict[int, list[dict]]:
    """rank -> rows in step order (a resumed run appends to the killed run's file)."""
    return {r: [json.loads(line) for line in (log_dir / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """About 3.5k training tokens: 6 steps an epoch of 2 ranks x 2 sequences of 128 + 1 tokens."""
    from nsa_lit.data.corpus import python_docs_documents

    root = tmp_path_factory.mktemp("fsdp_data")
    with open(root / "docs.jsonl", "w") as f:
        for _, text in python_docs_documents(max_bytes=20_000):
            f.write(json.dumps({"text": text}) + "\n")
    out = root / "data"
    subprocess.run([sys.executable, "-m", "nsa_lit.data.prepare", str(root / "docs.jsonl"), "--output", str(out),
                    "--val-fraction", "0.2", "--no-progress"], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def _steps_per_epoch(data_dir: Path) -> int:
    from nsa_lit.data import TokenDataModule

    dm = TokenDataModule(data_dir=str(data_dir), seq_len=SEQ_LEN, batch_size=PER_RANK_BATCH * 2,
                         num_workers=0, source=None, val_batches=1)
    dm.setup("fit")
    return len(dm.train_dataloader())


def _timed_fit(tmp: Path, config: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    return _fit(tmp, config), time.monotonic() - start


def test_killed_rank_stops_the_job_and_resume_matches_the_uninterrupted_run(data_dir, tmp_path):
    """The uninterrupted run and the run killed at the epoch boundary are independent: they go
    side by side (a job starts its second rank only once the first has started up, so one job
    alone leaves a core idle for much of its time); then the resume."""
    per_epoch = _steps_per_epoch(data_dir)
    assert 3 <= per_epoch <= 12, per_epoch
    kill_at, total = per_epoch, per_epoch + 3  # killed as epoch 1 starts: the last checkpoint closes epoch 0

    full_dir, run = tmp_path / "full", tmp_path / "killed"
    full_dir.mkdir()
    run.mkdir()
    log = {"class_path": "fault_injection.StepLog", "init_args": {"dir": str(full_dir / "steps")}}
    full_config = _config(full_dir, data_dir, total, [log])
    log = {"class_path": "fault_injection.StepLog", "init_args": {"dir": str(run / "steps")}}
    kill = {"class_path": "fault_injection.KillAt", "init_args": {"step": kill_at, "rank": 1}}
    killed_config = _config(run, data_dir, total, [log, kill])
    with ThreadPoolExecutor(max_workers=2) as pool:
        full_job = pool.submit(_fit, full_dir, full_config)
        killed_job = pool.submit(_timed_fit, run, killed_config)
        done, (killed, took) = full_job.result(), killed_job.result()
    assert done.returncode == 0, done.stderr[-6000:]
    full = _steps(full_dir / "steps")

    # rank 1 died by SIGKILL; rank 0, blocked in a collective, is taken down by the launcher
    assert killed.returncode != 0 and took < 200, (killed.returncode, took, killed.stderr[-3000:])
    before = _steps(run / "steps")
    assert [r["step"] for r in before[1]] == list(range(1, kill_at + 1))
    ckpt_dir = run / "checkpoints" / "resume" / "run"
    assert (ckpt_dir / "last.ckpt").is_dir()

    resumed = _fit(run, _config(run, data_dir, total, [log]), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    after = _steps(run / "steps")
    for rank in (0, 1):
        got = [r for r in after[rank] if r["step"] > kill_at]
        want = [r for r in full[rank] if r["step"] > kill_at]
        assert [r["step"] for r in got] == list(range(kill_at + 1, total + 1))
        assert [(r["epoch"], r["batch"]) for r in got] == [(r["epoch"], r["batch"]) for r in want], rank
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6, abs=0), rank
    # the resumed steps really are in a new epoch, on batches epoch 0 did not start with
    assert {r["epoch"] for r in got} == {1} and got[0]["batch"] != full[1][0]["batch"]
