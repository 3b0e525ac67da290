"""``python -m nsa_lit.compare``: runs read from event files and evaluation results, seeds grouped,
the table's numbers equal to direct computations, plots written, clear errors."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from nsa_lit.compare.__main__ import compare
from nsa_lit.compare.report import markdown_table, summarize
from nsa_lit.compare.runs import Run, RunDataError, load_runs
from test_run_identity import event_scalars, train_tiny_runs

ROOT = Path(__file__).resolve().parents[1]


def write_run(run_dir: Path, scalars: dict[str, list[tuple[int, float]]],
              hparams: dict | None = None) -> Path:
    """A run directory with TensorBoard event files holding ``scalars`` (and hparams.yaml)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    if hparams is not None:
        (run_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return run_dir


def synthetic(train, val, tokens_per_step=100.0, **extra):
    """Scalars of a run: train/loss at steps 0.., val/loss (and val/ppl) at odd steps."""
    out = {"train/loss": list(enumerate(train)),
           "train/tokens_seen": [(s, tokens_per_step * (s + 1)) for s in range(len(train))],
           "val/loss": [(2 * i + 1, v) for i, v in enumerate(val)],
           "val/ppl": [(2 * i + 1, math.exp(v)) for i, v in enumerate(val)]}
    return {**out, **extra}


def pm(xs, digits):
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return train_tiny_runs(tmp_path_factory.getbasetemp() / "tiny_runs")


# -- tiny real runs ------------------------------------------------------------------------------
def test_tiny_runs_compared_from_their_event_files(tiny_runs, tmp_path):
    import matplotlib.image

    logdir = Path(tiny_runs[("asa", 1)]["log_dir"]).parents[1]  # logs/tiny
    result = compare([str(logdir)], [], tmp_path / "out")
    summary = result["summary"]
    assert list(summary) == ["tiny/asa", "tiny/nsa"]
    assert summary["tiny/asa"]["seeds"] == [1, 2] and summary["tiny/nsa"]["seeds"] == [1]
    for variant, seeds in (("asa", (1, 2)), ("nsa", (1,))):
        events = [event_scalars(tiny_runs[(variant, s)]["log_dir"]) for s in seeds]
        metrics = summary[f"tiny/{variant}"]["metrics"]
        assert metrics["final_train_loss"]["values"] == [e["train/loss"][-1][1] for e in events]
        assert metrics["best_val_loss"]["values"] == [min(v for _, v in e["val/loss"])
                                                      for e in events]
        assert metrics["tokens_seen"]["values"] == [float(tiny_runs[(variant, s)]["tokens_seen"])
                                                    for s in seeds]
        kv = tiny_runs[(variant, seeds[0])]["kv_bytes_per_token"]
        assert metrics["kv_bytes_per_token"]["mean"] == pytest.approx(kv, rel=1e-12)
        assert metrics["parameters"]["mean"] == tiny_runs[(variant, seeds[0])]["parameters"]
    asa = summary["tiny/asa"]["metrics"]["final_val_loss"]["values"]
    assert "| tiny/asa | 1, 2 | " in result["table"] and pm(asa, 3) in result["table"]
    for name in ("loss_train", "loss_val"):
        image = matplotlib.image.imread(result["files"][name])
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    written = json.loads((tmp_path / "out/comparison.json").read_text())
    assert set(written["runs"]) == {"tiny/asa/seed1", "tiny/asa/seed2", "tiny/nsa/seed1"}
    assert (tmp_path / "out/comparison.md").read_text().count("| tiny/") == 2


# -- synthetic runs: exact numbers -------------------------------------------------------------
def test_table_cells_are_the_mean_and_std_over_seeds(tmp_path):
    logs = tmp_path / "logs"
    a1 = synthetic([3.0, 2.5], [2.75, 2.25], **{"train/tokens_per_sec": [(0, 100.0), (1, 300.0), (2, 200.0)],
                                             "run/parameters": [(0, 1_500_000.0)],
                                             "run/kv_bytes_per_token": [(0, 512.0)]})
    a2 = synthetic([3.25, 2.75], [2.5, 2.625], **{"train/tokens_per_sec": [(0, 400.0)],
                                              "run/parameters": [(0, 1_500_000.0)],
                                              "run/kv_bytes_per_token": [(0, 512.0)]})
    b1 = synthetic([4.0, 3.5, 3.0], [3.5, 3.25])
    write_run(logs / "syn/a/seed1", a1)
    write_run(logs / "syn/a/seed2", a2)
    write_run(logs / "syn/b/seed7", b1)
    runs = load_runs([logs])
    assert [(r.variant, r.version, r.seed) for r in runs] == [
        ("syn/a", "seed1", 1), ("syn/a", "seed2", 2), ("syn/b", "seed7", 7)]
    summary = summarize(runs)
    table = markdown_table(summary).splitlines()
    assert table[0].startswith("| variant | seeds | final train loss | final val loss |")
    assert len(table) == 4
    final_val = [2.25, 2.625]
    row_a = ["syn/a", "1, 2", pm([2.5, 2.75], 3), pm(final_val, 3), pm([2.25, 2.5], 3),
             pm([float(np.float32(math.exp(v))) for v in final_val], 2),  # val/ppl as logged
             "200 ± 0", "300 ± 141",  # tokens seen; tokens/s: medians 200 and 400
             "1.50M", "512.0"]
    assert table[2] == "| " + " | ".join(row_a) + " |"
    row_b = ["syn/b", "7", "3.000", "3.250", "3.250", f"{np.float32(math.exp(3.25)):.2f}", "300",
             "–", "–", "–"]
    assert table[3] == "| " + " | ".join(row_b) + " |"
    assert summary["syn/a"]["metrics"]["tokens_per_sec"]["values"] == [200.0, 400.0]


def test_tokens_follow_train_tokens_seen_between_and_past_its_points():
    run = Run(Path("r"), "v", "seed1", {"train/tokens_seen": [(1, 200.0), (3, 400.0)]})
    assert run.tokens_at(np.array([0, 1, 2, 3, 5])).tolist() == [100.0, 200.0, 300.0, 400.0, 600.0]
    one = Run(Path("r"), "v", "seed1", {"train/tokens_seen": [(3, 800.0)]})
    assert one.tokens_at(np.array([0, 3, 7])).tolist() == [200.0, 800.0, 1600.0]


def test_identity_from_hparams_then_from_the_path(tmp_path):
    from test_training import ARCH

    from nsa_lit.config import ModelConfig
    from nsa_lit.model import Transformer

    logs = tmp_path / "logs"
    write_run(logs / "x/whatever", synthetic([3.0], [2.0]),
              {"run": {"name": "340m/asa", "version": "seed3", "seed": 3, "parameters": 10,
                       "kv_bytes_per_token": 6.5}})
    write_run(logs / "old", synthetic([3.0], [2.0]), {"arch": ARCH})  # older logs: facts from arch
    write_run(logs / "x/nsa/seed4", synthetic([3.0], [2.0]))
    runs = {r.label: r for r in load_runs([logs])}
    assert set(runs) == {"340m/asa/seed3", "old/old", "x/nsa/seed4"}
    assert runs["340m/asa/seed3"].facts == {"seed": 3, "parameters": 10, "kv_bytes_per_token": 6.5}
    assert runs["x/nsa/seed4"].seed == 4
    model = Transformer(ModelConfig(**ARCH))
    assert runs["old/old"].facts["parameters"] == sum(p.numel() for p in model.parameters())


# -- evaluation results -------------------------------------------------------------------------
def niah_results(path: Path, ckpt_path: str, correct: dict[tuple[int, int], list[bool]]) -> Path:
    """results.json as ``python -m nsa_lit.eval niah`` writes it, from per-cell outcomes."""
    from nsa_lit.eval.retrieval import write_outputs

    records = [{"task": "s-niah-1", "length": length, "depth": depth, "index": i,
                "answer": "1", "prediction": "1" if ok else "2", "correct": ok}
               for (depth, length), oks in correct.items() for i, ok in enumerate(oks)]
    write_outputs(path, {"model": "last", "ckpt_path": ckpt_path}, records)
    return path / "results.json"


def test_eval_scores_and_heatmaps_join_their_runs(tmp_path):
    import matplotlib.image

    logs = tmp_path / "logs"
    for variant, seed in (("a", 1), ("a", 2), ("b", 1)):
        write_run(logs / f"syn/{variant}/seed{seed}", synthetic([3.0, 2.5], [2.5]))
    cells = {"a1": {(0, 64): [True, True], (0, 128): [True, False], (50, 64): [False, False],
                    (50, 128): [True, True]},
             "a2": {(0, 64): [True, False], (0, 128): [False, False], (50, 64): [True, True],
                    (50, 128): [True, True]},
             "b1": {(0, 64): [False, False], (0, 128): [False, False], (50, 64): [True, False],
                    (50, 128): [False, False]}}
    evals = [str(niah_results(tmp_path / "eval/a1", "checkpoints/syn/a/seed1/last.ckpt",
                              cells["a1"])),
             str(tmp_path / "eval/a2"),  # a folder: its results.json
             "syn/b/seed1=" + str(niah_results(tmp_path / "eval/b1", "elsewhere.ckpt",
                                               cells["b1"]))]
    niah_results(tmp_path / "eval/a2", str(tmp_path / "checkpoints/syn/a/seed2/last.ckpt"),
                 cells["a2"])
    result = compare([str(logs)], evals, tmp_path / "out")

    def accuracy(c):
        return statistics.fmean(x for oks in c.values() for x in oks)

    metrics = result["summary"]["syn/a"]["metrics"]["eval:s-niah-1"]
    assert metrics["values"] == [accuracy(cells["a1"]), accuracy(cells["a2"])]
    header, _, row_a, row_b = result["table"].splitlines()
    assert header.endswith("| s-niah-1 (%) |")
    a = [100 * accuracy(cells["a1"]), 100 * accuracy(cells["a2"])]
    assert row_a.endswith(f"| {statistics.fmean(a):.1f} ± {statistics.stdev(a):.1f} |")
    assert row_b.endswith(f"| {100 * accuracy(cells['b1']):.1f} |")
    grids = json.loads((tmp_path / "out/comparison.json").read_text())["retrieval_grids"]
    expect = [[statistics.fmean([statistics.fmean(cells[k][(d, n)]) for k in ("a1", "a2")])
               for n in (64, 128)] for d in (0, 50)]
    assert grids["s-niah-1"]["syn/a"]["grid"] == expect
    assert grids["s-niah-1"]["syn/a"]["lengths"] == [64, 128]
    image = matplotlib.image.imread(result["files"]["heatmap_s-niah-1"])
    assert image.shape[1] > image.shape[0]  # two variants side by side


def test_eval_without_a_matching_run_names_the_file_and_the_runs(tmp_path):
    logs = tmp_path / "logs"
    write_run(logs / "syn/a/seed1", synthetic([3.0], [2.5]))
    path = niah_results(tmp_path / "eval", "checkpoints/other/seed1/last.ckpt",
                        {(0, 64): [True]})
    with pytest.raises(RunDataError, match=rf"{path}.*matches no run.*syn/a/seed1"):
        compare([str(logs)], [str(path)], tmp_path / "out")
    with pytest.raises(RunDataError, match="no run syn/b/seed1"):
        compare([str(logs)], [f"syn/b/seed1={path}"], tmp_path / "out")


# -- errors -------------------------------------------------------------------------------------
def test_a_run_without_a_needed_tag_is_named(tmp_path):
    logs = tmp_path / "logs"
    write_run(logs / "syn/a/seed1", synthetic([3.0], [2.5]))
    scalars = synthetic([3.0], [2.5])
    del scalars["val/loss"]
    bad = write_run(logs / "syn/b/seed1", scalars)
    with pytest.raises(RunDataError, match=rf"run {bad}: no scalar 'val/loss'"):
        load_runs([logs])
    out = subprocess.run([sys.executable, "-m", "nsa_lit.compare", str(logs), "--out",
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert f"error: run {bad}: no scalar 'val/loss'" in out.stderr
    assert not (tmp_path / "out").exists()


def test_missing_or_empty_log_directories_and_clashing_runs_are_refused(tmp_path):
    with pytest.raises(RunDataError, match=f"log directory {tmp_path / 'nope'} does not exist"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDataError, match=f"log directory {tmp_path / 'empty'}: no TensorBoard"):
        load_runs([tmp_path / "empty"])
    one = write_run(tmp_path / "one/a/seed1", synthetic([3.0], [2.5]))
    two = write_run(tmp_path / "two/a/seed1", synthetic([3.0], [2.5]))
    with pytest.raises(RunDataError, match=f"runs {one} and {two} are both a/seed1"):
        load_runs([tmp_path / "one", tmp_path / "two"])


# -- what fit did not log ------------------------------------------------------------------------
def test_validate_outside_fit_and_replayed_steps_do_not_move_the_curves(tmp_path):
    """A ``main.py validate`` event file (val/* only, at step 0) adds no validation point; a
    step logged again after a resume keeps its latest value; a directory with evaluation
    scalars only is not a run."""
    import time

    logs = tmp_path / "logs"
    run_dir = write_run(logs / "syn/a/seed1", synthetic([3.0, 2.5, 2.25, 2.0], [2.75, 2.5]))
    time.sleep(0.01)  # the resumed run writes later: steps 2 and 3 again
    write_run(run_dir, {"train/loss": [(2, 2.125), (3, 1.875)],
                        "train/tokens_seen": [(2, 300.0), (3, 400.0)], "val/loss": [(3, 2.375)]})
    write_run(run_dir, {"val/loss": [(0, 1.0)], "val/ppl": [(0, math.e)], "test/loss": [(0, 1.5)],
                        "eval/niah/s-niah-1/mean": [(3, 0.5)]})  # validate, test, --tb_dir
    write_run(logs / "syn/evals-only", {"eval/ppl/len_512": [(3, 40.0)]})
    skipped = []
    (run,) = load_runs([logs], skipped)
    assert skipped == [logs / "syn/evals-only"]
    assert run.scalars["train/loss"] == [(0, 3.0), (1, 2.5), (2, 2.125), (3, 1.875)]
    assert run.scalars["val/loss"] == [(1, 2.75), (3, 2.375)]
    assert "test/loss" not in run.scalars and run.scalars["eval/niah/s-niah-1/mean"] == [(3, 0.5)]
    summary = summarize([run])["syn/a"]["metrics"]
    assert summary["best_val_loss"]["values"] == [2.375]
    write_run(tmp_path / "only-evals/x", {"eval/ppl/len_512": [(3, 40.0)]})
    with pytest.raises(RunDataError, match="no training run in it"):
        load_runs([tmp_path / "only-evals"])


def test_lm_eval_results_show_each_tasks_main_metric(tmp_path):
    logs = tmp_path / "logs"
    write_run(logs / "syn/a/seed1", synthetic([3.0], [2.5]))
    results = {"results": {
        "wikitext": {"alias": "wikitext", "word_perplexity,none": 35.25,
                     "word_perplexity_stderr,none": "N/A", "byte_perplexity,none": 1.9,
                     "bits_per_byte,none": 0.93},
        "hellaswag": {"acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.325},
        "boolq": {"acc,none": 0.6}},
        "config": {"ckpt_path": "checkpoints/syn/a/seed1/last.ckpt"}}
    path = tmp_path / "lm_eval.json"
    path.write_text(json.dumps(results))
    result = compare([str(logs)], [str(path)], tmp_path / "out")
    header, _, row = result["table"].splitlines()
    assert header.endswith("| wikitext word_perplexity | hellaswag acc_norm (%) | boolq acc (%) |")
    assert row.endswith("| 35.25 | 32.5 | 60.0 |")
