"""Training throughput through the real path: ``main.py fit`` for a few steps, figures read back.

    python3 benchmarks/fit_throughput.py --configs configs/340m/asa.yaml configs/340m/full.yaml \\
        --steps 20 --warmup 5 --raw --out h100-fit

Each config runs ``main.py fit`` in this process (``nsa_lit.cli.cli_main``: the config's
precision, compile, batch size and gradient accumulation, its datamodule and Lightning loop) for
``--warmup + --steps`` optimiser steps, with validation, checkpoints and loggers off and the
progress bar on, as ``main.py`` shows it (``--no_progress_bar``: off). A callback
times the last ``--steps`` optimiser steps (wall clock between two CUDA synchronisations) and
counts the tokens ``LanguageModel`` saw in them; MFU is those tokens/s x
``training_flops_per_token`` / ``--peak_tflops``. The model's own logged ``train/tokens_per_sec``
and ``train/mfu`` of the last step are read back beside it.

The data: a synthetic prepared dataset of random token ids (``data_throughput.synthetic_dataset``,
under ``--synthetic_dir``), sized so that every timed step lies in the first epoch. (The embedded
corpus holds about 70 sequences of 8k: one epoch of a 340M config is about one optimiser
step of 64 sequences, so Lightning would step on an epoch's partial accumulation and restart
the loader's workers every step or two.) ``--data_dir`` naming a prepared dataset trains on it;
a run whose timed steps cross an epoch boundary is flagged (``epochs_crossed``) either way.

``--raw`` also times ``benchmarks/train_throughput.py``'s raw loop first (the fit run's model
config with its overrides, T, micro-batch, accumulation and loss, compiled as the config says,
fused AdamW, random tokens) in the same process, and reports ``fit / raw``. ``--extra`` passes more ``main.py fit`` options to every run (e.g.
``--extra="--data.batch_size 2 --trainer.accumulate_grad_batches 1"``). ``--out NAME`` writes
``benchmarks/results/NAME.json``.
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

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
    """Wall time, tokens and epoch boundaries of the optimiser steps after the first ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        # (time, tokens_seen, global_step, epoch)
        self.start: tuple[float, int, int, int] | None = None
        self.seconds = self.tokens = self.steps = self.epochs = 0

    def _mark(self, trainer, pl_module) -> tuple[float, int, int, int]:
        _synchronize()
        return time.perf_counter(), pl_module.tokens_seen, trainer.global_step, trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is None and trainer.global_step >= self.warmup:
            self.start = self._mark(trainer, pl_module)
        elif self.start is not None:  # (the loop counts one more epoch once it stops)
            self.epochs = trainer.current_epoch - self.start[3]

    def on_train_end(self, trainer, pl_module) -> None:
        if self.start is None:
            raise RuntimeError(f"the run ended after {trainer.global_step} steps, before the "
                               f"{self.warmup} warm-up steps were done")
        end = self._mark(trainer, pl_module)
        self.seconds, self.tokens, self.steps = (b - a for a, b in zip(self.start[:3], end[:3]))


def fit_args(config: str, steps: int, data_dir: str, extra: list[str],
             source: str | None = None, progress_bar: bool = False) -> list[str]:
    """``main.py fit`` options (without the subcommand: the CLI only builds, the caller fits) of
    a timed run of ``config``: ``steps`` optimiser steps on the prepared dataset ``data_dir``
    (``source``: the corpus prepared there on first use, e.g. ``python-docs``), no validation,
    checkpoints or loggers (``extra`` is appended last); the progress bar ``main.py`` shows
    (``nsa_lit.progress.StepProgressBar``) with ``progress_bar``. The run's directory, where
    LightningCLI saves its ``config.yaml``, is a fixed one under the system's temporary directory,
    not the working directory."""
    return ["--config", config, "--model.optim.token_budget", "null",
            "--trainer.default_root_dir", os.path.join(tempfile.gettempdir(), "nsa-lit-benchmark"),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", "[]", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", str(progress_bar).lower(), "--trainer.devices", "1",
            "--data.source", source or "null", "--data.data_dir", data_dir, *extra]


def synthetic_data(root: str, sequences: int, seq_len: int, tokenizer: str) -> tuple[str, int]:
    """A synthetic prepared dataset under ``root`` holding ``sequences`` training sequences of
    ``seq_len`` (made, or remade larger, when the one there holds fewer); ``(path, tokens)``."""
    from data_throughput import synthetic_dataset

    from nsa_lit.data.manifest import read_meta

    path = os.path.join(root, f"synthetic-{tokenizer.replace(':', '-').replace('/', '-')}")
    tokens = sequences * seq_len + 1
    if os.path.isfile(os.path.join(path, "meta.json")):
        held = read_meta(path)["splits"]["train"]["tokens"]
        if held >= tokens:
            return path, held
    shutil.rmtree(path, ignore_errors=True)
    synthetic_dataset(Path(path), tokens, tokenizer)
    return path, tokens


def measure_fit(config: str, steps: int, warmup: int, data_dir: str, extra: list[str],
                peak_tflops: float, prepared: bool = False, raw: bool = False,
                progress_bar: bool = True) -> list[dict]:
    """One timed ``main.py fit`` of ``config``: on synthetic data made to hold every step in one
    epoch under ``data_dir``, or (``prepared``) on the dataset ``data_dir`` is. With ``raw``,
    first the raw loop (``train_throughput.measure``) on the fit run's model config, micro-batch
    and accumulation, while the fit run's model is still on the CPU. Returns the rows, raw
    first."""
    timer = StepTimer(warmup)
    cli = cli_main(fit_args(config, warmup + steps, data_dir, extra, progress_bar=progress_bar),
                   run=False)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    rows = []
    if raw:
        from train_throughput import measure

        rows.append({**measure(config, model.arch.seq_len, dm.batch_size * model.arch.seq_len,
                               "compiled" if model.compile_blocks else "eager", steps, warmup,
                               peak_tflops, model.loss_chunk, trainer.accumulate_grad_batches,
                               model.arch), "path": "raw"})
        torch._dynamo.reset()  # the fit run compiles its own blocks from scratch
        gc.collect()  # the raw loop's model and optimizer states, kept in reference cycles
        torch.cuda.empty_cache()
    held = None  # GiB still allocated when the fit starts (what the raw loop left behind)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() / 2**30
    data = {"data": data_dir}
    if not prepared:  # sized to this run's sequences per step (batch, accumulation, world)
        per_step = dm.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        dm.data_dir, tokens = synthetic_data(data_dir, (warmup + steps + 1) * per_step,
                                             model.arch.seq_len, dm.tokenizer)
        data = {"data": f"synthetic, {tokens:,} tokens", "data_dir": dm.data_dir}
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=dm)
    rate = timer.tokens / timer.seconds
    flops = training_flops_per_token(model.arch)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()
              if k in ("train/tokens_per_sec", "train/mfu", "train/loss")}
    row = {"config": os.path.relpath(config, ROOT), "layer_pattern": model.arch.layer_pattern,
            "T": model.arch.seq_len, "batch": dm.batch_size, "world_size": trainer.world_size,
            "accumulate": trainer.accumulate_grad_batches, "precision": str(trainer.precision),
            "compile": model.compile_blocks, "loss_chunk": model.loss_chunk,
            "progress_bar": trainer.progress_bar_callback is not None,
            "timed_steps": timer.steps, "epochs_crossed": timer.epochs, **data,
            "seconds": timer.seconds, "tokens_per_sec": rate,
            "ms_per_step": 1e3 * timer.seconds / timer.steps, "flops_per_token": flops,
            "mfu": rate * flops / (peak_tflops * 1e12),
            "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                             if torch.cuda.is_available() else None),
            "held_before_fit_gib": held,
            "logged": logged, "extra": extra, "path": "fit"}
    if rows:
        rows[0]["fit_over_raw"] = rate / rows[0]["tokens_per_sec"]
    return rows + [row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimiser steps first")
    parser.add_argument("--data_dir", default=None,
                        help="a prepared dataset to train on (default: synthetic random tokens, "
                             "made under --synthetic_dir to hold every timed step in one epoch)")
    parser.add_argument("--synthetic_dir", default=os.path.join(ROOT, "data", "benchmark"),
                        help="where the synthetic dataset is made (default data/benchmark)")
    parser.add_argument("--extra", default="", help="more main.py fit options, one string")
    parser.add_argument("--raw", action="store_true",
                        help="also time train_throughput.py's raw loop on the same shapes (CUDA)")
    parser.add_argument("--no_progress_bar", action="store_true",
                        help="run without the progress bar (main.py shows one by default)")
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
            rows = measure_fit(config, args.steps, args.warmup, args.data_dir or args.synthetic_dir,
                               extra, args.peak_tflops, prepared=args.data_dir is not None,
                               raw=args.raw, progress_bar=not args.no_progress_bar)
        except Exception as err:  # one failing run must not lose the others
            log.add({"config": config, "error": f"{type(err).__name__}: {err}"[:300]},
                    f"{config:24} error: {type(err).__name__}: {str(err)[:60]}")
            continue
        finally:
            torch.cuda.empty_cache()
        for row in rows:
            ratio = f" {row['fit_over_raw']:>7.3f}" if "fit_over_raw" in row else ""
            crossed = (f"  (crossed {row['epochs_crossed']} epoch boundaries: the loader "
                       "restarted inside the timed steps)" if row.get("epochs_crossed") else "")
            log.add(row, f"{row['config']:24} {row['path']:>5} {row['T']:>6} "
                         f"{row['ms_per_step']:>9.1f} {row['tokens_per_sec']:>10.0f} "
                         f"{row['mfu']:>6.1%}{ratio}{crossed}")
    log.summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
