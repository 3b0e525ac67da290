"""LightningModule: schedule, token budget, logging, NaN loss, vocabulary check, checkpoint reload."""
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nsa_lit.config import ModelConfig
from nsa_lit.lit_module import LanguageModel, OptimConfig, lr_factor

ARCH = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2,
            mlp_hidden=64, seq_len=32, latent_dim=16, rope_dim=4, window=8, compress_block=8,
            compress_stride=4, select_block=8, top_n=3, num_local_blocks=1, q_share=4,
            kernel_backend="reference")


class RandomTokens(L.LightningDataModule):
    def __init__(self, batch_size=4, seq_len=32, vocab_size=64, n=64):
        super().__init__()
        self.batch_size, self.vocab_size = batch_size, vocab_size
        self.data = torch.randint(0, vocab_size, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data[:8], batch_size=self.batch_size)


def trainer(tmp_path, **kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=-1,
                    default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kw})


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 10, 110, 0.1) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:111], f[10:111]))
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)


def test_token_budget_sets_the_steps_and_every_metric_is_logged(tmp_path):
    model = LanguageModel(ModelConfig(**ARCH), OptimConfig(lr=3e-3, warmup_steps=2, token_budget=4 * 32 * 12))
    t = trainer(tmp_path, limit_val_batches=0)
    t.fit(model, datamodule=RandomTokens())
    assert t.global_step == 12
    assert model.tokens_seen == 12 * 4 * 32
    logged = t.logged_metrics
    for key in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tokens_seen",
                "train/tokens_per_sec"):
        assert key in logged, key
    assert logged["train/ppl"] == pytest.approx(math.exp(logged["train/loss"]), rel=1e-4)


def test_token_budget_conflicting_with_max_steps_is_refused(tmp_path):
    model = LanguageModel(ModelConfig(**ARCH), OptimConfig(token_budget=4 * 32 * 12))
    with pytest.raises(ValueError, match="token_budget.*max_steps"):
        trainer(tmp_path, max_steps=5).fit(model, datamodule=RandomTokens())


class UnevenValidation(RandomTokens):
    """Validation batches of 4 and 2 sequences."""

    def val_dataloader(self):
        return DataLoader(self.data[:6], batch_size=self.batch_size)


def test_validation_perplexity_is_token_weighted(tmp_path):
    """``val/loss`` is the mean over target tokens: a batch of 4 sequences weighs twice a batch
    of 2 (a mean over batches would not)."""
    model = LanguageModel(ModelConfig(**ARCH))
    dm = UnevenValidation()
    out = trainer(tmp_path).validate(model, datamodule=dm, verbose=False)[0]
    with torch.no_grad():
        first, last = model._loss(dm.data[:4]), model._loss(dm.data[4:6])
    expect = (4 * first + 2 * last) / 6
    assert abs(first - last) > 1e-3  # a mean over batches differs
    assert out["val/loss"] == pytest.approx(expect.item(), rel=1e-5)
    assert out["val/ppl"] == pytest.approx(math.exp(expect.item()), rel=1e-5)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    model = LanguageModel(ModelConfig(**ARCH), OptimConfig(warmup_steps=1))
    with torch.no_grad():
        model.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="training loss is nan at step 0"):
        trainer(tmp_path, max_steps=2).fit(model, datamodule=RandomTokens())


def test_data_vocabulary_larger_than_the_model_is_refused(tmp_path):
    model = LanguageModel(ModelConfig(**ARCH))
    with pytest.raises(ValueError, match="model.arch.vocab_size"):
        trainer(tmp_path, max_steps=1).fit(model, datamodule=RandomTokens(vocab_size=65))


def test_checkpoint_round_trip(tmp_path):
    model = LanguageModel(ModelConfig(**ARCH), OptimConfig(lr=1e-3))
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t.fit(model, datamodule=RandomTokens())
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = LanguageModel.load_from_checkpoint(path)
    assert loaded.arch == model.arch and loaded.optim == model.optim
    assert loaded.tokens_seen == model.tokens_seen
    tokens = torch.randint(0, 64, (1, 32))
    torch.testing.assert_close(loaded(tokens), model(tokens))


def test_compiled_blocks_train_like_eager_blocks(tmp_path):
    """``compile=True`` compiles each block in place (weights, names and checkpoints unchanged)
    and its training steps give the eager losses (CPU: inductor's C++ backend)."""
    losses = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig(**{**ARCH, "n_layers": 1, "layer_pattern": "G"}),
                              OptimConfig(lr=1e-3, warmup_steps=1), compile=compile)
        t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
        t.fit(model, datamodule=RandomTokens())
        assert all((b._compiled_call_impl is not None) == compile for b in model.model.blocks)
        assert model.hparams.compile == compile
        losses[compile] = float(t.logged_metrics["train/loss"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_mfu_is_logged_from_the_training_flops(tmp_path):
    from nsa_lit.model_stats import training_flops_per_token

    arch = ModelConfig(**ARCH)
    model = LanguageModel(arch, OptimConfig(warmup_steps=1), peak_tflops=1e-3)
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t.fit(model, datamodule=RandomTokens())
    logged = t.logged_metrics
    expected = logged["train/tokens_per_sec"] * training_flops_per_token(arch) / 1e9
    assert float(logged["train/mfu"]) == pytest.approx(float(expected), rel=1e-4)
    without = LanguageModel(arch, OptimConfig(warmup_steps=1))  # CPU: no known peak, no MFU
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t.fit(without, datamodule=RandomTokens())
    assert "train/mfu" not in t.logged_metrics
    with pytest.raises(ValueError, match="model.peak_tflops must be > 0"):
        LanguageModel(arch, peak_tflops=0)


def test_chunked_loss_equals_the_full_logits_loss():
    """model.loss_chunk (chunks of 24 of the 4 x 32 = 128 targets) against the whole logits:
    the same loss and the same gradient of every parameter."""
    torch.manual_seed(0)
    batch = torch.randint(0, 64, (4, 33))
    losses, grads = [], []
    for chunk in (24, 0):
        torch.manual_seed(1)
        model = LanguageModel(ModelConfig(**ARCH), loss_chunk=chunk).double()
        loss = model._loss(batch)
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    # (the whole-logits loss runs in fp32 even for a float64 model)
    torch.testing.assert_close(losses[0].float(), losses[1], rtol=1e-6, atol=1e-7)
    assert grads[0].keys() == grads[1].keys() and "model.lm_head.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8,
                                   msg=name)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_loss_chunk_is_refused(bad):
    with pytest.raises(ValueError, match="model.loss_chunk"):
        LanguageModel(ModelConfig(**ARCH), loss_chunk=bad)


@pytest.mark.parametrize("precision, fused", [("bf16-mixed", True), ("32-true", True),
                                              pytest.param("16-mixed", False, marks=pytest.mark.gpu)])
def test_gradients_are_clipped_by_their_norm_and_adamw_is_fused_without_a_loss_scaler(tmp_path, precision, fused):
    """What AdamW's step receives: every gradient times min(1, 0.05 / (norm + 1e-6)), the norm
    being the one logged as train/grad_norm. Without a loss scaler (fp32, bf16-mixed) the fused
    AdamW runs and is clipped (Lightning's mixed-precision plugin would refuse to clip it); under
    16-mixed the scaler must unscale first, so AdamW stays unfused and Lightning clips."""
    model = LanguageModel(ModelConfig(**ARCH), OptimConfig(lr=1e-2, warmup_steps=1))
    seen = []

    class Capture(L.Callback):
        raw: dict = {}

        def on_train_start(self, trainer, module):
            def post_step(opt, args, kwargs):  # the closure (backward, clipping) ran inside step()
                seen.append((self.raw, {n: p.grad.detach().clone() for n, p in module.named_parameters()
                                        if p.grad is not None}, opt.param_groups[0]["fused"]))
            trainer.optimizers[0].register_step_post_hook(post_step)

        def on_before_optimizer_step(self, trainer, module, optimizer):  # runs before clipping
            self.raw = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}

    accelerator = "cuda" if precision == "16-mixed" else "cpu"
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0, precision=precision, gradient_clip_val=0.05,
                callbacks=[Capture()], accelerator=accelerator)
    t.fit(model, datamodule=RandomTokens())
    assert len(seen) == 2
    for raw, clipped, was_fused in seen:
        assert bool(was_fused) == fused
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.values()]))
        assert norm > 0.05  # clipping was active
        scale = 0.05 / (norm + 1e-6)
        for name, g in raw.items():
            torch.testing.assert_close(clipped[name], g * scale, rtol=1e-5, atol=1e-8)


class LrLog(L.Callback):
    """The learning rate each optimiser step uses and the tokens seen before it."""

    def __init__(self):
        self.points = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.points.append((pl_module.tokens_seen, trainer.optimizers[0].param_groups[0]["lr"]))


@pytest.mark.parametrize("batch_size", [2, 8])
def test_a_resume_with_another_batch_size_trains_the_token_budget_on_its_schedule(tmp_path, batch_size):
    """Budget 24 steps of 4 x 32 tokens; stopped after 6 steps and resumed with batches of 2 or 8:
    the run ends with the budget's tokens (no more, no fewer), and the learning rate at every
    later step is the uninterrupted schedule's at the same tokens seen."""
    _resume_with_another_batch_size(tmp_path, batch_size, False, None)


def test_the_same_under_fsdp2(tmp_path, one_process_group):
    """The same under FSDP2 (one process), whose strategy builds the optimiser before it reads
    the checkpoint."""
    from nsa_lit.parallel import FSDP2Strategy

    _resume_with_another_batch_size(tmp_path, 8, True, FSDP2Strategy)


def _saved(path):
    """A checkpoint's top-level entries (a sharded one's from its ``meta.pt``)."""
    return torch.load(path / "meta.pt" if path.is_dir() else path, weights_only=False)


def _resume_with_another_batch_size(tmp_path, batch_size, fsdp2, FSDP2Strategy):
    budget, warmup = 24 * 4 * 32, 4
    optim = OptimConfig(lr=1e-2, warmup_steps=warmup, token_budget=budget)
    first = LanguageModel(ModelConfig(**ARCH), optim)
    kw = dict(strategy=FSDP2Strategy()) if fsdp2 else {}
    t = trainer(tmp_path, limit_val_batches=0, max_steps=-1, **kw)
    t.fit_loop.epoch_loop.max_steps = -1
    stopper = L.Callback()
    stopper.on_train_batch_end = lambda tr, *a: setattr(tr, "should_stop", tr.global_step >= 6)
    t.callbacks.append(stopper)
    t.fit(first, datamodule=RandomTokens(n=400))
    assert t.global_step == 6
    ckpt = tmp_path / "6.ckpt"
    t.save_checkpoint(ckpt)
    assert _saved(ckpt)["schedule_tokens_per_step"] == 4 * 32

    log = LrLog()
    resumed = LanguageModel(ModelConfig(**ARCH), optim)
    t2 = trainer(tmp_path / "r", limit_val_batches=0, callbacks=[log],
                 **(dict(strategy=FSDP2Strategy()) if fsdp2 else {}))
    t2.fit(resumed, datamodule=RandomTokens(batch_size=batch_size, n=400), ckpt_path=ckpt)
    assert resumed.tokens_seen == budget
    assert t2.global_step == 6 + (budget - 6 * 128) // (batch_size * 32)
    total = math.ceil(budget / 128)
    for tokens, lr in log.points:
        assert lr == pytest.approx(1e-2 * lr_factor(tokens / 128, warmup, total, 0.1)), tokens
    t2.save_checkpoint(tmp_path / "end.ckpt")  # a later resume still counts in the first size
    assert _saved(tmp_path / "end.ckpt")["schedule_tokens_per_step"] == 128
