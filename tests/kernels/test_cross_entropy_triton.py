"""Cross-entropy + gradient kernel against the PyTorch reference.

CPU: Triton interpreter, float32, small rows (several column blocks, a ragged last block).
GPU (``-m gpu``): bf16 logits of a realistic vocabulary against the reference on the same
rounded logits.
"""
from __future__ import annotations

import pytest
import torch

from kernels.cross_entropy import reference as ref
from kernels.cross_entropy import triton_kernel as tk


def _case(N, V, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=gen)).to(dtype).to(device)
    targets = torch.randint(0, V, (N,), generator=gen).to(device)
    targets[1] = -100
    count = (targets != -100).sum().float()
    return logits, targets, count


@pytest.mark.parametrize("V", [50, 64, 200])
def test_matches_reference(V):
    """Losses and gradients; V below, at and past one 64-wide column block; an ignored row."""
    logits, targets, count = _case(7, V)
    want_loss, want_grad = ref.xent_grad(logits.clone(), targets, count)
    buf = logits.clone()
    loss, grad = tk.xent_grad(buf, targets, count)
    assert grad.data_ptr() == buf.data_ptr()  # written over the logits
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert loss[1] == 0 and (grad[1] == 0).all()
    torch.testing.assert_close(grad.sum(-1), torch.zeros(7), atol=1e-6, rtol=0)


def test_loss_only_leaves_the_logits():
    logits, targets, count = _case(5, 90)
    buf = logits.clone()
    loss, grad = tk.xent_grad(buf, targets, count, need_grad=False)
    assert grad is None and torch.equal(buf, logits)
    torch.testing.assert_close(loss, ref.xent_grad(logits.clone(), targets, count, -100, False)[0])


@pytest.mark.gpu
def test_gpu_bf16_vocabulary():
    logits, targets, count = _case(256, 32000, torch.bfloat16, "cuda")
    want_loss, want_grad = ref.xent_grad(logits.float(), targets, count)
    loss, grad = tk.xent_grad(logits.clone(), targets, count)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)
    err = ((grad.float() - want_grad).norm() / want_grad.norm()).item()
    assert err < 1e-2, err
