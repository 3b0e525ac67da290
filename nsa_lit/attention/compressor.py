"""Block compression: one summary token per overlapping block of raw tokens."""
from __future__ import annotations

import torch
from torch import nn

from kernels.blocks import num_compressed


class BlockCompressor(nn.Module):
    """Compress ``x (B, T, G, D)`` into ``(B, N, G, D)``, ``N = (T - block_len) // stride + 1``.

    Compressed token ``i`` summarises raw tokens ``[i * stride, i * stride + block_len)``.
    ``method="mlp"``: an MLP over the flattened block after adding a learned intra-block position
    embedding (NSA); ``"mean"``: the mean of the block. The same weights serve every head/group.
    """

    def __init__(self, dim: int, block_len: int, stride: int, method: str = "mlp"):
        super().__init__()
        self.block_len, self.stride, self.method = block_len, stride, method
        if method == "mlp":
            self.position = nn.Parameter(torch.empty(block_len, dim))
            self.mlp = nn.Sequential(
                nn.Linear(block_len * dim, dim), nn.SiLU(), nn.Linear(dim, dim)
            )
            self.reset_parameters()
        elif method != "mean":
            raise ValueError(f"compress_method must be 'mlp' or 'mean', got {method!r}")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Intra-block position embeddings 0 (the MLP's ``nn.Linear`` layers are the model's
        to set)."""
        if self.method == "mlp":
            nn.init.zeros_(self.position)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, G, D = x.shape
        N = num_compressed(T, self.block_len, self.stride)
        if N == 0:
            return x.new_zeros(B, 0, G, D)
        blocks = x.unfold(1, self.block_len, self.stride).transpose(-1, -2)  # (B, N, G, l, D)
        if self.method == "mean":
            return blocks.mean(dim=3)
        blocks = blocks + self.position.to(x.dtype)
        return self.mlp(blocks.flatten(3))
