"""Triton sliding-window attention against the PyTorch reference.

CPU: the Triton interpreter (TRITON_INTERPRET=1, set by conftest), float32 only, small shapes.
GPU (``-m gpu``): bf16 at realistic shapes against a float32 reference.
"""
import pytest
import torch

from kernels import dispatch
from kernels.sliding_window import reference
from kernels.sliding_window import triton_kernel as tk


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(B, T, H, Hk, Dqk, Dv, dtype=torch.float32, device="cpu"):
    q = torch.randn(B, T, H, Dqk, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, T, Hk, Dqk, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, T, Hk, Dv, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def _run(fn, q, k, v, window, scale, do):
    o = fn(q, k, v, window, scale)
    grads = torch.autograd.grad(o, (q, k, v), do)
    return o, grads


def _compare_cpu(B, T, H, Hk, Dqk, Dv, window, cfg=None):
    q, k, v = _inputs(B, T, H, Hk, Dqk, Dv)
    scale = Dqk ** -0.5
    do = torch.randn(B, T, H, Dv)
    o, g = _run(lambda *a: tk._sliding_window_attention(*a, cfg=cfg), q, k, v, window, scale, do)
    o_ref, g_ref = _run(reference.sliding_window_attention, q, k, v, window, scale, do)
    assert o.dtype == q.dtype and o.shape == (B, T, H, Dv)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    for name, a, b in zip("qkv", g, g_ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


# B, T, H, Hk, Dqk, Dv, window, launch config (None: the interpreter default, 16x16 tiles,
# two heads per tile, edge-only masking); configs are (BLOCK_M, BLOCK_N, GP, SPLIT, warps, stages)
CPU_CASES = [
    # window larger than a tile, smaller than T; GQA 4:2
    (2, 64, 4, 2, 32, 32, 20, None),
    # T not a multiple of any tile, window smaller than a tile, GQA 4:1, padded 24 / 16 dims
    (1, 100, 4, 1, 24, 16, 7, None),
    # window larger than T, MHA, split 48 = 32 + 16 and padded Dv 24
    (1, 50, 2, 2, 48, 24, 200, None),
    # MLA shape 96 = 64 + 32 / 64, four heads packed per tile, unequal tiles
    (1, 96, 4, 1, 96, 64, 33, {"fwd": (32, 16, 4, 1, 4, 1), "dq": (32, 16, 1, 0, 4, 1),
                               "dkdv": (32, 16, 4, 0, 4, 1)}),
    # one head per tile everywhere, key tiles wider than query tiles, window = tile
    (1, 128, 4, 2, 16, 16, 16, {"fwd": (16, 32, 1, 0, 4, 1), "dq": (16, 32, 1, 1, 4, 1),
                                "dkdv": (16, 32, 1, 2, 4, 1)}),
    # 40 = 32 + 16 (second part padded), GQA 8:2 with 4 heads per tile, edge-only masking
    (2, 77, 8, 2, 40, 24, 30, {"fwd": (32, 16, 4, 2, 4, 1), "dq": (32, 16, 4, 2, 4, 1),
                               "dkdv": (32, 32, 4, 2, 4, 1)}),
    # window = T
    (1, 64, 2, 1, 16, 16, 64, None),
    # TMA tiles (32/32) reaching past T = 100, a whole number of no tile
    (1, 100, 4, 2, 32, 32, 20, None),
]


@pytest.mark.parametrize("B,T,H,Hk,Dqk,Dv,window,cfg", CPU_CASES)
def test_matches_reference_fp32(B, T, H, Hk, Dqk, Dv, window, cfg):
    _compare_cpu(B, T, H, Hk, Dqk, Dv, window, cfg)


@pytest.mark.parametrize("case,tma", [(0, True), (3, True), (4, True), (7, True), (1, False),
                                      (2, False), (5, False)])
def test_descriptors_where_tiles_are_whole_head_dims(case, tma):
    """K/V tiles (forward, dq) and q/dO tiles (dk/dv) come through TMA descriptors exactly where
    no tile has padding columns (which would read the next head's): 32/32, 96 = 64 + 32 / 64
    and 16/16 do; 24/16, 48/24 and 40/24 keep row loads. Both kinds of CPU_CASES above match
    the reference."""
    B, T, H, Hk, Dqk, Dv, window, _ = CPU_CASES[case]
    q, k, v = _inputs(B, T, H, Hk, Dqk, Dv)
    do = torch.randn(B, T, H, Dv)
    consts = tk._consts(q, k, v, window)
    assert tk._tile_descriptors(k, v, consts, None)[3] == tma
    assert tk._tile_descriptors(q, do, consts, None)[3] == tma
    assert not tk._tile_descriptors(k, v, consts, {"tma": False})[3]
    assert not tk._tile_descriptors(q, do, consts, {"tma": False})[3]


def test_row_loads_where_tma_could_serve():
    """``cfg["tma"] = False``: the MLA case with K/V and q/dO tiles loaded by row offsets."""
    B, T, H, Hk, Dqk, Dv, window, cfg = CPU_CASES[3]
    _compare_cpu(B, T, H, Hk, Dqk, Dv, window, {**cfg, "tma": False})


def test_block_hooks_follow_the_configuration():
    """The autotuned kernels get descriptors before a configuration is chosen; the
    configurations' pre-hooks give their tiles that configuration's shape: BLOCK_N keys
    (forward, dq), BLOCK_M // GP tokens x GP heads (dk/dv)."""
    q, k, v = _inputs(1, 64, 4, 1, 96, 64)
    kd1, kd2, vd, tma = tk._tile_descriptors(k, v, tk._consts(q, k, v, 32), None)
    assert tma
    for tuned in (tk._fwd_tuned, tk._dq_tuned):
        cfg = tuned.configs[0]
        assert cfg.pre_hook is tk._kv_block_hook
        cfg.pre_hook({"TMA": True, "KD1": kd1, "KD2": kd2, "VD": vd, **cfg.kwargs})
        n = cfg.kwargs["BLOCK_N"]
        assert [list(d.block_shape) for d in (kd1, kd2, vd)] == [[1, n, 1, 64], [1, n, 1, 32],
                                                                  [1, n, 1, 64]]
    do = torch.randn(1, 64, 4, 64)
    qd1, qd2, dod, tma = tk._tile_descriptors(q, do, tk._consts(q, k, v, 32), None)
    assert tma
    cfg = tk._dkdv_tuned.configs[0]
    assert cfg.pre_hook is tk._qdo_block_hook
    cfg.pre_hook({"TMA": True, "QD1": qd1, "QD2": qd2, "DOD": dod, **cfg.kwargs})
    bt, gp = cfg.kwargs["BLOCK_M"] // cfg.kwargs["GP"], cfg.kwargs["GP"]
    assert [list(d.block_shape) for d in (qd1, qd2, dod)] == [[1, bt, gp, 64], [1, bt, gp, 32],
                                                               [1, bt, gp, 64]]
    for tuned, hook in ((tk._fwd_tuned, tk._kv_block_hook), (tk._dq_tuned, tk._kv_block_hook),
                        (tk._dkdv_tuned, tk._qdo_block_hook)):  # pruning keeps the hooks
        assert all(c.pre_hook is hook for c in tk._prune(tuned.configs, {"G": 4}))
    tk._kv_block_hook({"TMA": False, "KD1": k, "KD2": k, "VD": v, "BLOCK_N": 64})  # no-op
    tk._qdo_block_hook({"TMA": False, "QD1": q, "QD2": q, "DOD": do, "BLOCK_M": 64, "GP": 2})


def test_window_one_attends_itself():
    q, k, v = _inputs(1, 40, 2, 1, 16, 16)
    o = tk.sliding_window_attention(q, k, v, 1, 0.25)
    torch.testing.assert_close(o, v.repeat_interleave(2, dim=2), atol=1e-6, rtol=1e-6)
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert dq.abs().max() < 1e-6 and dk.abs().max() < 1e-6
    torch.testing.assert_close(dv, do.view(1, 40, 1, 2, 16).sum(3), atol=1e-6, rtol=1e-6)


def test_non_contiguous_inputs_and_dispatch():
    B, T, H, Hk, D = 1, 48, 4, 2, 32
    qkv = torch.randn(B, T, H + 2 * Hk, D)
    q, k, v = (x.requires_grad_() for x in qkv.split([H, Hk, Hk], dim=2))
    kt = torch.randn(B, D, T, Hk).permute(0, 2, 3, 1).requires_grad_()  # last dim strided
    do = torch.randn(B, T, H, D)
    o, g = _run(lambda *a: dispatch.sliding_window_attention(*a, backend="triton"),
                q, kt, v, 24, 0.2, do)
    o_ref, g_ref = _run(reference.sliding_window_attention, q, kt, v, 24, 0.2, do)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_split_dim():
    assert tk._split_dim(96) == (64, 32)
    assert tk._split_dim(64) == (64, 0)
    assert tk._split_dim(24) == (32, 0)
    assert tk._split_dim(80) == (64, 16)
    assert tk._split_dim(8) == (16, 0)


@pytest.mark.parametrize("shapes,window,match", [
    (((1, 8, 3, 16), (1, 8, 2, 16), (1, 8, 2, 16)), 4, "H=3 must be a multiple of .* Hk=2"),
    (((1, 8, 2, 300), (1, 8, 1, 300), (1, 8, 1, 16)), 4, "Dqk=300"),
    (((1, 8, 2, 16), (1, 8, 1, 16), (1, 8, 1, 512)), 4, "Dv=512"),
    (((1, 8, 2, 16), (1, 9, 1, 16), (1, 9, 1, 16)), 4, "k must have shape"),
    (((1, 8, 2, 16), (1, 8, 1, 16), (1, 8, 2, 16)), 4, "v must have shape"),
    (((1, 8, 2, 16), (1, 8, 1, 16), (1, 8, 1, 16)), 0, "window"),
])
def test_clear_errors(shapes, window, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        tk.sliding_window_attention(q, k, v, window, 0.1)


def test_dtype_mismatch_error():
    q = torch.randn(1, 8, 2, 16)
    k = torch.randn(1, 8, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        tk.sliding_window_attention(q, k, k, 4, 0.1)


# ------------------------------------------------------------------------------------- GPU


def _compare_gpu(B, T, H, Hk, Dqk, Dv, window, dtype=torch.bfloat16, cfg=None, tol=1e-2):
    q, k, v = _inputs(B, T, H, Hk, Dqk, Dv, dtype=dtype, device="cuda")
    scale = Dqk ** -0.5
    do = torch.randn(B, T, H, Dv, dtype=dtype, device="cuda")
    o, g = _run(lambda *a: tk._sliding_window_attention(*a, cfg=cfg), q, k, v, window, scale, do)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    q32, k32, v32 = (x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v))
    o_ref, g_ref = _run(reference.sliding_window_attention, q32, k32, v32, window, scale,
                        do.to(ref_dtype))
    assert o.dtype == dtype
    errors = {"o": _rel(o, o_ref), **{f"d{n}": _rel(a, b) for n, a, b in zip("qkv", g, g_ref)}}
    for name, x in [("o", o), *zip(("dq", "dk", "dv"), g)]:
        assert not torch.isnan(x).any(), name
    assert max(errors.values()) < tol, errors


@pytest.mark.gpu
def test_gpu_bf16_mla_shape():
    _compare_gpu(1, 4096, 16, 1, 96, 64, 512)


@pytest.mark.gpu
def test_gpu_bf16_gqa_shape():
    _compare_gpu(1, 4096, 32, 2, 64, 64, 512)


@pytest.mark.gpu
def test_gpu_bf16_head_dim_128_odd_length():
    cfg = {"fwd": (128, 64, 4, 0, 8, 3), "dq": (128, 64, 4, 0, 8, 3),
           "dkdv": (32, 128, 4, 0, 8, 3)}
    _compare_gpu(2, 1000, 8, 2, 128, 128, 300, cfg=cfg)


@pytest.mark.gpu
def test_gpu_fp16():
    cfg = {"fwd": (128, 64, 2, 2, 8, 3), "dq": (128, 64, 2, 2, 8, 3),
           "dkdv": (32, 128, 2, 2, 8, 3)}
    _compare_gpu(2, 700, 4, 2, 96, 64, 200, dtype=torch.float16, cfg=cfg)


@pytest.mark.gpu
def test_gpu_fp32():
    _compare_gpu(2, 700, 4, 2, 96, 64, 200, dtype=torch.float32, tol=1e-4)


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    # q, o, dq hold 8200 * 256 * 16 * 64 > 2**31 elements: batch offsets need 64 bits.
    B, T, H, Hk, D, window = 8200, 256, 16, 1, 64, 128
    q, k, v = _inputs(B, T, H, Hk, D, D, dtype=torch.bfloat16, device="cuda")
    assert q.numel() > 2**31
    do = torch.randn(B, T, H, D, dtype=torch.bfloat16, device="cuda")
    o = tk.sliding_window_attention(q, k, v, window, D ** -0.5)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    tail = slice(B - 2, B)
    q32, k32, v32 = (x[tail].detach().float().requires_grad_() for x in (q, k, v))
    o_ref, g_ref = _run(reference.sliding_window_attention, q32, k32, v32, window, D ** -0.5,
                        do[tail].float())
    assert _rel(o[tail], o_ref) < 1e-2
    for a, b in zip((dq, dk, dv), g_ref):
        assert _rel(a[tail], b) < 1e-2
