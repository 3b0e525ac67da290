"""Runs grouped by variant: per-run numbers, mean ± std over seeds, the Markdown table, plots.

Per run (:func:`run_values`): final and best losses and perplexity from the last / lowest
logged points, tokens seen, throughput (median of ``train/tokens_per_sec``: the first steps'
warm-up and compilation do not pull it), static facts and evaluation accuracies. Per variant
(:func:`summarize`): the mean over the runs that have a number and, with two or more, the sample
standard deviation (``ddof=1``).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nsa_lit.compare.runs import Run


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` in :func:`run_values`, its header, how one number is written
    and whether it is a fact of the variant (no ``± std``: every seed has the same)."""

    key: str
    header: str
    fmt: Callable[[float], str]
    static: bool = False


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda x: f"{x:.{digits}f}"


def _count(x: float) -> str:
    return f"{x:,.0f}"


def _millions(x: float) -> str:
    return f"{x / 1e6:,.2f}M"


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


COLUMNS = (
    Column("final_train_loss", "final train loss", _fixed(3)),
    Column("final_val_loss", "final val loss", _fixed(3)),
    Column("best_val_loss", "best val loss", _fixed(3)),
    Column("val_ppl", "val ppl", _fixed(2)),
    Column("tokens_seen", "tokens seen", _count),
    Column("tokens_per_sec", "tokens/s", _count),
    Column("parameters", "params", _millions, static=True),
    Column("kv_bytes_per_token", "KV bytes/token", _fixed(1), static=True),
)
EVAL_PREFIX = "eval:"


def run_values(run: Run) -> dict[str, float]:
    """The numbers of one run (keys of :data:`COLUMNS` and ``eval:<task>``); a number the run
    did not log is absent."""
    _, train = run.series("train/loss")
    _, val = run.series("val/loss")
    _, tokens = run.series("train/tokens_seen")
    out = {"final_train_loss": train[-1], "final_val_loss": val[-1], "best_val_loss": val.min(),
           "tokens_seen": tokens[-1]}
    out["val_ppl"] = run.series("val/ppl")[1][-1] if run.scalars.get("val/ppl") else math.exp(val[-1])
    if run.scalars.get("train/tokens_per_sec"):
        out["tokens_per_sec"] = float(np.median(run.series("train/tokens_per_sec")[1]))
    for fact in ("parameters", "kv_bytes_per_token"):
        if run.facts.get(fact) is not None:
            out[fact] = float(run.facts[fact])
    for task, summary in run.evals.items():
        out[EVAL_PREFIX + task] = float(summary["accuracy"] if "accuracy" in summary
                                        else summary["value"])
    return {k: float(v) for k, v in out.items()}


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by variant, variants in order of first appearance, runs by seed (then version)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    for members in groups.values():
        members.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.version))
    return groups


def summarize(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per variant: ``runs`` (labels), ``seeds``, and per number ``{"mean", "std", "n",
    "values"}`` (``std`` None with fewer than two values)."""
    out: dict[str, dict[str, Any]] = {}
    for variant, members in group_runs(runs).items():
        values = [run_values(r) for r in members]
        entry: dict[str, Any] = {"runs": [r.label for r in members],
                                 "seeds": [r.seed for r in members], "metrics": {}}
        keys = dict.fromkeys(k for v in values for k in v)
        for key in keys:
            xs = [v[key] for v in values if key in v]
            entry["metrics"][key] = {
                "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None,
                "n": len(xs), "values": xs}
        out[variant] = entry
    return out


def _cell(stat: dict[str, Any] | None, column: Column, runs: int) -> str:
    if stat is None:
        return "–"
    text = column.fmt(stat["mean"])
    if stat["std"] is not None and not (column.static and stat["std"] == 0):
        text += f" ± {column.fmt(stat['std'])}"
    if stat["n"] < runs:
        text += f" ({stat['n']} of {runs})"
    return text


def eval_columns(summary: dict[str, dict[str, Any]]) -> list[Column]:
    """One column per evaluation task any variant has: accuracy in percent, a perplexity (an
    lm-eval metric that is not a fraction, e.g. ``wikitext word_perplexity``) as it is."""
    from nsa_lit.eval.lm_eval_tasks import is_fraction

    tasks = dict.fromkeys(k for e in summary.values() for k in e["metrics"]
                          if k.startswith(EVAL_PREFIX))
    columns = []
    for key in tasks:
        name = key.removeprefix(EVAL_PREFIX)
        columns.append(Column(key, f"{name} (%)", _percent) if is_fraction(name)
                       else Column(key, name, _fixed(2)))
    return columns


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """``| variant | seeds | <COLUMNS> | <eval tasks> |``, one row per variant; a cell is
    ``mean ± std`` over seeds (``mean`` alone for one seed or a static fact), ``(k of n)``
    when only k of the n runs have the number, ``–`` when none has."""
    columns = [*COLUMNS, *eval_columns(summary)]
    lines = ["| variant | seeds | " + " | ".join(c.header for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for variant, entry in summary.items():
        runs = len(entry["runs"])
        seeds = ", ".join("?" if s is None else f"{s:g}" for s in entry["seeds"])
        cells = [_cell(entry["metrics"].get(c.key), c, runs) for c in columns]
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(runs: list[Run], tag: str, path: Path, title: str) -> None:
    """``tag`` against training tokens, every run one line: one colour per variant, one line
    style per seed."""
    plt = _pyplot()
    styles = ("-", "--", ":", "-.")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (variant, members) in enumerate(group_runs(runs).items()):
        for j, run in enumerate(members):
            steps, values = run.series(tag)
            ax.plot(run.tokens_at(steps), values, styles[j % len(styles)],
                    color=colors[i % len(colors)], marker="o" if len(steps) < 20 else None,
                    markersize=3, label=run.label if len(members) > 1 else variant)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(tag)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def retrieval_grids(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """``task -> variant -> {"lengths", "depths", "grid"}``: each variant's depth x length
    accuracy grid, the cell-wise mean over its seeds (tasks whose summaries have a ``grid``;
    seeds must share the cells)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, members in group_runs(runs).items():
        tasks = dict.fromkeys(t for r in members for t, s in r.evals.items() if "grid" in s)
        for task in tasks:
            summaries = [r.evals[task] for r in members if task in r.evals]
            lengths, depths = summaries[0]["lengths"], summaries[0]["depths"]
            if any(s["lengths"] != lengths or s["depths"] != depths for s in summaries):
                raise ValueError(f"{variant}: the seeds' {task} results cover different "
                                 "lengths or depths; evaluate them with the same options")
            grid = np.mean([[[s["grid"][str(d)][str(n)] for n in lengths] for d in depths]
                            for s in summaries], axis=0)
            out.setdefault(task, {})[variant] = {"lengths": lengths, "depths": depths,
                                                 "grid": grid.tolist(), "runs": len(summaries)}
    return out


def plot_heatmaps(task: str, grids: dict[str, dict[str, Any]], path: Path) -> None:
    """The variants' depth x length grids of one task side by side, one colour scale."""
    plt = _pyplot()
    n = len(grids)
    width = max(len(g["lengths"]) for g in grids.values())
    height = max(len(g["depths"]) for g in grids.values())
    fig, axes = plt.subplots(1, n, figsize=(0.3 + n * (1.2 + 0.8 * width), 1.6 + 0.45 * height),
                             squeeze=False, layout="constrained")
    image = None
    for ax, (variant, g) in zip(axes[0], grids.items()):
        image = ax.imshow(g["grid"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(g["lengths"])), [str(x) for x in g["lengths"]], fontsize=7)
        ax.set_yticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]], fontsize=7)
        ax.set_xlabel("length (tokens)", fontsize=8)
        ax.set_title(f"{variant}" + (f" ({g['runs']} seeds)" if g["runs"] > 1 else ""),
                     fontsize=8)
        for i, row in enumerate(g["grid"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6)
    axes[0][0].set_ylabel("needle depth (%)", fontsize=8)
    fig.suptitle(f"{task}: exact-match accuracy", fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), label="accuracy", shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
