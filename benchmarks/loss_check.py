"""Numerics check of the real training path: the per-step losses of a fixed ``main.py fit`` run,
their run-to-run noise, and the comparison against a recorded reference.

    python3 benchmarks/loss_check.py --config configs/340m/asa.yaml --steps 20 --repeat 2 --out h100-loss-asa
    python3 benchmarks/loss_check.py --config configs/340m/asa.yaml --steps 20 \\
        --reference benchmarks/results/h100-loss-asa.json

A run is ``--steps`` optimiser steps of ``main.py fit`` (the config's precision, compile, batch
and data order; the seed fixed by the config; no validation, checkpoints or loggers), the same
options as ``fit_throughput.py``. Each step's training loss (the mean over its micro-batches) is
recorded. ``--repeat R`` runs it R times, each in a fresh process (its own compilation and
kernel autotuning, as a later check against the reference will have), and reports the noise: the
largest relative difference of a step's loss between two repeats. fp32 on a CPU repeats exactly;
bf16 kernels on a GPU (atomics, split reductions, autotuned tiles) do not. ``--in_process`` runs
the repeats in this process instead (faster, but shared compiled code understates the noise).

``--reference FILE`` compares the (first) run with the losses recorded in FILE and exits with 1
when a step differs by more than ``--rtol`` relative. The tolerance is written down, torchtitan's
way: by default 5 x the noise recorded in the reference (its ``--repeat`` runs), and at least
``--min_rtol`` (1e-6 by default, for runs that repeat exactly), so a change passes if its losses
stay within a few times what rerunning the unchanged code gives. A change of the model's math, the
data order or the optimiser shows up as a larger difference within a few steps. A reference
compares only with a run of the same settings: pin the batch and accumulation in ``--extra``
(the config's defaults may have changed since the reference was recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fit_throughput import ROOT, fit_args  # noqa: E402
from nsa_lit.cli import cli_main  # noqa: E402
from results_log import ResultsLog, results_path, run_record  # noqa: E402

NOISE_FACTOR = 5.0


class StepLosses(Callback):
    """The training loss of every optimiser step: the mean of its micro-batches' losses."""

    def __init__(self):
        self.losses: list[float] = []
        self._micro: list[float] = []
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back the micro-batch's loss divided by the accumulation count
        self._micro.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)
        if trainer.global_step == self._step:  # an accumulating micro-batch: no step yet
            return
        self._step = trainer.global_step
        self.losses.append(sum(self._micro) / len(self._micro))
        self._micro = []


def run_losses(config: str, steps: int, data_dir: str, extra: list[str]) -> list[float]:
    recorder = StepLosses()
    cli = cli_main(fit_args(config, steps, data_dir, extra, source="python-docs"), run=False)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if len(recorder.losses) != steps:
        raise RuntimeError(f"recorded {len(recorder.losses)} optimiser steps, expected {steps}")
    return recorder.losses


def max_relative_difference(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"the runs have {len(a)} and {len(b)} steps: compare runs of equal length")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def tolerance(reference: dict, rtol: float | None, min_rtol: float) -> float:
    """``rtol`` if given, else ``NOISE_FACTOR`` x the reference's recorded noise, at least ``min_rtol``."""
    if rtol is not None:
        return rtol
    return max(NOISE_FACTOR * float(reference.get("noise") or 0.0), min_rtol)


def run_in_new_process(args: argparse.Namespace, i: int) -> list[float]:
    """One run's losses, computed by this script in a fresh Python process."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"run{i}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--steps",
               str(args.steps), "--data_dir", args.data_dir, "--extra", args.extra,
               "--one_run", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"run {i} failed (exit {done.returncode}): {done.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/340m/asa.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per run")
    parser.add_argument("--repeat", type=int, default=1, help="runs, to measure the run-to-run noise")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "data", "python-docs-mistral"),
                        help="where the embedded corpus is prepared (once)")
    parser.add_argument("--extra", default="", help="more main.py fit options, one string")
    parser.add_argument("--reference", help="a results JSON of this script to compare with")
    parser.add_argument("--rtol", type=float, default=None,
                        help=f"relative tolerance per step (default {NOISE_FACTOR:g} x the reference's noise)")
    parser.add_argument("--min_rtol", type=float, default=1e-6,
                        help="the least default tolerance, for references that repeat exactly")
    parser.add_argument("--out", help="results name (benchmarks/results/NAME.json) or path")
    parser.add_argument("--in_process", action="store_true",
                        help="run the repeats in this process (default: a fresh process each)")
    parser.add_argument("--one_run", help=argparse.SUPPRESS)  # a repeat's process: losses -> file
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeat < 1:
        raise SystemExit("--steps and --repeat must be >= 1")
    extra = shlex.split(args.extra)
    if args.one_run:
        with open(args.one_run, "w") as f:
            json.dump(run_losses(args.config, args.steps, args.data_dir, extra), f)
        return 0
    reference = None
    if args.reference:
        with open(results_path(args.reference)) as f:
            reference = json.load(f)

    record = run_record("loss_check.py", argv, config=os.path.relpath(os.path.abspath(args.config), ROOT),
                        steps=args.steps, extra=extra,
                        repeats_in=("one process" if args.in_process or args.repeat == 1
                                    else "a process each"))
    log = ResultsLog(record, f"{'run':>4} {'first loss':>11} {'last loss':>10}", args.out)
    runs = []
    for i in range(args.repeat):
        if args.in_process or args.repeat == 1:
            losses = run_losses(args.config, args.steps, args.data_dir, extra)
        else:
            losses = run_in_new_process(args, i)
        runs.append(losses)
        log.add({"run": i, "losses": losses}, f"{i:>4} {losses[0]:>11.5f} {losses[-1]:>10.5f}")
    record["losses"] = runs[0]
    record["noise"] = max((max_relative_difference(r, runs[0]) for r in runs[1:]), default=None)
    if record["noise"] is not None:
        print(f"run-to-run noise: {record['noise']:.3g} (largest relative difference of a step's loss)")
    status = 0
    if reference is not None:
        rtol = tolerance(reference, args.rtol, args.min_rtol)
        diff = max_relative_difference(runs[0], reference["losses"])
        worst = max(range(args.steps), key=lambda s: abs(runs[0][s] - reference["losses"][s]))
        record["reference"] = {"path": args.reference, "rtol": rtol, "max_relative_difference": diff,
                               "worst_step": worst + 1, "passed": diff <= rtol}
        print(f"against {args.reference}: max relative difference {diff:.3g} at step {worst + 1} "
              f"(tolerance {rtol:.3g}): {'ok' if diff <= rtol else 'CHANGED'}")
        status = 0 if diff <= rtol else 1
    log.save()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
