"""The one-GPU study (issue 21, docs/study.md): every variant x seed trained on the same tokens,
evaluated and compared.

For each variant (``configs/study/<variant>.yaml``) and seed: ``main.py fit`` for a fixed token
budget, ``nsa_lit.eval niah`` (S-NIAH-1/2/3, lengths up to the training context, several depths)
and ``nsa_lit.eval ppl`` (perplexity by context length, up to twice the training context) on the
last checkpoint; then ``nsa_lit.compare`` over all runs with their retrieval results, and a
perplexity table. Everything a run writes lies under ``--out``::

    <out>/logs/study/<variant>/seed<k>/           TensorBoard events, hparams.yaml
    <out>/checkpoints/study/<variant>/seed<k>/    last.ckpt
    <out>/eval/niah/<variant>/seed<k>/            results.json, heatmaps
    <out>/eval/ppl/<variant>/seed<k>.json
    <results>/                                    comparison.md/.json, plots, study.md

A run whose two evaluation files exist is done and skipped (``--redo`` runs it again); an
unfinished run is started again from scratch, its old logs and checkpoints deleted first. So
the study can be run in parts (``--variants``, ``--seeds``) and completed later.

The commands run in this process, one after another (``cli_main``, ``nsa_lit.eval``'s and
``nsa_lit.compare``'s ``main``), exactly as their command lines would run them.
``--smoke`` shrinks the model (6 layers of 64), the steps (4) and the evaluations so that the
whole pipeline runs on a CPU in a few minutes (``tests/test_small_study.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "study"
VARIANTS = ("full", "nsa", "asa", "asa_llg")
SEEDS = (1, 2)
NIAH_TASKS = ("s-niah-1", "s-niah-2", "s-niah-3")

# --smoke: the study's layer patterns, branches and key/value sources at toy widths (6 layers, so
# that both LG and LLG divide them), a few steps on the CPU in float32.
SMOKE_ARCH = dict(n_layers=6, d_model=64, n_heads=4, head_dim=16, n_kv_heads=2, mlp_hidden=128,
                  latent_dim=32, rope_dim=8, seq_len=256, window=64, compress_block=16,
                  compress_stride=8, select_block=32, top_n=4)
SMOKE_TRAINER = {"accelerator": "cpu", "precision": "32-true", "log_every_n_steps": 1}
SMOKE = dict(batch_size=2, steps=4, val_every=2, niah_lengths=(192, 256), niah_depths=(0, 50, 100),
             niah_samples=1, ppl_lengths=(128, 256, 512), ppl_max_tokens=2048)


@dataclass
class Study:
    """What one invocation runs. ``tokens``: training tokens per run, rounded up to whole
    validation intervals; ``None``: the config's ``model.optim.token_budget``."""

    out: Path
    results: Path
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    tokens: int | None = None
    data_dir: Path | None = None
    niah_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    niah_depths: list[float] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    niah_samples: int = 5
    niah_batch_size: int = 32
    ppl_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    smoke: bool = False
    redo: bool = False
    fit_args: list[str] = field(default_factory=list)

    def config(self, variant: str) -> Path:
        path = CONFIG_DIR / f"{variant}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ValueError(f"--variants: no config {path} (study variants: {known})")
        return path


@dataclass(frozen=True)
class Run:
    """Where run ``variant``/``seed`` of a study writes (the run identity of docs/compare.md)."""

    study: Study
    variant: str
    seed: int

    @property
    def label(self) -> str:
        return f"study/{self.variant}/seed{self.seed}"

    @property
    def log_dir(self) -> Path:
        return self.study.out / "logs" / "study" / self.variant / f"seed{self.seed}"

    @property
    def ckpt_dir(self) -> Path:
        return self.study.out / "checkpoints" / "study" / self.variant / f"seed{self.seed}"

    @property
    def niah_dir(self) -> Path:
        return self.study.out / "eval" / "niah" / self.variant / f"seed{self.seed}"

    @property
    def ppl_json(self) -> Path:
        return self.study.out / "eval" / "ppl" / self.variant / f"seed{self.seed}.json"

    @property
    def record_json(self) -> Path:
        """Where the run was trained and evaluated, and the seconds each part took
        (:func:`train_and_evaluate` writes it last): a report written later, on another
        machine, still names the device."""
        return self.study.out / "eval" / "runs" / self.variant / f"seed{self.seed}.json"

    def record(self) -> dict | None:
        return json.loads(self.record_json.read_text()) if self.record_json.is_file() else None

    def done(self) -> bool:
        return (self.niah_dir / "results.json").is_file() and self.ppl_json.is_file() \
            and self.log_dir.is_dir()


@dataclass(frozen=True)
class Schedule:
    """Steps of one run: ``steps`` optimiser steps of ``tokens_per_step``, validation every
    ``val_every`` steps (``steps`` a multiple of it, so the last validation sees the final model),
    ``accumulate`` micro-batches a step (Lightning counts the validation interval in those)."""

    tokens_per_step: int
    steps: int
    val_every: int
    accumulate: int = 1

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def split_option(args: list[str], option: str) -> tuple[str | None, list[str]]:
    """``(value, rest)``: the value the last ``OPTION V`` / ``OPTION=V`` of ``args`` gives
    ``option`` (None if none does), and ``args`` without any of them."""
    value, rest, i = None, [], 0
    while i < len(args):
        if args[i] == option:  # (a last one without a value is dropped)
            if i + 1 < len(args):
                value = args[i + 1]
            i += 2
            continue
        if args[i].startswith(option + "="):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return value, rest


def fit_override(fit_args: list[str], option: str) -> str | None:
    """The value the last ``OPTION V`` / ``OPTION=V`` of ``fit_args`` gives ``option``."""
    return split_option(fit_args, option)[0]


def schedule(study: Study, variant: str) -> Schedule:
    """The steps of a run: from the config (or ``--smoke``'s settings), with the sequence
    length, batch size, accumulation and validation interval that ``--fit_args`` sets."""
    doc = yaml.safe_load(study.config(variant).read_text())

    def setting(option: str, default: int) -> int:
        value = fit_override(study.fit_args, option)
        if value is None:
            return int(default)
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--fit_args {option} {value}: the study needs a whole number (it "
                             "sets the steps from tokens per step and validation interval)") from None

    seq_len = setting("--model.arch.seq_len",
                      SMOKE_ARCH["seq_len"] if study.smoke else doc["model"]["arch"]["seq_len"])
    batch = setting("--data.batch_size",
                    SMOKE["batch_size"] if study.smoke else doc["data"]["batch_size"])
    accumulate = setting("--trainer.accumulate_grad_batches",
                         doc["trainer"].get("accumulate_grad_batches", 1))
    per_step = seq_len * batch * accumulate
    val_every = setting("--trainer.val_check_interval",
                        SMOKE["val_every"] if study.smoke else doc["trainer"]["val_check_interval"])
    if study.tokens is not None:
        steps = math.ceil(study.tokens / per_step / val_every) * val_every
    elif study.smoke:
        steps = SMOKE["steps"]
    else:
        steps = math.ceil(doc["model"]["optim"]["token_budget"] / per_step / val_every) * val_every
    return Schedule(per_step, steps, val_every, accumulate)


def data_dir(study: Study, variant: str) -> Path:
    if study.data_dir is not None:
        return study.data_dir
    if study.smoke:  # prepared for the smoke run's sequences; the study's is for 2,048 tokens
        return study.out / "data-smoke"
    return Path(yaml.safe_load(study.config(variant).read_text())["data"]["data_dir"])


def fit_argv(run: Run) -> list[str]:
    """``main.py fit`` arguments of one run."""
    study, sched = run.study, schedule(run.study, run.variant)
    argv = ["fit", "--config", str(study.config(run.variant)),
            "--seed_everything", str(run.seed),
            "--trainer.default_root_dir", str(study.out),  # checkpoints/ under it
            "--trainer.logger.init_args.save_dir", str(study.out / "logs"),
            "--trainer.val_check_interval", str(sched.val_every * sched.accumulate),
            # one checkpoint, at the end: last.ckpt is the trained model
            "--trainer.callbacks.init_args.every_n_train_steps", str(sched.steps),
            "--trainer.enable_progress_bar", "false",
            "--model.optim.token_budget", str(sched.tokens),
            "--data.data_dir", str(data_dir(study, run.variant))]
    if study.smoke:
        argv += [a for k, v in SMOKE_ARCH.items() for a in (f"--model.arch.{k}", str(v))]
        argv += [a for k, v in SMOKE_TRAINER.items() for a in (f"--trainer.{k}", str(v))]
        argv += ["--model.optim.warmup_steps", "1", "--data.batch_size", str(SMOKE["batch_size"]),
                 "--data.val_batches", "1",
                 "--data.num_workers", "0", "--trainer.enable_model_summary", "false",
                 "--trainer.num_sanity_val_steps", "0"]
    # --fit_args' validation interval is in optimiser steps and already in the schedule
    return argv + split_option(study.fit_args, "--trainer.val_check_interval")[1]


def niah_argv(run: Run) -> list[str]:
    s = run.study
    lengths, depths, samples = ((SMOKE["niah_lengths"], SMOKE["niah_depths"], SMOKE["niah_samples"])
                                if s.smoke else (s.niah_lengths, s.niah_depths, s.niah_samples))
    return ["niah", "--ckpt_path", str(run.ckpt_dir / "last.ckpt"),
            "--lengths", ",".join(map(str, lengths)), "--depths", ",".join(f"{d:g}" for d in depths),
            "--tasks", ",".join(NIAH_TASKS), "--samples", str(samples), "--seed", "0",
            "--batch_size", str(s.niah_batch_size), "--out", str(run.niah_dir), "--no_progress"]


def ppl_argv(run: Run) -> list[str]:
    s = run.study
    lengths = SMOKE["ppl_lengths"] if s.smoke else s.ppl_lengths
    argv = ["ppl", "--ckpt_path", str(run.ckpt_dir / "last.ckpt"),
            "--data_dir", str(data_dir(s, run.variant)), "--lengths", ",".join(map(str, lengths)),
            "--output_path", str(run.ppl_json), "--no_progress"]
    return argv + (["--max_tokens", str(SMOKE["ppl_max_tokens"])] if s.smoke else [])


def _free_memory() -> None:
    """Between runs on a GPU: collect the cycles that hold the last run's CUDA tensors and
    return the cached blocks. (On the CPU nothing is cached; a full collection there only costs
    time: it scans every object of the process.)"""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def train_and_evaluate(run: Run) -> dict[str, float]:
    """Fit from scratch (the run's old logs and checkpoints deleted), then both evaluations.
    Returns the seconds each step took."""
    import torch

    from nsa_lit.cli import cli_main
    from nsa_lit.eval.__main__ import main as eval_main

    for path in (run.log_dir, run.ckpt_dir, run.niah_dir):
        shutil.rmtree(path, ignore_errors=True)
    run.ppl_json.unlink(missing_ok=True)
    run.record_json.unlink(missing_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads fit_argv alone
    try:
        cli = cli_main(fit_argv(run))
    finally:
        sys.argv = saved_argv
    steps, expected = cli.trainer.global_step, schedule(run.study, run.variant).steps
    del cli
    _free_memory()
    seconds["fit"] = time.perf_counter() - start
    if steps != expected:
        raise RuntimeError(f"run {run.label}: trained {steps} steps, expected {expected}")
    for name, argv in (("niah", niah_argv(run)), ("ppl", ppl_argv(run))):
        start = time.perf_counter()
        eval_main(argv)
        _free_memory()
        seconds[name] = time.perf_counter() - start
    run.record_json.parent.mkdir(parents=True, exist_ok=True)
    run.record_json.write_text(json.dumps({
        "run": run.label, "device": _device_name(),
        "finished": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "torch": torch.__version__, "seconds": seconds}, indent=1))
    return seconds


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


# -- perplexity table ----------------------------------------------------------------------------
def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def ppl_table(runs: list[Run]) -> str:
    """Markdown: one row per variant, one column per evaluated length; mean ± std over seeds of
    the perplexity (``*``: longer than the training context, extrapolated)."""
    by_variant: dict[str, dict[int, list[float]]] = {}
    extrapolated: set[int] = set()
    for run in runs:
        doc = json.loads(run.ppl_json.read_text())
        for row in doc["lengths"]:
            by_variant.setdefault(run.variant, {}).setdefault(row["length"], []).append(row["ppl"])
            if row["extrapolated"]:
                extrapolated.add(row["length"])
    lengths = sorted({n for cols in by_variant.values() for n in cols})
    head = ["variant", *(f"ppl @{n}{'*' if n in extrapolated else ''}" for n in lengths)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, cols in by_variant.items():
        lines.append("| " + " | ".join([variant, *(_cell(cols.get(n, [])) for n in lengths)]) + " |")
    return "\n".join(lines)


def corpus_tokens(path: Path) -> int | None:
    meta = path / "meta.json"
    if not meta.is_file():
        return None
    return int(json.loads(meta.read_text())["splits"]["train"]["tokens"])


def write_report(study: Study, runs: list[Run], compare_table: str, argv: list[str]) -> Path:
    """``<results>/study.md``: the settings, the comparison table, the perplexity table, where
    each run was trained and evaluated and the seconds it took (its record; runs done before
    records existed are listed as not recorded), and the command."""
    sched = schedule(study, study.variants[0])
    data = data_dir(study, study.variants[0])
    mixed = any(a.startswith("--data.mixture") for a in study.fit_args)
    train_tokens = None if mixed else corpus_tokens(data)
    epochs = f", {sched.tokens / train_tokens:.3g} epochs of it" if train_tokens else ""
    records = {run.label: run.record() for run in runs}
    devices = sorted({r["device"] for r in records.values() if r})
    lines = [
        f"# Small study{' (smoke)' if study.smoke else ''}: {', '.join(study.variants)}",
        "",
        f"Written by `python -m nsa_lit.study` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({_device_name()}); runs trained and evaluated on "
        f"{', '.join(devices) if devices else 'devices not recorded'}. Runs: {len(runs)} "
        f"({', '.join(study.variants)} x seeds {', '.join(map(str, study.seeds))}); "
        f"each {sched.steps} steps of {sched.tokens_per_step:,} tokens = {sched.tokens:,} tokens of "
        + ("the mixture of `--fit_args`" if mixed else f"`{data}`")
        + (f" ({train_tokens:,} training tokens{epochs})" if train_tokens else "") + ".",
        "",
        "## Comparison (`python -m nsa_lit.compare`; plots and per-run numbers beside this file)",
        "",
        compare_table,
        "",
        "## Perplexity by context length (`python -m nsa_lit.eval ppl`, validation split)",
        "",
        ppl_table(runs),
        "",
        "`*`: longer than the training context (extrapolated).",
        "",
    ]
    lines += ["## Seconds per run", "", "| run | device | finished | fit | niah | ppl |",
              "|---|---|---|---|---|---|"]
    for label, r in records.items():
        if r is None:
            lines.append(f"| {label} | not recorded | | | | |")
        else:
            s = r["seconds"]
            lines.append(f"| {label} | {r['device']} | {r['finished']} | {s['fit']:.0f} | "
                         f"{s['niah']:.0f} | {s['ppl']:.0f} |")
    lines.append("")
    lines += ["## Command", "", "```bash", "python -m nsa_lit.study " + shlex.join(argv), "```", ""]
    path = study.results / "study.md"
    path.write_text("\n".join(lines))
    return path


def run_study(study: Study, argv: list[str] | None = None) -> dict:
    """Train and evaluate every run not done yet, then compare them all. Returns the
    comparison (``nsa_lit.compare.main``'s result) and ``report``, the path of study.md."""
    from nsa_lit.compare.__main__ import main as compare_main

    for variant in study.variants:
        study.config(variant)  # an unknown variant fails before any work
    runs = [Run(study, v, s) for v in study.variants for s in study.seeds]
    for i, run in enumerate(runs, 1):
        if run.done() and not study.redo:
            print(f"[{i}/{len(runs)}] {run.label}: done, skipped (--redo to run it again)", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run.label}: {schedule(study, run.variant).tokens:,} tokens", flush=True)
        seconds = train_and_evaluate(run)
        print(f"[{i}/{len(runs)}] {run.label}: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in seconds.items()), flush=True)
    study.results.mkdir(parents=True, exist_ok=True)
    # the runs named here only (another invocation's runs, maybe unfinished, stay out)
    result = compare_main([*(str(r.log_dir) for r in runs), "--out", str(study.results), "--eval",
                           *(f"{r.label}={r.niah_dir / 'results.json'}" for r in runs)])
    report = write_report(study, runs, result["table"], argv or [])
    print(f"wrote {report}")
    return {**result, "report": report}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> Study:
    p = argparse.ArgumentParser(
        prog="python -m nsa_lit.study", description=__doc__.split("\n\n")[0],
        epilog="docs/study.md: what the study measures, the GPU and CPU commands, the results.")
    p.add_argument("--out", type=Path, default=Path("study_runs"),
                   help="root of the runs' logs, checkpoints and evaluation results (default study_runs)")
    p.add_argument("--results", type=Path, default=None,
                   help="where the comparison, plots and study.md go (default <out>/results)")
    p.add_argument("--variants", type=_names, default=list(VARIANTS),
                   help=f"comma-separated configs/study/ variants (default {','.join(VARIANTS)})")
    p.add_argument("--seeds", type=_ints, default=list(SEEDS),
                   help=f"comma-separated seeds (default {','.join(map(str, SEEDS))})")
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens per run, rounded up to whole validation intervals "
                        "(default: the config's token_budget, 9.8M = 300 steps of 32,768)")
    p.add_argument("--data_dir", type=Path, default=None,
                   help="prepared dataset (default: the config's data/study-python-docs, the "
                        "embedded corpus, prepared by the first run)")
    p.add_argument("--niah_lengths", type=_ints, default=[512, 1024, 2048],
                   help="S-NIAH lengths, prompt plus answer (default 512,1024,2048)")
    p.add_argument("--niah_depths", type=_floats, default=[0, 25, 50, 75, 100],
                   help="needle depths in percent (default 0,25,50,75,100)")
    p.add_argument("--niah_samples", type=int, default=5, help="prompts per task, length and depth (default 5)")
    p.add_argument("--niah_batch_size", type=int, default=32, help="prompts decoded together (default 32)")
    p.add_argument("--ppl_lengths", type=_ints, default=[512, 1024, 2048, 4096],
                   help="perplexity window lengths (default 512,1024,2048,4096; 4096 extrapolates)")
    p.add_argument("--smoke", action="store_true",
                   help="toy model, 4 steps, small evaluations: the whole pipeline on a CPU in minutes")
    p.add_argument("--redo", action="store_true", help="run again runs whose results exist")
    p.add_argument("--fit_args", default="",
                   help="extra main.py fit options for every run, one string, e.g. "
                        "\"--model.compile true\" or \"--data.mixture '[{path: A, weight: 1}, "
                        "{path: B, weight: 3}]'\" (docs/study.md)")
    a = p.parse_args(argv)
    if a.niah_samples < 1:
        p.error(f"--niah_samples must be >= 1, got {a.niah_samples}")
    if a.tokens is not None and a.tokens < 1:
        p.error(f"--tokens must be >= 1, got {a.tokens:g}")
    if not a.variants or not a.seeds:
        p.error("--variants and --seeds must each name at least one value")
    return Study(out=a.out, results=a.results or a.out / "results", variants=a.variants,
                 seeds=a.seeds, tokens=None if a.tokens is None else int(a.tokens),
                 data_dir=a.data_dir, niah_lengths=a.niah_lengths, niah_depths=a.niah_depths,
                 niah_samples=a.niah_samples, niah_batch_size=a.niah_batch_size,
                 ppl_lengths=a.ppl_lengths, smoke=a.smoke, redo=a.redo, fit_args=shlex.split(a.fit_args))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return run_study(parse_args(argv), argv)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        sys.exit(f"error: {err}")
