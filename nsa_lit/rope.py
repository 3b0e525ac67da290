"""Rotary position embedding (rotate-half convention)."""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Caches ``cos``/``sin`` tables of width ``dim`` for positions ``[0, max_len)``."""

    def __init__(self, dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        self.dim = dim
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x (B, T, heads, dim)``; ``positions`` ``(T,)`` or per sequence ``(B, T)``,
        default ``0..T-1``."""
        T = x.shape[1]
        if positions is None:
            if T > self.cos.shape[0]:
                raise ValueError(f"sequence length {T} exceeds the RoPE table ({self.cos.shape[0]})")
            cos, sin = self.cos[:T], self.sin[:T]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        cos = cos[..., None, :].to(x.dtype)
        sin = sin[..., None, :].to(x.dtype)
        x1, x2 = x[..., : self.dim // 2], x[..., self.dim // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
