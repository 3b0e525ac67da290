"""One attention layer: a key/value source, a set of branches, a gate, an output projection.

Every variant of the paper is a composition of these parts (see ``ModelConfig``):
full attention, NSA (compression + selection + window over GQA heads), ASA local layers
(window over an MLA latent) and ASA global layers (compression + selection over GLA latents).
Branch computations go through :mod:`kernels.dispatch`; the layer never learns which kernel ran.

Latent layers train each branch in one of two equal forms (``latent_form``; ``"auto"`` picks per
branch, see ``ModelConfig.branch_form``):
  * ``absorbed``: attend to the latent itself, MQA-style: query ``[W_uk[h]^T q_h ; q_R]``
    against key ``[c_g ; k_R]`` and value ``c_g``; the output is up-projected by ``W_uv[h]``.
  * ``expanded``: rebuild per-head keys ``[W_uk[h] c_g ; k_R]`` and values ``W_uv[h] c_g``.
Both use the softmax scale ``1 / sqrt(head_dim + rope_dim)``. Branch outputs are gated in head
space.

Selection always computes the compression attention, since block importance comes from its
probabilities; a layer without the compression *branch* (NSA ablation) just drops its output,
so its compressors get no gradient (use ``compress_method="mean"`` there).

Decoding (:meth:`Attention.decode`, one token per sequence against an :mod:`nsa_lit.cache` cache)
always runs latent layers in the absorbed form, reading the latent cache directly. ``forward``
with a cache (prefill) also writes the prompt's keys/values, compressed tokens and kept
selection into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

import kernels
from nsa_lit.attention.compressor import BlockCompressor
from nsa_lit.attention.kv import GroupedKV, LatentKV
from nsa_lit.cache import TokenCache
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
    def _project(self, x: torch.Tensor, positions: torch.Tensor | None = None):
        """Per-token projections of ``x (B, T, d_model)``, rotated at ``positions`` (``(B, T)``;
        default ``0..T-1``). Grouped: ``q (B,T,H,dh)``, ``k``, ``v (B,T,Hk,dh)``; latent:
        ``q (B,T,H,dh+dR)`` (RoPE part rotated), ``c (B,T,g,dc)``, ``k_r (B,T,1,dR)``."""
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim
        rope = self.rope if positions is None else partial(self.rope, positions=positions)
        if self.source == "grouped":
            q = rope(self.wq(x).view(B, T, H, dh))
        else:
            q = self.wq(x).view(B, T, H, dh + self.cfg.rope_dim)
            q = torch.cat([q[..., :dh], rope(q[..., dh:])], dim=-1)
        return (q, *self.kv(x, rope))

    def _compress(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress the two cached tensors (``k, v`` or ``c, k_r``) ``(B, T, G, D)`` -> ``(B, N, G, D)``."""
        if self.source == "grouped":
            return self.k_compressor(a), self.v_compressor(b)
        return self.latent_compressor(a), self.rope_compressor(b)

    def _absorbed_query(self, q: torch.Tensor) -> torch.Tensor:
        """Latent query ``[q_nope ; q_R]`` -> ``[W_uk[h]^T q_nope ; q_R]`` ``(B, T, H, dc + dR)``."""
        dh = self.cfg.head_dim
        return torch.cat([self.kv.absorb_query(q[..., :dh]), q[..., dh:]], dim=-1)

    def _grouped_inputs(self, q, k, v, cmp) -> BranchInputs:
        k_cmp, v_cmp = cmp if cmp is not None else (None, None)
        return BranchInputs(q, k, v, k_cmp, v_cmp, groups=self.cfg.n_kv_heads)

    def _latent_inputs(self, form: str, q, c, k_r, cmp, tokens: bool) -> BranchInputs:
        """Branch inputs of a latent layer in ``form``; the per-token keys/values only when
        ``tokens`` (a branch reads them in this form), the compressed ones only when ``cmp``."""
        H, groups = self.cfg.n_heads, self.kv.groups
        c_cmp, kr_cmp = cmp if cmp is not None else (None, None)
        if form == "absorbed":
            def keys_values(lat, rot):
                # values are the keys' first columns, passed as a view of the keys: kernels
                # that recognise it (selected attention) read each latent tile once
                k = torch.cat([lat, rot.expand(-1, -1, groups, -1)], dim=-1)
                return k, k[..., :lat.shape[-1]]

            q = self._absorbed_query(q)
        else:
            def keys_values(lat, rot):
                k = torch.cat([self.kv.up_keys(lat), rot.expand(-1, -1, H, -1)], dim=-1)
                return k, self.kv.up_values(lat)
        k, v = keys_values(c, k_r) if tokens else (None, None)
        k_cmp, v_cmp = keys_values(c_cmp, kr_cmp) if cmp is not None else (None, None)
        return BranchInputs(q, k, v, k_cmp, v_cmp, groups=groups)

    def _form(self, branch: str) -> str:
        """``"grouped"``, or the form (absorbed / expanded) a latent layer trains ``branch`` in."""
        return "grouped" if self.source == "grouped" else self.cfg.branch_form(branch)

    def _to_heads(self, out: torch.Tensor, form: str) -> torch.Tensor:
        """Branch output ``(B, T, H, D)`` in head space: absorbed outputs are up-projected."""
        return self.kv.expand_output(out) if form == "absorbed" else out

    # -- branches ----------------------------------------------------------------------------
    def _run_branches(self, inputs: dict[str, BranchInputs]
                      ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Branch outputs in head space, ``(B, T, H, head_dim)`` in ``self.branches`` order, and
        the selected blocks (or None). ``inputs`` maps each form a branch uses to its inputs;
        block selection scores blocks in the compression branch's form."""
        cfg, backend, form = self.cfg, self.cfg.kernel_backend, self._form
        outputs: dict[str, torch.Tensor] = {}
        block_idx = None
        if "full" in self.branches:
            inp = inputs[form("full")]
            outputs["full"] = kernels.causal_attention(inp.q, inp.k, inp.v, self.scale, backend)
        if "window" in self.branches:
            inp = inputs[form("window")]
            outputs["window"] = self._to_heads(kernels.sliding_window_attention(
                inp.q, inp.k, inp.v, cfg.window, self.scale, backend), form("window"))
        if "compression" in self.branches or "selection" in self.branches:
            inp = inputs[form("compression")]
            o_cmp, lse = kernels.compression_attention(
                inp.q, inp.k_cmp, inp.v_cmp, cfg.compress_block, cfg.compress_stride, self.scale,
                backend)
            if "compression" in self.branches:
                outputs["compression"] = self._to_heads(o_cmp, form("compression"))
            if "selection" in self.branches:
                block_idx = kernels.select_blocks(
                    inp.q.detach(), inp.k_cmp.detach(), lse, num_groups=inp.groups,
                    block_len=cfg.compress_block, stride=cfg.compress_stride,
                    select_block=cfg.select_block, top_n=cfg.top_n,
                    num_local=cfg.num_local_blocks, q_share=self.q_share, scale=self.scale,
                    backend=backend)
                sel = inputs[form("selection")]
                outputs["selection"] = self._to_heads(kernels.selected_attention(
                    sel.q, sel.k, sel.v, block_idx, cfg.select_block, self.scale,
                    q_share=self.q_share, backend=backend), form("selection"))
        return [outputs[b] for b in self.branches], block_idx

    def _decode_branches(self, q: torch.Tensor, cache: TokenCache,
                         positions: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`_run_branches` for one query per sequence, ``q (B, H, Dq)``, against ``cache``
        (absorbed form for latent caches); outputs ``(B, H, Dv)``."""
        cfg, backend, scale = self.cfg, self.cfg.kernel_backend, self.scale
        k, v, k_rope = cache.attention_inputs()
        outputs: dict[str, torch.Tensor] = {}
        if "full" in self.branches:
            outputs["full"] = kernels.causal_decode(q, k, v, positions, scale, k_rope,
                                                    backend=backend)
        if "window" in self.branches:
            outputs["window"] = kernels.window_decode(q, k, v, positions, cfg.window, scale,
                                                      k_rope, backend=backend)
        if cache.compressed is not None:
            k_cmp, v_cmp, kr_cmp = cache.compressed_inputs()
            o_cmp, lse = kernels.compression_decode(
                q, k_cmp, v_cmp, positions, cfg.compress_block, cfg.compress_stride, scale,
                kr_cmp, backend=backend)
            if "compression" in self.branches:
                outputs["compression"] = o_cmp
            if "selection" in self.branches:
                fresh = kernels.select_blocks_decode(
                    q, k_cmp, lse, positions, num_groups=cache.block_idx.shape[1],
                    block_len=cfg.compress_block, stride=cfg.compress_stride,
                    select_block=cfg.select_block,
                    num_blocks=math.ceil(cache.slots / cfg.select_block), top_n=cfg.top_n,
                    num_local=cfg.num_local_blocks, scale=scale, k_rope_cmp=kr_cmp,
                    backend=backend)
                block_idx = cache.share_selection(fresh, positions)
                outputs["selection"] = kernels.selected_decode(
                    q, k, v, block_idx, positions, cfg.select_block, scale, k_rope,
                    backend=backend)
        return [outputs[b] for b in self.branches]

    def _output(self, x: torch.Tensor, outs: list[torch.Tensor], latent: bool) -> torch.Tensor:
        """Gate the branch outputs ``(B, T, H, D)``, up-project them by ``W_uv`` when ``latent``
        (absorbed form), and project to ``(B, T, d_model)``."""
        B, T, _ = x.shape
        if self.gate is None:
            o = outs[0]
        else:
            gates = torch.sigmoid(self.gate(x)).view(B, T, self.cfg.n_heads, len(outs), 1)
            o = sum(gates[:, :, :, i] * out for i, out in enumerate(outs))
        if latent:
            o = self.kv.expand_output(o)
        return self.wo(o.reshape(B, T, -1))

    # -- entry points ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: TokenCache | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, T, d_model)`` -> ``(B, T, d_model)``. With ``cache`` (prefill), also write
        sequence ``b``'s first ``lengths[b]`` tokens (default ``T``; ``x`` right-padded) to it."""
        q, a, b = self._project(x)
        compressed = "compression" in self.branches or "selection" in self.branches
        cmp = self._compress(a, b) if compressed else None
        if self.source == "grouped":
            inputs = {"grouped": self._grouped_inputs(q, a, b, cmp)}
        else:
            cmp_form = self._form("compression") if compressed else None
            token_forms = {self._form(br) for br in self.branches if br != "compression"}
            inputs = {f: self._latent_inputs(f, q, a, b, cmp if f == cmp_form else None,
                                             tokens=f in token_forms)
                      for f in token_forms | ({cmp_form} if compressed else set())}
        outs, block_idx = self._run_branches(inputs)
        if cache is not None:
            if lengths is None:
                lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
            cache.write_prompt((a, b), cmp, lengths)
            if block_idx is not None:
                cache.keep_selection(block_idx)
        return self._output(x, outs, latent=False)

    def decode(self, x: torch.Tensor, cache: TokenCache) -> torch.Tensor:
        """One new token per sequence: ``x (B, 1, d_model)`` at position ``cache.lengths (B,)``
        -> ``(B, 1, d_model)``; appends the token (and any completed compression block) to
        ``cache``. Latent layers attend in the absorbed form, to the latent cache itself."""
        positions = cache.lengths.clone()  # append advances cache.lengths in place
        q, a, b = self._project(x, positions[:, None])
        if self.source == "latent":
            q = self._absorbed_query(q)
        cache.append(a[:, 0], b[:, 0], self._compress if cache.compressed is not None else None)
        outs = self._decode_branches(q[:, 0], cache, positions)
        return self._output(x, [o[:, None] for o in outs], latent=self.source == "latent")
