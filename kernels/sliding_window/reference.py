"""Sliding-window causal attention, PyTorch reference.

Query ``t`` attends key ``s`` iff ``t - window < s <= t`` (the last ``window`` tokens, itself
included). Key and value widths may differ (MLA: ``Dqk = d_h + d_R``, ``Dv = d_h``).
"""
from __future__ import annotations

import torch

from kernels.masked_attention import masked_attention


def window_mask(T: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``(T, T)`` mask: ``mask[t, s] = t - window < s <= t``."""
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(T, device=device)[None, :]
    return (s <= t) & (s > t - window)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """``q (B, T, H, Dqk)``, ``k (B, T, Hk, Dqk)``, ``v (B, T, Hk, Dv)`` -> ``o (B, T, H, Dv)``."""
    mask = window_mask(q.shape[1], window, q.device)
    return masked_attention(q, k, v, mask, scale)[0]
