"""Compression-attention Triton kernel against the PyTorch reference.

CPU: Triton interpreter, float32, small shapes (forward, lse and all three gradients).
GPU (``-m gpu``): bf16/fp16 at realistic shapes against a float32 reference on the same rounded
inputs, relative error < 1e-2, no NaN.
"""
from __future__ import annotations

import pytest
import torch

from kernels import dispatch
from kernels.blocks import num_compressed
from kernels.compression import reference as ref
from kernels.compression import triton_kernel as tk

INF = float("inf")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make(B, T, H, Hk, D, Dv, block_len, stride, *, extra_n=0, dtype=torch.float32, device="cpu"):
    N = num_compressed(T, block_len, stride) + extra_n
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k = torch.randn(B, N, Hk, D, device=device).to(dtype)
    v = torch.randn(B, N, Hk, Dv, device=device).to(dtype)
    return q, k, v


def check_against_reference(q, k, v, block_len, stride, *, tol, fn=tk.compression_attention):
    scale = q.shape[-1] ** -0.5
    qk = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    qr = [x.detach().float().clone().requires_grad_(True) for x in (q, k, v)]
    o, lse = fn(*qk, block_len, stride, scale)
    o_ref, lse_ref = ref.compression_attention(*qr, block_len, stride, scale)
    assert o.dtype == q.dtype and o.shape == o_ref.shape
    assert lse.dtype == torch.float32 and not lse.requires_grad
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    seen = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), seen)
    assert (lse[~seen] == -INF).all()
    assert (o.float()[~seen] == 0).all()
    assert rel(o, o_ref) < tol
    if seen.any():
        assert (lse[seen] - lse_ref[seen]).abs().max().item() < 1e-3
    do = torch.randn_like(o_ref)
    grads = torch.autograd.grad(o, qk, do.to(o.dtype))
    grads_ref = torch.autograd.grad(o_ref, qr, do)
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert g.dtype == q.dtype and g.shape == gr.shape
        assert not torch.isnan(g).any(), name
        assert rel(g, gr) < tol, (name, rel(g, gr))


# ------------------------------------------------------------------------------------------
# interpreter (CPU) or GPU, float32, small shapes
# ------------------------------------------------------------------------------------------

SMALL = [
    # B, T, H, Hk, D, Dv, block_len, stride
    (2, 64, 4, 2, 24, 16, 8, 4),     # GQA 4:2, non-power-of-2 qk dim
    (1, 100, 4, 1, 32, 32, 8, 4),    # 4:1, T not a multiple of anything
    (1, 128, 4, 4, 24, 16, 16, 8),   # 4:4 (up-projected form)
    (1, 72, 6, 2, 40, 24, 8, 4),     # 3 heads per group (padded), dims 40/24
]


@pytest.mark.parametrize("shape", SMALL)
def test_matches_reference_fp32(shape):
    B, T, H, Hk, D, Dv, l, s = shape
    q, k, v = make(B, T, H, Hk, D, Dv, l, s)
    check_against_reference(q, k, v, l, s, tol=1e-4)


@pytest.mark.parametrize("shape", [
    (2, 70, 8, 2, 48, 32, 8, 4),   # 4 heads per group, 48 = 32 + 16, T not a tile multiple
    (1, 64, 2, 2, 48, 32, 8, 4),   # one head per group (up-projected form)
    (1, 64, 4, 1, 32, 16, 8, 4),   # one-tile head dims
])
def test_tma_tiles_match_reference(shape):
    """Head dims that are whole tiles: the streamed K/V (forward, dq) and q/dO (dk/dv) tiles go
    through TMA descriptors, tiles past N or T reading zeros."""
    B, T, H, Hk, D, Dv, l, s = shape
    q, k, v = make(B, T, H, Hk, D, Dv, l, s)
    rep = H // Hk
    da, db = tk.split_dim(D)
    for kind in ("fwd", "dq", "dkdv"):
        cfg = tk._config(kind, rep, 0, False, q.device)
        assert tk._kv_descriptors(k, v, cfg, da, db, Dv)[3]
        assert tk._qdo_descriptors(q, torch.empty(B, T, H, Dv), cfg, rep, rep, da, db, Dv)[3]
    check_against_reference(q, k, v, l, s, tol=1e-4)


def test_masked_tails_keep_row_loads():
    """Dqk 24 = 16 + 8 and 3 heads per group: a descriptor tile would read the next head's
    columns or rows, so the kernels keep row-offset loads."""
    q, k, v = make(1, 72, 6, 2, 24, 24, 8, 4)
    cfg = tk._config("dkdv", 4, 0, False, q.device)
    assert not tk._kv_descriptors(k, v, cfg, 16, 16, 32)[3]
    assert not tk._qdo_descriptors(q, torch.empty(1, 72, 6, 24), cfg, 3, 4, 16, 16, 32)[3]
    check_against_reference(q, k, v, 8, 4, tol=1e-4)


@pytest.mark.parametrize("splits", [1, 3])
def test_query_splits_and_extra_tokens(splits, monkeypatch):
    """dk/dv written by one program per key tile (no fp32 partials) or summed over the fp32
    partials of several query chunks per key tile (3 asked; 2 here, as chunks round up to whole
    query tiles); compressed tokens that no query of the sequence can see."""
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"dkdv": {"SPLITS": splits}})
    q, k, v = make(1, 64, 4, 2, 16, 16, 8, 4, extra_n=3)
    check_against_reference(q, k, v, 8, 4, tol=1e-4)



def test_dkdv_split_plan():
    """Query chunks of the dk/dv pass: enough for the GPU's multiprocessors, none longer than
    MAX_SPLIT_TOKENS, whole query tiles, an asked count rounded to what whole tiles allow."""
    # the H200 shapes: 64 key tiles x 16 heads, 132 multiprocessors, 64-token query tiles
    assert tk._dkdv_splits(65536, 1024, 64, None, 132) == (4, 16384)  # length cap
    assert tk._dkdv_splits(8192, 1024, 64, None, 132) == (2, 4096)  # occupancy (batch 8)
    assert tk._dkdv_splits(8192, 8192, 64, None, 132) == (1, 8192)  # programs enough
    assert tk._dkdv_splits(8192, 32, 64, None, 132) == (32, 256)  # 33 asked, whole tiles
    assert tk._dkdv_splits(100, 1, 64, 5, 132) == (2, 64)  # only 2 whole tiles
    assert tk._dkdv_splits(65536, 1024, 64, 1, 132) == (1, 65536)  # asked: no split
    for T in (1, 63, 4097, 65536, 100_000):
        splits, chunk = tk._dkdv_splits(T, 64, 64, None, 132)
        assert chunk % 64 == 0 and (splits - 1) * chunk < T <= splits * chunk

def test_strided_inputs_and_dispatch():
    """Head-sliced (non-contiguous, row-major) inputs, called through the dispatcher."""
    B, T, H, Hk, D, Dv, l, s = 1, 48, 4, 2, 16, 16, 8, 4
    N = num_compressed(T, l, s)
    q = torch.randn(B, T, H + 2, D)[:, :, 1:H + 1]
    k = torch.randn(B, N, Hk + 1, D)[:, :, :Hk]
    v = torch.randn(B, N, Hk, Dv)
    assert not q.is_contiguous()

    def run(q, k, v, l, s, scale):
        return dispatch.compression_attention(q, k, v, l, s, scale, backend="triton")

    check_against_reference(q, k, v, l, s, tol=1e-4, fn=run)


def test_no_visible_token():
    """T < block_len: no compressed token at all; zero output, -inf lse, zero gradients."""
    q = torch.randn(1, 6, 4, 16, requires_grad=True)
    k = torch.randn(1, 0, 2, 16, requires_grad=True)
    v = torch.randn(1, 0, 2, 16, requires_grad=True)
    o, lse = tk.compression_attention(q, k, v, 8, 4, 0.25)
    o_ref, lse_ref = ref.compression_attention(q, k, v, 8, 4, 0.25)
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
    assert (o == 0).all() and (lse == -INF).all()
    (dq,) = torch.autograd.grad(o.sum(), (q,))
    assert (dq == 0).all()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: (q, k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1)),
         "multiple of key/value heads"),
        (lambda q, k, v: (q, k.double(), v), "dtype"),
        (lambda q, k, v: (q, k[..., :8], v), "head dim"),
        (lambda q, k, v: (q, k, v[:, :-1]), "compressed tokens"),
        (lambda q, k, v: (q[0], k, v), "4-D"),
        (lambda q, k, v: (torch.randn(1, 8, 4, 300), torch.randn(1, 1, 2, 300), v[:, :1]),
         "head dim"),
    ],
)
def test_clear_errors(mutate, match):
    q, k, v = make(1, 16, 4, 2, 16, 16, 8, 4)
    q, k, v = mutate(q, k, v)
    with pytest.raises(ValueError, match=match):
        tk.compression_attention(q, k, v, 8, 4, 0.25)


@pytest.mark.parametrize("bad", [{"block_len": 0}, {"stride": 0}, {"stride": 2.5}])
def test_clear_errors_block_geometry(bad):
    q, k, v = make(1, 16, 4, 2, 16, 16, 8, 4)
    args = {"block_len": 8, "stride": 4, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        tk.compression_attention(q, k, v, args["block_len"], args["stride"], 0.25)


# ------------------------------------------------------------------------------------------
# GPU: bf16 at realistic shapes
# ------------------------------------------------------------------------------------------

GPU_SHAPES = {
    # name: B, T, H, Hk, D, Dv, block_len, stride
    "asa_absorbed_gla": (1, 4096, 16, 2, 160, 128, 32, 16),
    "nsa_gqa": (1, 4096, 16, 4, 64, 64, 32, 16),
    "asa_upprojected": (1, 4096, 16, 16, 96, 64, 32, 16),
    "odd_lengths": (2, 1000, 8, 2, 96, 64, 32, 16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "row_loads"])
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_gpu_bf16(name, tma, monkeypatch):
    """Every shape with the streamed tiles through descriptors (where they serve) and by row
    offsets."""
    if not tma:
        monkeypatch.setattr(tk, "CONFIG_OVERRIDE",
                            {kind: {"TMA": False} for kind in ("fwd", "dq", "dkdv")})
    B, T, H, Hk, D, Dv, l, s = GPU_SHAPES[name]
    q, k, v = make(B, T, H, Hk, D, Dv, l, s, dtype=torch.bfloat16, device="cuda")
    check_against_reference(q, k, v, l, s, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(dtype):
    q, k, v = make(2, 777, 8, 2, 160, 128, 32, 16, dtype=dtype, device="cuda")
    check_against_reference(q, k, v, 32, 16, tol=1e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.gpu
def test_gpu_large_head_dims():
    q, k, v = make(1, 512, 4, 1, 256, 256, 32, 16, dtype=torch.bfloat16, device="cuda")
    check_against_reference(q, k, v, 32, 16, tol=1e-2)


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """B * T * H * D past 2**31 elements: the last sequence must be as right as the first."""
    B, T, H, Hk, D, Dv, l, s = 512, 2048, 16, 2, 160, 128, 32, 16
    assert B * T * H * D > 2**31
    q, k, v = make(B, T, H, Hk, D, Dv, l, s, dtype=torch.bfloat16, device="cuda")
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    scale = D ** -0.5
    o, lse = tk.compression_attention(q, k, v, l, s, scale)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    for b in (0, B - 1):
        qr, kr, vr = (x[b:b + 1].detach().float().requires_grad_(True) for x in (q, k, v))
        o_ref, lse_ref = ref.compression_attention(qr, kr, vr, l, s, scale)
        g_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do[b:b + 1].float())
        assert rel(o[b:b + 1], o_ref) < 1e-2
        seen = torch.isfinite(lse_ref)
        assert (lse[b:b + 1][seen] - lse_ref[seen]).abs().max().item() < 1e-2
        for g, gr in zip(grads, g_ref):
            assert rel(g[b:b + 1], gr) < 1e-2
