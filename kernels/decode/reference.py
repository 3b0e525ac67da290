"""Attention of one new query per sequence to a decode cache, PyTorch reference.

Sequence ``b`` decodes the token at ``positions[b]``, already written to the cache; every
function takes its query ``q (B, H, Dq)`` and returns that row of the matching training branch.

Raw caches hold one slot per token, ``k (B, S, Hk, Dk)``, ``v (B, S, Hk, Dv)``: token ``p`` lives in
slot ``p % S``, so a cache of ``S > positions`` slots holds every token and a smaller one is a ring
buffer of the last ``S`` tokens. Compressed caches hold compressed token ``i`` in slot ``i``.

Latent (MLA/GLA, absorbed form) caches pass their shared RoPE key ``k_rope (B, S, 1, Dr)`` beside
the latent ``k``: group ``g``'s key is ``[k[:, :, g] ; k_rope]`` (so ``Dq = Dk + Dr``) and the value
is the latent itself (``v is k``). Grouped (GQA) caches pass ``k_rope=None``.

The attention functions also take ``gate_logit (B, H)`` and ``add_to (B, H, Dv)`` (keyword,
both optional) and then return ``add_to + sigmoid(gate_logit) * o`` (computed in float32,
rounded once to ``q``'s dtype): a layer's gated sum of its branches, accumulated one branch call
after another, the logits taken as they come out of the layer's input projection.
"""
from __future__ import annotations

import torch

from kernels.blocks import compressed_visible, pick_blocks
from kernels.masked_attention import masked_attention
from kernels.selection.reference import group_importance


def slot_positions(positions: torch.Tensor, slots: int) -> torch.Tensor:
    """``(B, slots)`` position of the token each slot holds once ``positions (B,)`` is written;
    negative for a slot not written yet."""
    s = torch.arange(slots, device=positions.device)
    return positions[:, None] - (positions[:, None] - s) % slots


def _keys(k: torch.Tensor, k_rope: torch.Tensor | None) -> torch.Tensor:
    """``[k ; k_rope]`` per key head (the shared RoPE key repeated), or ``k``."""
    if k_rope is None:
        return k
    return torch.cat([k, k_rope.expand(-1, -1, k.shape[2], -1)], dim=-1)


def _attend(q, k, v, mask, scale, k_rope):
    """``mask (B, 1 or H, S)`` -> ``o (B, H, Dv)``, ``lse (B, H)``."""
    o, lse = masked_attention(q[:, None], _keys(k, k_rope), v, mask[:, :, None, :], scale)
    return o[:, 0], lse[:, 0]


def gated_sum(o: torch.Tensor, gate_logit: torch.Tensor | None = None,
              add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``add_to + sigmoid(gate_logit)[..., None] * o`` (either term optional) in at least
    float32, in ``o``'s dtype: what the attention functions return when given ``gate_logit`` or
    ``add_to``."""
    if gate_logit is None and add_to is None:
        return o
    out = o.to(torch.promote_types(o.dtype, torch.float32))
    if gate_logit is not None:
        out = out * torch.sigmoid(gate_logit.to(out.dtype))[..., None]
    if add_to is not None:
        out = out + add_to
    return out.to(o.dtype)


def causal_decode(q, k, v, positions, scale: float, k_rope=None, *, gate_logit=None,
                  add_to=None) -> torch.Tensor:
    """Full causal attention: every token ``<= positions`` (``k`` must hold all of them)."""
    mask = slot_positions(positions, k.shape[1]) >= 0
    return gated_sum(_attend(q, k, v, mask[:, None], scale, k_rope)[0], gate_logit, add_to)


def window_decode(q, k, v, positions, window: int, scale: float, k_rope=None, *, gate_logit=None,
                  add_to=None) -> torch.Tensor:
    """Sliding window: tokens ``s`` with ``positions - window < s <= positions`` (``k`` holds at
    least the last ``window`` tokens)."""
    held = slot_positions(positions, k.shape[1])
    mask = (held >= 0) & (held > positions[:, None] - window)
    return gated_sum(_attend(q, k, v, mask[:, None], scale, k_rope)[0], gate_logit, add_to)


def compression_decode(q, k_cmp, v_cmp, positions, block_len: int, stride: int, scale: float,
                       k_rope_cmp=None, *, gate_logit=None, add_to=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention to the compressed tokens whose block has ended. Returns ``o (B, H, Dv)`` and
    ``lse (B, H)`` (float32; ``-inf`` while no block has ended; of the attention, not gated)."""
    mask = compressed_visible(positions, k_cmp.shape[1], block_len, stride)
    o, lse = _attend(q, k_cmp, v_cmp, mask[:, None], scale, k_rope_cmp)
    return gated_sum(o, gate_logit, add_to), lse


def select_blocks_decode(q, k_cmp, lse, positions, *, num_groups: int, block_len: int,
                         stride: int, select_block: int, num_blocks: int, top_n: int,
                         num_local: int, scale: float, k_rope_cmp=None) -> torch.Tensor:
    """Blocks chosen by the query at ``positions`` (``lse`` from :func:`compression_decode`),
    among ``num_blocks`` selection blocks (enough to cover the raw cache) ->
    ``block_idx (B, G, top_n)``. Query sharing is the caller's: it calls this for a group's first
    query and keeps the result for the others."""
    keys = _keys(k_cmp, k_rope_cmp)
    acc = torch.promote_types(q.dtype, torch.float32)
    keys = keys.to(acc).repeat_interleave(q.shape[1] // keys.shape[2], dim=2)
    scores = torch.einsum("bhd,bnhd->bhn", q.to(acc), keys) * scale
    visible = compressed_visible(positions, k_cmp.shape[1], block_len, stride)[:, None, :]
    importance = group_importance(scores, lse, visible, num_groups=num_groups,
                                  block_len=block_len, stride=stride, select_block=select_block,
                                  num_blocks=num_blocks)
    current = (positions // select_block)[:, None]
    return pick_blocks(importance, current, top_n=top_n, num_local=num_local)


def selected_decode(q, k, v, block_idx, positions, select_block: int, scale: float,
                    k_rope=None, *, gate_logit=None, add_to=None) -> torch.Tensor:
    """Attention to the tokens ``<= positions`` of the selected blocks; ``block_idx (B, G, n)``
    (``-1`` padding), query head ``h`` in group ``h // (H // G)``."""
    held = slot_positions(positions, k.shape[1])  # (B, S)
    in_block = (held[:, None, :, None] // select_block == block_idx[:, :, None, :]).any(-1)
    mask = in_block & (held >= 0)[:, None, :]  # (B, G, S)
    mask = mask.repeat_interleave(q.shape[1] // block_idx.shape[1], dim=1)
    return gated_sum(_attend(q, k, v, mask, scale, k_rope)[0], gate_logit, add_to)
