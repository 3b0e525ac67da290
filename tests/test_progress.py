"""Host waits of a training step: the progress bar and the logging of ``main.py fit``.

A read of a tensor's value on the host (``item``, ``bool``, ``float``, ``tolist``) waits for the
device, and so does a Python number given to ``LightningModule.log`` (Lightning copies it to the
device, a blocking copy). These tests count both on CPU, where the same calls run, to show that a
run with gradient accumulation waits as often as one without (per optimiser step, not per
micro-batch); on a GPU, CUDA's synchronisation warnings are counted the same way."""
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

import nsa_lit.lit_module as lit_module
from nsa_lit.cli import cli_main
from nsa_lit.config import ModelConfig
from nsa_lit.lit_module import LanguageModel, OptimConfig
from nsa_lit.progress import StepProgressBar
from test_training import ARCH, RandomTokens

ROOT = Path(__file__).resolve().parents[1]
READS = ("item", "__bool__", "__float__", "tolist")


class CountWaits(Callback):
    """Host reads of tensor values and Python numbers logged, from the start of training to its
    end."""

    def __init__(self, monkeypatch):
        self.waits, self.counting = 0, False
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.waits += self.counting
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        log = LanguageModel.log

        def counted_log(module, name, value, *args, **kwargs):
            self.waits += self.counting and not isinstance(value, torch.Tensor)
            return log(module, name, value, *args, **kwargs)

        monkeypatch.setattr(LanguageModel, "log", counted_log)

    def on_train_start(self, trainer, pl_module):
        self.counting = True

    def on_train_end(self, trainer, pl_module):
        self.counting = False


def fit(tmp_path, accumulate: int, bar, callbacks=(), steps: int = 3, model_class=LanguageModel,
        **kwargs) -> L.Trainer:
    model = model_class(ModelConfig(**ARCH), OptimConfig(warmup_steps=1))
    trainer = L.Trainer(devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, max_steps=steps, limit_val_batches=0,
                        accumulate_grad_batches=accumulate, gradient_clip_val=1.0,
                        callbacks=[bar, *callbacks], default_root_dir=tmp_path, **kwargs)
    # 64 sequences of batch 2: every micro-batch of 3 steps x 4 lies in the first epoch
    trainer.fit(model, datamodule=RandomTokens(batch_size=2))
    assert trainer.global_step == steps
    return trainer


def waits_in_fit(monkeypatch, tmp_path, accumulate: int, bar, model_class=LanguageModel) -> int:
    counter = CountWaits(monkeypatch)
    fit(tmp_path, accumulate, bar, [counter], model_class=model_class, accelerator="cpu")
    return counter.waits


class LoggingPerMicroBatch(LanguageModel):
    """What the training step must not do: a ``prog_bar`` tensor and a Python number a micro-batch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("bar_loss", loss.detach(), prog_bar=True)
        self.log("host_number", float(batch_idx))
        return loss


def test_training_waits_for_the_device_once_per_optimizer_step(monkeypatch, tmp_path):
    one = waits_in_fit(monkeypatch, tmp_path, 1, StepProgressBar())
    four = waits_in_fit(monkeypatch, tmp_path, 4, StepProgressBar())
    assert four == one
    # the count sees waits per micro-batch: 3 x 3 more micro-batches, 2 waits each at least
    more = [waits_in_fit(monkeypatch, tmp_path, accumulate, StepProgressBar(),
                         LoggingPerMicroBatch) for accumulate in (1, 4)]
    assert more[1] - more[0] >= 2 * 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_synchronises_the_gpu_once_per_optimizer_step(tmp_path):
    """CUDA's own count: every synchronising call warns under ``set_sync_debug_mode``."""
    def syncs(accumulate: int) -> int:
        class Count(Callback):
            def on_train_start(self, trainer, pl_module):
                torch.cuda.set_sync_debug_mode("warn")

            def on_train_end(self, trainer, pl_module):
                torch.cuda.set_sync_debug_mode("default")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(tmp_path, accumulate, StepProgressBar(), [Count()], accelerator="gpu")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(1)  # a process's first run adds one-off synchronisations (CUDA's own set-up)
    assert syncs(4) == syncs(1) > 0


def test_step_progress_bar_moves_on_optimizer_steps(tmp_path):
    seen = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(trainer.progress_bar_callback.train_progress_bar.n)

    model = LanguageModel(ModelConfig(**ARCH), OptimConfig(warmup_steps=1))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, max_epochs=1, limit_val_batches=0,
                        limit_train_batches=7, accumulate_grad_batches=3,
                        callbacks=[StepProgressBar(refresh_rate=1), Watch()],
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=RandomTokens(batch_size=2))
    # steps end on micro-batches 3, 6 and (the epoch's last) 7
    assert seen == [0, 0, 3, 3, 3, 6, 7]
    assert "train/loss" in trainer.progress_bar_callback.train_progress_bar.postfix


def test_the_cli_installs_the_step_progress_bar_unless_one_is_configured_or_off():
    base = ["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.logger", "false",
            "--trainer.accelerator", "cpu"]
    assert type(cli_main(base, run=False).trainer.progress_bar_callback) is StepProgressBar
    named = cli_main([*base, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
                      "--trainer.callbacks.refresh_rate", "5"], run=False).trainer
    assert type(named.progress_bar_callback) is TQDMProgressBar
    assert named.progress_bar_callback.refresh_rate == 5
    off = cli_main([*base, "--trainer.enable_progress_bar", "false"], run=False).trainer
    assert off.progress_bar_callback is None


class RateLog(LanguageModel):
    """Records every ``train/tokens_per_sec`` it logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates = []

    def log(self, name, value, *args, **kwargs):
        if name == "train/tokens_per_sec":
            self.rates.append(value)
        super().log(name, value, *args, **kwargs)


@pytest.mark.parametrize("validate", [False, True])
def test_tokens_per_sec_is_measured_over_optimizer_steps(monkeypatch, tmp_path, validate):
    """The clock is read at each optimiser step's loss check (after its backward pass): the
    tokens of one step (2 micro-batches of 4 x 32) over one tick of a fake clock; a validation
    run (after micro-batch 4, step 2) restarts it, so step 3 logs nothing."""
    ticks = iter(range(1000))
    monkeypatch.setattr(lit_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    model = RateLog(ModelConfig(**ARCH), OptimConfig(warmup_steps=1))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, max_steps=3,
                        accumulate_grad_batches=2, val_check_interval=4 if validate else 1.0,
                        limit_val_batches=1 if validate else 0, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=RandomTokens())
    assert model.rates == ([256.0] if validate else [256.0, 256.0])
