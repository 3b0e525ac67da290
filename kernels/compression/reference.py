"""Attention to compressed tokens, PyTorch reference.

Compressed token ``i`` summarises raw tokens ``[i * stride, i * stride + block_len)`` and becomes
visible to query ``t`` once its block has ended: ``i * stride + block_len - 1 <= t``. Queries that
see no compressed token (``t < block_len - 1``) get a zero output and ``lse = -inf``.
"""
from __future__ import annotations

import torch

from kernels.masked_attention import masked_attention


def num_compressed(T: int, block_len: int, stride: int) -> int:
    """Number of complete compression blocks in a sequence of ``T`` tokens."""
    return 0 if T < block_len else (T - block_len) // stride + 1


def compressed_visible(
    positions: torch.Tensor, num_blocks: int, block_len: int, stride: int
) -> torch.Tensor:
    """Boolean ``(*positions.shape, num_blocks)``: the query at each position may read compressed
    token ``i`` (its block has ended)."""
    end = torch.arange(num_blocks, device=positions.device) * stride + block_len - 1
    return end <= positions[..., None]


def compression_mask(
    T: int, num_blocks: int, block_len: int, stride: int, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean ``(T, num_blocks)`` mask: query ``t`` may read compressed token ``i``."""
    return compressed_visible(torch.arange(T, device=device), num_blocks, block_len, stride)


def compression_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    block_len: int,
    stride: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q (B, T, H, Dqk)``, ``k_cmp (B, N, Hk, Dqk)``, ``v_cmp (B, N, Hk, Dv)``.

    Returns ``o (B, T, H, Dv)`` and ``lse (B, T, H)`` (float32, detached), the log-sum-exp that
    block selection uses to recover the attention probabilities without storing them.
    """
    mask = compression_mask(q.shape[1], k_cmp.shape[1], block_len, stride, q.device)
    return masked_attention(q, k_cmp, v_cmp, mask, scale)
