"""Loop-based attention written straight from each branch's definition: the test oracle.

Slow and obvious on purpose: every query builds the explicit list of keys it may read.
"""
from __future__ import annotations

import torch


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row against an explicit key list (zeros when the list is empty)."""
    if keys.shape[0] == 0:
        return values.new_zeros(values.shape[-1])
    probs = torch.softmax((keys @ q) * scale, dim=0)
    return probs @ values


def _loop(q, k, v, scale, allowed):
    """``allowed(b, t, h) -> list of key positions``."""
    B, T, H, _ = q.shape
    Hk = k.shape[2]
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                kv = h // (H // Hk)
                idx = torch.tensor(allowed(b, t, h), dtype=torch.long)
                out[b, t, h] = attend(q[b, t, h].double(), k[b, idx, kv].double(),
                                      v[b, idx, kv].double(), scale)
    return out


def window(q, k, v, w, scale):
    return _loop(q, k, v, scale, lambda b, t, h: [s for s in range(q.shape[1]) if t - w < s <= t])


def compression(q, k_cmp, v_cmp, block_len, stride, scale):
    N = k_cmp.shape[1]
    return _loop(q, k_cmp, v_cmp, scale,
                 lambda b, t, h: [i for i in range(N) if i * stride + block_len - 1 <= t])


def selected_sets(q, k_cmp, *, groups, block_len, stride, select_block, top_n, num_local, q_share,
                  scale):
    """``sets[b][t][g]``: the set of selected block indices, from the definition."""
    B, T, H, _ = q.shape
    N, Hk = k_cmp.shape[1], k_cmp.shape[2]
    num_blocks = -(-T // select_block)
    sets = []
    for b in range(B):
        per_t = []
        for t in range(T):
            t0 = t - t % q_share
            visible = [i for i in range(N) if i * stride + block_len - 1 <= t0]
            per_g = []
            for g in range(groups):
                group_prob = torch.zeros(N, dtype=torch.float64)
                for h in range(g * H // groups, (g + 1) * H // groups):
                    if visible:
                        keys = k_cmp[b, visible, h // (H // Hk)].double()
                        p = torch.softmax((keys @ q[b, t0, h].double()) * scale, dim=0)
                        group_prob[visible] += p
                importance = []
                for j in range(num_blocks):
                    blk = set(range(j * select_block, (j + 1) * select_block))
                    imp = sum(group_prob[i].item() * len(blk & set(range(i * stride, i * stride + block_len)))
                              for i in range(N)) / stride
                    importance.append(imp)
                current = t0 // select_block
                forced = {0} | {current - m for m in range(num_local) if current - m >= 0}
                rest = sorted((j for j in range(current + 1) if j not in forced),
                              key=lambda j: -importance[j])
                per_g.append(forced | set(rest[: top_n - len(forced)]))
            per_t.append(per_g)
        sets.append(per_t)
    return sets


def selected(q, k, v, sets, select_block, scale):
    H = q.shape[2]
    groups = len(sets[0][0])
    return _loop(q, k, v, scale, lambda b, t, h: [
        s for s in range(t + 1) if s // select_block in sets[b][t][h // (H // groups)]])
