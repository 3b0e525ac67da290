"""Attention to compressed tokens, PyTorch reference.

Compressed token ``i`` summarises raw tokens ``[i * stride, i * stride + block_len)`` and becomes
visible to query ``t`` once its block has ended: ``i * stride + block_len - 1 <= t``. Queries that
see no compressed token (``t < block_len - 1``) get a zero output and ``lse = -inf``. The geometry
(block counts, visibility) lives in :mod:`kernels.blocks`.
"""
from __future__ import annotations

import torch

from kernels.blocks import compression_mask
from kernels.masked_attention import masked_attention


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
