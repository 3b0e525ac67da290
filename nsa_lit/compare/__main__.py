"""Compare runs: ``python -m nsa_lit.compare LOGDIR [LOGDIR ...] [--eval JSON ...] --out DIR``.

Reads every run under the log directories (TensorBoard event files and hparams.yaml) and the
evaluation results given, groups the runs of one variant (its seeds) and writes to --out:
comparison.md (the table: losses, perplexity, tokens, throughput, parameters, KV bytes per
token, evaluation accuracies; mean ± std over seeds), comparison.json (every number per run and
per variant), loss_train.png / loss_val.png (loss against training tokens, all runs) and
heatmap_<task>.png (retrieval accuracy, the variants side by side). See docs/compare.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nsa_lit.compare.report import (markdown_table, plot_heatmaps, plot_loss, retrieval_grids,
                                    run_values, summarize)
from nsa_lit.compare.runs import RunDataError, attach_evals, load_runs


def compare(logdirs: list[str], evals: list[str], out: str | Path) -> dict[str, Any]:
    """Write the comparison of the runs under ``logdirs`` (with the evaluation results
    ``evals``) into ``out``; returns ``{"summary", "table", "files"}``."""
    skipped: list[Path] = []
    runs = load_runs(logdirs, skipped)
    for path in skipped:
        print(f"skipped {path}: no training scalars (evaluation scalars only)", file=sys.stderr)
    attach_evals(runs, evals)
    summary = summarize(runs)
    table = markdown_table(summary)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"loss_train": out / "loss_train.png", "loss_val": out / "loss_val.png"}
    plot_loss(runs, "train/loss", files["loss_train"], "training loss")
    plot_loss(runs, "val/loss", files["loss_val"], "validation loss")
    grids = retrieval_grids(runs)
    for task, by_variant in grids.items():
        files[f"heatmap_{task}"] = out / f"heatmap_{task}.png"
        plot_heatmaps(task, by_variant, files[f"heatmap_{task}"])
    lines = ["# Run comparison", "", f"Log directories: {', '.join(map(str, logdirs))}.", "",
             table, "", "Runs:", ""]
    lines += [f"- `{r.label}`: `{r.path}`" + (f" (evaluated: {', '.join(r.evals)})" if r.evals
                                               else "") for r in runs]
    lines += ["", "Columns: final = last logged point, best = lowest; val ppl = the last "
              "val/ppl; tokens/s = median of train/tokens_per_sec; KV bytes/token: all layers, "
              "bf16, at the training context; evaluation accuracies in percent; mean ± sample "
              "std over seeds (docs/compare.md).", ""]
    lines += [f"![{name}]({path.name})" for name, path in files.items()]
    files["table"] = out / "comparison.md"
    files["table"].write_text("\n".join(lines) + "\n")
    files["json"] = out / "comparison.json"
    files["json"].write_text(json.dumps({
        "logdirs": [str(d) for d in logdirs], "variants": summary,
        "runs": {r.label: {"path": str(r.path), "variant": r.variant, "version": r.version,
                           "facts": r.facts, "values": run_values(r)} for r in runs},
        "retrieval_grids": grids}, indent=1) + "\n")
    return {"summary": summary, "table": table, "files": files}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m nsa_lit.compare", description=__doc__.split("\n\n")[1],
        epilog="docs/compare.md describes every column and file.")
    parser.add_argument("logdirs", nargs="+", metavar="LOGDIR",
                        help="log directories to search for runs (e.g. logs/340m); every "
                             "directory with TensorBoard event files below one is a run")
    parser.add_argument("--eval", nargs="+", default=[], metavar="JSON", dest="evals",
                        help="evaluation results (results.json of python -m nsa_lit.eval, or its "
                             "folder), matched to a run by the checkpoint they evaluated; "
                             "RUN=JSON names the run (<variant>/<version>, e.g. 340m/asa/seed1234)")
    parser.add_argument("--out", default=None,
                        help="output folder (default comparisons/<first LOGDIR's name>)")
    args = parser.parse_args(argv)
    out = args.out or Path("comparisons") / (Path(args.logdirs[0]).resolve().name or "runs")
    result = compare(args.logdirs, args.evals, out)
    print(result["table"])
    print(f"wrote {', '.join(str(p) for p in result['files'].values())}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (RunDataError, ValueError) as err:
        sys.exit(f"error: {err}")
