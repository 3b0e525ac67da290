"""Faults: a non-finite training loss stops the run (``model.nonfinite_loss: stop``, the default)
or drops the optimiser step it belongs to (``skip``) and stops after
``model.max_consecutive_skips`` dropped steps in a row. (A failing save: tests/test_checkpoint.py.)"""
import lightning as L
import pytest
import torch

from nsa_lit.config import ModelConfig
from nsa_lit.lit_module import LanguageModel, OptimConfig
from tests.test_training import ARCH, RandomTokens


class Flaky(LanguageModel):
    """A training loss that is NaN at the given calls of ``_loss`` (0-based micro-batches)."""

    def __init__(self, bad=(), **kwargs):
        super().__init__(ModelConfig(**ARCH), OptimConfig(lr=1e-2, warmup_steps=1), **kwargs)
        self.bad, self.calls = set(bad), 0

    def _loss(self, batch):
        loss = super()._loss(batch)
        i, self.calls = self.calls, self.calls + 1
        return loss * float("nan") if i in self.bad else loss


class Snapshots(L.Callback):
    """Parameters and AdamW state after every optimiser step."""

    def __init__(self):
        self.params, self.state, self.skipped = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
        opt = trainer.optimizers[0]
        self.state.append({i: {k: v.clone() for k, v in opt.state[p].items()}
                           for i, p in enumerate(pl_module.parameters()) if p in opt.state})
        self.skipped.append(float(trainer.callback_metrics.get("train/skipped_steps", -1)))


def run(model, steps, **kw):
    snaps = Snapshots()
    kw.setdefault("gradient_clip_val", 1.0)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[snaps], **kw)
    t.fit(model, datamodule=RandomTokens())
    return t, snaps


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else same(a[k], b[k]) for k in a)


def test_skip_drops_the_step_and_leaves_parameters_and_optimiser_state_alone():
    t, snaps = run(Flaky(bad={2}, nonfinite_loss="skip"), 5)
    assert t.global_step == 5  # the dropped step counts: the schedule and the data move on
    assert same(snaps.params[2], snaps.params[1]) and same(snaps.state[2], snaps.state[1])
    for i in (1, 3, 4):  # every other step updates
        assert not same(snaps.params[i], snaps.params[i - 1])
    assert snaps.state[4][0]["step"].item() == 4  # AdamW's step count skips the dropped step
    assert all(torch.isfinite(p).all() for p in snaps.params[4].values())
    assert snaps.skipped == [0, 0, 1, 1, 1]


def test_skip_drops_every_micro_batch_of_the_step():
    """With gradient accumulation a NaN in the second micro-batch drops the whole step:
    the first micro-batch's (finite) gradients are not applied either."""
    t, snaps = run(Flaky(bad={3}, nonfinite_loss="skip"), 3, accumulate_grad_batches=2)
    assert t.global_step == 3
    assert same(snaps.params[1], snaps.params[0]) and same(snaps.state[1], snaps.state[0])
    assert not same(snaps.params[2], snaps.params[1])
    assert snaps.skipped == [0, 1, 1]


def test_skip_stops_after_too_many_skips_in_a_row():
    model = Flaky(bad={1, 2, 4, 5, 6}, nonfinite_loss="skip", max_consecutive_skips=3)
    with pytest.raises(FloatingPointError, match=r"non-finite in 3 optimiser steps in a row "
                                                 r"\(model.max_consecutive_skips=3, up to step 6"):
        run(model, 10)
    assert model.skipped_steps == 5


def test_stop_is_the_default_and_keeps_its_message():
    model = Flaky(bad={1})
    assert model.nonfinite_loss == "stop" and model.hparams.nonfinite_loss == "stop"
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 1 \(batch 1\)"):
        run(model, 3)


def test_stop_names_the_micro_batch_of_an_accumulated_step():
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 1 \(batch 3\)"):
        run(Flaky(bad={3}), 3, accumulate_grad_batches=2)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_training_step_reads_no_tensor_value(monkeypatch, mode):
    """The non-finite check waits for the device once per optimiser step, in
    ``on_before_optimizer_step``: ``training_step`` converts no tensor to a Python value, so
    the host keeps queueing the backward behind the forward."""
    reads, inside = [], []
    for name in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _name=name, _original=original):
            if inside:
                reads.append(_name)
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, read)
    step = LanguageModel.training_step

    def watched(self, batch, batch_idx):
        inside.append(True)
        try:
            return step(self, batch, batch_idx)
        finally:
            inside.pop()
    monkeypatch.setattr(LanguageModel, "training_step", watched)
    run(Flaky(nonfinite_loss=mode), 3, accumulate_grad_batches=2)
    assert reads == []


def test_skipped_steps_survive_a_checkpoint(tmp_path):
    t, _ = run(Flaky(bad={1}, nonfinite_loss="skip"), 2)
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.skipped_steps == 1 and loaded.nonfinite_loss == "skip"


@pytest.mark.parametrize("kw, match", [(dict(nonfinite_loss="ignore"), "model.nonfinite_loss"),
                                       (dict(max_consecutive_skips=0), "max_consecutive_skips")])
def test_bad_fault_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LanguageModel(ModelConfig(**ARCH), **kw)


class InfGrad(Flaky):
    """A finite loss whose backward leaves an inf in one gradient at the given optimiser steps."""

    def __init__(self, inf_steps=(), **kwargs):
        super().__init__(**kwargs)
        self.inf_steps = set(inf_steps)

    def on_after_backward(self):
        if self.global_step in self.inf_steps:
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_skip_under_every_precision_with_clipping(precision):
    """bf16-mixed (the paper configs: fused AdamW, clipping done by the module) drops the step as
    fp32 does: no clipping of gradients that are gone, no error from Lightning's clipping."""
    t, snaps = run(Flaky(bad={1}, nonfinite_loss="skip"), 3, precision=precision)
    assert t.global_step == 3 and snaps.skipped == [0, 1, 1]
    assert same(snaps.params[1], snaps.params[0]) and not same(snaps.params[2], snaps.params[1])


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_or_stops():
    t, snaps = run(InfGrad(inf_steps={1}, nonfinite_loss="skip"), 3)
    assert snaps.skipped == [0, 1, 1] and same(snaps.params[1], snaps.params[0])
    assert all(torch.isfinite(p).all() for p in snaps.params[2].values())
    with pytest.raises(FloatingPointError, match=r"gradient norm is inf at step 1 \(the loss was finite\)"):
        run(InfGrad(inf_steps={1}), 3)


def test_clipping_by_value_with_the_fused_optimiser():
    """``gradient_clip_algorithm: value`` under bf16-mixed (fused AdamW): clipped by the module."""
    model = Flaky()
    grads = []
    model.on_before_optimizer_step = lambda opt: None  # no norm: value clipping needs none
    clip = model.configure_gradient_clipping

    def spy(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))

    model.configure_gradient_clipping = spy
    run(model, 2, precision="bf16-mixed", gradient_clip_algorithm="value", gradient_clip_val=1e-3)
    assert grads == [pytest.approx(1e-3)] * 2  # the largest gradient entry clipped to the value


def test_an_overflow_under_a_loss_scaler_is_the_scalers_to_handle():
    """16-mixed: an inf gradient norm after unscaling is GradScaler's overflow signal (it skips
    the step and lowers the scale), not a fault: training goes on in stop mode."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # the first steps overflow
    t, _ = run(Flaky(), 3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert t.global_step == 3 and scaler.get_scale() < 2.0 ** 60
