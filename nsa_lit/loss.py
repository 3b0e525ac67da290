"""Next-token loss from hidden states, without materialising the logits.

``linear_cross_entropy(h, weight, targets, chunk)`` equals
``F.cross_entropy((h @ weight.T).float(), targets)`` (mean over targets other than
``ignore_index``). It computes ``chunk`` rows of logits at a time and, since the loss is the end
of the graph, their gradients at once (``softmax - onehot``, divided by the count), so neither
the (tokens x vocab) logits nor their fp32 copy nor their gradient outlive a chunk: at 65,536
tokens and a 32,000-token vocabulary that is about 12 GB less memory than the plain loss.
Backward only scales the stored input and weight gradients by the incoming gradient. Each
chunk's loss and logit gradient come from ``kernels.xent_grad`` (one Triton pass over the
logits on CUDA, written over them; PyTorch elsewhere).

Under autocast the products run in the autocast dtype, like ``nn.Linear`` would; the
log-softmax and the sums over chunks (loss, weight gradient) run in fp32 at least.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels

IGNORE_INDEX = -100
DEFAULT_CHUNK = 8192  # tokens per chunk (model.loss_chunk, train_throughput.py --loss_chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, need_grad: bool):
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            x_all, w = h.to(dtype), weight.to(dtype)
            acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
            count = (targets != IGNORE_INDEX).sum().to(acc)
            total = torch.zeros((), dtype=acc, device=h.device)
            if need_grad:
                dh = torch.empty_like(x_all)
                dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            for i in range(0, h.shape[0], chunk):
                x, t = x_all[i:i + chunk], targets[i:i + chunk]
                # per-row losses, and (softmax - onehot(target)) / count over the logits
                loss_rows, g = kernels.xent_grad(x @ w.T, t, count, IGNORE_INDEX, need_grad)
                total += loss_rows.sum().to(acc)
                if need_grad:
                    dh[i:i + chunk] = g @ w
                    dw += (g.T @ x).to(acc)
        if need_grad:
            ctx.save_for_backward(dh.to(h.dtype), dw.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad, dw * grad, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of the logits ``h (N, d) @ weight (V, d).T`` against ``targets (N,)``
    (``IGNORE_INDEX`` rows skipped), computed ``chunk`` rows at a time; a scalar tensor, fp32 (or
    fp64 for fp64 inputs).
    Differentiable in ``h`` and ``weight``; the gradients are computed in the forward pass (only
    when grad mode is on and an input requires them), so call it once per loss (it is the end
    of the graph)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h (N, d) and weight (V, d), got {tuple(h.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"targets must have shape ({h.shape[0]},), got {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, need_grad)


def next_token_loss(model, batch: torch.Tensor, loss_chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` (a :class:`nsa_lit.model.Transformer`) on
    ``batch (B, T + 1)``: through :func:`linear_cross_entropy` in chunks of ``loss_chunk``
    tokens, or (``loss_chunk == 0``) from the whole logits, in fp32."""
    if batch.ndim != 2 or batch.shape[1] < 2:
        raise ValueError(f"expected a token batch (B, seq_len + 1), got shape {tuple(batch.shape)}")
    inputs, targets = batch[:, :-1], batch[:, 1:].long().flatten()
    if loss_chunk:
        h = model.hidden(inputs)
        return linear_cross_entropy(h.flatten(0, 1), model.lm_head.weight, targets, loss_chunk)
    return F.cross_entropy(model(inputs).float().flatten(0, 1), targets)
