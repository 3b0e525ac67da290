"""The branch pipeline of one attention layer: window, full, compression -> selection -> selected
attention, each through :mod:`kernels.dispatch`. The layer (:mod:`nsa_lit.attention.layer`) and
the attention benchmarks call :func:`run_branches`; nothing else spells the pipeline out."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from nsa_lit.config import Branch, Form, LayerSpec


@dataclass
class BranchInputs:
    """What the branches of one form read. ``q (B,T,H,Dqk)``, ``k (B,T,Hk,Dqk)``, ``v (B,T,Hk,Dv)``
    (None where no branch of this form reads per-token keys); compressed ``k_cmp (B,N,Hk,Dqk)``,
    ``v_cmp (B,N,Hk,Dv)`` (None where this form does not compress). ``values_in_keys``: ``v`` is
    ``k[..., :Dv]`` (the absorbed latent form), which the selected-attention kernel then reads
    from the key tiles."""

    q: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    k_cmp: torch.Tensor | None = None
    v_cmp: torch.Tensor | None = None
    values_in_keys: bool = False


def run_branches(spec: LayerSpec, inputs: dict[Form, BranchInputs] | dict[Branch, BranchInputs],
                 backend: str = "auto") -> tuple[dict[Branch, torch.Tensor], torch.Tensor | None]:
    """Outputs ``(B, T, H, Dv)`` of every branch of ``spec`` in its own form's space (absorbed
    outputs are still latent), and the selected blocks ``(B, T, kv_heads, top_n)`` (or None).
    ``inputs`` maps each form a branch uses to its inputs or, in a layer with per-branch
    key/values (``spec.kv_per_branch``), each branch of ``spec.kv_branches`` to its own. Blocks
    are scored by the compression attention (its compressed keys and log-sum-exp)."""
    def inputs_of(branch: Branch) -> BranchInputs:
        return inputs[branch if spec.kv_per_branch else spec.form(branch)]

    outputs: dict[Branch, torch.Tensor] = {}
    block_idx = None
    scale = spec.scale
    if Branch.FULL in spec.branches:
        inp = inputs_of(Branch.FULL)
        outputs[Branch.FULL] = kernels.causal_attention(inp.q, inp.k, inp.v, scale, backend)
    if Branch.WINDOW in spec.branches:
        inp = inputs_of(Branch.WINDOW)
        outputs[Branch.WINDOW] = kernels.sliding_window_attention(
            inp.q, inp.k, inp.v, spec.window, scale, backend)
    if spec.compresses:
        inp = inputs_of(Branch.COMPRESSION)
        o_cmp, lse = kernels.compression_attention(
            inp.q, inp.k_cmp, inp.v_cmp, spec.compress_block, spec.compress_stride, scale,
            backend)
        if Branch.COMPRESSION in spec.branches:
            outputs[Branch.COMPRESSION] = o_cmp
        if spec.selects:
            block_idx = kernels.select_blocks(
                inp.q.detach(), inp.k_cmp.detach(), lse, num_groups=spec.kv_heads,
                block_len=spec.compress_block, stride=spec.compress_stride,
                select_block=spec.select_block, top_n=spec.top_n,
                num_local=spec.num_local_blocks, q_share=spec.q_share, scale=scale,
                backend=backend)
            sel = inputs_of(Branch.SELECTION)
            if sel.values_in_keys:
                v, value_dim = None, sel.v.shape[-1]
            else:
                v, value_dim = sel.v, None
            outputs[Branch.SELECTION] = kernels.selected_attention(
                sel.q, sel.k, v, block_idx, spec.select_block, scale, q_share=spec.q_share,
                backend=backend, value_dim=value_dim)
    return outputs, block_idx
