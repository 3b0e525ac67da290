"""Per-row cross-entropy of a chunk of logits and the gradient of the mean loss, in PyTorch.

``xent_grad(logits (N, V), targets (N,), count, ignore_index, need_grad)`` returns
``(loss_rows (N,), grad (N, V) or None)``: ``loss_rows = logsumexp(logits) - logits[target]``
(0 for ignored rows) in fp32 (fp64 for fp64 logits); ``grad = (softmax(logits) -
onehot(target)) / count`` in the logits' dtype (0 for ignored rows). ``count`` is a 0-d tensor
(the number of targets the mean runs over). ``logits`` may be overwritten by ``grad``.
"""
from __future__ import annotations

import torch


def xent_grad(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor,
              ignore_index: int = -100, need_grad: bool = True):
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    rows = torch.arange(x.shape[0], device=x.device)
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(valid, lse - x[rows, t], 0.0)
    if not need_grad:
        return loss, None
    g = x.sub_(lse[:, None]).exp_()  # in place: x is logits itself or its fp32 copy
    g[rows, t] -= 1.0
    g.mul_((valid.to(acc) / count.to(acc))[:, None])
    return loss, g.to(logits.dtype)
