"""LightningModule: next-token loss, AdamW, warm-up + cosine schedule, token budget, metrics.

Logged to every logger: ``train/loss``, ``train/ppl``, ``train/lr``, ``train/grad_norm`` (before
clipping), ``train/tokens_seen``, ``train/tokens_per_sec`` (wall clock over each optimiser step,
all processes),
``train/mfu`` (when the accelerator's peak is known), ``train/skipped_steps`` (with
``nonfinite_loss: skip``), and ``val/loss``, ``val/ppl`` (token-weighted over the whole validation
set, through a torchmetrics metric, :class:`TokenMean`); ``main.py test`` logs ``test/loss``, ``test/ppl`` over the test split the
same way (one code path: :meth:`LanguageModel._eval_step`, :meth:`LanguageModel._log_eval`).

Once per ``fit``, the run's static facts (:func:`run_facts`) go to every logger as hyperparameters
under ``run`` (``hparams.yaml``) and as scalars at step 0: ``run/parameters``,
``run/kv_bytes_per_token``, ``run/train_flops_per_token``, ``run/seed`` (read back by
``python -m nsa_lit.compare``).
"""
from __future__ import annotations

import contextvars
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
import torch
from torchmetrics import Metric

from nsa_lit.checkpoint import arch_differences
from nsa_lit.config import ModelConfig
from nsa_lit.loss import DEFAULT_CHUNK, next_token_loss
from nsa_lit.model import Transformer
from nsa_lit.model_stats import count_parameters, kv_elements_per_token, training_flops_per_token
from nsa_lit.parallel import FSDPConfig, materialize, parallelize


@dataclass
class OptimConfig:
    """Optimiser and schedule. ``token_budget`` (training tokens, all processes) sets the number
    of optimiser steps; leave it None to use ``trainer.max_steps`` / ``trainer.max_epochs``."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 1024
    min_lr_ratio: float = 0.1
    token_budget: int | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"optim config field `{name}`: {why}")

        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
             f"must be two numbers in [0, 1), got {self.betas}")
        need(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        need(self.token_budget is None or self.token_budget >= 1, "token_budget",
             f"must be >= 1 or null, got {self.token_budget}")


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at
    ``total_steps`` (and ``min_ratio`` after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# dense bf16 peaks (TFLOP/s) by CUDA device name (first match wins), for train/mfu
_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.5,
                "H200": 989.5, "A100": 312.0}


def _device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)


# bytes per cached element in run/kv_bytes_per_token: decoding keeps its caches in bf16
KV_CACHE_BYTES = 2


def run_facts(arch: ModelConfig, seed: int | None) -> dict[str, int | float | str | None]:
    """What identifies a run's variant and its cost, from the config alone: ``parameters``
    (total), ``kv_bytes_per_token`` (KV cache of all layers per token of one sequence at the
    training context ``seq_len``, bf16; the formula :mod:`nsa_lit.kv_report` checks against the
    real decode caches), ``train_flops_per_token`` (what ``train/mfu`` divides by),
    ``layer_pattern`` and ``seed`` (``seed_everything``; None when unseeded)."""
    return {"parameters": count_parameters(arch)["total"],
            "kv_bytes_per_token": kv_elements_per_token(arch, arch.seq_len) * KV_CACHE_BYTES,
            "train_flops_per_token": training_flops_per_token(arch),
            "layer_pattern": arch.layer_pattern, "seed": seed}


class TokenMean(Metric):
    """Mean of per-batch values weighted by their counts (``update(value, weight)``), summed over
    all processes. A NaN value shows in the result: there is no NaN check, which would wait for
    the device after each batch. (torchmetrics' ``MeanMetric`` waits for its NaN check, or,
    with ``nan_strategy="disable"``, drops the weights: Lightning-AI/torchmetrics#3434.)"""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int | float) -> None:
        self.total += value.detach().float() * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


def _has_loss_scaler(precision_plugin) -> bool:
    """Whether the precision plugin scales the loss (``16-mixed``): its gradients need unscaling
    before they are clipped, which a fused optimiser does only inside its own step."""
    return getattr(precision_plugin, "scaler", None) is not None


_BUILD_ON_META = contextvars.ContextVar("nsa_lit_build_on_meta", default=False)


@contextmanager
def build_on_meta(enabled: bool = True):
    """``LanguageModel``s created inside build their ``Transformer`` on the meta device (no
    memory, no initialisation); ``configure_model`` shards it, allocates each process's shards
    and initialises them. The CLI uses it under a model-parallel strategy."""
    token = _BUILD_ON_META.set(enabled)
    try:
        yield
    finally:
        _BUILD_ON_META.reset(token)


class LanguageModel(L.LightningModule):
    """Causal language model over token batches ``(B, seq_len + 1)``.

    ``compile``: ``torch.compile`` each transformer block (per block, like torchtitan) when the
    model is configured. The attention kernels are custom operators the compiler traces through
    (:mod:`kernels.ops`), so each block is one graph: it fuses the projections' neighbours, RoPE,
    concatenations, norms, gates and the MLP around them. Weights and checkpoints are unchanged.

    ``loss_chunk``: the loss projects the last hidden states to the vocabulary this many tokens
    at a time and takes the gradients as it goes (:mod:`nsa_lit.loss`), so the (tokens x vocab)
    logits never exist whole; 0 computes them whole (``F.cross_entropy``). The same loss either
    way.

    ``peak_tflops``: one device's dense peak (TFLOP/s) for ``train/mfu``, model FLOPs utilisation
    from ``nsa_lit.model_stats.training_flops_per_token`` (attention counted for what the variant
    computes). ``None``: the bf16 peak of a known CUDA device (A100 312, H100 PCIe 756,
    H100 / H200 SXM 989.5), else no MFU is logged.

    ``activation_checkpointing``: recompute each block's activations in the backward pass
    instead of keeping them (less memory, about one more forward per step).

    ``fsdp``: FSDP2 settings (:class:`nsa_lit.parallel.FSDPConfig`: bf16 parameters and fp32
    gradient reduction by default), used when the trainer's strategy is model-parallel
    (``nsa_lit.parallel.FSDP2Strategy`` or Lightning's ``ModelParallelStrategy``): each block
    and the root are then sharded over the processes (:func:`nsa_lit.parallel.parallelize`).

    ``nonfinite_loss``: what a non-finite (NaN / inf) training loss, or a non-finite gradient
    norm with a finite loss, does, decided over all processes at once (one process's NaN stops
    or skips on every process) at the end of the optimiser step (one wait for the GPU a step,
    not one a micro-batch). ``stop`` raises ``FloatingPointError`` naming the micro-batch.
    ``skip`` drops the whole optimiser step that micro-batch belongs to (its gradients and those
    of the other micro-batches it is accumulated with are discarded before the update:
    parameters and optimiser state are untouched; the step still counts, so the schedule and the
    data move on), counts it in ``train/skipped_steps`` and stops with ``FloatingPointError``
    after ``max_consecutive_skips`` skipped steps in a row.

    Resuming (``fit --ckpt_path``): the checkpoint's ``model.arch`` must equal the config's
    (``kernel_backend`` and ``latent_form`` aside), else a ``ValueError`` names the fields that
    differ. ``model.optim`` is the config's: its ``lr``, ``weight_decay``, ``betas`` and
    ``eps`` replace the ones restored with the optimiser state (a change is reported), and the
    schedule is the config's. With a ``token_budget`` the schedule runs over tokens: a run
    resumed with another batch size, accumulation or world size trains the tokens left
    (``max_steps`` = the restored step + the steps of the new size that hold them) and its
    learning rate goes on from where the tokens seen put it in the schedule (steps of the
    tokens per step the run started with).
    """

    def __init__(self, arch: ModelConfig = ModelConfig(), optim: OptimConfig = OptimConfig(),
                 compile: bool = False, peak_tflops: float | None = None,
                 loss_chunk: int = DEFAULT_CHUNK, activation_checkpointing: bool = False,
                 fsdp: FSDPConfig = FSDPConfig(),
                 nonfinite_loss: Literal["stop", "skip"] = "stop",
                 max_consecutive_skips: int = 10):
        super().__init__()
        # load_from_checkpoint passes the saved hyperparameters back as plain dicts
        arch = ModelConfig(**arch) if isinstance(arch, dict) else arch
        optim = OptimConfig(**optim) if isinstance(optim, dict) else optim
        fsdp = FSDPConfig(**fsdp) if isinstance(fsdp, dict) else fsdp
        if not isinstance(activation_checkpointing, bool):
            raise ValueError("model.activation_checkpointing must be true or false, got "
                             f"{activation_checkpointing!r}")
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"model.peak_tflops must be > 0 (or null), got {peak_tflops}")
        if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
            raise ValueError(f"model.loss_chunk must be an int >= 0, got {loss_chunk!r}")
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        if (isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int)
                or max_consecutive_skips < 1):
            raise ValueError("model.max_consecutive_skips must be an int >= 1, got "
                             f"{max_consecutive_skips!r}")
        self.nonfinite_loss, self.max_consecutive_skips = nonfinite_loss, max_consecutive_skips
        self.arch, self.optim, self.compile_blocks = arch, optim, compile
        self.peak_tflops, self.loss_chunk = peak_tflops, loss_chunk
        self.activation_checkpointing, self.fsdp = activation_checkpointing, fsdp
        self.save_hyperparameters({"arch": asdict(arch), "optim": asdict(optim),
                                   "compile": compile, "peak_tflops": peak_tflops,
                                   "loss_chunk": loss_chunk,
                                   "activation_checkpointing": activation_checkpointing,
                                   "fsdp": asdict(fsdp), "nonfinite_loss": nonfinite_loss,
                                   "max_consecutive_skips": max_consecutive_skips})
        self._flops_per_token: float | None = None  # computed when MFU is first logged
        # on the meta device under build_on_meta() (or trainer.init_module(empty_init=True)
        # with a model-parallel strategy): configure_model then allocates and initialises it
        with torch.device("meta") if _BUILD_ON_META.get() else nullcontext():
            self.model = Transformer(arch)
        with torch.device("cpu"):  # never on meta: Lightning moves it to the device
            self.val_loss = TokenMean()  # a NaN shows in val/loss
            self.test_loss = TokenMean()
        self.tokens_seen = 0
        self.skipped_steps = 0  # optimiser steps dropped for a non-finite loss (whole run)
        self._consecutive_skips = 0
        # (batch index, loss) of the current optimiser step's micro-batches, checked at its end
        self._step_losses: list[tuple[int, torch.Tensor]] = []
        self._grad_norm: torch.Tensor | None = None  # this step's total gradient norm, before clipping
        self._skipping = False  # the current optimiser step is dropped (skip mode)
        self._tokens_per_step: int | None = None  # with a token budget: this run's, set in setup
        # with a token budget: (step, tokens seen, tokens per step the schedule counts in) of the
        # resume, or None (the schedule's steps are the optimiser steps)
        self._schedule_anchor: tuple[int, int, int] | None = None
        self._resumed_optim: dict | None = None  # the checkpoint's model.optim, until applied
        self._clock: tuple[float, int] | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self.model, batch, self.loss_chunk)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``; a sharded (FSDP2) checkpoint directory is
        consolidated in memory first (:func:`nsa_lit.checkpoint.consolidate`)."""
        import io

        from nsa_lit.checkpoint import consolidate, is_sharded_checkpoint

        if isinstance(checkpoint_path, (str, os.PathLike)) and is_sharded_checkpoint(
                checkpoint_path):
            buffer = io.BytesIO()
            torch.save(consolidate(checkpoint_path), buffer)
            buffer.seek(0)
            checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def configure_model(self) -> None:
        """Activation checkpointing, per-block compile and (with a device mesh) FSDP2 sharding
        (:func:`nsa_lit.parallel.parallelize`); then a model built on the meta device is
        allocated on the strategy's device and initialised. Idempotent: Lightning calls it
        per stage and in ``load_from_checkpoint``."""
        parallelize(self.model, self.device_mesh, compile=self.compile_blocks,
                    activation_checkpointing=self.activation_checkpointing, fsdp=self.fsdp)
        trainer = self._trainer
        materialize(self.model, trainer.strategy.root_device if trainer is not None else "cpu")

    # -- run length --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        data_vocab = getattr(trainer.datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab > self.arch.vocab_size:
            raise ValueError(
                f"model.arch.vocab_size ({self.arch.vocab_size}) is smaller than the data's "
                f"tokenizer vocabulary ({data_vocab})")
        if stage != "fit" or self.optim.token_budget is None:
            return
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        if batch_size is None:
            raise ValueError("optim.token_budget needs a datamodule with a `batch_size` attribute")
        tokens_per_step = (batch_size * self.arch.seq_len * trainer.accumulate_grad_batches
                           * trainer.world_size)
        steps = math.ceil(self.optim.token_budget / tokens_per_step)
        if trainer.max_steps not in (-1, steps):
            raise ValueError(
                f"model.optim.token_budget={self.optim.token_budget} means {steps} steps of "
                f"{tokens_per_step} tokens, but trainer.max_steps={trainer.max_steps}: set one")
        trainer.fit_loop.epoch_loop.max_steps = steps
        trainer.fit_loop.max_epochs = -1
        self._tokens_per_step = tokens_per_step

    def _resume_token_budget(self, checkpoint: dict) -> None:
        """On a resume with a token budget: train the tokens left, counting the schedule in the
        tokens per step the run started with (saved in the checkpoint), whatever this launch's."""
        trainer = self._trainer
        if (trainer is None or self._tokens_per_step is None or self.optim.token_budget is None
                or "global_step" not in checkpoint):
            return
        reference = int(checkpoint.get("schedule_tokens_per_step") or self._tokens_per_step)
        if reference == self._tokens_per_step and not checkpoint.get("schedule_anchored"):
            return  # the run's own size throughout: its steps are the schedule's (exact resume)
        step, tokens = int(checkpoint["global_step"]), self.tokens_seen
        left = max(0, self.optim.token_budget - tokens)
        steps = step + math.ceil(left / self._tokens_per_step)
        rank_zero_info(
            f"resuming at step {step} with {tokens:,} of model.optim.token_budget="
            f"{self.optim.token_budget:,} tokens seen, {self._tokens_per_step:,} tokens a step "
            f"(the schedule counts steps of {reference:,}): training to step {steps}")
        trainer.fit_loop.epoch_loop.max_steps = steps
        self._schedule_anchor = (step, tokens, reference)

    def _schedule_total(self, steps: int) -> int:
        """The schedule's length: ``steps`` (the run's), or after a resume with another size the
        whole budget in steps of the size the run started with. Read when the scheduler asks: a
        model-parallel strategy builds the optimiser before the checkpoint is read."""
        if self._schedule_anchor is None:
            return steps
        return math.ceil(self.optim.token_budget / self._schedule_anchor[2])

    def schedule_step(self, step: int) -> float:
        """The step of the learning-rate schedule at optimiser step ``step``: ``step`` itself, or
        after a resume with a token budget, the tokens seen by then in steps of the tokens per
        step the run started with."""
        if self._schedule_anchor is None:  # (set only with a token budget: tokens per step known)
            return step
        step0, tokens0, reference = self._schedule_anchor
        return (tokens0 + (step - step0) * self._tokens_per_step) / reference

    def on_fit_start(self) -> None:
        self._log_run_facts()

    def _log_run_facts(self) -> None:
        """:func:`run_facts` plus the logger's ``name`` / ``version`` as the ``run``
        hyperparameters of every logger, and the numeric facts as ``run/*`` scalars at step 0.
        TensorBoard gets them without a second HParams session (``metrics={}``): Lightning's
        own hyperparameter call follows and writes ``hparams.yaml`` with them included."""
        if not self.loggers:
            return
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything
        facts = run_facts(self.arch, int(seed) if seed is not None else None)
        scalars = {f"run/{k}": float(v) for k, v in facts.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in self.loggers:
            version = logger.version
            params = {"run": {"name": logger.name, "version": version if isinstance(version, str)
                              else f"version_{version}", **facts}}
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics={})
            else:
                logger.log_hyperparams(params)
            logger.log_metrics(scalars, step=0)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.tokens_seen += batch[:, 1:].numel() * self.trainer.world_size
        # checked once per optimiser step (on_before_optimizer_step), not here: a check here
        # would wait for the GPU after every forward (and all-reduce, with several processes)
        self._step_losses.append((batch_idx, loss.detach()))
        # Tensors only, and no prog_bar, between two optimiser steps: Lightning reads prog_bar
        # metrics back after every micro-batch, and copies a logged Python number to the device
        # with a blocking copy: either would wait for the GPU (nsa_lit.progress shows the loss)
        self.log("train/loss", loss)
        self.log("train/ppl", torch.exp(loss.detach()))
        return loss

    def _check_step_losses(self) -> bool:
        """Whether a training loss of this optimiser step's micro-batches was non-finite on any
        process (one host synchronisation, and one all-reduce when there are several, so that
        every process stops or skips together); raises ``FloatingPointError`` under ``stop``.
        Backward ran as usual for every micro-batch (every process takes part in the same
        collectives); under ``skip`` the step's gradients are then discarded."""
        losses, self._step_losses = self._step_losses, []
        finite = (torch.isfinite(torch.stack([loss for _, loss in losses])) if losses
                  else torch.ones(0, dtype=torch.bool, device=self.device))
        bad = (~finite).any().float()  # every process takes part in the all-reduce
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bool(bad > 0):
            return False
        if self.nonfinite_loss == "stop":
            first = next((i for i, ok in enumerate(finite.tolist()) if not ok), None)
            where = ("training loss is non-finite on another process" if first is None else
                     f"training loss is {losses[first][1].item()}")
            batch = "" if first is None else f" (batch {losses[first][0]})"
            raise FloatingPointError(
                f"{where} at step {self.global_step}{batch}; lower model.optim.lr, check the "
                "data, or resume from an earlier checkpoint")
        return True

    def on_before_optimizer_step(self, optimizer) -> None:
        self._grad_norm, self._skipping = None, False
        skip = self._check_step_losses()  # (waits for the backward pass: the step's clock)
        # the step's host numbers, logged while the device is idle anyway
        self.log("train/tokens_seen", float(self.tokens_seen))
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        self._log_throughput()
        norm = None
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not skip:
            self._grad_norm = norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): the norm over all shards
                norm = norm.full_tensor()
            # a finite loss with a non-finite gradient (an overflow in backward) is a fault too:
            # clipping would turn the inf into NaN weights (the norm is the same on every process)
            # (under 16-mixed an inf/NaN norm is the loss scaler's overflow signal: it skips)
            if not _has_loss_scaler(self.trainer.precision_plugin) and not bool(torch.isfinite(norm)):
                if self.nonfinite_loss == "stop":
                    raise FloatingPointError(
                        f"gradient norm is {norm.item()} at step {self.global_step} (the loss was "
                        "finite); lower model.optim.lr, check the data, or resume from an earlier "
                        "checkpoint")
                skip = True
        if self.nonfinite_loss == "skip":
            self._consecutive_skips = self._consecutive_skips + 1 if skip else 0
            self.skipped_steps += skip
            self.log("train/skipped_steps", float(self.skipped_steps))
            if skip:
                # no gradient, no update: AdamW leaves these parameters and their state alone
                optimizer.zero_grad(set_to_none=True)
                self._grad_norm, self._skipping = None, True
                if self._consecutive_skips >= self.max_consecutive_skips:
                    raise FloatingPointError(
                        f"training loss or gradient norm was non-finite in "
                        f"{self._consecutive_skips} optimiser steps in a row "
                        f"(model.max_consecutive_skips={self.max_consecutive_skips}, up to step "
                        f"{self.global_step}); lower model.optim.lr, check the data, or resume "
                        "from an earlier checkpoint")
                return
        if norm is not None:
            self.log("train/grad_norm", norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clipping done here rather than by the precision plugin: without a loss scaler (fp32,
        bf16-mixed) nothing needs unscaling, so the fused AdamW can be clipped, which Lightning's
        mixed-precision plugin refuses. Norm clipping uses the total norm
        :meth:`on_before_optimizer_step` computed (one pass over the gradients, not two); a
        dropped step (skip mode) has no gradients to clip. With a loss scaler (16-mixed, AdamW
        not fused) Lightning's clipping unscales first."""
        if _has_loss_scaler(self.trainer.precision_plugin):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if self._skipping or not gradient_clip_val:
            return
        params = [p for p in self.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        elif self._grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm, foreach=True)

    def _log_throughput(self) -> None:
        """``train/tokens_per_sec`` (all processes) and ``train/mfu`` over the last optimiser
        step: the wall clock between the ends of two steps' backward passes, each of which the
        step's loss check (:meth:`_check_step_losses`) has waited for, so the interval is the
        device's whole step (update, data and launches included) and adds no wait of its own.
        Not measured across an epoch start or a validation run."""
        now = time.perf_counter()
        if self._clock is not None:
            then, tokens_then = self._clock
            if now > then:
                rate = (self.tokens_seen - tokens_then) / (now - then)
                self.log("train/tokens_per_sec", rate)
                peak = self.peak_tflops or _device_peak_tflops(self.device)
                if peak:
                    if self._flops_per_token is None:
                        self._flops_per_token = training_flops_per_token(self.arch)
                    self.log("train/mfu", rate / self.trainer.world_size
                             * self._flops_per_token / (peak * 1e12))
        self._clock = (now, self.tokens_seen)

    def on_train_epoch_start(self) -> None:
        self._clock = None

    def on_validation_end(self) -> None:
        self._clock = None  # the next step's interval would hold the validation run

    def on_train_start(self) -> None:
        self._step_losses = []
        if self._resumed_optim is not None:
            self._apply_optim_config(self._resumed_optim)
            self._resumed_optim = None

    # -- validation and test -----------------------------------------------------------------
    def _eval_step(self, metric: TokenMean, batch: torch.Tensor) -> None:
        """Add a ``(B, T + 1)`` batch's mean next-token loss to ``metric``, weighted by its ``B * T``
        targets: the epoch's value is the mean over every target token of the split."""
        loss = self._loss(batch)
        metric.update(loss, weight=batch[:, 1:].numel())

    def _log_eval(self, split: str, metric: TokenMean) -> None:
        """``<split>/loss`` (token-weighted over all processes, by the metric's own sync) and ``<split>/ppl``."""
        loss = metric.compute()
        metric.reset()
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{split}/ppl", torch.exp(loss), sync_dist=False)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(self.val_loss, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_loss)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(self.test_loss, batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss)

    # -- optimiser ---------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps,
            # fused unless a loss scaler (16-mixed) must unscale the gradients before clipping
            fused=self.device.type in ("cuda", "cpu") and not _has_loss_scaler(self.trainer.precision_plugin),
        )
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        warmup, min_ratio = self.optim.warmup_steps, self.optim.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(
            self.schedule_step(step), warmup, self._schedule_total(total), min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoint --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        if self._tokens_per_step is not None:  # the unit of the schedule's steps (token budget)
            checkpoint["schedule_tokens_per_step"] = (self._schedule_anchor[2] if self._schedule_anchor
                                                      else self._tokens_per_step)
            checkpoint["schedule_anchored"] = self._schedule_anchor is not None
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["consecutive_skips"] = self._consecutive_skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Called before any state is restored (``fit`` / ``validate`` with ``ckpt_path``,
        ``load_from_checkpoint``): refuse a checkpoint of another architecture."""
        hparams = checkpoint.get("hyper_parameters") or {}
        saved_arch = hparams.get("arch")
        if saved_arch is not None:
            differ = arch_differences(saved_arch, self.arch)
            if differ:
                trainer = self._trainer
                path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
                name = f"checkpoint {path}" if path else "the checkpoint"
                raise ValueError(
                    f"{name} was trained with another model.arch; differing fields: "
                    f"{'; '.join(differ)}. Resume with the checkpoint's run config (a "
                    "checkpoint's architecture cannot change), or start a new run under another "
                    "logger name/version")
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self._consecutive_skips = int(checkpoint.get("consecutive_skips", 0))
        self._resumed_optim = hparams.get("optim") or {}
        self._resume_token_budget(checkpoint)

    def _apply_optim_config(self, saved: dict) -> None:
        """After a resume restored the optimiser and scheduler: the config's ``lr``,
        ``weight_decay``, ``betas`` and ``eps`` replace the restored ones (which are the
        checkpoint's), and the learning rate is the config's schedule at the restored step.
        A change from the checkpoint's ``model.optim`` is reported."""
        trainer = self.trainer
        if not trainer.optimizers:
            return
        changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in asdict(self.optim).items()
                   if k in saved and saved[k] != v]
        if changed:
            rank_zero_info("Resuming with model.optim changed from the checkpoint's ("
                           + "; ".join(changed) + "): the config's values apply")
        opt = trainer.optimizers[0]
        scheds = [c.scheduler for c in trainer.lr_scheduler_configs]
        sched = scheds[0] if scheds else None
        lr = self.optim.lr
        for i, group in enumerate(opt.param_groups):
            group["weight_decay"] = self.optim.weight_decay if i == 0 else 0.0
            group["betas"] = tuple(self.optim.betas)
            group["eps"] = self.optim.eps
            group["initial_lr"] = lr
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                group["lr"] = lr * sched.lr_lambdas[i](sched.last_epoch)
        if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            sched.base_lrs = [lr] * len(opt.param_groups)
            sched._last_lr = [g["lr"] for g in opt.param_groups]
