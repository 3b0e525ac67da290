"""Block-selection Triton kernel against the PyTorch reference.

CPU: Triton interpreter, float32, small shapes: block sets compared exactly (random inputs, where
ties have probability zero; forced blocks tie at +inf and the lower index wins in both), the
kernel's importance compared numerically, early queries, causality, the long-row fallback.
GPU (``-m gpu``): bf16 at realistic shapes against the float32 reference on the same rounded
inputs; a differing block is accepted only where its score is within rounding of the cut.
"""
from __future__ import annotations


import pytest
import torch
import triton

from kernels import dispatch
from kernels.blocks import num_compressed
from kernels.compression import reference as cref
from kernels.selection import reference as ref
from kernels.selection import triton_kernel as tk


def make(B, T, H, Hk, D, block_len, stride, *, dtype=torch.float32, device="cpu"):
    N = num_compressed(T, block_len, stride)
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k = torch.randn(B, N, Hk, D, device=device).to(dtype)
    v = torch.randn(B, N, Hk, 16, device=device).to(dtype)
    _, lse = cref.compression_attention(q.float(), k.float(), v.float(), block_len, stride,
                                        D ** -0.5)
    return q, k, lse


CASES = [
    # B, T, H, Hk, G, D, block_len, stride, select_block, top_n, num_local, q_share
    (2, 64, 4, 2, 2, 24, 8, 4, 16, 3, 1, 1),      # GQA 4:2, group = kv head
    (1, 128, 4, 2, 2, 24, 8, 4, 16, 4, 2, 4),     # query sharing 4
    (1, 128, 4, 1, 2, 16, 8, 4, 16, 4, 1, 4),     # 4:1, two selection groups on one kv head
    (1, 100, 4, 4, 2, 32, 8, 4, 16, 3, 2, 1),     # 4:4 (up-projected), 2 kv heads per group
    (1, 128, 8, 8, 2, 24, 16, 8, 16, 4, 1, 2),    # block_len = select_block
    (1, 90, 6, 3, 3, 24, 8, 4, 16, 4, 1, 3),      # odd q_share, 2 heads per group
    (1, 128, 4, 2, 2, 24, 8, 8, 32, 2, 0, 1),     # no local blocks, top_n 2
    (1, 128, 4, 2, 2, 24, 40, 8, 16, 4, 1, 1),    # block_len > 2 * select_block
]


def kwargs(case):
    B, T, H, Hk, G, D, l, s, sb, n, nl, qs = case
    return dict(num_groups=G, block_len=l, stride=s, select_block=sb, top_n=n, num_local=nl,
                q_share=qs, scale=D ** -0.5)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case, monkeypatch):
    B, T, H, Hk, G, D, l, s, sb, n, nl, qs = case
    # top-n inside the importance kernel for odd-numbered cases, in its own launch otherwise
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE",
                        {"TOPN": "fused" if CASES.index(case) % 2 else "split"})
    q, k, lse = make(B, T, H, Hk, D, l, s)
    kw = kwargs(case)
    out = tk.select_blocks(q, k, lse, **kw)
    expected = ref.select_blocks(q, k, lse, **kw)
    assert out.dtype == torch.int64 and out.shape == (B, T, G, n)
    assert torch.equal(out, expected)
    # the kernel's importance rows (first query of each sharing group)
    imp = tk.block_importance_first(q, k, lse, num_groups=G, block_len=l, stride=s,
                                    select_block=sb, q_share=qs, scale=kw["scale"])
    imp_ref = ref.block_importance(q, k, lse, num_groups=G, block_len=l, stride=s,
                                   select_block=sb, scale=kw["scale"])[:, ::qs]
    assert imp.shape == imp_ref.shape
    assert (imp - imp_ref).abs().max().item() <= 1e-5 * imp_ref.abs().max().item()


def test_early_queries_and_forced_ties():
    """Rows where forced and visible blocks decide everything, including top_n smaller than the
    number of forced blocks (ties at +inf: the lower block index wins)."""
    B, T, H, Hk, G, D, l, s, sb = 1, 80, 4, 2, 2, 16, 8, 4, 16
    q, k, lse = make(B, T, H, Hk, D, l, s)
    kw = dict(num_groups=G, block_len=l, stride=s, select_block=sb, scale=D ** -0.5)
    out = tk.select_blocks(q, k, lse, top_n=3, num_local=1, q_share=1, **kw)
    assert torch.equal(out, ref.select_blocks(q, k, lse, top_n=3, num_local=1, q_share=1, **kw))
    assert (out[0, :16] == torch.tensor([0, -1, -1])).all()          # only block 0 visible
    assert (out[0, 16:32] == torch.tensor([0, 1, -1])).all()         # blocks 0 and 1, forced
    assert (out[0, 32:48] == torch.tensor([0, 1, 2])).all()          # three visible, three slots
    # 3 forced blocks (0, cur-1, cur) but only 2 slots: block 0 and cur-1 win
    out = tk.select_blocks(q, k, lse, top_n=2, num_local=2, q_share=1, **kw)
    assert torch.equal(out, ref.select_blocks(q, k, lse, top_n=2, num_local=2, q_share=1, **kw))
    t = torch.arange(48, T)
    assert (out[0, t, :, 0] == 0).all()
    assert (out[0, t, :, 1] == (t // sb - 1)[:, None]).all()


def test_query_sharing_and_causality():
    """Each aligned group of q_share queries carries its first query's row, and nothing after
    that first query changes it."""
    B, T, H, Hk, G, D, l, s, sb = 1, 96, 4, 2, 2, 16, 8, 4, 16
    q, k, lse = make(B, T, H, Hk, D, l, s)
    kw = dict(num_groups=G, block_len=l, stride=s, select_block=sb, top_n=4, num_local=1,
              q_share=4, scale=D ** -0.5)
    out = tk.select_blocks(q, k, lse, **kw)
    assert torch.equal(out, out[:, ::4].repeat_interleave(4, dim=1)[:, :T])
    t1 = 52  # first query of a sharing group
    q2, k2, lse2 = q.clone(), k.clone(), lse.clone()
    q2[:, t1 + 1:] = torch.randn_like(q2[:, t1 + 1:])
    lse2[:, t1 + 1:] = torch.randn_like(lse2[:, t1 + 1:])
    n_vis = (t1 - l + 1) // s + 1
    k2[:, n_vis:] = torch.randn_like(k2[:, n_vis:])
    out2 = tk.select_blocks(q2, k2, lse2, **kw)
    assert torch.equal(out2[:, :t1 + 4], out[:, :t1 + 4])
    assert not torch.equal(out2, out)


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_fewer_compressed_tokens(mode, monkeypatch):
    """k_cmp shorter than the sequence could fill: the later visible blocks score 0."""
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"TOPN": mode})
    B, T, H, Hk, G, D, l, s, sb = 1, 128, 4, 2, 2, 16, 8, 4, 16
    q, k, lse = make(B, T, H, Hk, D, l, s)
    k = k[:, :9]
    kw = dict(num_groups=G, block_len=l, stride=s, select_block=sb, top_n=4, num_local=1,
              q_share=2, scale=D ** -0.5)
    assert torch.equal(tk.select_blocks(q, k, lse, **kw), ref.select_blocks(q, k, lse, **kw))


@pytest.mark.parametrize("min_width", [1, 2])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]])
def test_topn_width_buckets(case, min_width, monkeypatch):
    """The split top-n over several launches of growing row width (each row in the narrowest
    that holds its current block) picks what the reference picks."""
    B, T, H, Hk, G, D, l, s, sb, n, nl, qs = case
    Tq, ns_pad = -(-T // qs), triton.next_power_of_2(-(-T // sb))
    assert len(tk._topn_buckets(Tq, ns_pad, sb, qs, min_width)) > 1
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"TOPN": "split", "TOPN_MIN_WIDTH": min_width})
    q, k, lse = make(B, T, H, Hk, D, l, s)
    assert torch.equal(tk.select_blocks(q, k, lse, **kwargs(case)),
                       ref.select_blocks(q, k, lse, **kwargs(case)))


@pytest.mark.parametrize("Tq,ns_pad,sb,qs,min_width", [
    (16384, 1024, 64, 4, 128), (100, 32, 16, 3, 1), (7, 4, 16, 4, 16), (64, 64, 64, 1, 8),
    (100, 32, 16, 3, 3)])  # (a min_width of 3 rounds up to 4)
def test_topn_buckets_cover_rows_in_the_narrowest_width(Tq, ns_pad, sb, qs, min_width):
    buckets = tk._topn_buckets(Tq, ns_pad, sb, qs, min_width)
    assert buckets[-1][1] == Tq
    r0 = 0
    for width, r_end in buckets:
        assert r_end > r0 and width <= ns_pad and width & (width - 1) == 0
        cur = torch.arange(r0, r_end) * qs // sb  # current block of each row
        assert (cur < width).all()
        if width > min(triton.next_power_of_2(min_width), ns_pad):  # the first row needs it
            assert r0 * qs // sb >= width // 2
        r0 = r_end
    if (Tq, ns_pad, sb, qs, min_width) == (16384, 1024, 64, 4, 128):
        assert buckets == [(128, 2048), (256, 4096), (512, 8192), (1024, 16384)]


def test_long_rows_fallback(monkeypatch):
    """Rows too long for registers: importance from the kernel, top-n in torch; same answer."""
    case = CASES[1]
    B, T, H, Hk, G, D, l, s, sb, n, nl, qs = case
    q, k, lse = make(B, T, H, Hk, D, l, s)
    expected = tk.select_blocks(q, k, lse, **kwargs(case))
    monkeypatch.setattr(tk, "MAX_NS_IN_REGISTERS", 4)
    out = tk.select_blocks(q, k, lse, **kwargs(case))
    assert torch.equal(out, expected)
    assert torch.equal(out, ref.select_blocks(q, k, lse, **kwargs(case)))


def test_dispatch_and_kernel_lse():
    """Through the dispatcher, with the lse of the compression Triton kernel."""
    from kernels.compression import triton_kernel as ctk

    B, T, H, Hk, G, D, l, s, sb = 1, 64, 4, 2, 2, 16, 8, 4, 16
    q, k, _ = make(B, T, H, Hk, D, l, s)
    v = torch.randn(B, k.shape[1], Hk, 16)
    _, lse = ctk.compression_attention(q, k, v, l, s, D ** -0.5)
    kw = dict(num_groups=G, block_len=l, stride=s, select_block=sb, top_n=3, num_local=1,
              q_share=1, scale=D ** -0.5)
    out = dispatch.select_blocks(q, k, lse, backend="triton", **kw)
    assert torch.equal(out, ref.select_blocks(q, k, lse, **kw))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_groups": 3}, "num_groups"),
        ({"stride": 16, "select_block": 48}, "power of two"),
        ({"top_n": 0}, "top_n"),
        ({"num_local": -1}, "num_local"),
        ({"q_share": 0}, "q_share"),
        ({"lse": "short"}, "lse"),
        ({"lse": "half"}, "lse must be float32"),
        ({"k": "heads"}, "key/value heads"),
    ],
)
def test_clear_errors(change, match):
    q, k, lse = make(1, 64, 4, 2, 16, 8, 4)
    kw = dict(num_groups=2, block_len=8, stride=4, select_block=16, top_n=3, num_local=1,
              q_share=1, scale=0.25)
    change = dict(change)
    if change.get("lse") == "short":
        lse = lse[:, :-1]
    elif change.get("lse") == "half":
        lse = lse.half()
    if change.pop("k", None) == "heads":
        k = k[:, :, :1].repeat(1, 1, 3, 1)
    change.pop("lse", None)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        tk.select_blocks(q, k, lse, **kw)


# ------------------------------------------------------------------------------------------
# GPU: bf16 at realistic shapes
# ------------------------------------------------------------------------------------------


def check_within_rounding(out, expected, score, *, rtol, max_row_fraction):
    """Block sets may differ only where the scores are within rounding of the cut.

    ``score (B, T, G, Ns)``: the reference's masked score rows (forced +inf, invisible -inf).
    For a row whose sets differ, every block the kernel chose that the reference did not must
    score at least the reference's cut (its lowest chosen score) minus the tolerance, and every
    block the reference chose that the kernel did not must score at most the kernel's cut plus
    the tolerance. At most ``max_row_fraction`` of the rows may differ at all."""
    assert out.shape == expected.shape
    # padding and counts agree, forced and visible blocks are respected
    assert torch.equal(out >= 0, expected >= 0)
    Ns = score.shape[-1]

    def chosen(idx):
        slots = torch.where(idx >= 0, idx, Ns)  # padding goes to a spare column
        sel = torch.zeros(*score.shape[:-1], Ns + 1, dtype=torch.bool, device=score.device)
        return sel.scatter_(-1, slots, True)[..., :Ns]

    sel_k, sel_r = chosen(out), chosen(expected)
    assert not (sel_k & (score == float("-inf"))).any(), "kernel chose an invisible block"
    forced = score == float("inf")
    dropped = (~sel_k & forced).any(-1)
    full_of_forced = (sel_k & forced).sum(-1) == out.shape[-1]
    assert (~dropped | full_of_forced).all(), "kernel dropped a forced block"
    differ = (sel_k != sel_r).any(-1)
    frac = differ.float().mean().item()
    assert frac <= max_row_fraction, f"{frac:.4%} of the rows differ"
    if differ.any():
        s = score[differ]
        k_only = sel_k[differ] & ~sel_r[differ]
        r_only = sel_r[differ] & ~sel_k[differ]
        big = torch.finfo(torch.float32).max
        cut_r = torch.where(sel_r[differ], s, big).amin(-1, keepdim=True)
        cut_k = torch.where(sel_k[differ], s, big).amin(-1, keepdim=True)
        tol = rtol * s.masked_fill(~torch.isfinite(s), 0).amax(-1, keepdim=True)
        assert (torch.where(k_only, s, big) >= cut_r - tol).all(), "kernel chose a weak block"
        assert (torch.where(r_only, s, -big) <= cut_k + tol).all(), "kernel missed a strong block"
    return frac


def masked_reference_scores(q, k, lse, *, num_groups, block_len, stride, select_block,
                            num_local, q_share, scale):
    imp = ref.block_importance(q, k, lse, num_groups=num_groups, block_len=block_len,
                               stride=stride, select_block=select_block, scale=scale)
    B, T, G, Ns = imp.shape
    first = torch.arange(T, device=q.device) // q_share * q_share
    cur = (first // select_block)[:, None]
    blocks = torch.arange(Ns, device=q.device)[None, :]
    forced = (blocks == 0) | ((blocks <= cur) & (blocks > cur - num_local))
    score = imp[:, first].masked_fill(forced[None, :, None], float("inf"))
    return score.masked_fill((blocks > cur)[None, :, None], float("-inf"))


GPU_CASES = {
    # B, T, H, Hk, G, D, block_len, stride, select_block, top_n, num_local, q_share
    "asa_absorbed_gla": (1, 4096, 16, 2, 2, 160, 32, 16, 64, 16, 2, 4),
    "nsa_gqa": (1, 4096, 16, 4, 4, 64, 32, 16, 64, 16, 2, 1),
    "asa_upprojected": (1, 4096, 16, 16, 2, 96, 32, 16, 64, 16, 2, 4),
    "odd_lengths": (2, 1000, 8, 2, 2, 96, 32, 16, 64, 8, 1, 4),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu(name, dtype):
    case = GPU_CASES[name]
    B, T, H, Hk, G, D, l, s, sb, n, nl, qs = case
    q, k, lse = make(B, T, H, Hk, D, l, s, dtype=dtype, device="cuda")
    kw = kwargs(case)
    out = tk.select_blocks(q, k, lse, **kw)
    qf, kf = q.float(), k.float()
    expected = ref.select_blocks(qf, kf, lse, **kw)
    # the kernel's importance itself: fp32 accumulation of exact bf16 products
    imp = tk.block_importance_first(q, k, lse, num_groups=G, block_len=l, stride=s,
                                    select_block=sb, q_share=qs, scale=kw["scale"])
    imp_ref = ref.block_importance(qf, kf, lse, num_groups=G, block_len=l, stride=s,
                                   select_block=sb, scale=kw["scale"])[:, ::qs]
    assert not torch.isnan(imp).any()
    err = ((imp - imp_ref).norm() / imp_ref.norm()).item()
    assert err < 1e-4, err
    score = masked_reference_scores(qf, kf, lse, num_groups=G, block_len=l, stride=s,
                                    select_block=sb, num_local=nl, q_share=qs, scale=kw["scale"])
    check_within_rounding(out, expected, score, rtol=1e-4, max_row_fraction=0.01)


@pytest.mark.gpu
def test_gpu_topn_width_buckets(monkeypatch):
    """Split top-n launches of widths 16, 32, 64 give the single 64-wide launch's picks."""
    case = GPU_CASES["asa_absorbed_gla"]
    B, T, H, Hk, G, D, l, s, sb, n, nl, qs = case
    q, k, lse = make(B, T, H, Hk, D, l, s, dtype=torch.bfloat16, device="cuda")
    one = tk.select_blocks(q, k, lse, **kwargs(case))
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"TOPN_MIN_WIDTH": 16})
    assert len(tk._topn_buckets(-(-T // qs), -(-T // sb), sb, qs, 16)) == 3
    assert torch.equal(tk.select_blocks(q, k, lse, **kwargs(case)), one)


@pytest.mark.gpu
def test_gpu_check_catches_a_wrong_kernel():
    """The tolerant comparison must still fail for a wrong answer (here: blocks shifted by one
    in a few rows, or the importance of another row)."""
    case = GPU_CASES["nsa_gqa"]
    B, T, H, Hk, G, D, l, s, sb, n, nl, qs = case
    q, k, lse = make(B, T, H, Hk, D, l, s, dtype=torch.bfloat16, device="cuda")
    kw = kwargs(case)
    qf, kf = q.float(), k.float()
    expected = ref.select_blocks(qf, kf, lse, **kw)
    score = masked_reference_scores(qf, kf, lse, num_groups=G, block_len=l, stride=s,
                                    select_block=sb, num_local=nl, q_share=qs, scale=kw["scale"])
    assert check_within_rounding(expected, expected, score, rtol=1e-4, max_row_fraction=0) == 0
    # a kernel that picks by the previous query's scores
    wrong = ref.top_n_blocks(torch.roll(
        ref.block_importance(qf, kf, lse, num_groups=G, block_len=l, stride=s, select_block=sb,
                             scale=kw["scale"]), 1, dims=1),
        select_block=sb, top_n=n, num_local=nl, q_share=qs)
    with pytest.raises(AssertionError):
        check_within_rounding(wrong, expected, score, rtol=1e-4, max_row_fraction=0.01)
    # a handful of rows where the strongest chosen (unforced) block is swapped for the weakest
    # visible unchosen one
    wrong = expected.clone()
    for t in range(2000, 2010):
        sc = score[0, t, 0]
        chosen = [j for j in expected[0, t, 0].tolist() if j >= 0]
        free = [j for j in chosen if torch.isfinite(sc[j])]
        unchosen = [j for j in range(sc.numel()) if j not in chosen and torch.isfinite(sc[j])]
        victim = max(free, key=lambda j: sc[j].item())
        weakest = min(unchosen, key=lambda j: sc[j].item())
        row = sorted([weakest if j == victim else j for j in chosen])
        wrong[0, t, 0, :len(row)] = torch.tensor(row, device="cuda")
    with pytest.raises(AssertionError):
        check_within_rounding(wrong, expected, score, rtol=1e-4, max_row_fraction=0.01)


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """B * T * H * D past 2**31 elements: the last sequence must be as right as the first."""
    B, T, H, Hk, G, D, l, s, sb, n, nl, qs = 512, 2048, 16, 2, 2, 160, 32, 16, 64, 16, 2, 4
    assert B * T * H * D > 2**31
    N = num_compressed(T, l, s)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, N, Hk, D, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(B, T, H, device="cuda")
    for b in (0, B - 1):  # lse only where it is checked; elsewhere any finite value will do
        lse[b:b + 1] = cref.compression_attention(q[b:b + 1].float(), k[b:b + 1].float(),
                                                  k[b:b + 1, ..., :16].float(), l, s, D ** -0.5)[1]
    lse[1:B - 1] = 0.0
    kw = dict(num_groups=G, block_len=l, stride=s, select_block=sb, top_n=n, num_local=nl,
              q_share=qs, scale=D ** -0.5)
    out = tk.select_blocks(q, k, lse, **kw)
    for b in (0, B - 1):
        qf, kf = q[b:b + 1].float(), k[b:b + 1].float()
        expected = ref.select_blocks(qf, kf, lse[b:b + 1], **kw)
        score = masked_reference_scores(qf, kf, lse[b:b + 1], num_groups=G, block_len=l,
                                        stride=s, select_block=sb, num_local=nl, q_share=qs,
                                        scale=kw["scale"])
        check_within_rounding(out[b:b + 1], expected, score, rtol=1e-4, max_row_fraction=0.01)
