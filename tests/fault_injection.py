"""Callbacks that tests put into a real ``main.py fit`` run through its YAML config.

``StepLog`` writes what each rank trained on at every step (JSON lines, one file per rank);
``KillAt`` kills one rank with SIGKILL, the way an out-of-memory killer or a lost node does,
at the start of a given optimiser step. Not part of the package: tests import them by
``class_path: fault_injection.<Name>`` with ``tests/`` on PYTHONPATH.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L


class StepLog(L.Callback):
    """``<dir>/rank<r>.jsonl``: per optimiser step, ``{"step", "epoch", "loss", "batch"}`` where
    ``batch`` is a hash of this rank's token batch and ``loss`` its local training loss."""

    def __init__(self, dir: str):
        self.dir = Path(dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.dir.mkdir(parents=True, exist_ok=True)
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "loss": float(outputs["loss"]),
               "batch": hashlib.sha1(batch.cpu().numpy().tobytes()).hexdigest()}
        with open(self.dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


class KillAt(L.Callback):
    """SIGKILL rank ``rank`` when optimiser step ``step`` (0-based: ``step`` steps done) starts."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)
