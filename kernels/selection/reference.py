"""Block importance and top-n block selection, PyTorch reference.

For query ``t`` and selection group ``g`` (a GQA key/value group, or a GLA latent group):

1. ``p[t, h, i]`` is the compression-branch attention probability of head ``h`` on compressed
   token ``i``, recovered from the compression scores and their log-sum-exp.
2. Group sharing: ``p_g[t, i] = sum over the heads h of group g of p[t, h, i]``.
3. Re-binning: selection block ``j`` covers raw tokens ``[j * select_block, (j + 1) *
   select_block)``; its importance is ``sum_i p_g[t, i] * overlap(i, j) / stride`` where
   ``overlap`` counts the raw tokens that compressed token ``i`` and block ``j`` share. For the NSA
   defaults (l=32, d=16, l'=64) this gives the weights 1, 2, 2, 2, 1 of the NSA paper's formula.
4. Query sharing: every aligned group of ``q_share`` queries ``[t0, t0 + q_share)`` uses the
   importance and the forced blocks of its first query ``t0``. The later queries see everything
   ``t0`` sees, so no future information reaches an earlier query. ``select_block % q_share == 0``
   keeps the current block of every query inside the chosen set.
5. Forced blocks: block 0 and the ``num_local`` blocks ending with the current block of ``t0``.
   Blocks that start after ``t0`` are never chosen. The ``top_n`` highest-scoring visible blocks
   are kept (forced ones first); fewer visible blocks leave ``-1`` padding.

Output: ``block_idx (B, T, G, top_n)`` int64, valid indices ascending, ``-1`` padding last.

The re-binning weights of step 3 (``overlap_weights``) and the pick of step 5 (``pick_blocks``)
live in :mod:`kernels.blocks`, shared with the decode path and the Triton kernels.
"""
from __future__ import annotations

import torch

from kernels.blocks import compression_mask, num_selection_blocks, overlap_weights, pick_blocks


def block_importance(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, num_groups: int,
    block_len: int, stride: int, select_block: int, scale: float,
) -> torch.Tensor:
    """``q (B, T, H, Dqk)``, ``k_cmp (B, N, Hk, Dqk)``, ``lse (B, T, H)`` -> ``(B, T, G, Ns)``.

    ``Ns = ceil(T / select_block)``; ``G = num_groups`` must divide ``H``.
    """
    T, N, Hk = q.shape[1], k_cmp.shape[1], k_cmp.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    k = k_cmp.to(acc).repeat_interleave(q.shape[2] // Hk, dim=2)
    scores = torch.einsum("bthd,bnhd->bthn", q.to(acc), k) * scale
    visible = compression_mask(T, N, block_len, stride, q.device)[None, :, None, :]
    return group_importance(scores, lse, visible, num_groups=num_groups, block_len=block_len,
                            stride=stride, select_block=select_block,
                            num_blocks=num_selection_blocks(T, select_block))


def group_importance(
    scores: torch.Tensor, lse: torch.Tensor, visible: torch.Tensor, *, num_groups: int,
    block_len: int, stride: int, select_block: int, num_blocks: int,
) -> torch.Tensor:
    """Steps 1-3: scaled compression scores ``(..., H, N)``, their log-sum-exp ``(..., H)`` and
    the visible compressed tokens (broadcast to ``(..., H, N)``) -> importance ``(..., G, Ns)``
    of ``Ns = num_blocks`` selection blocks."""
    H, N = scores.shape[-2:]
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse[..., None]).masked_fill(~visible, 0.0)
    group_probs = probs.unflatten(-2, (num_groups, H // num_groups)).sum(dim=-2)
    weights = overlap_weights(N, num_blocks, block_len, stride, select_block, scores.device)
    return group_probs @ weights.to(scores.dtype)


def top_n_blocks(
    importance: torch.Tensor, *, select_block: int, top_n: int, num_local: int, q_share: int,
) -> torch.Tensor:
    """``importance (B, T, G, Ns)`` -> ``block_idx (B, T, G, top_n)`` (see module docstring)."""
    T = importance.shape[1]
    first = torch.arange(T, device=importance.device) // q_share * q_share
    current = (first // select_block)[None, :, None]
    return pick_blocks(importance[:, first], current, top_n=top_n, num_local=num_local)


def select_blocks(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, num_groups: int, block_len: int,
    stride: int, select_block: int, top_n: int, num_local: int, q_share: int, scale: float,
) -> torch.Tensor:
    """Block importance followed by top-n selection; returns ``(B, T, G, top_n)`` int64."""
    with torch.no_grad():
        importance = block_importance(
            q, k_cmp, lse, num_groups=num_groups, block_len=block_len, stride=stride,
            select_block=select_block, scale=scale,
        )
        return top_n_blocks(
            importance, select_block=select_block, top_n=top_n, num_local=num_local,
            q_share=q_share,
        )
