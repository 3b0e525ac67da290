"""Training runs as logged: TensorBoard event files, ``hparams.yaml`` and evaluation results.

A *run* is a directory holding ``events.out.tfevents.*`` files (what ``TensorBoardLogger``
writes: ``logs/<size>/<variant>/seed<k>``). Its identity is the ``run`` section that
``LanguageModel`` writes into ``hparams.yaml`` (logger ``name`` = the variant, ``version`` =
``seed<k>``, plus ``parameters``, ``kv_bytes_per_token``, ``seed``, ...); runs without it (older
logs, other tools) are named by their path: a ``seed<k>`` directory belongs to the variant named
by its parent's path under the log root, any other directory is a variant of its own.
Runs of one variant (one logger name) are its repeats, one per seed.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

EVENT_GLOB = "events.out.tfevents.*"
SEED_DIR = re.compile(r"seed(-?\d+)")
# scalar tags every run must have for the comparison
REQUIRED_TAGS = ("train/loss", "train/tokens_seen", "val/loss")
# run facts (LanguageModel's run/* scalars and hparams.yaml `run`) the table reads
FACTS = ("parameters", "kv_bytes_per_token", "train_flops_per_token", "seed")


class RunDataError(ValueError):
    """A log directory, run or evaluation file lacks what the comparison needs; the message
    names the path."""


@dataclass
class Run:
    """One training run: where it logged, which variant and seed it is, its scalars
    (``tag -> [(step, value), ...]`` in step order), its static facts and the evaluation
    summaries attached to it (``task -> summary``)."""

    path: Path
    variant: str
    version: str
    scalars: dict[str, list[tuple[int, float]]]
    facts: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.variant}/{self.version}"

    @property
    def seed(self) -> int | None:
        return self.facts.get("seed")

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a scalar tag; :class:`RunDataError` naming the run's
        directory when the run never logged it."""
        points = self.scalars.get(tag)
        if not points:
            raise RunDataError(
                f"run {self.path}: no scalar '{tag}' in its event files (it has: "
                f"{', '.join(sorted(self.scalars)) or 'none'}); the comparison needs "
                f"{', '.join(REQUIRED_TAGS)}")
        steps, values = zip(*points)
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)

    def tokens_at(self, steps: np.ndarray) -> np.ndarray:
        """Training tokens seen at each global step, from ``train/tokens_seen``: linear between
        logged points and, past either end, along the nearest segment (one point: the same
        tokens per step since step 0)."""
        known_steps, tokens = self.series("train/tokens_seen")
        steps = np.asarray(steps, dtype=np.float64)
        if len(known_steps) == 1:
            return tokens[0] / (known_steps[0] + 1) * (steps + 1)
        out = np.interp(steps, known_steps, tokens)
        for mask, (i, j) in ((steps < known_steps[0], (0, 1)), (steps > known_steps[-1], (-2, -1))):
            slope = (tokens[j] - tokens[i]) / (known_steps[j] - known_steps[i])
            out[mask] = tokens[i] + slope * (steps[mask] - known_steps[i])
        return out


# the scalars a validation or test outside training (``main.py validate`` / ``test`` with the
# run's config, which log into the run's directory at step 0) would add to the curves
EVAL_OUTSIDE_FIT = ("val/", "test/")


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``run_dir`` (all of them: a resumed run appends
    files), ``tag -> [(step, value), ...]`` sorted by step, one point a step.

    - A step logged more than once (a run resumed from a checkpoint older than its last logged
      step logs those steps again) keeps its latest write (the event's wall time).
    - A file without ``train/`` scalars was not written by ``fit``: its ``val/*`` and ``test/*``
      points (``main.py validate`` / ``test`` logging into the run's directory at step 0) are
      left out; its other scalars (``eval/*`` from ``--tb_dir``) are kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall time, value)
    for path in sorted(run_dir.glob(EVENT_GLOB)):
        if not path.is_file():
            continue
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        tags = acc.Tags()["scalars"]
        fit = is_training_run(tags)
        for tag in tags:
            if not fit and tag.startswith(EVAL_OUTSIDE_FIT):
                continue
            points = latest.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if e.step not in points or e.wall_time >= points[e.step][0]:
                    points[e.step] = (e.wall_time, float(e.value))
    return {tag: sorted((step, value) for step, (_, value) in points.items())
            for tag, points in latest.items()}


def find_run_dirs(logdir: Path) -> list[Path]:
    """Directories under (or equal to) ``logdir`` holding event files, sorted."""
    return sorted({p.parent for p in logdir.rglob(EVENT_GLOB) if p.is_file()})


def is_training_run(tags: Iterable[str]) -> bool:
    """Whether scalar tags (an event file's, or a directory's ``tag -> points``) come from a
    training run (any ``train/`` tag), not only from evaluations (``main.py validate`` /
    ``test``, ``--tb_dir``)."""
    return any(tag.startswith("train/") for tag in tags)


def _path_identity(run_dir: Path, logdir: Path) -> tuple[str, str]:
    """``(variant, version)`` from a run directory's place under its log root: a ``seed<k>``
    directory is a version of the variant its parent names, any other is a variant of its own;
    the variant is the path under the log root (the directory's own name at the root)."""
    variant_dir = run_dir.parent if SEED_DIR.fullmatch(run_dir.name) else run_dir
    try:
        variant = variant_dir.relative_to(logdir).as_posix()
    except ValueError:  # the log root is itself a seed directory
        variant = "."
    if variant == ".":
        variant = variant_dir.resolve().name
    return variant, run_dir.name


def read_run(run_dir: Path, logdir: Path) -> Run:
    """A run's scalars, identity and facts: ``hparams.yaml``'s ``run`` section, then the
    ``run/*`` scalars, then (for logs older than both) the facts computed from ``hparams.yaml``'s
    ``arch`` with :func:`nsa_lit.lit_module.run_facts`."""
    scalars = read_scalars(run_dir)
    hparams_path = run_dir / "hparams.yaml"
    hparams: dict[str, Any] = {}
    if hparams_path.is_file():
        try:
            hparams = yaml.safe_load(hparams_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RunDataError(f"run {run_dir}: unreadable hparams.yaml ({err})") from None
    recorded = hparams.get("run") if isinstance(hparams.get("run"), dict) else {}
    variant, version = _path_identity(run_dir, logdir)
    if recorded.get("name") and recorded.get("version"):
        variant, version = str(recorded["name"]), str(recorded["version"])
    facts = {k: recorded[k] for k in FACTS if recorded.get(k) is not None}
    for name in FACTS:
        if name not in facts and scalars.get(f"run/{name}"):
            facts[name] = scalars[f"run/{name}"][-1][1]
    if "seed" not in facts and SEED_DIR.fullmatch(version):
        facts["seed"] = int(SEED_DIR.fullmatch(version).group(1))
    if not all(k in facts for k in ("parameters", "kv_bytes_per_token")) and hparams.get("arch"):
        from nsa_lit.config import ModelConfig
        from nsa_lit.lit_module import run_facts

        try:
            computed = run_facts(ModelConfig(**hparams["arch"]), facts.get("seed"))
        except (TypeError, ValueError) as err:
            raise RunDataError(f"run {run_dir}: hparams.yaml arch is not a model config of this "
                               f"version ({err})") from None
        facts = {**{k: computed[k] for k in FACTS}, **facts}
    return Run(path=run_dir, variant=variant, version=version, scalars=scalars, facts=facts)


def load_runs(logdirs: list[str | Path], skipped: list[Path] | None = None) -> list[Run]:
    """Every run under each log directory, in the order given (sorted within one). A directory
    whose event files hold no ``train/`` scalar (evaluation scalars only) is not a run: it is
    left out and appended to ``skipped``. Raises :class:`RunDataError` for a missing directory,
    one without runs, a run lacking a :data:`REQUIRED_TAGS` tag, or two directories claiming the
    same variant and version."""
    runs: list[Run] = []
    seen: dict[str, Path] = {}
    for logdir in map(Path, logdirs):
        if not logdir.is_dir():
            raise RunDataError(f"log directory {logdir} does not exist")
        run_dirs = find_run_dirs(logdir)
        if not run_dirs:
            raise RunDataError(f"log directory {logdir}: no TensorBoard event files "
                               f"({EVENT_GLOB}) in it or below it")
        found = 0
        for run_dir in run_dirs:
            run = read_run(run_dir, logdir)
            if not is_training_run(run.scalars):
                if skipped is not None:
                    skipped.append(run_dir)
                continue
            found += 1
            for tag in REQUIRED_TAGS:
                run.series(tag)
            if run.label in seen and seen[run.label] != run_dir:
                raise RunDataError(
                    f"runs {seen[run.label]} and {run_dir} are both {run.label}: compare them "
                    "in separate commands or give one another logger name or version")
            seen[run.label] = run_dir
            runs.append(run)
        if not found:
            raise RunDataError(f"log directory {logdir}: no training run in it or below it (its "
                               f"event files hold no train/ scalars)")
    return runs


# -- evaluation results --------------------------------------------------------------------------
def read_eval(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(meta, scores)`` of an evaluation results file (or a directory holding
    ``results.json``). ``scores``: ``task -> summary`` where a summary has ``accuracy`` (and,
    for retrieval, ``grid[depth][length]``, ``lengths``, ``depths``): the ``summary`` of
    ``python -m nsa_lit.eval niah``, or lm-evaluation-harness's ``results``: each task's main
    metric (:func:`nsa_lit.eval.lm_eval_tasks.summary_metric`) as ``"<task> <metric>"`` with
    ``accuracy`` when it is a fraction, ``value`` when not (a perplexity)."""
    from nsa_lit.eval.lm_eval_tasks import is_fraction, summary_metric

    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise RunDataError(f"evaluation results {path} do not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunDataError(f"evaluation results {path}: not JSON ({err})") from None
    scores: dict[str, dict[str, Any]] = {}
    for task, summary in (doc.get("summary") or {}).items():
        if isinstance(summary, dict) and isinstance(summary.get("accuracy"), (int, float)):
            scores[task] = summary
    for task, metrics in (doc.get("results") or {}).items():
        if not isinstance(metrics, dict):
            continue
        picked = summary_metric(task, metrics)
        if picked:
            metric, value = picked
            scores[f"{task} {metric}"] = {"accuracy" if is_fraction(metric) else "value": value}
    if not scores:
        raise RunDataError(f"evaluation results {path}: no task scores (expected `summary` "
                           "with per-task `accuracy`, or lm-eval's `results`)")
    meta = doc.get("meta") or doc.get("config") or {}
    return {**meta, "_path": str(path)}, scores


def _checkpoint_run(ckpt_path: str) -> tuple[str, ...]:
    """The run directory's path parts of a checkpoint (``checkpoints/340m/asa/seed1/last.ckpt``
    -> ``(..., '340m', 'asa', 'seed1')``)."""
    return Path(ckpt_path).parent.parts


def attach_evals(runs: list[Run], specs: list[str]) -> None:
    """Attach each evaluation file to its run. A spec is ``PATH`` (matched through its
    ``meta.ckpt_path``: the checkpoint directory ``.../<variant>/<version>/`` that
    ``RunCheckpoint`` writes) or ``RUN=PATH`` with ``RUN`` a run's ``<variant>/<version>``."""
    by_label = {run.label: run for run in runs}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = "", spec
        meta, scores = read_eval(path)
        if label:
            if label not in by_label:
                raise RunDataError(f"--eval {spec}: no run {label}; runs: {', '.join(by_label)}")
            run = by_label[label]
        else:
            ckpt = meta.get("ckpt_path")
            parts = _checkpoint_run(ckpt) if ckpt else ()
            matches = [r for r in runs if parts[-len(r.label.split("/")):] ==
                       tuple(r.label.split("/"))] if parts else []
            if len(matches) != 1:
                found = "matches several runs" if matches else "matches no run"
                raise RunDataError(
                    f"evaluation results {meta['_path']}: its checkpoint ({ckpt}) {found}; "
                    f"pass it as RUN=PATH with RUN one of: {', '.join(by_label)}")
            run = matches[0]
        clash = sorted(set(run.evals) & set(scores))
        if clash:
            raise RunDataError(f"evaluation results {meta['_path']}: run {run.label} already "
                               f"has scores for {', '.join(clash)} from another file")
        run.evals.update(scores)
