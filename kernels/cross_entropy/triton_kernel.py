"""Per-row cross-entropy and its gradient in one kernel: see :mod:`kernels.cross_entropy.reference`.

One program per row reads the row twice (online max / sum of exponentials, then the gradient)
and writes the gradient in the logits' dtype over the logits themselves, so a chunk of bf16
logits costs two reads and one write instead of the reference's fp32 copies and passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import interpreter_tiles

LOG2E = tl.constexpr(1.4426950408889634)  # a global a jit function reads must be constexpr


@triton.jit
def _xent_grad_kernel(X, T, LOSS, COUNT, V, stride, ignore_index,
                      BLOCK: tl.constexpr, NEED_GRAD: tl.constexpr):
    row = tl.program_id(0)
    base = X + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):  # per-lane running max and sum of 2^(x log2e - max)
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        x = x * LOG2E
        m_new = tl.maximum(m, x)
        s = s * tl.exp2(m - m_new) + tl.exp2(x - m_new)
        s = tl.where(m_new == float("-inf"), 0.0, s)
        m = m_new
    mx = tl.max(m, 0)
    total = tl.sum(s * tl.exp2(m - mx), 0)
    lse2 = mx + tl.log2(total)  # log2-sum-exp2 of x log2e
    t = tl.load(T + row)
    valid = t != ignore_index
    t = tl.where(valid, t, 0)
    picked = tl.load(base + t).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, (lse2 - picked * LOG2E) / LOG2E, 0.0))
    if NEED_GRAD:
        w = tl.where(valid, 1.0 / tl.load(COUNT).to(tl.float32), 0.0)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
            g = tl.exp2(x * LOG2E - lse2) - tl.where(c == t, 1.0, 0.0)
            tl.store(base + c, (g * w).to(X.dtype.element_ty), mask=c < V)


def xent_grad(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor,
              ignore_index: int = -100, need_grad: bool = True):
    """See :mod:`kernels.cross_entropy.reference`; the gradient overwrites ``logits``
    (fp16 / bf16 / fp32; fp64 goes to the reference)."""
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        from kernels.cross_entropy.reference import xent_grad as ref
        return ref(logits, targets, count, ignore_index, need_grad)
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (N, V) with unit column stride, got {tuple(logits.shape)}")
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        small = interpreter_tiles(logits.device)
        block = 64 if small else min(4096, triton.next_power_of_2(V))
        _xent_grad_kernel[(N,)](logits, targets.contiguous(), loss, count, V, logits.stride(0),
                                ignore_index, BLOCK=block, NEED_GRAD=need_grad,
                                num_warps=4 if small else 8)
    return loss, (logits if need_grad else None)
