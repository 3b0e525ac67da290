"""Rotary position embedding (rotate-half convention)."""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Caches ``cos``/``sin`` tables of width ``dim`` for positions ``[0, max_len)``."""

    def __init__(self, dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        self.dim, self.max_len, self.theta = dim, max_len, theta
        # not in checkpoints (persistent=False): always computed, by reset_parameters
        self.register_buffer("cos", torch.empty(max_len, (dim + 1) // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, (dim + 1) // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Compute the tables, always on the CPU in float32 (then copied to the buffers' device
        and dtype), so that a model built on the meta device and materialised on a GPU has the
        same tables as one built on the CPU."""
        if self.cos.is_meta:
            return
        inv_freq = 1.0 / self.theta ** (
            torch.arange(0, self.dim, 2, dtype=torch.float32, device="cpu") / self.dim)
        angles = torch.outer(torch.arange(self.max_len, dtype=torch.float32, device="cpu"),
                             inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

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
