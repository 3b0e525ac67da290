"""Attention to the raw tokens of selected blocks, PyTorch reference.

Query ``t`` of head ``h`` (selection group ``g = h // (H // G)``) attends key ``s`` iff ``s <= t``
and the block ``s // select_block`` is one of ``block_idx[t, g]`` (``-1`` entries are padding).

Values are passed either as a tensor ``v`` or, for the absorbed latent form (keys ``[c ; k_R]``,
values ``c``), as ``v=None, value_dim=Dv``: the values are then the keys' first ``Dv`` columns
``k[..., :Dv]`` and their gradient is part of ``k``'s (the Triton kernel reads each key tile once
for both).
"""
from __future__ import annotations

import torch

from kernels.blocks import num_selection_blocks
from kernels.masked_attention import masked_attention


def key_values(k: torch.Tensor, v: torch.Tensor | None, value_dim: int | None) -> torch.Tensor:
    """The values of selected attention: ``v``, or ``k[..., :value_dim]`` when ``v is None``.

    Exactly one of ``v`` and ``value_dim`` must be given, and ``1 <= value_dim <= Dqk``;
    ``ValueError`` otherwise."""
    if value_dim is None:
        if v is None:
            raise ValueError("selected_attention needs the values: pass v, or v=None with "
                             "value_dim (values = k[..., :value_dim])")
        return v
    if v is not None:
        raise ValueError(f"selected_attention got both a tensor v and value_dim={value_dim!r}: "
                         "pass v=None with value_dim (values = k[..., :value_dim]), or v alone")
    width = k.shape[-1]
    if isinstance(value_dim, bool) or not isinstance(value_dim, int) or not 1 <= value_dim <= width:
        raise ValueError(f"value_dim must be an int in [1, Dqk={width}], got {value_dim!r}")
    return k[..., :value_dim]


def selection_mask(block_idx: torch.Tensor, select_block: int, T: int, num_heads: int) -> torch.Tensor:
    """``block_idx (B, T, G, n)`` -> boolean ``(B, H, T, T)`` mask of the selected raw tokens."""
    B, _, G, _ = block_idx.shape
    num_blocks = num_selection_blocks(T, select_block)
    slots = torch.where(block_idx >= 0, block_idx, torch.full_like(block_idx, num_blocks))
    chosen = torch.zeros(B, T, G, num_blocks + 1, dtype=torch.bool, device=block_idx.device)
    chosen.scatter_(-1, slots, True)
    tokens = chosen[..., :num_blocks].repeat_interleave(select_block, dim=-1)[..., :T]
    causal = torch.ones(T, T, dtype=torch.bool, device=block_idx.device).tril()
    mask = tokens & causal[None, :, None, :]
    return mask.repeat_interleave(num_heads // G, dim=2).permute(0, 2, 1, 3)


def selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, block_idx: torch.Tensor,
    select_block: int, scale: float, q_share: int = 1, *, value_dim: int | None = None,
) -> torch.Tensor:
    """``q (B, T, H, Dqk)``, ``k (B, T, Hk, Dqk)``, ``v (B, T, Hk, Dv)`` (or ``v=None`` with
    ``value_dim=Dv``: values ``k[..., :Dv]``), ``block_idx (B, T, G, n)`` with ``H % G == 0``
    -> ``o (B, T, H, Dv)``.

    ``q_share`` promises that aligned groups of ``q_share`` queries carry identical block indices
    (kernels may load each block once per group); the reference does not need it.
    """
    v = key_values(k, v, value_dim)
    mask = selection_mask(block_idx, select_block, q.shape[1], q.shape[2])
    return masked_attention(q, k, v, mask, scale)[0]
