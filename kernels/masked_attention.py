"""Dense masked softmax attention: the one primitive every PyTorch reference is written with.

Written for clarity, not speed: it materialises the (T, S) score matrix in float32 (float64
for float64 inputs).
"""
from __future__ import annotations

import torch


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to ``mask``.

    Shapes: ``q (B, T, H, Dqk)``, ``k (B, S, Hk, Dqk)``, ``v (B, S, Hk, Dv)`` with ``H % Hk == 0``
    (query head ``h`` reads key/value head ``h // (H // Hk)``); ``mask`` is boolean and broadcasts
    to ``(B, H, T, S)``; True means "may attend".

    Returns ``o (B, T, H, Dv)`` in ``q.dtype`` and the log-sum-exp of the scaled scores
    ``lse (B, T, H)`` in float32 (detached). A query with no visible key gets ``o = 0`` and
    ``lse = -inf``.
    """
    H, Hk = q.shape[2], k.shape[2]
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hk})")
    if k.shape[1] == 0:  # no key at all (e.g. no compression block has ended yet)
        B, T = q.shape[:2]
        return (q.new_zeros(B, T, H, v.shape[-1]),
                torch.full((B, T, H), float("-inf"), device=q.device))
    rep = H // Hk
    acc = torch.promote_types(q.dtype, torch.float32)
    k = k.to(acc).repeat_interleave(rep, dim=2)
    v = v.to(acc).repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.to(acc), k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhts,bshd->bthd", probs, v)
    lse = (row_max + denom.log()).squeeze(-1).transpose(1, 2).detach().float()
    return out.to(q.dtype), lse
