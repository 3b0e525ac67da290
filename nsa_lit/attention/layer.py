"""One attention layer: a key/value source, a set of branches, a gate, an output projection.

Every variant of the paper is a composition of these parts (see ``ModelConfig``):
full attention, NSA (compression + selection + window over GQA heads), ASA local layers
(window over an MLA latent) and ASA global layers (compression + selection over GLA latents).
Branch computations go through :mod:`kernels.dispatch`; the layer never learns which kernel ran.

Latent layers run in one of two equal forms (``latent_form``):
  * ``absorbed``: attend to the latent itself, MQA-style: query ``[W_uk[h]^T q_h ; q_R]``
    against key ``[c_g ; k_R]`` and value ``c_g``; the output is up-projected by ``W_uv[h]``.
  * ``expanded``: rebuild per-head keys ``[W_uk[h] c_g ; k_R]`` and values ``W_uv[h] c_g``.
Both use the softmax scale ``1 / sqrt(head_dim + rope_dim)``.

Selection always computes the compression attention, since block importance comes from its
probabilities; a layer without the compression *branch* (NSA ablation) just drops its output,
so its compressors get no gradient (use ``compress_method="mean"`` there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from nsa_lit.attention.compressor import BlockCompressor
from nsa_lit.attention.kv import GroupedKV, LatentKV
from nsa_lit.config import ModelConfig
from nsa_lit.rope import Rotary


@dataclass
class BranchInputs:
    """What every branch reads. ``q (B,T,H,Dqk)``, ``k (B,T,Hk,Dqk)``, ``v (B,T,Hk,Dv)``;
    compressed ``k_cmp (B,N,Hk,Dqk)``, ``v_cmp (B,N,Hk,Dv)`` or None; ``groups`` is the number
    of selection groups (heads of one group share their selected blocks)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cmp: torch.Tensor | None
    v_cmp: torch.Tensor | None
    groups: int


class Attention(nn.Module):
    """Attention layer of ``kind`` (a letter of ``ModelConfig.layer_pattern``).

    ``forward(x (B, T, d_model)) -> (B, T, d_model)``; causal.
    """

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.branches = cfg.branches(kind)
        self.source = cfg.kv_source(kind)
        self.q_share = cfg.layer_q_share(kind)
        H, dh = cfg.n_heads, cfg.head_dim
        compressed = "compression" in self.branches or "selection" in self.branches
        if self.source == "grouped":
            self.wq = nn.Linear(cfg.d_model, H * dh, bias=False)
            self.kv = GroupedKV(cfg)
            self.rope = Rotary(dh, cfg.seq_len, cfg.rope_theta)
            self.scale = dh ** -0.5
            if compressed:
                self.k_compressor = BlockCompressor(dh, cfg.compress_block, cfg.compress_stride,
                                                    cfg.compress_method)
                self.v_compressor = BlockCompressor(dh, cfg.compress_block, cfg.compress_stride,
                                                    cfg.compress_method)
        else:
            groups = cfg.latent_groups(kind)
            self.wq = nn.Linear(cfg.d_model, H * (dh + cfg.rope_dim), bias=False)
            self.kv = LatentKV(cfg, groups)
            self.rope = Rotary(cfg.rope_dim, cfg.seq_len, cfg.rope_theta)
            self.scale = (dh + cfg.rope_dim) ** -0.5
            if compressed:
                self.latent_compressor = BlockCompressor(
                    cfg.latent_dim // groups, cfg.compress_block, cfg.compress_stride,
                    cfg.compress_method)
                self.rope_compressor = BlockCompressor(
                    cfg.rope_dim, cfg.compress_block, cfg.compress_stride, cfg.compress_method)
        self.gate = nn.Linear(cfg.d_model, H * len(self.branches)) if len(self.branches) > 1 else None
        self.wo = nn.Linear(H * dh, cfg.d_model, bias=False)

    # -- projections -------------------------------------------------------------------------
    def _grouped_inputs(self, x: torch.Tensor, compressed: bool) -> BranchInputs:
        B, T, _ = x.shape
        q = self.rope(self.wq(x).view(B, T, self.cfg.n_heads, self.cfg.head_dim))
        k, v = self.kv(x, self.rope)
        k_cmp = self.k_compressor(k) if compressed else None
        v_cmp = self.v_compressor(v) if compressed else None
        return BranchInputs(q, k, v, k_cmp, v_cmp, groups=self.cfg.n_kv_heads)

    def _latent_inputs(self, x: torch.Tensor, compressed: bool) -> BranchInputs:
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim
        q = self.wq(x).view(B, T, H, dh + self.cfg.rope_dim)
        q_nope, q_rope = q[..., :dh], self.rope(q[..., dh:])
        c, k_r = self.kv(x, self.rope)
        c_cmp = self.latent_compressor(c) if compressed else None
        kr_cmp = self.rope_compressor(k_r) if compressed else None
        groups = self.kv.groups
        if self.cfg.latent_form == "absorbed":
            def keys(lat, rot):
                return torch.cat([lat, rot.expand(-1, -1, groups, -1)], dim=-1)

            q = torch.cat([self.kv.absorb_query(q_nope), q_rope], dim=-1)
            k, v = keys(c, k_r), c
            k_cmp = keys(c_cmp, kr_cmp) if compressed else None
            v_cmp = c_cmp
        else:
            def keys(lat, rot):
                return torch.cat([self.kv.up_keys(lat), rot.expand(-1, -1, H, -1)], dim=-1)

            q = torch.cat([q_nope, q_rope], dim=-1)
            k, v = keys(c, k_r), self.kv.up_values(c)
            k_cmp = keys(c_cmp, kr_cmp) if compressed else None
            v_cmp = self.kv.up_values(c_cmp) if compressed else None
        return BranchInputs(q, k, v, k_cmp, v_cmp, groups=groups)

    # -- branches ----------------------------------------------------------------------------
    def _run_branches(self, inp: BranchInputs) -> list[torch.Tensor]:
        cfg, backend = self.cfg, self.cfg.kernel_backend
        outputs: dict[str, torch.Tensor] = {}
        if "full" in self.branches:
            outputs["full"] = kernels.causal_attention(inp.q, inp.k, inp.v, self.scale, backend)
        if "window" in self.branches:
            outputs["window"] = kernels.sliding_window_attention(
                inp.q, inp.k, inp.v, cfg.window, self.scale, backend)
        if inp.k_cmp is not None:
            o_cmp, lse = kernels.compression_attention(
                inp.q, inp.k_cmp, inp.v_cmp, cfg.compress_block, cfg.compress_stride, self.scale,
                backend)
            if "compression" in self.branches:
                outputs["compression"] = o_cmp
            if "selection" in self.branches:
                block_idx = kernels.select_blocks(
                    inp.q.detach(), inp.k_cmp.detach(), lse, num_groups=inp.groups,
                    block_len=cfg.compress_block, stride=cfg.compress_stride,
                    select_block=cfg.select_block, top_n=cfg.top_n,
                    num_local=cfg.num_local_blocks, q_share=self.q_share, scale=self.scale,
                    backend=backend)
                outputs["selection"] = kernels.selected_attention(
                    inp.q, inp.k, inp.v, block_idx, cfg.select_block, self.scale,
                    q_share=self.q_share, backend=backend)
        return [outputs[b] for b in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        compressed = "compression" in self.branches or "selection" in self.branches
        if self.source == "grouped":
            inp = self._grouped_inputs(x, compressed)
        else:
            inp = self._latent_inputs(x, compressed)
        outs = self._run_branches(inp)
        if self.gate is None:
            o = outs[0]
        else:
            gates = torch.sigmoid(self.gate(x)).view(B, T, self.cfg.n_heads, len(outs), 1)
            o = sum(gates[:, :, :, i] * out for i, out in enumerate(outs))
        if self.source == "latent" and self.cfg.latent_form == "absorbed":
            o = self.kv.expand_output(o)
        return self.wo(o.reshape(B, T, -1))
