"""Decoder-only transformer: pre-norm RMSNorm, SwiGLU MLP, RoPE, untied embeddings.

Data flows one way: tokens -> embedding -> blocks (attention kind chosen per layer by
``ModelConfig.layer_pattern``) -> final norm -> LM head -> logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nsa_lit.attention import Attention
from nsa_lit.attention import layer as attention_layer
from nsa_lit.cache import StepPlan, TokenCache, advance
from nsa_lit.config import ModelConfig
from nsa_lit.step_weights import MergedWeights, ParameterWatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self._step_weights: MergedWeights | None = None  # built by refresh_step_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._swiglu(x, self._stacked())

    def _stacked(self) -> torch.Tensor:
        """``w_gate`` and ``w_up`` stacked: both projections of the input in one GEMM."""
        return torch.cat([self.w_gate.weight, self.w_up.weight])

    def _swiglu(self, x: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w_in).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)

    @property
    def step_weights(self) -> MergedWeights:
        """``w_in``: :meth:`_stacked`, kept between decode steps."""
        if self._step_weights is None:
            self._step_weights = MergedWeights(lambda: {"w_in": self._stacked()},
                                               lambda: [self.w_gate.weight, self.w_up.weight])
        return self._step_weights

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` through :attr:`step_weights` (refreshed by the caller)."""
        return self._swiglu(x, self.step_weights.tensors["w_in"])


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, kind)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, cache: TokenCache | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, lengths)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x: torch.Tensor, cache: TokenCache, plan: StepPlan = StepPlan()
               ) -> torch.Tensor:
        """One token per sequence, ``x (B, 1, d_model)``; see :meth:`Attention.decode`."""
        x = x + self.attn.decode(self.attn_norm(x), cache, plan)
        return x + self.mlp.decode(self.mlp_norm(x))

    def refresh_step_weights(self, force: bool = False) -> None:
        """The merged weights of :meth:`decode` (:mod:`nsa_lit.step_weights`), up to date
        (``force``: rebuilt)."""
        self.attn.refresh_step_weights(force)
        self.mlp.step_weights.refresh(force)


# Inductor options for compiled blocks. Its memory-coalescing tiling analysis asserts on the
# latent layers' grouped RMSNorm at some shapes (pytorch/pytorch#197077, torch 2.11 and 2.14):
# skipping that analysis only loses a tiling heuristic.
COMPILE_OPTIONS = {"triton.coalesce_tiling_analysis": False}


class Transformer(nn.Module):
    """``forward(tokens (B, T) int) -> logits (B, T, vocab_size)``; ``T <= seq_len``.

    Decoding (see :mod:`nsa_lit.generate`): ``forward(prompts, caches, lengths)`` is the prefill,
    then ``decode(tokens (B,), caches) -> logits (B, vocab_size)`` once per new token; the caches
    come from :func:`nsa_lit.cache.new_caches`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._parameter_watch: ParameterWatch | None = None  # for refresh_step_weights
        # The submodules' constructors ran their own ``reset_parameters`` (norms, latent
        # up-projections, compressor positions, RoPE tables); the projections are set here.
        # ``init_weights`` repeats both for a model built on the meta device.
        self._init_projections()

    def compile_blocks(self) -> None:
        """``torch.compile`` every block in place (its ``forward``; :meth:`compile_decode`
        compiles ``decode``). The attention kernels are custom operators the compiler traces
        through (:mod:`kernels.ops`): each block is one graph, the PyTorch code around the
        kernels fused."""
        for block in self.blocks:
            if block._compiled_call_impl is None:  # Lightning configures the model per stage
                block.compile(options=COMPILE_OPTIONS)

    def compile_decode(self, options: dict | None = None) -> None:
        """``torch.compile`` every block's one-token step (:meth:`Block.decode`) in place: the
        compiler fuses the projections' elementwise tails, RoPE, the latent norm, the cache
        writes, the compressor of the block that ends and the gated output into a few kernels
        per layer around the attention kernels (custom operators it traces through, see
        :mod:`kernels.dispatch`), so a step launches fewer kernels (what
        a small batch's step under a CUDA graph, :class:`~nsa_lit.decode_graph.GraphedDecode`,
        is bound by). Compiles on the first step; layers of one kind share the compiled code.
        ``options``: more Inductor options (e.g. ``{"combo_kernels": True}``)."""
        for block in self.blocks:
            if "decode" not in vars(block):  # not compiled yet (an instance attribute once it is)
                block.decode = torch.compile(block.decode,
                                             options={**COMPILE_OPTIONS, **(options or {})})

    @torch.no_grad()
    def init_weights(self) -> None:
        """Set every parameter and buffer: what a model built on the meta device needs after
        ``to_empty`` (:func:`nsa_lit.parallel.materialize`); also works on FSDP2-sharded
        parameters. The same distributions as the constructor: each submodule's own
        ``reset_parameters`` (RMSNorm weights 1, latent up-projections Normal(0, init_std),
        latent norms 1, compressor positions 0, RoPE tables), then :meth:`_init_projections`.
        (Not the same draws: the constructor also spends random numbers on ``nn.Linear``'s own
        initialisation, which is then overwritten.)"""
        for module in self.modules():
            if module is not self and not isinstance(module, (nn.Linear, nn.Embedding)):
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        self._init_projections()

    @torch.no_grad()
    def _init_projections(self) -> None:
        """Normal(0, init_std) weights and zero biases of every ``nn.Linear`` / ``nn.Embedding``;
        residual output projections (``attn.wo``, ``mlp.w_down``) with std / sqrt(2 n_layers)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:  # (an activation-checkpointing wrapper forwards .attn, .mlp)
            for weight in (block.attn.wo.weight, block.mlp.w_down.weight):
                nn.init.normal_(weight, std=std / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, tokens: torch.Tensor, caches: list[TokenCache] | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """With ``caches`` (one per layer): prefill, writing sequence ``b``'s first ``lengths[b]``
        tokens (default all; ``tokens`` right-padded) to them."""
        return self.lm_head(self.hidden(tokens, caches, lengths))

    def hidden(self, tokens: torch.Tensor, caches: list[TokenCache] | None = None,
               lengths: torch.Tensor | None = None) -> torch.Tensor:
        """What ``forward`` feeds the output projection: the normalised last hidden states
        ``(B, T, d_model)`` (for losses that fuse the projection, :mod:`nsa_lit.loss`)."""
        if tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"input length {tokens.shape[1]} exceeds model seq_len {self.cfg.seq_len}")
        x = self.embed(tokens.long())
        for i, block in enumerate(self.blocks):
            x = block(x) if caches is None else block(x, caches[i], lengths)
        return self.norm(x)

    def refresh_step_weights(self, force: bool = False) -> None:
        """Bring every block's merged decode weights (:mod:`nsa_lit.step_weights`) up to date
        with the parameters: builds them on the first call, then rebuilds (in place) only what
        changed, after one cheap check of the whole model (``force``: rebuild them all, e.g.
        after writing parameters through ``.data``), and when latent layers need the per-head
        stack or no longer do (``MERGED_UP_PROJECTIONS_MIN_BATCH``, :mod:`nsa_lit.attention.layer`).
        :meth:`decode` calls it first."""
        if self._parameter_watch is None:
            self._parameter_watch = ParameterWatch(self)
        watch = self._parameter_watch
        # the parameters, and which decode form the latent layers' weights serve
        state = (watch.state(), attention_layer.per_head_steps_possible())
        if force or state != watch.seen:
            for block in self.blocks:
                block.refresh_step_weights(force)
            watch.seen = state

    def decode(self, tokens: torch.Tensor, caches: list[TokenCache]) -> torch.Tensor:
        """Next token of each sequence, ``tokens (B,)`` at positions ``caches[i].lengths`` ->
        logits ``(B, vocab_size)``; appends the token to every cache. Inference only: the step
        multiplies by weights merged from the parameters (:meth:`refresh_step_weights`), which
        carry no gradient."""
        self.refresh_step_weights()
        x = self.embed(tokens.long()[:, None])
        for block, cache in zip(self.blocks, caches):
            x = block.decode(x, cache, cache.reserve())  # the host side first
        advance(caches)
        return self.lm_head(self.norm(x))[:, 0]
