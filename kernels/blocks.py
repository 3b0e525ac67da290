"""Block geometry of NSA's compression and selection branches, in one place.

The PyTorch references, the Triton kernels' host code and ``nsa_lit`` all derive their block
counts, visibility masks and block picks from here.

* Compression: compressed token ``i`` summarises raw tokens ``[i * stride, i * stride +
  block_len)`` and becomes visible to the query at position ``t`` once its block has ended:
  ``i * stride + block_len - 1 <= t``.
* Selection: selection block ``j`` covers raw tokens ``[j * select_block, (j + 1) *
  select_block)``; a sequence of ``T`` tokens has ``ceil(T / select_block)`` of them (the last
  one possibly partial).
"""
from __future__ import annotations

import torch


def num_compressed(T: int, block_len: int, stride: int) -> int:
    """Number of complete compression blocks in a sequence of ``T`` tokens (0 when
    ``T < block_len``). ``num_compressed(t + 1, ...)`` is the number the query at ``t`` sees."""
    return 0 if T < block_len else (T - block_len) // stride + 1


def num_selection_blocks(T: int, select_block: int) -> int:
    """Number of selection blocks ``Ns = ceil(T / select_block)`` covering ``T`` tokens."""
    return -(-T // select_block)


def compressed_visible(
    positions: torch.Tensor, num_blocks: int, block_len: int, stride: int
) -> torch.Tensor:
    """Boolean ``(*positions.shape, num_blocks)``: the query at each position may read compressed
    token ``i`` (its block has ended). Negative positions see nothing."""
    end = torch.arange(num_blocks, device=positions.device) * stride + block_len - 1
    return end <= positions[..., None]


def compression_mask(
    T: int, num_blocks: int, block_len: int, stride: int, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean ``(T, num_blocks)``: query ``t`` may read compressed token ``i``
    (:func:`compressed_visible` of positions ``0 .. T-1``)."""
    return compressed_visible(torch.arange(T, device=device), num_blocks, block_len, stride)


def overlap_weights(
    num_compressed: int, num_blocks: int, block_len: int, stride: int, select_block: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``(num_compressed, num_blocks)`` float32 matrix of ``overlap(i, j) / stride``, where
    ``overlap`` counts the raw tokens compressed token ``i`` and selection block ``j`` share.

    Right-multiplying compression probabilities ``(..., num_compressed)`` re-bins them to
    selection-block importance ``(..., num_blocks)``. For the NSA defaults (l=32, d=16, l'=64) a
    block's column holds the weights 1, 2, 2, 2, 1 (the weights of the NSA paper's Eq. 9, whose printed indices differ: see the README's selection note); every entry times ``stride``
    is an exact integer."""
    start = torch.arange(num_compressed, device=device, dtype=torch.float32)[:, None] * stride
    blk = torch.arange(num_blocks, device=device, dtype=torch.float32)[None, :] * select_block
    lo = torch.maximum(start, blk)
    hi = torch.minimum(start + block_len, blk + select_block)
    return (hi - lo).clamp_min(0.0) / stride


def pick_blocks(
    score: torch.Tensor, current: torch.Tensor, *, top_n: int, num_local: int
) -> torch.Tensor:
    """Top-n selection: importance ``score (..., Ns)`` and the current block of the choosing
    query ``current`` (broadcast to ``score.shape[:-1]``) -> ``top_n`` block indices
    ``(..., top_n)`` int64.

    Only visible blocks (``<= current``) are chosen; the forced ones (block 0 and the
    ``num_local`` blocks ending with ``current``) always, then the highest scores (ties: the
    lower index). Valid indices ascending, ``-1`` padding last (fewer visible blocks than
    ``top_n``)."""
    Ns = score.shape[-1]
    blocks = torch.arange(Ns, device=score.device)
    current = current[..., None]
    visible = blocks <= current
    forced = (blocks == 0) | ((blocks <= current) & (blocks > current - num_local))
    score = score.masked_fill(forced, float("inf"))
    score = score.masked_fill(~visible, float("-inf"))
    k = min(top_n, Ns)
    top_score, idx = score.sort(dim=-1, descending=True, stable=True)  # ties: lower index wins
    top_score, idx = top_score[..., :k], idx[..., :k]
    idx = torch.where(top_score == float("-inf"), torch.full_like(idx, Ns), idx)
    idx = idx.sort(dim=-1).values
    idx = torch.where(idx == Ns, torch.full_like(idx, -1), idx)
    if k < top_n:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], top_n - k), -1)], dim=-1)
    return idx


__all__ = ["num_compressed", "num_selection_blocks", "compressed_visible", "compression_mask",
           "overlap_weights", "pick_blocks"]
