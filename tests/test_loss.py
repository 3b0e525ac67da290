"""Chunked linear + cross-entropy against ``F.cross_entropy`` of the full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nsa_lit.loss import IGNORE_INDEX, linear_cross_entropy


def _reference(h, w, t):
    logits = h @ w.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t,
                           ignore_index=IGNORE_INDEX)


def _leaves(N, d, V, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(V, d, generator=gen, dtype=dtype) / d ** 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_matches_full_logits(chunk):
    """Loss and both gradients, chunks that do and do not divide the 37 rows, one chunk for all;
    some rows ignored; the upstream gradient scales both."""
    h, w, t = _leaves(37, 12, 50)
    t[[3, 20]] = IGNORE_INDEX
    loss = linear_cross_entropy(h, w, t, chunk)
    (3 * loss).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _reference(h2, w2, t)
    (3 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-9, atol=1e-12)
    assert (h.grad[[3, 20]] == 0).all()


def test_bf16_autocast_follows_the_linear_layer():
    """Under CPU bf16 autocast the products run in bf16 (as nn.Linear would) and the result
    stays close to the fp32 loss; gradients come back in the leaves' dtypes."""
    h, w, t = _leaves(64, 32, 40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, 24)
    loss.backward()
    ref = _reference(h.detach(), w.detach(), t)
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _reference(h2, w2, t).backward()
    for got, want in ((h.grad, h2.grad), (w.grad, w2.grad)):
        assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_rejects_bad_shapes():
    h, w, t = _leaves(8, 4, 10)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:5])
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, t, 0)


def test_no_gradient_work_without_grad_mode():
    """Under no_grad (validation) the same loss, and nothing to backpropagate."""
    h, w, t = _leaves(20, 8, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, 6)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(h.detach(), w.detach(), t))


def test_triton_kernel_inside_the_loss(monkeypatch):
    """The chunked loss with the Triton cross-entropy kernel (interpreter, fp32), as CUDA runs it."""
    import kernels
    from nsa_lit import loss as loss_module

    h, w, t = _leaves(30, 8, 70, dtype=torch.float32)
    t[4] = IGNORE_INDEX
    monkeypatch.setattr(loss_module.kernels, "xent_grad",
                        lambda *a: kernels.dispatch.xent_grad(*a, backend="triton"))
    loss = linear_cross_entropy(h, w, t, 11)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _reference(h2, w2, t)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)
