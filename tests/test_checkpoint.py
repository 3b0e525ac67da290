"""Checkpoints that cannot be lost or mixed up (nsa_lit.checkpoint): atomic saves, one checkpoint
directory per run, resuming only the same architecture, the config's optimiser settings on resume."""
import errno
import io
import logging
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from nsa_lit.checkpoint import (AtomicCheckpointIO, CheckpointSaveError, RunCheckpoint,
                                arch_differences, load_checkpoint)
from nsa_lit.config import ModelConfig
from nsa_lit.lit_module import LanguageModel, OptimConfig, lr_factor
from tests.test_training import ARCH, RandomTokens

ROOT = Path(__file__).resolve().parents[1]


def fit(root, model, max_steps, ckpt_path=None, callbacks=(), logger=False, **kw):
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0,
                  logger=logger, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=root, callbacks=list(callbacks),
                  plugins=[AtomicCheckpointIO()], **kw)
    t.fit(model, datamodule=RandomTokens(), ckpt_path=ckpt_path)
    return t


def every_step(**kw):
    return RunCheckpoint(every_n_train_steps=1, save_last=True, **kw)


def model(lr=1e-3, **arch):
    return LanguageModel(ModelConfig(**{**ARCH, **arch}), OptimConfig(lr=lr, warmup_steps=1))


# -- atomic saves ---------------------------------------------------------------------------------
def test_a_save_failing_midway_keeps_the_previous_last_ckpt(tmp_path, monkeypatch):
    """A disk that fills up half way through writing last.ckpt: the save raises an error naming
    the file and saying the previous one is kept; last.ckpt is byte for byte the previous
    checkpoint (and loads); no temporary file is left behind."""
    ckpt_dir = tmp_path / "ckpt"
    fit(tmp_path, model(), 2, callbacks=[every_step(dirpath=ckpt_dir)])
    last = ckpt_dir / "last.ckpt"
    before = last.read_bytes()

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # while writing last.ckpt (after epoch=0-step=3.ckpt)
        if "last" not in str(getattr(f, "name", f)):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if isinstance(f, (str, Path)):
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointSaveError, match=r"last\.ckpt failed \(OSError: .*No space left"
                                                  r".*the previous last\.ckpt is unchanged"):
        fit(tmp_path, model(), 3, ckpt_path=last, callbacks=[every_step(dirpath=ckpt_dir)])
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before
    assert not list(ckpt_dir.glob("*.tmp"))
    net, _ = load_checkpoint(last)
    assert torch.load(last, weights_only=False)["global_step"] == 2 and net.cfg.n_layers == 2


def test_saves_need_no_space_outside_the_checkpoint_directory(tmp_path, monkeypatch):
    """The temporary file is next to the checkpoint (same filesystem: a rename, never a copy
    from /tmp), so a full system temp directory does not stop a save."""
    def tmp_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (system temp)")

    monkeypatch.setattr(tempfile, "mkstemp", tmp_full)
    path = tmp_path / "a" / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]


def test_the_cli_saves_atomically():
    from nsa_lit.cli import cli_main

    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.logger", "false",
                    "--trainer.accelerator", "cpu"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


# -- one directory per run ------------------------------------------------------------------------
def TINY_DATA():  # configs/tiny.yaml's model, smaller
    return RandomTokens(batch_size=2, seq_len=128, n=16)


def _tiny_cli(variant: str, *extra: str):
    from nsa_lit.cli import cli_main

    return cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.accelerator", "cpu",
                     "--trainer.logger.init_args.name", f"tiny/{variant}",
                     "--trainer.callbacks.init_args.every_n_train_steps", "1",
                     "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                     "--model.arch.vocab_size", "64", "--model.arch.n_layers", "2",
                     "--model.arch.seq_len", "128", "--model.arch.window", "32",
                     "--model.arch.select_block", "16",
                     "--model.optim.token_budget", "100000", *extra], run=False)


def test_each_run_checkpoints_in_its_own_directory_and_last_resumes_its_own(tmp_path, monkeypatch):
    """configs/tiny.yaml as two variants (logger names tiny/<variant>, version seed1234 from
    seed_everything): each writes its checkpoints to checkpoints/tiny/<variant>/seed1234;
    ``--ckpt_path last`` of the first run resumes the first run's last.ckpt even though the
    other run's is newer."""
    monkeypatch.chdir(tmp_path)
    runs = {"asa": 1, "nsa": 2}
    for variant, steps in runs.items():
        extra = ["--model.arch.top_n", "3"] if variant == "nsa" else []
        cli = _tiny_cli(variant, "--trainer.max_steps", str(steps), "--model.optim.token_budget",
                        "null", *extra)
        cli.trainer.fit(cli.model, datamodule=TINY_DATA())
        [cb] = cli.trainer.checkpoint_callbacks
        assert isinstance(cb, RunCheckpoint)
        assert Path(cb.dirpath) == tmp_path / "checkpoints" / "tiny" / variant / "seed1234"
        state = torch.load(Path(cb.dirpath) / "last.ckpt", weights_only=False)
        assert state["global_step"] == steps
    cli = _tiny_cli("asa", "--trainer.max_steps", "2", "--model.optim.token_budget", "null")
    cli.trainer.fit(cli.model, datamodule=TINY_DATA(), ckpt_path="last")
    assert Path(cli.trainer.ckpt_path) == tmp_path / "checkpoints/tiny/asa/seed1234/last.ckpt"
    assert torch.load(cli.trainer.ckpt_path, weights_only=False)["global_step"] == 2


def test_run_checkpoint_directory_follows_the_logger(tmp_path):
    logger = TensorBoardLogger(tmp_path / "logs", name="340m", version=3)
    cb = every_step()
    fit(tmp_path, model(), 1, callbacks=[cb], logger=logger)
    assert Path(cb.dirpath) == tmp_path / "checkpoints" / "340m" / "version_3"
    assert (Path(cb.dirpath) / "last.ckpt").exists()


# -- same architecture only -----------------------------------------------------------------------
@pytest.mark.parametrize("change", [dict(top_n=2), dict(q_share=2, window=16),
                                    dict(d_model=48, head_dim=12)])
def test_resuming_another_architecture_names_the_fields(tmp_path, change):
    """top_n, q_share and window do not change any weight's shape (today's resume would load them
    silently); d_model does (a state-dict shape error). Each is refused before loading,
    naming every differing field, in fit and in validate."""
    ckpt_dir = tmp_path / "ckpt"
    fit(tmp_path, model(), 1, callbacks=[every_step(dirpath=ckpt_dir)])
    other = model(**change)
    with pytest.raises(ValueError, match="another model.arch; differing fields") as err:
        fit(tmp_path, other, 2, ckpt_path=ckpt_dir / "last.ckpt")
    for name, value in change.items():
        assert f"{name}: checkpoint {ARCH[name]!r}, config {value!r}" in str(err.value)
    assert str(ckpt_dir / "last.ckpt") in str(err.value)
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="differing fields"):
        t.validate(model(**change), datamodule=RandomTokens(), ckpt_path=ckpt_dir / "last.ckpt",
                   verbose=False)


def test_execution_only_fields_may_differ():
    saved = {**ARCH, "kernel_backend": "triton", "latent_form": "absorbed"}
    assert arch_differences(saved, ModelConfig(**ARCH)) == []
    saved.pop("top_n")  # a field the checkpoint predates compares as its default
    assert arch_differences(saved, ModelConfig(**ARCH)) == ["top_n: checkpoint 16, config 3"]


# -- the config's optimiser settings on resume ----------------------------------------------------
@pytest.mark.parametrize("how", ["file", "last"])
def test_resume_applies_the_configs_optimiser_settings(tmp_path, caplog, how):
    """``--model.optim.lr`` (and weight_decay, betas, eps) on a resume are the ones trained with,
    whether the checkpoint is named or found as ``last``; the change is reported. (Restoring the
    optimiser state alone would keep the checkpoint's.)"""
    ckpt_dir = tmp_path / "ckpt"
    fit(tmp_path, model(lr=1e-3), 2, callbacks=[every_step(dirpath=ckpt_dir)])
    resumed = LanguageModel(ModelConfig(**ARCH), OptimConfig(
        lr=4e-3, warmup_steps=1, weight_decay=0.05, betas=[0.8, 0.9], eps=1e-6))
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([dict(g, params=None) for g in trainer.optimizers[0].param_groups])

    with caplog.at_level(logging.INFO):
        t = fit(tmp_path, resumed, 4, callbacks=[every_step(dirpath=ckpt_dir), Record()],
                ckpt_path=ckpt_dir / "last.ckpt" if how == "file" else "last")
    assert "model.optim changed from the checkpoint's (lr: 0.001 -> 0.004" in caplog.text
    first = seen[0]  # step 2, before its update
    assert first[0]["lr"] == pytest.approx(4e-3 * lr_factor(2, 1, 4, 0.1))
    assert [g["weight_decay"] for g in first] == [0.05, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in first)
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == [4e-3, 4e-3]
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(4e-3 * lr_factor(4, 1, 4, 0.1))


@pytest.mark.parametrize("seed", ["true", "false"])
def test_resuming_last_needs_the_runs_seed(tmp_path, monkeypatch, seed):
    """``--ckpt_path last`` finds the run by its seed: with a seed drawn anew each launch (or
    none) it would silently start a new run, so it is refused before anything is built."""
    from nsa_lit.cli import cli_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--ckpt_path last resumes the run of this seed.*not an integer"):
        cli_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.accelerator", "cpu",
                  "--seed_everything", seed, "--ckpt_path", "last"])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "data").exists()
