"""Triton selected-block attention vs the PyTorch reference.

CPU: the Triton interpreter (TRITON_INTERPRET=1, set by conftest), float32 only, small shapes.
GPU (``-m gpu``): bf16 at T=4096 for the three layouts that matter, against a float32 reference.
"""
from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from kernels.blocks import num_compressed
from kernels.compression.reference import compression_attention
from kernels.selected_attention import reference as ref
from kernels.selected_attention import triton_kernel as tk
from kernels.selection.reference import select_blocks, top_n_blocks

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def random_block_idx(B, T, G, n, select_block, q_share, *, gen=None, drop_current=False):
    """Random valid index sets: ascending, -1 padded, the current block always included (unless
    ``drop_current``), a random number of earlier blocks, identical inside each q_share group."""
    nb = math.ceil(T / select_block)
    first = torch.arange(T) // q_share * q_share
    cur = first // select_block  # (T,)
    score = torch.rand(B, T, G, nb, generator=gen)
    score = score[:, first]  # share within q_share groups
    blocks = torch.arange(nb)
    visible = blocks[None, :] < cur[:, None]
    count = torch.randint(0, n, (B, T, G), generator=gen)[:, first]  # earlier blocks per row
    score = score.masked_fill(~visible[None, :, None, :], -1.0)
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
    keep = (rank < count[..., None]) & visible[None, :, None, :]
    if not drop_current:
        keep |= (blocks[None, :] == cur[:, None])[None, :, None, :]
    idx = torch.where(keep, blocks.expand_as(keep), torch.full_like(rank, nb))
    idx = idx.sort(dim=-1).values[..., :n]
    idx = torch.where(idx == nb, torch.full_like(idx, -1), idx)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], n - idx.shape[-1]), -1)], dim=-1)
    return idx


def make_qkv(B, T, H, HK, D, DV, dtype=torch.float32, device=DEV, gen=None):
    q = torch.randn(B, T, H, D, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, T, HK, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, T, HK, DV, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(q, k, v, block_idx, select_block, q_share, *, config=None, ref_dtype=torch.float64,
            tol=1e-5):
    scale = q.shape[-1] ** -0.5
    qt, kt, vt = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = tk.selected_attention(qt, kt, vt, block_idx, select_block, scale, q_share,
                                config=config)
    do = torch.randn_like(out)
    out.backward(do)
    qr, kr, vr = (x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v))
    expect = ref.selected_attention(qr, kr, vr, block_idx, select_block, scale, q_share)
    expect.backward(do.to(ref_dtype))
    assert out.dtype == q.dtype and out.shape == expect.shape
    for name, got, want in (("out", out, expect), ("dq", qt.grad, qr.grad),
                            ("dk", kt.grad, kr.grad), ("dv", vt.grad, vr.grad)):
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        err = rel(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# layouts: (H, Hk, G, Dqk, Dv, q_share)
LAYOUTS = {
    "gqa": (4, 2, 2, 24, 16, 1),           # NSA GQA, 2 heads per KV head: union chunks
    "latent": (8, 2, 2, 24, 16, 4),        # GLA absorbed: 4 queries x 4 heads = 16 shared rows
    "upproj": (4, 4, 2, 24, 16, 4),        # per-head K/V, shared selection: union chunks
}


# ------------------------------------------------------------------------- interpreter (CPU)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_select_blocks_indices(layout):
    """block_idx produced by the selection reference on random inputs."""
    H, HK, G, D, DV, qs = LAYOUTS[layout]
    B, T, sb, n, blen, stride = 1, 64, 16, 3, 8, 4
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(B, T, H, HK, D, DV, gen=gen)
    N = num_compressed(T, blen, stride)
    k_cmp = torch.randn(B, N, HK, D, generator=gen)
    v_cmp = torch.randn(B, N, HK, DV, generator=gen)
    scale = D ** -0.5
    _, lse = compression_attention(q, k_cmp, v_cmp, blen, stride, scale)
    block_idx = select_blocks(q, k_cmp, lse, num_groups=G, block_len=blen, stride=stride,
                              select_block=sb, top_n=n, num_local=1, q_share=qs, scale=scale)
    compare(q, k, v, block_idx, sb, qs)


@pytest.mark.parametrize("layout,T", [("gqa", 54), ("latent", 64), ("upproj", 45)])
def test_random_index_sets(layout, T):
    """Random valid index sets with a random number of blocks; T not a multiple of the tiles."""
    H, HK, G, D, DV, qs = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(1, T, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(1, T, G, 3, 16, qs, gen=gen)
    compare(q, k, v, block_idx, 16, qs)


@pytest.mark.parametrize("H,HK,G,qs", [(4, 1, 2, 2), (4, 2, 1, 2), (2, 2, 2, 1)])
def test_other_head_groupings(H, HK, G, qs):
    """G > Hk (one KV head, two groups), G < Hk, and one head per group."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 48, H, HK, 16, 24, gen=gen)
    block_idx = random_block_idx(2, 48, G, 3, 16, qs, gen=gen)
    compare(q, k, v, block_idx, 16, qs)


@pytest.mark.parametrize("config", [
    tk.Config(bwd="atomic_kv"),
    tk.Config(bwd="atomic_q", seg=2),
    tk.Config(seg=2),
    tk.Config(fwd_order="keys", dq_order="rows"),
    tk.Config(tok=4),        # padded shared chunks instead of union chunks
    tk.Config(dkdv_tok=4),   # union chunks for forward and dq, shared ones for dk/dv
], ids=["atomic_kv", "atomic_q", "seg2", "keys_rows_order", "tok4", "dkdv_tok4"])
def test_variants(config):
    H, HK, G, D, DV, qs = LAYOUTS["upproj"]
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 48, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(1, 48, G, 3, 16, qs, gen=gen)
    compare(q, k, v, block_idx, 16, qs, config=config)


@pytest.mark.parametrize("config", [
    None, tk.Config(union_groups=1), tk.Config(dkdv_tok=8), tk.Config(tok=8, union_groups=1),
    tk.Config(union_groups=4, max_rows=128),
    tk.Config(union_groups=1, fwd_order="keys", dq_order="keys"),
], ids=["default", "one_group", "union_dkdv", "tok8", "union4", "one_group_keys"])
def test_latent_chunk_plans(config):
    """GLA layout: 8-query union chunks (two q_share groups) for forward and dq with the 4-query
    shared chunks for dk/dv (default), one group per chunk throughout, union chunks for dk/dv
    too, tok=8 given directly, 16-query chunks (four groups), and one group per chunk with
    keys-major products (key rows fill the tile's M side)."""
    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(1, 64, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(1, 64, G, 3, 16, qs, gen=gen)
    compare(q, k, v, block_idx, 16, qs, config=config)


def _chunk_lists_oracle(block_idx, p):
    """Python sets: per (batch, chunk, group) the valid blocks of the chunk's first tokens."""
    B, T, G, n = block_idx.shape
    ng, step = (p.TOK // p.QS, p.QS) if p.UNION else (1, p.TOK)
    out = torch.full((B, p.NC, G, p.L), -1, dtype=torch.int32)
    for b in range(B):
        for c in range(p.NC):
            for g in range(G):
                rows = [block_idx[b, t, g].tolist() for t in range(c * ng * step,
                                                                      (c + 1) * ng * step, step)
                        if t < T]
                blocks = sorted({j for row in rows for j in row if 0 <= j < p.NB})
                out[b, c, g, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return out


@pytest.mark.parametrize("H,HK,G,qs,config,n", [
    (8, 2, 2, 4, None, 3),                          # latent: union of 2 q_share groups
    (8, 2, 2, 4, tk.Config(union_groups=1), 3),      # latent: shared chunks
    (4, 2, 2, 1, None, 5),                          # GQA: union of 8 single-query groups
    (4, 4, 2, 4, None, 16),                         # per-head K/V: 4 groups x 16 = 64 entries
    (4, 4, 1, 2, tk.Config(tok=16), 16),            # 8 groups x 16 = 128 entries
])
def test_chunk_lists_are_sorted_unique_valid_blocks(H, HK, G, qs, config, n):
    """The chunk-list kernel on messy rows (unsorted, repeated, negative and out-of-range
    entries) against Python sets; T not a multiple of the chunk."""
    T, sb = 70, 16
    gen = torch.Generator().manual_seed(17)
    block_idx = torch.randint(-3, math.ceil(T / sb) + 3, (2, T, G, n), generator=gen)
    q, k, v = make_qkv(2, T, H, HK, 16, 16, gen=gen)
    p = tk._plan(q, k, v, block_idx, sb, qs, config or tk.DEFAULT_CONFIG)
    assert torch.equal(tk._chunk_lists(block_idx, p), _chunk_lists_oracle(block_idx, p))


@pytest.mark.parametrize("seg", [1, 2, 3, 64])
def test_segments_invert_the_chunk_lists_in_chunk_order(seg):
    """CSR of the dk/dv pass: per (batch, group, key block) the chunks that list the block,
    ascending, cut into segments of at most ``seg``; the padding segments are empty."""
    T, sb, G = 70, 16, 2
    gen = torch.Generator().manual_seed(5)
    block_idx = torch.randint(-2, math.ceil(T / sb) + 2, (2, T, G, 3), generator=gen)
    q, k, v = make_qkv(2, T, 8, 2, 16, 16, gen=gen)
    p = tk._plan(q, k, v, block_idx, sb, 4, tk.Config(union_groups=1))
    clist = tk._chunk_lists(block_idx, p)
    seg_key, seg_lo, seg_hi, ent_chunk, smax = tk._segments(clist, p, seg)
    got = {}
    for s_ in range(smax):
        lo, hi = int(seg_lo[s_]), int(seg_hi[s_])
        if hi > lo:
            got.setdefault(int(seg_key[s_]), []).append(ent_chunk[lo:hi].tolist())
    want = {}
    for b in range(2):
        for g in range(G):
            for c in range(p.NC):
                for j in clist[b, c, g].tolist():
                    if j >= 0:
                        want.setdefault((b * G + g) * p.NB + j, []).append(c)
    assert sorted(got) == sorted(want)
    for key, chunks in want.items():
        assert got[key] == [chunks[i:i + seg] for i in range(0, len(chunks), seg)]
    # the real segments come first, key by key; the padding after them is empty
    real = sum(-(-len(chunks) // seg) for chunks in want.values())
    assert smax >= real and seg_key[:real].diff().ge(0).all()
    assert (seg_lo[real:] == 0).all() and (seg_hi[real:] == 0).all()
    assert ((seg_key >= 0) & (seg_key < 2 * G * p.NB)).all()



def test_segments_across_many_programs():
    """The CSR kernels past one 1024-wide block: 9,600 entries (several programs per kernel),
    2,800 keys (the segment-end scan carries over three blocks), lists with repeats and
    padding, keys nobody lists; against a Python inversion."""
    _check_segments_across_many_programs("cpu")


@pytest.mark.gpu
def test_gpu_segments_across_many_programs():
    """The same, compiled."""
    _check_segments_across_many_programs("cuda")


def _check_segments_across_many_programs(device):
    B, NC, G, L, NB, seg = 2, 300, 2, 8, 700, 3
    gen = torch.Generator().manual_seed(11)
    clist = torch.randint(-1, NB, (B, NC, G, L), generator=gen, dtype=torch.int32)
    seg_key, seg_lo, seg_hi, ent_chunk, smax = (
        x.cpu() if isinstance(x, torch.Tensor) else x
        for x in tk._segments(clist.to(device), SimpleNamespace(NB=NB), seg))
    want = {}
    for b in range(B):
        for c in range(NC):
            for g in range(G):
                for j in clist[b, c, g].tolist():
                    if j >= 0:
                        want.setdefault((b * G + g) * NB + j, []).append(c)
    got = {}
    for s_ in range(smax):
        lo, hi = int(seg_lo[s_]), int(seg_hi[s_])
        if hi > lo:
            got.setdefault(int(seg_key[s_]), []).append(ent_chunk[lo:hi].tolist())
    assert len(want) < B * G * NB  # some keys have no entry
    assert got == {key: [chunks[i:i + seg] for i in range(0, len(chunks), seg)]
                   for key, chunks in want.items()}


def _meta_plan(H, HK, G, D, DV, qs, config=tk.DEFAULT_CONFIG, T=256):
    q = torch.empty(1, T, H, D, device="meta")
    k = torch.empty(1, T, HK, D, device="meta")
    return tk._plan(q, k, torch.empty(1, T, HK, DV, device="meta"),
                    torch.empty(1, T, G, 16, dtype=torch.int64, device="meta"), 64, qs, config)


def test_default_plans_of_the_model_layouts():
    """The tilings the H200 sweeps chose (module docstring): GLA absorbed 64-row union chunks
    (rows-major products) with 32-row shared chunks for dk/dv; per-head K/V and GQA 16-row
    union chunks."""
    p = _meta_plan(*GPU_LAYOUTS["gla_absorbed"])
    assert (p.HP, p.TOK, p.ROWS, p.UNION, p.KV_TOK) == (8, 8, 64, True, 4)
    assert (p.FWD_ORDER, p.DQ_ORDER) == ("rows", "rows")
    p = _meta_plan(*GPU_LAYOUTS["gla_absorbed"], config=tk.Config(union_groups=1))
    assert (p.TOK, p.ROWS, p.UNION, p.KV_TOK, p.FWD_ORDER, p.DQ_ORDER) == (
        4, 32, False, 4, "keys", "keys")
    for layout in ("gla_upprojected", "nsa_gqa"):
        p = _meta_plan(*GPU_LAYOUTS[layout])
        assert p.ROWS == 16 and p.UNION and p.KV_TOK == p.TOK
        assert (p.FWD_ORDER, p.DQ_ORDER) == ("rows", "keys")
    # an MLA-like group of 16 heads already fills 64 rows with one q_share group
    p = _meta_plan(16, 1, 1, 160, 128, 4)
    assert (p.TOK, p.ROWS, p.UNION) == (4, 64, False)


def compare_values_in_keys(q, k, DV, block_idx, select_block, q_share, *, config=None,
                           ref_dtype=torch.float64, tol=1e-5, head_major_do=False, vk=True):
    """Values given as ``v=None, value_dim=DV`` (the absorbed latent form, values
    ``k[..., :DV]``): the kernel reads them through the keys (``_Plan.VK``; ``vk=False``: values
    wider than the first key tile, read as a separate view) and the one key gradient carries dv
    too; output, dq and dk against the reference fed the view ``k[..., :DV]``.
    ``head_major_do``: the output gradient laid out ``(H, B, T, DV)`` and viewed as
    ``(B, T, H, DV)``, as the layer's ``W_uv`` up-projection returns it."""
    scale = q.shape[-1] ** -0.5
    B, T, H = q.shape[:3]
    if head_major_do:
        do = torch.randn(H, B, T, DV, dtype=q.dtype, device=q.device).permute(1, 2, 0, 3)
    else:
        do = torch.randn(B, T, H, DV, dtype=q.dtype, device=q.device)
    results = []
    for dt in (q.dtype, ref_dtype):
        qq, kk = (x.detach().to(dt).requires_grad_() for x in (q, k))
        if dt == q.dtype:
            p = tk._plan(qq, kk, None, block_idx, select_block, q_share,
                         config or tk.DEFAULT_CONFIG, value_dim=DV)
            assert p.VK == vk and p.DV == DV
            o = tk.selected_attention(qq, kk, None, block_idx, select_block, scale, q_share,
                                      value_dim=DV, config=config)
        else:
            o = ref.selected_attention(qq, kk, kk[..., :DV], block_idx, select_block, scale,
                                       q_share)
        o.backward(do.to(dt))
        results.append((o, qq.grad, kk.grad))
    for name, got, want in zip(("out", "dq", "dk"), *results):
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        err = rel(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("config", [
    None, tk.Config(bwd="atomic_kv"), tk.Config(bwd="atomic_q", seg=2),
    tk.Config(fwd_order="rows", dq_order="keys"), tk.Config(union_groups=1),
    tk.Config(one_acc=True), tk.Config(bwd="atomic_q", seg=2, one_acc=True),
], ids=["default", "atomic_kv", "atomic_q", "rows_keys_order", "one_group", "one_acc",
        "one_acc_atomic_q"])
def test_values_in_keys(config):
    """Latent layout with Dqk 24 = 16 + 8 (tiles 16 + 16) and the values the first 16 key
    columns: every backward strategy, both product orders, union and shared chunks; two
    sequences of 54 tokens (not a multiple of the 8- or 4-query chunks)."""
    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(13)
    q, k, _ = make_qkv(2, 54, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(2, 54, G, 3, 16, qs, gen=gen)
    compare_values_in_keys(q, k, DV, block_idx, 16, qs, config=config)


@pytest.mark.parametrize("config", [
    None, tk.Config(tma=False), tk.Config(bwd="atomic_kv"), tk.Config(bwd="atomic_q", seg=2),
    tk.Config(fwd_order="keys", dq_order="keys"),
], ids=["default", "gathered", "atomic_kv", "atomic_q", "keys_order"])
def test_head_major_output_gradient(config, monkeypatch):
    """dO laid out head-major, as the W_uv up-projection's backward returns it: the kernels read
    it through its strides (descriptors included), never a contiguous copy, and give the same
    gradients (Dqk 48 = 32 + 16 and values the first 32 key columns, as 160 = 128 + 32 with
    128 values in the layer, so the default plan's descriptors serve)."""
    seen = []
    backward = tk._backward

    def spy(*args, **kwargs):
        seen.append(args[5])  # the do that reaches the kernels
        return backward(*args, **kwargs)

    monkeypatch.setattr(tk, "_backward", spy)
    H, HK, G, _, _, qs = LAYOUTS["latent"]
    B, T, D, DV = 2, 54, 48, 32
    gen = torch.Generator().manual_seed(17)
    q, k, _ = make_qkv(B, T, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(B, T, G, 3, 16, qs, gen=gen)
    compare_values_in_keys(q, k, DV, block_idx, 16, qs, config=config, head_major_do=True)
    assert len(seen) == 1 and seen[0].stride() == (T * DV, DV, B * T * DV, 1)
    if config is None:
        cfg = tk.DEFAULT_CONFIG
        p = tk._plan(q, k, k[..., :DV], block_idx, 16, qs, cfg)
        p_kv = tk._dkdv_plan(q, k, k[..., :DV], block_idx, 16, qs, cfg, p)
        assert tk._chunk_descriptors(q, seen[0], p_kv, cfg)[3]


@pytest.mark.parametrize("D,values_in_keys,bwd", [
    (48, True, "csr"), (48, False, "csr"), (16, False, "csr"), (48, True, "atomic_kv"),
    (48, False, "atomic_q"),
], ids=["48_values_in_keys", "48_separate_values", "16_one_tile", "atomic_kv", "atomic_q"])
def test_key_descriptors(D, values_in_keys, bwd):
    """``Config(tma=True)``: the forward and dq kernels load key tiles, the dk/dv kernel each
    chunk's q and dO tiles, through tensor descriptors (48 = 32 + 16 columns,
    or one 16-column tile); two sequences of 54 tokens, so the last key block of each runs past
    T (rows the causal mask hides)."""
    H, HK, G, _, DV, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(21)
    q, k, v = make_qkv(2, 54, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(2, 54, G, 3, 16, qs, gen=gen)
    cfg = tk.Config(fwd_order="rows", dq_order="rows", bwd=bwd)  # tma=True: the default
    p = tk._plan(q, k, v, block_idx, 16, qs, cfg)
    assert tk._key_descriptors(k, p, cfg)[2]
    p_kv = tk._dkdv_plan(q, k, v, block_idx, 16, qs, cfg, p)
    do = torch.empty(2, 54, H, DV)
    assert tk._chunk_descriptors(q, do, p_kv, cfg)[3]
    if values_in_keys:
        compare_values_in_keys(q, k, DV, block_idx, 16, qs, config=cfg)
    else:
        compare(q, k, v, block_idx, 16, qs, config=cfg)


def test_key_descriptors_refuse_masked_tails():
    """Dqk 24 = 16 + 8 padded to 16 + 16: a descriptor tile would read the next head's columns,
    so the kernels keep gathered loads (and stay correct)."""
    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(22)
    q, k, v = make_qkv(1, 40, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(1, 40, G, 3, 16, qs, gen=gen)
    cfg = tk.Config(fwd_order="rows", dq_order="rows")
    p = tk._plan(q, k, v, block_idx, 16, qs, cfg)
    assert not tk._key_descriptors(k, p, cfg)[2]
    assert not tk._chunk_descriptors(q, torch.empty(1, 40, H, DV), p, cfg)[3]
    compare(q, k, v, block_idx, 16, qs, config=cfg)


@pytest.mark.parametrize("D,DV", [(16, 16), (24, 8), (32, 16)],
                         ids=["v_is_k", "narrower_than_tile", "half_of_one_tile"])
def test_values_in_keys_widths(D, DV):
    """Values all of a one-tile key (``v is k``) or only part of the first key tile (Dv 8 of
    16, 16 of 32): the key tile serves as the value tile, padded past Dv."""
    gen = torch.Generator().manual_seed(16)
    q, k, _ = make_qkv(1, 40, 4, 2, D, DV, gen=gen)
    block_idx = random_block_idx(1, 40, 2, 3, 16, 2, gen=gen)
    compare_values_in_keys(q, k, DV, block_idx, 16, 2)


@pytest.mark.parametrize("config", [None, tk.Config(one_acc=False)], ids=["default", "two_accs"])
def test_wide_latent_keys(config):
    """Keys over 256 columns (288 = 256 + 32, values the first 256: the 1.3B ASA global layer's
    absorbed latent): accepted, planned with the WIDE tiles (16-key tiles, 16-row chunks,
    2-token dk/dv chunks, one dk/dv accumulator by default) and correct."""
    gen = torch.Generator().manual_seed(19)
    H, HK, G, D, DV, qs = 4, 1, 1, 288, 256, 2
    q, k, _ = make_qkv(1, 40, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(1, 40, G, 2, 16, qs, gen=gen)
    cfg = config or tk.DEFAULT_CONFIG
    p = tk._plan(q, k, None, block_idx, 16, qs, cfg, value_dim=DV)
    assert (p.D1, p.D2, p.BK, p.ROWS, p.KV_TOK, p.ONE_ACC) == (256, 32, 16, 16, 2, config is None)
    compare_values_in_keys(q, k, DV, block_idx, 16, qs, config=config)


def test_values_in_keys_wider_than_the_first_key_tile():
    """``value_dim`` past the first key tile (20 of Dqk 24 = 16 + 16): the kernels read the
    values as the separate view ``k[..., :20]`` (no ``VK``) and autograd adds their gradient
    into the keys'; still correct."""
    H, HK, G, D, _, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(14)
    q, k, _ = make_qkv(1, 32, H, HK, D, 8, gen=gen)
    block_idx = random_block_idx(1, 32, G, 2, 16, qs, gen=gen)
    assert not tk._plan(q, k, None, block_idx, 16, qs, tk.DEFAULT_CONFIG, value_dim=20).VK
    compare_values_in_keys(q, k, 20, block_idx, 16, qs, vk=False)
    o, lse = tk.selected_attention_with_lse(q, k, None, block_idx, 16, D ** -0.5, qs,
                                            value_dim=20)
    assert rel(o, ref.selected_attention(q.double(), k.double(), None, block_idx, 16, D ** -0.5,
                                         qs, value_dim=20)) < 1e-5


def test_values_in_keys_of_keys_that_are_not_row_major():
    """Keys that are a column slice of a wider tensor: the kernel reads a row-major copy, values
    through its first tile, and the gradient reaches the original keys."""
    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(18)
    q, wide, _ = make_qkv(1, 40, H, HK, 2 * D, DV, gen=gen)
    k = wide[..., :D]
    assert not k.is_contiguous()
    block_idx = random_block_idx(1, 40, G, 3, 16, qs, gen=gen)
    compare_values_in_keys(q[..., :D], k, DV, block_idx, 16, qs)


def test_values_given_as_a_view_are_separate_values():
    """A view ``v = k[..., :16]`` passed as ``v`` (no ``value_dim``) is read as separate values
    (no ``VK``): the gradient reaches ``k`` through autograd, or ``v`` itself when it is its own
    leaf; both correct."""
    H, HK, G, D, _, qs = LAYOUTS["latent"]  # Dqk 24: tiles 16 + 16
    gen = torch.Generator().manual_seed(14)
    q, k, _ = make_qkv(1, 32, H, HK, D, 8, gen=gen)
    block_idx = random_block_idx(1, 32, G, 2, 16, qs, gen=gen)
    assert not tk._plan(q, k, k[..., :16], block_idx, 16, qs, tk.DEFAULT_CONFIG).VK
    qt, kt = (x.clone().requires_grad_() for x in (q, k))
    out = tk.selected_attention(qt, kt, kt[..., :16], block_idx, 16, D ** -0.5, qs)
    out.square().sum().backward()
    qr, kr = (x.double().requires_grad_() for x in (q, k))
    expect = ref.selected_attention(qr, kr, kr[..., :16], block_idx, 16, D ** -0.5, qs)
    expect.square().sum().backward()
    assert rel(out, expect) < 1e-5 and rel(qt.grad, qr.grad) < 1e-5
    assert rel(kt.grad, kr.grad) < 1e-5
    # values that alias the keys' memory but are their own autograd leaf get their own gradient
    vt, vr = k[..., :16], k.double()[..., :16]
    vt.requires_grad_(), vr.requires_grad_()
    tk.selected_attention(q, k, vt, block_idx, 16, D ** -0.5, qs).square().sum().backward()
    ref.selected_attention(q.double(), k.double(), vr, block_idx, 16, D ** -0.5,
                           qs).square().sum().backward()
    assert rel(vt.grad, vr.grad) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "reference", "dispatch", "triton_with_lse"])
@pytest.mark.parametrize("v_given,value_dim,match", [
    (True, 16, r"both a tensor v and value_dim"),
    (False, None, r"pass v, or v=None with value_dim"),
    (False, 0, r"value_dim must be an int in \[1, Dqk=24\]"),
    (False, 25, r"value_dim must be an int in \[1, Dqk=24\]"),
    (False, 16.0, r"value_dim must be an int"),
], ids=["both", "neither", "zero", "wider_than_keys", "float"])
def test_value_dim_errors(impl, v_given, value_dim, match):
    """Exactly one of ``v`` and ``value_dim``, and ``value_dim`` in ``[1, Dqk]``: ``ValueError``
    naming ``v``/``value_dim`` otherwise, from the kernel, the reference and the dispatch."""
    from kernels import dispatch

    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    q, k, v = make_qkv(1, 32, H, HK, D, DV)
    block_idx = random_block_idx(1, 32, G, 2, 16, qs)
    fn = {"triton": tk.selected_attention, "reference": ref.selected_attention,
          "triton_with_lse": tk.selected_attention_with_lse,
          "dispatch": lambda *a, **kw: dispatch.selected_attention(
              *a[:6], q_share=a[6], backend="reference", **kw)}[impl]
    with pytest.raises(ValueError, match=match):
        fn(q, k, v if v_given else None, block_idx, 16, 0.25, qs, value_dim=value_dim)


def test_reference_value_dim_is_the_key_prefix():
    """The reference's ``v=None, value_dim`` is attention with values ``k[..., :value_dim]``,
    gradients included."""
    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(19)
    q, k, _ = make_qkv(1, 32, H, HK, D, DV, dtype=torch.float64, gen=gen)
    block_idx = random_block_idx(1, 32, G, 2, 16, qs, gen=gen)
    grads = []
    for explicit in (True, False):
        kk = k.clone().requires_grad_()
        v, vd = (None, DV) if explicit else (kk[..., :DV], None)
        out = ref.selected_attention(q, kk, v, block_idx, 16, 0.3, qs, value_dim=vd)
        out.square().sum().backward()
        grads.append((out, kk.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_key_subtiles_and_batch():
    """select_block 32 tiled by 16-key tiles; latent layout."""
    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 72, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(1, 72, G, 2, 32, qs, gen=gen)
    compare(q, k, v, block_idx, 32, qs, config=tk.Config(bk=16, fwd_order="keys"))


def test_messy_rows_and_empty_rows():
    """Unsorted rows, duplicates, out-of-range entries, and rows that see nothing."""
    gen = torch.Generator().manual_seed(6)
    H, HK, G, D, DV = 4, 2, 2, 16, 16
    T = 40
    q, k, v = make_qkv(1, T, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(1, T, G, 3, 16, 1, gen=gen, drop_current=True)
    block_idx[0, 5:9] = -1  # rows with no visible key at all -> o = 0, lse = -inf
    block_idx = block_idx.flip(-1)  # -1 first, descending: the kernel must not rely on order
    block_idx[0, 20, 0] = torch.tensor([1, 1, 0])  # duplicates
    compare(q, k, v, block_idx, 16, 1)
    o, lse = tk.selected_attention_with_lse(q, k, v, block_idx, 16, D ** -0.5, 1)
    assert torch.equal(o[0, 5:9], torch.zeros_like(o[0, 5:9]))
    assert torch.isneginf(lse[0, 5:9]).all()


def test_lse_matches_reference():
    from kernels.masked_attention import masked_attention

    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(1, 32, H, HK, D, DV, gen=gen)
    block_idx = random_block_idx(1, 32, G, 2, 16, qs, gen=gen)
    o, lse = tk.selected_attention_with_lse(q, k, v, block_idx, 16, D ** -0.5, qs)
    mask = ref.selection_mask(block_idx, 16, 32, H)
    o_ref, lse_ref = masked_attention(q.double(), k.double(), v.double(), mask, D ** -0.5)
    assert rel(o, o_ref) < 1e-5 and rel(lse, lse_ref) < 1e-5


def test_dispatch_finds_kernel():
    from kernels import dispatch

    assert inspect.unwrap(dispatch.triton_kernel("selected_attention")) is tk.selected_attention
    H, HK, G, D, DV, qs = LAYOUTS["latent"]
    q, k, v = make_qkv(1, 32, H, HK, D, DV)
    block_idx = random_block_idx(1, 32, G, 2, 16, qs)
    if not CUDA:
        out = dispatch.selected_attention(q, k, v, block_idx, 16, 0.25, q_share=qs,
                                          backend="triton")
        expect = ref.selected_attention(q.double(), k.double(), v.double(), block_idx, 16, 0.25)
        assert rel(out, expect) < 1e-5
        out = dispatch.selected_attention(q, k, None, block_idx, 16, 0.25, q_share=qs,
                                          backend="triton", value_dim=DV)
        expect = ref.selected_attention(q.double(), k.double(), k.double()[..., :DV], block_idx,
                                        16, 0.25)
        assert rel(out, expect) < 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(select_block=48), r"select_block \(48\)"),
    (dict(select_block=64, q_share=3), r"q_share \(3\) must divide select_block \(64\)"),
    (dict(q_share=0), r"q_share"),
    (dict(G=3), r"selection groups G \(3\)"),
    (dict(HK=3), r"key/value heads \(3\)"),
    (dict(dtype=torch.float64), r"dtype"),
    (dict(D=520), r"Dqk \(520\)"),
    (dict(bi_shape=(1, 8, 2)), r"block_idx must have shape"),
    (dict(bi_dtype=torch.float32), r"block_idx must be int64 or int32"),
    (dict(kv_T=16), r"sequence length"),
    (dict(config=tk.Config(union_groups=0)), r"union_groups"),
    (dict(config=tk.Config(dq_order="cols")), r"dq_order"),
])
def test_clear_errors(kwargs, match):
    H, HK, G, D, DV, T = 4, kwargs.get("HK", 2), kwargs.get("G", 2), kwargs.get("D", 16), 16, 32
    dtype = kwargs.get("dtype", torch.float32)
    q = torch.randn(1, T, H, D, dtype=dtype)
    k = torch.randn(1, kwargs.get("kv_T", T), HK, D, dtype=dtype)
    v = torch.randn(1, kwargs.get("kv_T", T), HK, DV, dtype=dtype)
    bi = torch.zeros(kwargs.get("bi_shape", (1, T, G, 2)),
                     dtype=kwargs.get("bi_dtype", torch.int64))
    with pytest.raises(ValueError, match=match):
        tk.selected_attention(q, k, v, bi, kwargs.get("select_block", 16), 0.25,
                              kwargs.get("q_share", 1), config=kwargs.get("config"))


# ------------------------------------------------------------------------- GPU (bf16)
GPU_LAYOUTS = {
    # the three layouts of the ASA / NSA 340M configs
    "gla_absorbed": (16, 2, 2, 160, 128, 4),
    "gla_upprojected": (16, 16, 2, 96, 64, 4),
    "nsa_gqa": (16, 4, 4, 64, 64, 1),
}


def _gpu_compare(H, HK, G, D, DV, qs, T, dtype, *, config=None, tol=1e-2, sb=64, n=16):
    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(1, T, H, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(1, T, HK, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(1, T, HK, DV, device="cuda", generator=gen).to(dtype)
    imp = torch.rand(1, T, G, math.ceil(T / sb), device="cuda", generator=gen)
    block_idx = top_n_blocks(imp, select_block=sb, top_n=n, num_local=2, q_share=qs)
    compare(q, k, v, block_idx, sb, qs, config=config, ref_dtype=torch.float32, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(GPU_LAYOUTS))
def test_gpu_bf16_t4096(layout):
    _gpu_compare(*GPU_LAYOUTS[layout], T=4096, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [
    tk.Config(fwd_order="keys", dq_order="keys"), tk.Config(fwd_order="rows", dq_order="rows"),
    tk.Config(bwd="atomic_kv"), tk.Config(bwd="atomic_q"), tk.Config(seg=256, dkdv_warps=8),
], ids=["keys_order", "rows_order", "atomic_kv", "atomic_q", "seg256_w8"])
@pytest.mark.parametrize("layout", list(GPU_LAYOUTS))
def test_gpu_bf16_variants(layout, config):
    _gpu_compare(*GPU_LAYOUTS[layout], T=1024, dtype=torch.bfloat16, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.float32, 1e-4)])
def test_gpu_other_dtypes(dtype, tol):
    _gpu_compare(*GPU_LAYOUTS["gla_absorbed"], T=512, dtype=dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [
    tk.Config(fwd_stages=3, dq_stages=3, dkdv_stages=2), tk.Config(union_groups=1),
    tk.Config(dkdv_tok=8),
], ids=["stages", "one_group", "union_dkdv"])
@pytest.mark.parametrize("layout", ["gla_absorbed", "nsa_gqa"])
def test_gpu_chunk_plans(layout, config):
    _gpu_compare(*GPU_LAYOUTS[layout], T=1024, dtype=torch.bfloat16, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("config,head_major_do", [
    (None, False), (tk.Config(union_groups=1), False), (tk.Config(tma=False), False),
    (None, True), (tk.Config(tma=False), True),
], ids=["default", "one_group", "gathered_keys", "head_major_do", "head_major_do_gathered"])
def test_gpu_values_in_keys(config, head_major_do):
    """GLA absorbed layout as the layer passes it: keys [c ; k_R] (160), values c = k[..., :128];
    with ``head_major_do`` also the layer's output gradient, read through its strides."""
    H, HK, G, D, DV, qs = GPU_LAYOUTS["gla_absorbed"]
    B, T, sb = 2, 4096, 64
    gen = torch.Generator(device="cuda").manual_seed(15)
    q = torch.randn(B, T, H, D, device="cuda", generator=gen).bfloat16()
    k = torch.randn(B, T, HK, D, device="cuda", generator=gen).bfloat16()
    imp = torch.rand(B, T, G, T // sb, device="cuda", generator=gen)
    block_idx = top_n_blocks(imp, select_block=sb, top_n=16, num_local=2, q_share=qs)
    compare_values_in_keys(q, k, DV, block_idx, sb, qs, config=config, ref_dtype=torch.float32,
                           tol=1e-2, head_major_do=head_major_do)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, tk.Config(one_acc=False)], ids=["default", "two_accs"])
@pytest.mark.parametrize("layout", [(32, 2, 2), (16, 1, 1)], ids=["1.3b_asa", "340m_global_mla"])
def test_gpu_wide_latent_values_in_keys(layout, config):
    """The absorbed latent of 256 + RoPE 32 (configs/1.3b/asa.yaml, configs/340m/asa_global_mla.yaml),
    values its first 256 columns, as the layer passes them."""
    H, HK, G = layout
    T, sb, D, DV, qs = 2048, 64, 288, 256, 4
    gen = torch.Generator(device="cuda").manual_seed(16)
    q = torch.randn(1, T, H, D, device="cuda", generator=gen).bfloat16()
    k = torch.randn(1, T, HK, D, device="cuda", generator=gen).bfloat16()
    imp = torch.rand(1, T, G, T // sb, device="cuda", generator=gen)
    block_idx = top_n_blocks(imp, select_block=sb, top_n=16, num_local=2, q_share=qs)
    compare_values_in_keys(q, k, DV, block_idx, sb, qs, config=config, ref_dtype=torch.float32,
                           tol=1e-2)


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """q, o and dq hold more than 2**31 elements (T = 2**20, 16 heads x 160); the last query
    group is checked against a float32 reference built from its own selected keys."""
    H, HK, G, D, DV, qs = GPU_LAYOUTS["gla_absorbed"]
    T, sb, n = 1 << 20, 64, 16
    assert T * H * D > 2**31
    gen = torch.Generator(device="cuda").manual_seed(12)
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, T, HK, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, T, HK, DV, device="cuda", dtype=torch.bfloat16, generator=gen)
    cur = (torch.arange(T, device="cuda") // qs * qs // sb).view(1, T, 1, 1)
    step = torch.tensor([7, 5], device="cuda").view(1, 1, G, 1)
    cand = cur - 1 - step * torch.arange(n - 2, device="cuda").view(1, 1, 1, n - 2)
    cand = torch.cat([torch.zeros_like(cur).expand(1, T, G, 1), cand.expand(1, T, G, n - 2),
                      cur.expand(1, T, G, 1)], dim=-1)
    big = T
    cand = torch.where(cand >= 1, cand, torch.full_like(cand, big))
    cand[..., 0] = 0
    cand[..., -1] = cur[..., 0]
    block_idx = cand.sort(dim=-1).values
    block_idx = torch.where(block_idx == big, torch.full_like(block_idx, -1), block_idx)
    scale = D ** -0.5
    qg, kg, vg = (x.requires_grad_() for x in (q, k, v))
    out = tk.selected_attention(qg, kg, vg, block_idx, sb, scale, qs)
    rows = slice(T - qs, T)
    do = torch.zeros_like(out)
    do[0, rows] = torch.randn(qs, H, DV, device="cuda", generator=gen).to(do.dtype)
    out.backward(do)
    assert torch.isfinite(out[0, rows]).all()
    # float32 mini-reference over the selected keys of the last query group
    sel = block_idx[0, T - qs]  # (G, n), identical for the group
    for g in range(G):
        blocks = sel[g][sel[g] >= 0]
        keys = (blocks[:, None] * sb + torch.arange(sb, device="cuda")).reshape(-1)
        keys = keys[keys < T]
        heads = slice(g * (H // G), (g + 1) * (H // G))
        qr = q[0, rows, heads].detach().float().requires_grad_()
        kr = k[0, keys, g].detach().float().requires_grad_()
        vr = v[0, keys, g].detach().float().requires_grad_()
        t = torch.arange(T - qs, T, device="cuda")
        mask = keys[None, :] <= t[:, None]
        s = torch.einsum("thd,sd->ths", qr, kr) * scale
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        o_ref = torch.einsum("ths,sd->thd", s.softmax(-1), vr)
        o_ref.backward(do[0, rows, heads].float())
        assert rel(out[0, rows, heads], o_ref) < 1e-2
        assert rel(qg.grad[0, rows, heads], qr.grad) < 1e-2
        assert rel(kg.grad[0, keys, g], kr.grad) < 1e-2
        assert rel(vg.grad[0, keys, g], vr.grad) < 1e-2
