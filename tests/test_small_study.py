"""The one-GPU study harness (``python -m nsa_lit.study``, docs/study.md).

The schedule and the command lines it builds are checked directly; the smoke mode runs the whole
pipeline (fit, S-NIAH, perplexity, comparison) for every variant x seed on the CPU (``slow``: a
few minutes on 2 busy cores), and a second invocation finds every run done.
"""
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from nsa_lit import study as st
from nsa_lit.config import ModelConfig
from nsa_lit.model_stats import count_parameters, kv_elements_per_token

ROOT = Path(__file__).resolve().parents[1]


def config(variant: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "study" / f"{variant}.yaml").read_text())


@pytest.mark.parametrize("variant", st.VARIANTS)
def test_study_configs_fit_the_bounds_and_share_everything_but_attention(variant):
    doc, base = config(variant), config("full")
    arch = ModelConfig(**doc["model"]["arch"])
    assert arch.seq_len == 2048 and arch.window < arch.seq_len
    assert arch.top_n < arch.seq_len // arch.select_block
    assert 30e6 <= count_parameters(arch)["total"] <= 60e6
    # same width, depth, data, schedule and trainer as the full-attention baseline
    for key in ("n_layers", "d_model", "n_heads", "head_dim", "mlp_hidden", "seq_len", "vocab_size"):
        assert doc["model"]["arch"].get(key) == base["model"]["arch"].get(key), key
    assert doc["model"]["optim"] == base["model"]["optim"] and doc["data"] == base["data"]
    assert doc["trainer"]["logger"]["init_args"]["name"] == f"study/{variant}"


def test_tokens_round_up_to_whole_validation_intervals(tmp_path):
    study = st.Study(out=tmp_path, results=tmp_path / "r", tokens=1_000_000)
    sched = st.schedule(study, "asa")
    assert sched.tokens_per_step == 16 * 2048 and sched.val_every == 50
    # 1e6 / 32768 = 30.5 steps -> one interval of 50
    assert sched.steps == 50 and sched.tokens == 50 * 32768
    study.tokens = 50 * 32768 + 1
    assert st.schedule(study, "asa").steps == 100
    study.tokens = None  # the config's budget: 300 steps
    assert st.schedule(study, "asa").steps == config("asa")["model"]["optim"]["token_budget"] // 32768 == 300


def test_fit_args_that_change_the_tokens_per_step_change_the_steps(tmp_path):
    study = st.Study(out=tmp_path, results=tmp_path / "r", tokens=3_000_000,
                     fit_args=["--data.batch_size", "8", "--trainer.val_check_interval=25"])
    sched = st.schedule(study, "asa")  # 8 x 2048 tokens a step, validation every 25 steps
    assert (sched.tokens_per_step, sched.val_every, sched.steps) == (8 * 2048, 25, 200)
    study.fit_args = ["--trainer.accumulate_grad_batches", "2", "--data.batch_size", "8",
                      "--trainer.val_check_interval", "25"]
    assert st.schedule(study, "asa").tokens_per_step == 2 * 8 * 2048
    # validation every 25 optimiser steps: 50 of Lightning's micro-batches, the option not passed again
    argv = st.fit_argv(st.Run(study, "asa", 1))
    assert argv[argv.index("--trainer.val_check_interval") + 1] == "50"
    assert argv.count("--trainer.val_check_interval") == 1
    study.fit_args = ["--trainer.val_check_interval", "0.5"]
    with pytest.raises(ValueError, match="--trainer.val_check_interval 0.5: the study needs"):
        st.schedule(study, "asa")


def test_fit_command_names_the_run_and_checkpoints_only_at_the_end(tmp_path):
    study = st.Study(out=tmp_path, results=tmp_path / "r", tokens=3_000_000)
    argv = st.fit_argv(st.Run(study, "nsa", 2))
    opts = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}
    assert argv[0] == "fit" and opts["--config"].endswith("configs/study/nsa.yaml")
    assert opts["--seed_everything"] == "2"
    assert opts["--trainer.logger.init_args.save_dir"] == str(tmp_path / "logs")
    assert opts["--trainer.callbacks.init_args.every_n_train_steps"] == "100"
    assert opts["--model.optim.token_budget"] == str(100 * 32768)
    assert opts["--data.data_dir"] == "data/study-python-docs"
    run = st.Run(study, "nsa", 2)
    assert run.log_dir == tmp_path / "logs/study/nsa/seed2" and run.label == "study/nsa/seed2"


def test_unknown_variant_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="no config .*bogus.yaml.*asa, asa_llg, full, nsa"):
        st.run_study(st.Study(out=tmp_path, results=tmp_path / "r", variants=["asa", "bogus"]))
    assert not (tmp_path / "logs").exists()


def test_ppl_table_is_mean_and_std_over_seeds(tmp_path):
    study = st.Study(out=tmp_path, results=tmp_path / "r", variants=["asa", "nsa"], seeds=[1, 2])
    values = {("asa", 1): (10.0, 5.0), ("asa", 2): (12.0, 7.0), ("nsa", 1): (20.0, 9.0), ("nsa", 2): (26.0, 9.5)}
    runs = []
    for (variant, seed), (short, long) in values.items():
        run = st.Run(study, variant, seed)
        run.ppl_json.parent.mkdir(parents=True, exist_ok=True)
        run.ppl_json.write_text(json.dumps({"lengths": [
            {"length": 512, "ppl": short, "extrapolated": False},
            {"length": 4096, "ppl": long, "extrapolated": True}]}))
        runs.append(run)
    rows = st.ppl_table(runs).splitlines()
    assert rows[0] == "| variant | ppl @512 | ppl @4096* |"
    assert rows[2] == f"| asa | 11.00 ± {statistics.stdev([10, 12]):.2f} | 6.00 ± {statistics.stdev([5, 7]):.2f} |"
    assert rows[3] == f"| nsa | 23.00 ± {statistics.stdev([20, 26]):.2f} | 9.25 ± {statistics.stdev([9, 9.5]):.2f} |"


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    result = st.main(["--smoke", "--out", str(out)])
    table = (out / "results" / "comparison.md").read_text()
    doc = json.loads((out / "results" / "comparison.json").read_text())

    labels = {f"study/{v}/seed{s}" for v in st.VARIANTS for s in st.SEEDS}
    assert set(doc["runs"]) == labels
    for label, run in doc["runs"].items():
        variant = label.rsplit("/", 1)[0].removeprefix("study/")
        values = run["values"]
        for key in ("final_train_loss", "final_val_loss", "tokens_seen", "kv_bytes_per_token"):
            assert math.isfinite(values[key]), (label, key)
        # 4 steps of 2 x 256 tokens, from a vocabulary of 32,000: the loss is still near ln(32000)
        assert values["tokens_seen"] == 4 * 2 * 256
        assert 8.0 < values["final_train_loss"] < 11.5
        for task in st.NIAH_TASKS:
            assert 0.0 <= values[f"eval:{task}"] <= 1.0, (label, task)
        # KV bytes per token (bf16) at the training context, for the shrunk architecture
        arch = ModelConfig(**{**config(variant)["model"]["arch"], **st.SMOKE_ARCH})
        assert values["kv_bytes_per_token"] == pytest.approx(2 * kv_elements_per_token(arch, 256))
        if variant == "full":  # every layer caches K and V of its key/value heads
            assert values["kv_bytes_per_token"] == 2 * arch.n_layers * 2 * arch.n_kv_heads * arch.head_dim
        assert (out / "checkpoints" / label / "last.ckpt").is_file()
        step = torch.load(out / "checkpoints" / label / "last.ckpt", map_location="cpu",
                          weights_only=False)["global_step"]
        assert step == 4, (label, step)
    for variant in st.VARIANTS:
        assert f"| study/{variant} | 1, 2 |" in table
        assert doc["variants"][f"study/{variant}"]["metrics"]["final_val_loss"]["n"] == 2
    for task in st.NIAH_TASKS:
        assert (out / "results" / f"heatmap_{task}.png").is_file()
    report = result["report"].read_text()
    assert "| variant | ppl @128 | ppl @256 | ppl @512* |" in report
    for variant in st.VARIANTS:
        assert f"| {variant} | " in report
    assert "runs trained and evaluated on CPU." in report
    for label in labels:
        assert f"| {label} | CPU | " in report

    # a second invocation finds every run done and only compares again, from the logs and
    # evaluations alone (as on another machine, without the checkpoints); a run done before
    # runs were recorded is listed as such
    shutil.rmtree(out / "checkpoints")
    st.Run(st.Study(out=out, results=out / "results"), "nsa", 1).record_json.unlink()
    capsys.readouterr()
    again = st.main(["--smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == len(labels)
    assert again["table"] == result["table"]
    assert "| study/nsa/seed1 | not recorded |" in again["report"].read_text()
