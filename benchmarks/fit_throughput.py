"""Training throughput through the real path: ``main.py fit`` for a few steps, figures read back.

    python3 benchmarks/fit_throughput.py --configs configs/340m/asa.yaml configs/340m/full.yaml \\
        --steps 20 --warmup 5 --raw --out h100-fit

Each config runs ``main.py fit`` in this process (``nsa_lit.cli.cli_main``: the config's
precision, compile, batch size and gradient accumulation, its datamodule and Lightning loop) for
``--warmup + --steps`` optimiser steps, with validation, checkpoints and loggers off. A callback
times the last ``--steps`` optimiser steps (wall clock between two CUDA synchronisations) and
counts the tokens ``LanguageModel`` saw in them; MFU is those tokens/s x
``training_flops_per_token`` / ``--peak_tflops``. The model's own logged ``train/tokens_per_sec``
and ``train/mfu`` of the last step are read back beside it. The data is the embedded corpus
(prepared once under ``--data_dir``) unless ``--extra`` names other data.

``--raw`` also times ``benchmarks/train_throughput.py``'s raw loop (the same model config, T,
micro-batch and loss, compiled as the config says, fused AdamW) in the same process, and reports
``fit / raw``. ``--extra`` passes more ``main.py fit`` options to every run (e.g.
``--extra="--data.batch_size 8 --trainer.accumulate_grad_batches 1"``). ``--out NAME`` writes
``benchmarks/results/NAME.json``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_lit.cli import cli_main  # noqa: E402
from nsa_lit.model_stats import training_flops_per_token  # noqa: E402
from results_log import ResultsLog, run_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = [os.path.join(ROOT, "configs/340m", f"{v}.yaml") for v in ("asa", "nsa", "full")]


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Wall time and tokens of the optimiser steps after the first ``warmup`` ones."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: tuple[float, int, int] | None = None  # (time, tokens_seen, global_step)
        self.seconds = self.tokens = self.steps = 0

    def _mark(self, trainer, pl_module) -> tuple[float, int, int]:
        _synchronize()
        return time.perf_counter(), pl_module.tokens_seen, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is None and trainer.global_step >= self.warmup:
            self.start = self._mark(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.start is None:
            raise RuntimeError(f"the run ended after {trainer.global_step} steps, before the "
                               f"{self.warmup} warm-up steps were done")
        end = self._mark(trainer, pl_module)
        self.seconds, self.tokens, self.steps = (b - a for a, b in zip(self.start, end))


def fit_args(config: str, steps: int, data_dir: str, extra: list[str]) -> list[str]:
    """``main.py fit`` options (without the subcommand: the CLI only builds, the caller fits) of
    a timed run of ``config``: ``steps`` optimiser steps on the embedded corpus, no validation,
    checkpoints or loggers (``extra`` is appended last)."""
    return ["--config", config, "--model.optim.token_budget", "null",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", "[]", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--data.source", "python-docs", "--data.data_dir", data_dir, *extra]


def measure_fit(config: str, steps: int, warmup: int, data_dir: str, extra: list[str],
                peak_tflops: float) -> dict:
    timer = StepTimer(warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cli = cli_main(fit_args(config, warmup + steps, data_dir, extra), run=False)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    rate = timer.tokens / timer.seconds
    flops = training_flops_per_token(model.arch)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()
              if k in ("train/tokens_per_sec", "train/mfu", "train/loss")}
    return {"config": os.path.relpath(config, ROOT), "layer_pattern": model.arch.layer_pattern,
            "T": model.arch.seq_len, "batch": dm.batch_size,
            "accumulate": trainer.accumulate_grad_batches, "precision": str(trainer.precision),
            "compile": model.compile_blocks, "loss_chunk": model.loss_chunk,
            "timed_steps": timer.steps, "seconds": timer.seconds, "tokens_per_sec": rate,
            "ms_per_step": 1e3 * timer.seconds / timer.steps, "flops_per_token": flops,
            "mfu": rate * flops / (peak_tflops * 1e12),
            "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                             if torch.cuda.is_available() else None),
            "logged": logged, "extra": extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimiser steps first")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "data", "python-docs-mistral"),
                        help="where the embedded corpus is prepared (once)")
    parser.add_argument("--extra", default="", help="more main.py fit options, one string")
    parser.add_argument("--raw", action="store_true",
                        help="also time train_throughput.py's raw loop on the same shapes (CUDA)")
    parser.add_argument("--peak_tflops", type=float, default=989.5,
                        help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--out", help="results name (benchmarks/results/NAME.json) or path")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1 (the first step compiles)")
    if args.raw and not torch.cuda.is_available():
        raise SystemExit("--raw needs a CUDA device")
    extra = shlex.split(args.extra)

    record = run_record("fit_throughput.py", argv, peak_tflops=args.peak_tflops)
    log = ResultsLog(record, f"{'config':24} {'path':>5} {'T':>6} {'ms/step':>9} {'tokens/s':>10} "
                             f"{'MFU':>6} {'fit/raw':>7}", args.out)
    for config in args.configs:
        try:
            row = measure_fit(config, args.steps, args.warmup, args.data_dir, extra,
                              args.peak_tflops)
            log.add(row, f"{row['config']:24} {'fit':>5} {row['T']:>6} {row['ms_per_step']:>9.1f} "
                         f"{row['tokens_per_sec']:>10.0f} {row['mfu']:>6.1%}")
        except Exception as err:  # one failing run must not lose the others
            log.add({"config": config, "path": "fit", "error": f"{type(err).__name__}: {err}"[:300]},
                    f"{config:24} fit error: {type(err).__name__}: {str(err)[:60]}")
            continue
        if args.raw:
            from train_throughput import measure

            raw = measure(config, row["T"], row["batch"] * row["T"],
                          "compiled" if row["compile"] else "eager", args.steps, args.warmup,
                          args.peak_tflops, row["loss_chunk"])
            raw["fit_over_raw"] = row["tokens_per_sec"] / raw["tokens_per_sec"]
            log.add({**raw, "path": "raw"},
                    f"{raw['config']:24} {'raw':>5} {raw['T']:>6} {raw['ms_per_step']:>9.1f} "
                    f"{raw['tokens_per_sec']:>10.0f} {raw['mfu']:>6.1%} {raw['fit_over_raw']:>7.3f}")
        torch.cuda.empty_cache()
    log.summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
