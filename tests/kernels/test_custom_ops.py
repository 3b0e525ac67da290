"""The Triton training kernels as custom operators (:mod:`kernels.ops`): registrations that
``torch.compile`` can trace (``opcheck``: schema, fake outputs against the real ones, autograd
registration), and a compiled model whose blocks are one graph each, without a graph break,
computing the eager model's logits and gradients.

CPU: the Triton interpreter (conftest), float32, small shapes.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.blocks import num_compressed
from kernels.selected_attention import triton_kernel as selected_tk
from test_selected_attention_triton import random_block_idx

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
B, T, H, HK, D = 1, 32, 4, 2, 16
BLOCK_LEN, STRIDE, SELECT, Q_SHARE = 8, 4, 16, 4


def _randn(*shape, grad=True):
    return torch.randn(*shape, device=DEV, requires_grad=grad)


def _compressed():
    return num_compressed(T, BLOCK_LEN, STRIDE)


def _window_args():
    return (_randn(B, T, H, D), _randn(B, T, HK, D), _randn(B, T, HK, D), 8, 0.25, "")


def _compression_args():
    n = _compressed()
    return (_randn(B, T, H, D), _randn(B, n, HK, D), _randn(B, n, HK, D), BLOCK_LEN, STRIDE, 0.25)


def _selection_args():
    q, k_cmp, v_cmp, *_ = _compression_args()
    _, lse = torch.ops.nsa_lit.compression_attention(q, k_cmp, v_cmp, BLOCK_LEN, STRIDE, 0.25)
    return (q.detach(), k_cmp.detach(), lse, HK, BLOCK_LEN, STRIDE, SELECT, 2, 1, Q_SHARE, 0.25)


def _selected_args(values_in_keys: bool, config: str = "", d: int = D, value_dim: int = 8):
    q, k = _randn(B, T, H, d), _randn(B, T, HK, d)
    v, value_dim = (None, value_dim) if values_in_keys else (_randn(B, T, HK, 8), None)
    block_idx = random_block_idx(B, T, HK, 2, SELECT, Q_SHARE).to(DEV)
    return (q, k, v, block_idx, SELECT, 0.25, Q_SHARE, value_dim, config)


CASES = {
    "sliding_window": ("sliding_window_attention", _window_args),
    "compression": ("compression_attention", _compression_args),
    "selection": ("select_blocks", _selection_args),
    "selected": ("selected_attention", lambda: _selected_args(False)),
    "selected_values_in_keys": ("selected_attention", lambda: _selected_args(True)),
    "selected_shared_chunks": ("selected_attention", lambda: _selected_args(
        False, selected_tk.encode_config(selected_tk.Config(union_groups=1)))),
    # keys over 256 columns, values the first 256 (the 1.3B ASA global layer's latent): the
    # WIDE plan, whose dk/dv pass chunks the queries differently from the forward
    "selected_wide_latent": ("selected_attention", lambda: _selected_args(
        True, d=288, value_dim=256)),
}


@pytest.mark.parametrize("case", CASES)
def test_training_operators_pass_opcheck(case):
    """Schema, fake outputs (shapes, dtypes, strides) equal to the real ones, autograd
    registration, and the operator traced by AOTAutograd (forward and backward operators)."""
    torch.manual_seed(0)
    name, make = CASES[case]
    torch.library.opcheck(getattr(torch.ops.nsa_lit, name).default, make())


@pytest.mark.parametrize("values_in_keys", [False, True])
def test_selected_attention_backward_operator_matches_reference(values_in_keys):
    """The backward operator's gradients (``dk`` holding the values' when they are the keys')
    against the PyTorch reference's, through the public function."""
    torch.manual_seed(1)
    q, k, v, block_idx, select, scale, q_share, value_dim, _ = _selected_args(values_in_keys)
    got = selected_tk.selected_attention(q, k, v, block_idx, select, scale, q_share,
                                         value_dim=value_dim)
    want = kernels.selected_attention(q, k, v, block_idx, select, scale, q_share,
                                      backend="reference", value_dim=value_dim)
    do = torch.randn_like(want)
    inputs = [x for x in (q, k, v) if x is not None]
    grads = torch.autograd.grad(got, inputs, do)
    expected = torch.autograd.grad(want, inputs, do)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_have_no_graph_break(monkeypatch):
    """``Transformer.compile_blocks`` with the Triton kernels: one graph per block (local:
    window; global: compression, selection, selected attention) and one more per block once a
    second length makes the shapes dynamic, no graph break even where the kernel modules are
    first loaded inside the compiled code, and the eager model's logits and parameter
    gradients at both lengths."""
    from torch._dynamo.utils import counters

    from nsa_lit.model import Transformer
    from test_model import config

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = config("asa", select_block=SELECT, compress_block=BLOCK_LEN * 2,
                 compress_stride=STRIDE * 2, window=16, kernel_backend="triton")
    model = Transformer(cfg).to(DEV)
    tokens = torch.randint(0, cfg.vocab_size, (1, 64), device=DEV)

    def run(length):
        model.zero_grad()
        logits = model(tokens[:, :length])
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager = {length: run(length) for length in (64, 48)}
    monkeypatch.setattr(kernels.dispatch, "_loaded", {})  # loaded again while compiling
    model.compile_blocks()
    for length, (logits, grads) in eager.items():
        got_logits, got_grads = run(length)
        torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)
        for n, g in got_grads.items():
            torch.testing.assert_close(g, grads[n], rtol=1e-4, atol=1e-5, msg=n)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2 + 2  # LG at 64 tokens, again at dynamic T
    torch._dynamo.reset()
