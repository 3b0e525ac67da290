"""Attention to the raw tokens of selected blocks, PyTorch reference.

Query ``t`` of head ``h`` (selection group ``g = h // (H // G)``) attends key ``s`` iff ``s <= t``
and the block ``s // select_block`` is one of ``block_idx[t, g]`` (``-1`` entries are padding).
"""
from __future__ import annotations

import math

import torch

from kernels.masked_attention import masked_attention


def selection_mask(block_idx: torch.Tensor, select_block: int, T: int, num_heads: int) -> torch.Tensor:
    """``block_idx (B, T, G, n)`` -> boolean ``(B, H, T, T)`` mask of the selected raw tokens."""
    B, _, G, _ = block_idx.shape
    num_blocks = math.ceil(T / select_block)
    slots = torch.where(block_idx >= 0, block_idx, torch.full_like(block_idx, num_blocks))
    chosen = torch.zeros(B, T, G, num_blocks + 1, dtype=torch.bool, device=block_idx.device)
    chosen.scatter_(-1, slots, True)
    tokens = chosen[..., :num_blocks].repeat_interleave(select_block, dim=-1)[..., :T]
    causal = torch.ones(T, T, dtype=torch.bool, device=block_idx.device).tril()
    mask = tokens & causal[None, :, None, :]
    return mask.repeat_interleave(num_heads // G, dim=2).permute(0, 2, 1, 3)


def selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
    select_block: int, scale: float, q_share: int = 1,
) -> torch.Tensor:
    """``q (B, T, H, Dqk)``, ``k (B, T, Hk, Dqk)``, ``v (B, T, Hk, Dv)``,
    ``block_idx (B, T, G, n)`` with ``H % G == 0`` -> ``o (B, T, H, Dv)``.

    ``q_share`` promises that aligned groups of ``q_share`` queries carry identical block indices
    (kernels may load each block once per group); the reference does not need it.
    """
    mask = selection_mask(block_idx, select_block, q.shape[1], q.shape[2])
    return masked_attention(q, k, v, mask, scale)[0]
