"""Each branch's PyTorch reference equals the loop oracle built from its definition."""

import pytest
import torch

import oracle
from kernels.blocks import num_compressed, overlap_weights
from kernels.compression.reference import compression_attention
from kernels.selected_attention.reference import selected_attention
from kernels.selection.reference import select_blocks
from kernels.sliding_window.reference import sliding_window_attention
from nsa_lit.attention.compressor import BlockCompressor


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def close(a, b):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("H,Hk,dqk,dv,w", [(4, 2, 12, 8, 5), (4, 1, 10, 6, 16), (2, 2, 8, 8, 1)])
def test_sliding_window_matches_oracle(H, Hk, dqk, dv, w):
    q, k, v = rand(2, 23, H, dqk), rand(2, 23, Hk, dqk), rand(2, 23, Hk, dv)
    close(sliding_window_attention(q, k, v, w, 0.4), oracle.window(q, k, v, w, 0.4))


@pytest.mark.parametrize("l,d", [(8, 4), (4, 4), (6, 2)])
def test_compression_attention_matches_oracle(l, d):
    T, H, Hk = 30, 4, 2
    N = num_compressed(T, l, d)
    q, kc, vc = rand(1, T, H, 10), rand(1, N, Hk, 10), rand(1, N, Hk, 7)
    out, lse = compression_attention(q, kc, vc, l, d, 0.3)
    close(out, oracle.compression(q, kc, vc, l, d, 0.3))
    # lse is the log-sum-exp of the visible scores; -inf (and zero output) before the first block
    assert torch.isinf(lse[:, : l - 1]).all() and (out[:, : l - 1] == 0).all()
    t, h = T - 1, 3
    scores = (kc[0, :, h // 2] @ q[0, t, h]) * 0.3
    visible = torch.arange(N) * d + l - 1 <= t
    close(lse[0, t, h], torch.logsumexp(scores[visible], 0))


def test_overlap_weights_reproduce_nsa_formula():
    # NSA defaults: l=32, d=16, l'=64 -> block j gets compressed tokens 4j-1..4j+3 weighted 1,2,2,2,1
    W = overlap_weights(20, 5, 32, 16, 64)
    assert W[3:8, 1].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]
    assert W[:, 1].sum() == 8.0 and W[2, 1] == 0 and W[8, 1] == 0


@pytest.mark.parametrize("l,d,ls", [(32, 16, 64), (8, 4, 8), (16, 4, 32), (64, 64, 64)])
def test_rebinning_follows_raw_token_overlap_not_printed_eq9_indices(l, d, ls):
    """Weights count the raw tokens compressed token i ([i d, i d + l)) shares with selection
    block j ([j l', (j+1) l')), divided by d. The NSA paper's printed Eq. 9,
    p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d) j - m - n], has the same weights on
    indices l'/d - 1 lower (its block 1 at the defaults reads tokens 0..4, not 3..7)."""
    N, blocks = 40, 6
    W = overlap_weights(N, blocks, l, d, ls)
    for i in range(N):
        for j in range(blocks):
            shared = len(set(range(i * d, i * d + l)) & set(range(j * ls, (j + 1) * ls)))
            assert W[i, j] * d == shared, (i, j)
    eq9 = torch.zeros(N, blocks)
    for j in range(blocks):
        for m in range(ls // d):
            for n in range(l // d):
                if 0 <= (ls // d) * j - m - n < N:
                    eq9[(ls // d) * j - m - n, j] += 1
    shift = ls // d - 1  # l'/d - 1 (0 when blocks do not overlap and l' = d)
    whole = [j for j in range(blocks)  # columns whose indices all lie in [0, N) both ways
             if (ls // d) * j - (ls // d - 1) - (l // d - 1) >= 0 and (ls // d) * (j + 1) <= N]
    assert len(whole) >= 3
    for j in whole:
        torch.testing.assert_close(W[:, j], torch.roll(eq9[:, j], shift), rtol=0, atol=0)
    if shift:
        assert not torch.equal(W, eq9)


@pytest.mark.parametrize("q_share", [1, 4])
@pytest.mark.parametrize("H,Hk,groups", [(4, 2, 2), (4, 1, 2), (4, 4, 2)])
def test_selection_matches_oracle(q_share, H, Hk, groups):
    T, l, d, ls, n, loc = 48, 8, 4, 8, 3, 1
    N = num_compressed(T, l, d)
    q, kc, vc = rand(2, T, H, 8), rand(2, N, Hk, 8), rand(2, N, Hk, 8)
    _, lse = compression_attention(q, kc, vc, l, d, 0.5)
    kw = dict(block_len=l, stride=d, select_block=ls, top_n=n, num_local=loc, q_share=q_share,
              scale=0.5)
    idx = select_blocks(q, kc, lse, num_groups=groups, **kw)
    sets = oracle.selected_sets(q, kc, groups=groups, **kw)
    assert idx.shape == (2, T, groups, n) and idx.dtype == torch.int64
    for b in range(2):
        for t in range(T):
            for g in range(groups):
                row = idx[b, t, g].tolist()
                valid = [j for j in row if j >= 0]
                assert valid == sorted(valid) and row == valid + [-1] * (n - len(valid))
                assert set(valid) == sets[b][t][g], (b, t, g)
                assert t // ls in valid  # the current block is always selected
    # query sharing: aligned groups of q_share queries carry identical rows
    rows = idx.view(2, T // q_share, q_share, groups, n)
    assert (rows == rows[:, :, :1]).all()


@pytest.mark.parametrize("H,Hk,groups,q_share", [(4, 2, 2, 1), (4, 4, 2, 4), (4, 1, 1, 2)])
def test_selected_attention_matches_oracle(H, Hk, groups, q_share):
    T, l, d, ls = 40, 8, 4, 8
    N = num_compressed(T, l, d)
    q, k, v = rand(1, T, H, 12), rand(1, T, Hk, 12), rand(1, T, Hk, 6)
    kc = rand(1, N, Hk, 12)
    _, lse = compression_attention(q, kc, kc[..., :6], l, d, 0.4)
    kw = dict(block_len=l, stride=d, select_block=ls, top_n=3, num_local=1, q_share=q_share,
              scale=0.4)
    idx = select_blocks(q, kc, lse, num_groups=groups, **kw)
    sets = [[[set(j for j in idx[b, t, g].tolist() if j >= 0) for g in range(groups)]
             for t in range(T)] for b in range(1)]
    close(selected_attention(q, k, v, idx, ls, 0.4), oracle.selected(q, k, v, sets, ls, 0.4))


def test_selected_attention_with_random_block_sets():
    T, H, G, ls, n = 32, 4, 2, 4, 3
    q, k, v = rand(1, T, H, 8), rand(1, T, 2, 8), rand(1, T, 2, 5)
    gen = torch.Generator().manual_seed(7)
    idx = torch.full((1, T, G, n), -1, dtype=torch.long)
    sets = [[[None] * G for _ in range(T)]]
    for t in range(T):
        for g in range(G):
            cur = t // ls
            others = torch.randperm(cur, generator=gen)[: n - 1].tolist() if cur else []
            chosen = sorted(set(others) | {cur})
            idx[0, t, g, : len(chosen)] = torch.tensor(chosen)
            sets[0][t][g] = set(chosen)
    close(selected_attention(q, k, v, idx, ls, 0.5), oracle.selected(q, k, v, sets, ls, 0.5))


@pytest.mark.parametrize("method", ["mlp", "mean"])
def test_block_compressor_summarises_each_block(method):
    l, d, D = 8, 4, 6
    comp = BlockCompressor(D, l, d, method)
    torch.nn.init.normal_(comp.position) if method == "mlp" else None
    x = rand(2, 30, 3, D)
    out = comp(x)
    N = num_compressed(30, l, d)
    assert out.shape == (2, N, 3, D)
    for i in range(N):
        block = x[:, i * d: i * d + l]  # (B, l, G, D)
        if method == "mean":
            expect = block.mean(1)
        else:
            expect = comp.mlp((block + comp.position[:, None]).transpose(1, 2).flatten(2))
        close(out[:, i], expect)
    assert comp(rand(1, l - 1, 3, D)).shape == (1, 0, 3, D)
