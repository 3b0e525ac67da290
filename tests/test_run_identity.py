"""Run identity: every run logs to ``logs/<size>/<variant>/seed<k>`` and checkpoints to
``checkpoints/<size>/<variant>/seed<k>``, records its static facts, and TensorBoard serves the
runs side by side (a real ``tensorboard`` server, read through its HTTP API)."""
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from nsa_lit.cli import cli_main, version_loggers_by_seed
from nsa_lit.kv_report import measure
from test_training import RandomTokens

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

# tiny runs shared with tests/test_compare.py: (variant, seed) -> extra CLI options
TINY_RUNS = {("asa", 1): [], ("asa", 2): [], ("nsa", 1): ["--model.arch.layer_pattern", "N"]}
TINY_STEPS, TINY_BATCH, TINY_SEQ = 4, 2, 128
FACT_TAGS = ("run/parameters", "run/kv_bytes_per_token", "run/train_flops_per_token", "run/seed")


def tiny_cli(root: Path, variant: str, seed: int, *extra: str):
    """configs/tiny.yaml, shrunk, as the ``tiny/<variant>`` run of ``seed`` under ``root``."""
    return cli_main([
        "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.accelerator", "cpu",
        "--seed_everything", str(seed), "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
        "--trainer.logger.init_args.name", f"tiny/{variant}",
        "--trainer.max_steps", str(TINY_STEPS), "--model.optim.token_budget", "null",
        "--model.optim.warmup_steps", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.arch.vocab_size", "64", "--model.arch.n_layers", "2",
        "--model.arch.seq_len", str(TINY_SEQ), "--model.arch.window", "32",
        "--model.arch.select_block", "16", *extra], run=False)


def train_tiny_runs(root: Path) -> dict[tuple[str, int], dict]:
    """Train :data:`TINY_RUNS` under ``root`` once per test session (a later call reuses them);
    returns, per run, its log and checkpoint directories and what the test computes directly."""
    done = root / "done.json"
    if not done.exists():
        runs = {}
        for (variant, seed), extra in TINY_RUNS.items():
            cli = tiny_cli(root, variant, seed, *extra)
            cli.trainer.fit(cli.model, datamodule=RandomTokens(batch_size=TINY_BATCH,
                                                               seq_len=TINY_SEQ, n=16))
            [ckpt] = cli.trainer.checkpoint_callbacks
            cfg = cli.model.arch
            runs[f"{variant}/{seed}"] = dict(
                log_dir=cli.trainer.logger.log_dir, ckpt_dir=ckpt.dirpath,
                parameters=sum(p.numel() for p in cli.model.model.parameters()),
                kv_bytes_per_token=measure(cfg, cfg.seq_len, dtype=torch.bfloat16)[0] / cfg.seq_len,
                tokens_seen=cli.model.tokens_seen, global_step=cli.trainer.global_step)
        done.write_text(json.dumps(runs))
    return {(k.split("/")[0], int(k.split("/")[1])): v
            for k, v in json.loads(done.read_text()).items()}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return train_tiny_runs(tmp_path_factory.getbasetemp() / "tiny_runs")


def event_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# -- identity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_names_its_run_by_size_and_variant(path):
    logger = yaml.safe_load(path.read_text())["trainer"]["logger"]["init_args"]
    size = path.parent.name if path.parent != ROOT / "configs" else path.stem
    variant = path.stem if path.parent != ROOT / "configs" else "asa"
    assert logger["name"] == f"{size}/{variant}"
    assert logger["version"] is None  # seed<k> from seed_everything


def test_configs_never_share_a_run_name():
    names = [yaml.safe_load(p.read_text())["trainer"]["logger"]["init_args"]["name"]
             for p in CONFIGS]
    assert len(set(names)) == len(names)


def test_version_follows_the_seed_unless_given():
    from jsonargparse import Namespace

    def config(seed, version, logger_list=False):
        logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                           init_args=Namespace(save_dir="logs", name="340m/asa", version=version))
        return Namespace(seed_everything=seed,
                         trainer=Namespace(logger=[logger] if logger_list else logger))

    c = config(7, None)
    version_loggers_by_seed(c)
    assert c.trainer.logger.init_args.version == "seed7"
    c = config(7, None, logger_list=True)
    version_loggers_by_seed(c)
    assert c.trainer.logger[0].init_args.version == "seed7"
    c = config(7, "mine")
    version_loggers_by_seed(c)
    assert c.trainer.logger.init_args.version == "mine"
    c = config(False, None)  # unseeded: Lightning's version_<n>
    version_loggers_by_seed(c)
    assert c.trainer.logger.init_args.version is None


def test_tiny_runs_log_and_checkpoint_in_their_own_directories(tiny_runs):
    for (variant, seed), run in tiny_runs.items():
        log_dir, ckpt_dir = Path(run["log_dir"]), Path(run["ckpt_dir"])
        assert log_dir.parts[-4:] == ("logs", "tiny", variant, f"seed{seed}")
        assert ckpt_dir.parts[-4:] == ("checkpoints", "tiny", variant, f"seed{seed}")
        state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
        assert state["global_step"] == TINY_STEPS
        saved = yaml.safe_load((log_dir / "config.yaml").read_text())
        assert saved["trainer"]["logger"]["init_args"]["version"] == f"seed{seed}"
    assert len({r["log_dir"] for r in tiny_runs.values()}) == len(tiny_runs)
    assert len({r["ckpt_dir"] for r in tiny_runs.values()}) == len(tiny_runs)


def test_tiny_runs_record_their_static_facts(tiny_runs):
    for (variant, seed), run in tiny_runs.items():
        scalars = event_scalars(run["log_dir"])
        assert scalars["run/parameters"] == [(0, float(run["parameters"]))]
        assert scalars["run/seed"] == [(0, float(seed))]
        [(step, kv)] = scalars["run/kv_bytes_per_token"]
        # float32 in the event file; the direct value is the bytes the decode caches allocate
        assert step == 0 and kv == pytest.approx(run["kv_bytes_per_token"], rel=1e-6)
        facts = yaml.safe_load((Path(run["log_dir"]) / "hparams.yaml").read_text())["run"]
        assert facts["name"] == f"tiny/{variant}" and facts["version"] == f"seed{seed}"
        assert facts["seed"] == seed and facts["parameters"] == run["parameters"]
        assert facts["layer_pattern"] == ("N" if variant == "nsa" else "LG")
        assert facts["kv_bytes_per_token"] == pytest.approx(run["kv_bytes_per_token"], rel=1e-12)
    kv = {v: r["kv_bytes_per_token"] for (v, _), r in tiny_runs.items()}
    assert kv["asa"] < kv["nsa"]


# -- TensorBoard --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def tensorboard_server(tiny_runs):
    """A ``tensorboard`` process over the tiny runs' log root on a free localhost port; yields
    its base URL once ``/data/runs`` lists every run; always terminated."""
    logdir = Path(next(iter(tiny_runs.values()))["log_dir"]).parents[2]
    port = _free_port()
    # --load_fast=false: TensorBoard's Python reader in this one process (no data-server binary)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    base = f"http://127.0.0.1:{port}"
    expected = {f"tiny/{v}/seed{s}" for v, s in tiny_runs}
    try:
        deadline, runs = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            try:
                runs = _get_json(base + "/data/runs")
                if expected <= set(runs):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard at {base} did not list {sorted(expected)} within 90 s "
                        f"(it lists {runs})")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_tensorboard_serves_every_run_with_the_event_files_scalars(tiny_runs, tensorboard_server):
    base = tensorboard_server
    tags = _get_json(base + "/data/plugin/scalars/tags")
    for (variant, seed), run in tiny_runs.items():
        name = f"tiny/{variant}/seed{seed}"
        events = event_scalars(run["log_dir"])
        for tag in ("train/loss", "val/loss", "train/tokens_seen", *FACT_TAGS):
            assert tag in tags[name], (name, tag)
            query = urllib.parse.urlencode({"run": name, "tag": tag})
            served = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")  # [wall, step, value]
            assert [(step, value) for _, step, value in served] == events[tag], (name, tag)
        assert events["train/tokens_seen"][-1] == (TINY_STEPS - 1, float(run["tokens_seen"]))
    # the runs differ: distinct names, and the two seeds of one variant trained differently
    losses = {(v, s): events_last(r["log_dir"]) for (v, s), r in tiny_runs.items()}
    assert losses[("asa", 1)] != losses[("asa", 2)]
    assert all(math.isfinite(x) for x in losses.values())


def events_last(log_dir: str) -> float:
    return event_scalars(log_dir)["train/loss"][-1][1]
