"""Decode Triton kernels (``kernels.decode.triton_kernel``) against the PyTorch reference.

CPU: Triton interpreter, float32, small shapes: batches of sequences with different lengths, ring
wrap-around, empty key sets, GQA and latent (MLA/GLA, absorbed) layouts with odd widths, split-K
on and off, the model's decode through ``kernel_backend="triton"``, clear errors.
GPU (``-m gpu``): bf16 at the 340M ASA/NSA shapes, 32k context, batch 1 and 64, against a float32
reference (relative error < 1e-2, no NaN); float32 generation gives the reference's tokens.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import kernels
from kernels.blocks import num_compressed, pick_blocks
from kernels.decode import reference as ref
from kernels.decode import triton_kernel as tk

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
INF = float("inf")

# name -> (H, Hk, Dk, Dr, Dv); Dv None: latent layout (v is k, RoPE key beside it)
LAYOUTS = {
    "gqa": (4, 2, 16, 0, 16),
    "gqa_odd": (6, 2, 24, 0, 20),   # 3 heads per kv head, widths not powers of two
    "mla": (4, 1, 24, 8, None),     # one latent of 24 + RoPE 8 read by every head
    "gla": (4, 2, 12, 8, None),     # two latent groups of 12 + RoPE 8
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make(layout, B, S, *, dtype=torch.float32, device=DEV, gen=None):
    """``q, k, v, k_rope`` of a random cache; latent layouts share the tensor of k and v."""
    H, Hk, Dk, Dr, Dv = LAYOUTS[layout] if isinstance(layout, str) else layout

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    q = rnd(B, H, Dk + Dr)
    k = rnd(B, S, Hk, Dk)
    v = k if Dv is None else rnd(B, S, Hk, Dv)
    k_rope = rnd(B, S, 1, Dr) if Dr else None
    return q, k, v, k_rope


def check(o, o_ref, lse=None, lse_ref=None, *, tol=1e-5, lse_tol=1e-4):
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert not torch.isnan(o).any()
    assert rel(o, o_ref) < tol, rel(o, o_ref)
    if lse is not None:
        assert lse.dtype == torch.float32 and not torch.isnan(lse).any()
        seen = torch.isfinite(lse_ref)
        assert torch.equal(torch.isfinite(lse), seen)
        assert (lse[~seen] == -INF).all()
        assert (o.float()[~seen] == 0).all()
        if seen.any():
            assert (lse[seen] - lse_ref[seen]).abs().max().item() < lse_tol


@pytest.fixture(params=[1, 3], ids=["one_split", "split3"])
def splits(request, monkeypatch):
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"SPLITS": request.param})
    return request.param


# ------------------------------------------------------------------------------------------
# interpreter (CPU) or GPU, float32, small shapes
# ------------------------------------------------------------------------------------------

WINDOW_CASES = {
    # slots, window, positions
    "ring": (12, 12, [0, 5, 11, 30, 47]),       # ASA local: ring of the window, wrapped
    "ring_gt_window": (16, 12, [2, 15, 33]),    # window-only NSA: ring of max(window, block)
    "full_cache": (40, 7, [0, 6, 39]),           # NSA: every token held
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_decode(layout, case, splits):
    S, window, positions = WINDOW_CASES[case]
    pos = torch.tensor(positions, device=DEV)
    q, k, v, kr = make(layout, len(positions), S)
    scale = q.shape[-1] ** -0.5
    check(tk.window_decode(q, k, v, pos, window, scale, k_rope=kr),
          ref.window_decode(q, k, v, pos, window, scale, k_rope=kr))


@pytest.mark.parametrize("layout", ["gqa_odd", "mla"])
def test_causal_decode(layout, splits):
    for S, positions in ((40, [0, 17, 39]), (12, [5, 30])):  # full cache; a ring (holds the last S)
        pos = torch.tensor(positions, device=DEV)
        q, k, v, kr = make(layout, len(positions), S)
        check(tk.causal_decode(q, k, v, pos, 0.3, k_rope=kr),
              ref.causal_decode(q, k, v, pos, 0.3, k_rope=kr))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compression_decode(layout, splits):
    """Positions 0 and 6 see no compressed token yet (o = 0, lse = -inf)."""
    pos = torch.tensor([0, 6, 7, 20, 47], device=DEV)
    q, k, v, kr = make(layout, len(pos), num_compressed(48, 8, 4))
    scale = q.shape[-1] ** -0.5
    o, lse = tk.compression_decode(q, k, v, pos, 8, 4, scale, k_rope_cmp=kr)
    o_ref, lse_ref = ref.compression_decode(q, k, v, pos, 8, 4, scale, k_rope_cmp=kr)
    check(o, o_ref, lse, lse_ref)


def test_compression_decode_all_empty_and_no_tokens():
    q, k, v, kr = make("gla", 2, 3)
    pos = torch.tensor([1, 3], device=DEV)  # block_len 8: nothing has ended
    o, lse = tk.compression_decode(q, k, v, pos, 8, 4, 0.5, k_rope_cmp=kr)
    assert (o == 0).all() and (lse == -INF).all()
    q, k, v, kr = make("gla", 2, 0)          # a cache with no compressed slot at all
    o, lse = tk.compression_decode(q, k, v, pos, 8, 4, 0.5, k_rope_cmp=kr)
    assert o.shape == (2, 4, 12) and (o == 0).all() and (lse == -INF).all()


def random_blocks(B, G, S, sb, top_n, positions, gen=None):
    """Valid selections as the model makes them (pick_blocks over random importance)."""
    nb = math.ceil(S / sb)
    imp = torch.rand(B, G, nb, generator=gen).to(positions.device)
    return pick_blocks(imp, (positions // sb)[:, None], top_n=top_n, num_local=1)


SEL_LAYOUTS = {  # layout, groups G (selection groups; Hk for the model's own layouts)
    "gqa": ("gqa", 2), "gqa_odd": ("gqa_odd", 2), "mla": ("mla", 1), "gla": ("gla", 2),
    "gqa_G4": ("gqa", 4),   # finer selection groups than kv heads: 1 head per program
    "gqa_G1": ("gqa", 1),   # coarser: one group spans two kv heads
}


@pytest.mark.parametrize("name", list(SEL_LAYOUTS))
def test_selected_decode(name, splits):
    layout, G = SEL_LAYOUTS[name]
    S, sb = 48, 8
    pos = torch.tensor([0, 3, 17, 40, 47], device=DEV)
    q, k, v, kr = make(layout, len(pos), S)
    bidx = random_blocks(len(pos), G, S, sb, 3, pos)
    # hand-made rows: -1 padding in the middle, a repeated block, a block after the position
    bidx[1, 0] = torch.tensor([0, -1, 0])
    bidx[2, -1] = torch.tensor([2, 5, 1])
    scale = q.shape[-1] ** -0.5
    check(tk.selected_decode(q, k, v, bidx, pos, sb, scale, k_rope=kr),
          ref.selected_decode(q, k, v, bidx, pos, sb, scale, k_rope=kr))


def test_selected_decode_ring_and_partial_blocks(splits):
    """A ring cache (only the last S tokens held) and a block length that is not a multiple of
    the kernel's key tile."""
    S, sb = 20, 6
    pos = torch.tensor([4, 19, 33, 58], device=DEV)
    q, k, v, kr = make("gla", len(pos), S)
    bidx = torch.tensor([[[0, -1, -1], [0, -1, -1]], [[0, 2, 3], [1, 3, -1]],
                         [[0, 3, 5], [4, 5, -1]], [[2, 7, 9], [8, 9, 9]]], device=DEV)
    check(tk.selected_decode(q, k, v, bidx, pos, sb, 0.4, k_rope=kr),
          ref.selected_decode(q, k, v, bidx, pos, sb, 0.4, k_rope=kr))


@pytest.mark.parametrize("terms", ["gate_and_sum", "gate", "sum"])
def test_gated_branch_sum(terms, splits):
    """``gate_logit`` and ``add_to``: every attention function returns ``add_to +
    sigmoid(gate_logit) * o`` (the reference's), in each epilogue (the main kernel's with one
    split, the combine's with three), the logits a strided view like the layer's
    ``gate_logits[:, :, i]``; the compression lse is not gated; the empty selection and the empty
    cache too."""
    gen = torch.Generator(device=DEV).manual_seed(11)
    pos = torch.tensor([3, 17, 40], device=DEV)
    q, k, v, kr = make("gla", len(pos), 48, gen=gen)
    B, H, Dv = q.shape[0], q.shape[1], k.shape[-1]
    logits = 3 * torch.randn(B, H, 3, device=DEV, generator=gen)
    extra = {"gate_logit": logits[:, :, 1] if "gate" in terms else None,
             "add_to": (torch.randn(B, H, Dv, device=DEV, generator=gen) if "sum" in terms
                        else None)}
    bidx = random_blocks(B, 2, 48, 8, 3, pos)
    cases = {
        "causal": lambda m: m.causal_decode(q, k, v, pos, 0.3, k_rope=kr, **extra),
        "window": lambda m: m.window_decode(q, k, v, pos, 9, 0.3, k_rope=kr, **extra),
        "selected": lambda m: m.selected_decode(q, k, v, bidx, pos, 8, 0.3, k_rope=kr, **extra),
        "no_blocks": lambda m: m.selected_decode(q, k, v, bidx[:, :, :0], pos, 8, 0.3,
                                                 k_rope=kr, **extra),
    }
    for name, run in cases.items():
        check(run(tk), run(ref))
    o, lse = tk.compression_decode(q, k, v, pos, 8, 4, 0.3, k_rope_cmp=kr, **extra)
    o_ref, lse_ref = ref.compression_decode(q, k, v, pos, 8, 4, 0.3, k_rope_cmp=kr, **extra)
    check(o, o_ref)  # (position 3 sees no compressed token: o is add_to there, lse -inf)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-5)
    plain = ref.compression_decode(q, k, v, pos, 8, 4, 0.3, k_rope_cmp=kr)
    assert torch.equal(lse_ref, plain[1])
    q0, k0, v0, kr0 = make("gla", B, 0, gen=gen)  # no slot: o = 0, then gated and summed
    check(tk.causal_decode(q0, k0, v0, pos, 0.3, k_rope=kr0, **extra),
          ref.gated_sum(torch.zeros(B, H, Dv, device=DEV), **extra))


def test_gated_branch_sum_errors():
    q, k, v, kr = make("gla", 2, 8)
    pos = torch.tensor([3, 5], device=DEV)
    with pytest.raises(ValueError, match="gate_logit must be"):
        tk.causal_decode(q, k, v, pos, 0.3, k_rope=kr, gate_logit=torch.ones(2, 3, device=DEV))
    with pytest.raises(ValueError, match="add_to must be"):
        tk.causal_decode(q, k, v, pos, 0.3, k_rope=kr, add_to=torch.ones(2, 4, 5, device=DEV))
    with pytest.raises(ValueError, match="add_to must be a float"):
        tk.causal_decode(q, k, v, pos, 0.3, k_rope=kr,
                         add_to=torch.ones(2, 4, 12, device=DEV, dtype=torch.int64))


def test_more_heads_than_one_program(splits):
    """80 heads on one latent: the heads are cut into row chunks of 64."""
    pos = torch.tensor([9, 30], device=DEV)
    q, k, v, kr = make((80, 1, 16, 8, None), 2, 16)
    check(tk.window_decode(q, k, v, pos, 16, 0.25, k_rope=kr),
          ref.window_decode(q, k, v, pos, 16, 0.25, k_rope=kr))


def test_separate_value_with_rope_key(splits):
    """A latent-style RoPE key with a value tensor that is not the key tensor."""
    pos = torch.tensor([3, 11], device=DEV)
    q, k, _, kr = make("gla", 2, 12)
    v = torch.randn(2, 12, 2, 20, device=DEV)
    check(tk.window_decode(q, k, v, pos, 8, 0.3, k_rope=kr),
          ref.window_decode(q, k, v, pos, 8, 0.3, k_rope=kr))


@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.bfloat16),
                                                   (torch.bfloat16, torch.float32)])
def test_mixed_dtypes_compute_in_fp32(q_dtype, cache_dtype, splits):
    """A cache in another dtype than the query (``generate(cache_dtype=...)``): computed in fp32
    like the reference (no bf16 dot runs, so this is exact in the interpreter too)."""
    pos = torch.tensor([0, 6, 20, 47], device=DEV)
    q, k, _, kr = make("gla", len(pos), 48)
    q, k, kr = q.to(q_dtype), k.to(cache_dtype), kr.to(cache_dtype)
    tol = 1e-5 if q_dtype == torch.float32 else 1e-2  # output rounded to q's dtype
    check(tk.window_decode(q, k, k, pos, 12, 0.3, k_rope=kr),
          ref.window_decode(q, k, k, pos, 12, 0.3, k_rope=kr), tol=tol)
    o, lse = tk.compression_decode(q, k[:, :11], k[:, :11], pos, 8, 4, 0.3, k_rope_cmp=kr[:, :11])
    o_ref, lse_ref = ref.compression_decode(q, k[:, :11], k[:, :11], pos, 8, 4, 0.3,
                                            k_rope_cmp=kr[:, :11])
    check(o, o_ref, lse, lse_ref, tol=tol)
    bidx = random_blocks(len(pos), 2, 48, 8, 3, pos)
    check(tk.selected_decode(q, k, k, bidx, pos, 8, 0.3, k_rope=kr),
          ref.selected_decode(q, k, k, bidx, pos, 8, 0.3, k_rope=kr), tol=tol)
    kw = dict(num_groups=2, block_len=8, stride=4, select_block=8, num_blocks=6, top_n=3,
              num_local=1, scale=0.3, k_rope_cmp=kr[:, :11])
    assert torch.equal(tk.select_blocks_decode(q, k[:, :11], lse_ref, pos, **kw),
                       ref.select_blocks_decode(q, k[:, :11], lse_ref, pos, **kw))


SELECT_CASES = {"gqa": ("gqa", 2), "gla": ("gla", 2), "mla": ("mla", 1), "gqa_G1": ("gqa", 1)}


@pytest.mark.parametrize("name", list(SELECT_CASES))
def test_select_blocks_decode(name):
    layout, G = SELECT_CASES[name]
    max_len, l, d, sb = 64, 8, 4, 8
    pos = torch.tensor([0, 5, 20, 63, 33], device=DEV)
    q, k, _, kr = make(layout, len(pos), num_compressed(max_len, l, d))
    scale = q.shape[-1] ** -0.5
    _, lse = ref.compression_decode(q, k, k, pos, l, d, scale, k_rope_cmp=kr)
    kw = dict(num_groups=G, block_len=l, stride=d, select_block=sb, num_blocks=max_len // sb,
              top_n=3, num_local=1, scale=scale, k_rope_cmp=kr)
    got = tk.select_blocks_decode(q, k, lse, pos, **kw)
    want = ref.select_blocks_decode(q, k, lse, pos, **kw)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_select_blocks_decode_ties_pick_the_lower_block():
    """Equal importance (a zero query: every visible compressed token equally likely) and
    negative scores: the pick takes the highest importance, the lower block among equals, as
    ``pick_blocks`` does; with fewer visible blocks than ``top_n`` the rest is ``-1``."""
    max_len, l, d, sb = 64, 8, 4, 8
    pos = torch.tensor([63, 40, 9, 30], device=DEV)
    q, k, _, kr = make("gla", len(pos), num_compressed(max_len, l, d))
    q[0] = 0
    q[2:] = -q[2:].abs()  # with keys of one sign below: some importance from negative scores
    k[3] = k[3].abs()
    _, lse = ref.compression_decode(q, k, k, pos, l, d, 1.0, k_rope_cmp=kr)
    kw = dict(num_groups=2, block_len=l, stride=d, select_block=sb, num_blocks=max_len // sb,
              top_n=5, num_local=1, scale=1.0, k_rope_cmp=kr)
    got = tk.select_blocks_decode(q, k, lse, pos, **kw)
    assert torch.equal(got, ref.select_blocks_decode(q, k, lse, pos, **kw))
    assert (got[2] == -1).any()  # position 9: blocks 0 and 1 only


@pytest.mark.parametrize("geometry", [(32, 16, 64, 16, 2), (16, 16, 16, 4, 1), (48, 16, 32, 5, 3)])
def test_select_blocks_decode_at_the_nsa_geometry(geometry):
    """The pick kernel's in-kernel re-binning and top-n equal the reference's overlap matrix and
    ``pick_blocks`` at the NSA defaults (l=32, d=16, l'=64, top-16, 2 local blocks: the 1,2,2,2,1
    weights), at l = d = l', and at an l' that is not a multiple of l: positions with fewer
    visible blocks than top_n (padding), exactly top_n, and many more."""
    l, d, sb, top_n, num_local = geometry
    max_len = 64 * sb
    pos = torch.tensor([0, l - 1, sb * top_n - 1, sb * top_n + 3, max_len // 2 + 7, max_len - 1],
                       device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(3)
    q, k, _, kr = make("gla", len(pos), num_compressed(max_len, l, d), gen=gen)
    scale = q.shape[-1] ** -0.5
    _, lse = ref.compression_decode(q, k, k, pos, l, d, scale, k_rope_cmp=kr)
    kw = dict(num_groups=2, block_len=l, stride=d, select_block=sb, num_blocks=max_len // sb,
              top_n=top_n, num_local=num_local, scale=scale, k_rope_cmp=kr)
    got = tk.select_blocks_decode(q, k, lse, pos, **kw)
    want = ref.select_blocks_decode(q, k, lse, pos, **kw)
    assert torch.equal(got, want)
    assert (got[0] == -1).sum() > 0 and (got[-1] >= 0).all()  # padded early, full late


def test_dispatch_picks_the_decode_kernels():
    pos = torch.tensor([2, 13], device=DEV)
    q, k, v, kr = make("mla", 2, 8)
    out = kernels.window_decode(q, k, v, pos, 8, 0.3, kr, backend="triton")
    check(out, ref.window_decode(q, k, v, pos, 8, 0.3, k_rope=kr))
    for name in ("causal_decode", "window_decode", "compression_decode", "select_blocks_decode",
                 "selected_decode"):
        assert inspect.unwrap(kernels.dispatch.triton_kernel(name)) is getattr(tk, name)


@pytest.mark.parametrize("prompts", [[1, 14, 31], [31, 31, 31]], ids=["lengths_differ", "one_length"])
@pytest.mark.parametrize("variant,n_splits", [("asa", 2), ("nsa", None)])
@torch.no_grad()
def test_model_decode_with_triton_kernels(variant, n_splits, prompts, monkeypatch):
    """A small model decodes the same logits with ``kernel_backend="triton"`` as with the
    reference (prompts of lengths 1, 14 and 31, or all of 31: masked steps or step plans; window
    ring wrap-around, compression and selection blocks, query sharing)."""
    from nsa_lit.cache import new_caches
    from nsa_lit.model import Transformer
    from test_model import config

    if n_splits is not None:
        monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"SPLITS": n_splits})
    torch.manual_seed(0)
    cfg = config(variant)
    model = Transformer(cfg).to(DEV)
    T, prompts = 48, torch.tensor(prompts, device=DEV)
    tokens = torch.randint(0, cfg.vocab_size, (3, T), device=DEV)
    caches = {b: new_caches(cfg, 3, T, torch.float32, DEV) for b in ("triton", "reference")}
    for c in caches.values():
        model(tokens[:, :31], c, prompts)
    rows, pos = torch.arange(3, device=DEV), prompts.clone()
    for _ in range(17):  # positions up to 47: past the window (12), blocks of 8, q_share 4
        logits = {}
        for backend, c in caches.items():
            cfg.kernel_backend = backend
            logits[backend] = model.decode(tokens[rows, pos], c)
        torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-4, atol=1e-4)
        pos += 1
    cfg.kernel_backend = "reference"


@torch.no_grad()
def test_compiled_decode_traces_through_the_kernels(monkeypatch):
    """The Triton decode kernels are custom operators (``torch.ops.nsa_lit.*``): a compiled
    step (``Transformer.compile_decode``) traces a whole block without a graph break, even
    where the kernel module is loaded first inside the compiled step, one graph per layer kind
    and step plan (local: one; global: a block ends, a group opens, neither), and gives the
    eager step's logits, across a compression block end and a query-sharing group."""
    from torch._dynamo.utils import counters

    from nsa_lit.cache import new_caches
    from nsa_lit.model import Transformer
    from test_model import config

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = config("asa")  # the prefill runs the references (SMALL's blocks are too small
    model = Transformer(cfg).to(DEV).eval()  # for the training kernels), decoding the kernels
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), device=DEV)
    caches = [new_caches(cfg, 2, 24, torch.float32, DEV) for _ in range(2)]
    for c in caches:
        model(tokens[:, :14], c, torch.tensor([14, 14], device=DEV))
    cfg.kernel_backend = "triton"
    eager = [model.decode(tokens[:, 14 + i], caches[0]) for i in range(6)]
    monkeypatch.setattr(kernels.dispatch, "_loaded", {})  # the compiled step loads them
    model.compile_decode()
    for i in range(6):
        torch.testing.assert_close(model.decode(tokens[:, 14 + i], caches[1]), eager[i],
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1 + 3
    cfg.kernel_backend = "reference"
    torch._dynamo.reset()


# -- clear errors ----------------------------------------------------------------------------


def test_errors_are_clear(monkeypatch):
    pos = torch.tensor([3, 5], device=DEV)
    q, k, v, kr = make("gla", 2, 8)
    with pytest.raises(ValueError, match="dtype must be float16, bfloat16 or float32"):
        tk.window_decode(q.double(), k.double(), k.double(), pos, 4, 0.3, k_rope=kr.double())
    with pytest.raises(ValueError, match=r"q width \(20\) must equal the key width 12"):
        tk.window_decode(q, k, v, pos, 4, 0.3)  # RoPE key missing
    with pytest.raises(ValueError, match="k_rope must be"):
        tk.window_decode(q, k, v, pos, 4, 0.3, k_rope=kr.expand(-1, -1, 2, -1))
    with pytest.raises(ValueError, match=r"multiple of key heads"):
        tk.window_decode(q[:, :3], k, v, pos, 4, 0.3, k_rope=kr)
    with pytest.raises(ValueError, match="positions must be a"):
        tk.window_decode(q, k, v, pos[:1], 4, 0.3, k_rope=kr)
    with pytest.raises(ValueError, match="positions must be int32 or int64"):
        tk.window_decode(q, k, v, pos.float(), 4, 0.3, k_rope=kr)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        tk.window_decode(q, k, v, pos, 0, 0.3, k_rope=kr)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        tk.compression_decode(q, k, v, pos, 8, 0, 0.3, k_rope_cmp=kr)
    with pytest.raises(ValueError, match=r"multiple of selection groups \(3\)"):
        tk.selected_decode(q, k, v, torch.zeros(2, 3, 2, dtype=torch.long, device=DEV), pos, 8,
                           0.3, k_rope=kr)
    with pytest.raises(ValueError, match="block_idx must be int32 or int64"):
        tk.selected_decode(q, k, v, torch.zeros(2, 2, 2, device=DEV), pos, 8, 0.3, k_rope=kr)
    with pytest.raises(ValueError, match=r"lse must be \(B=2, H=4\)"):
        tk.select_blocks_decode(q, k, torch.zeros(2, 3, device=DEV), pos, num_groups=2,
                                block_len=8, stride=4, select_block=8, num_blocks=2, top_n=2,
                                num_local=1, scale=0.3, k_rope_cmp=kr)
    with pytest.raises(ValueError, match="key width Dk=600 is not supported"):
        big = torch.zeros(2, 8, 1, 600, device=DEV)
        tk.window_decode(torch.zeros(2, 4, 600, device=DEV), big, big, pos, 4, 0.3)
    monkeypatch.setattr(tk, "interpreting", lambda: False)
    if not CUDA:
        with pytest.raises(ValueError, match="need CUDA tensors"):
            tk.window_decode(q, k, v, pos, 4, 0.3, k_rope=kr)


# ------------------------------------------------------------------------------------------
# GPU: bf16 at the 340M shapes, 32k context (``pytest -m gpu``)
# ------------------------------------------------------------------------------------------

CTX = 32768
GPU_LAYOUTS = {  # H, Hk, Dk, Dr, Dv
    "mla_local": (16, 1, 256, 32, None),    # ASA local layer: latent 256 + RoPE 32
    "gla_global": (16, 2, 128, 32, None),   # ASA global layer: 2 latent groups of 128 + RoPE 32
    "gqa_nsa": (16, 4, 64, 0, 64),          # NSA / full attention: 4 kv heads of 64
}


def gpu_positions(B, gen):
    """Different lengths per sequence up to the 32k context, with short ones (empty compression,
    window not yet full, first blocks) when the batch is large enough."""
    if B == 1:
        return torch.tensor([CTX - 1], device="cuda")
    pos = torch.randint(0, CTX, (B,), device="cuda", generator=gen)
    pos[:6] = torch.tensor([0, 20, 31, 100, 511, 512])
    pos[6] = CTX - 1
    return pos


def per_sequence(fn, *tensors, n_out=1):
    """Run a float32 reference one sequence at a time (the batched reference would materialise
    ``B x S x H x D`` float32 keys): ``tensors`` are ``(B, ...)`` or None."""
    B = tensors[0].shape[0]
    outs = []
    for b in range(B):
        args = [None if t is None else (t[b:b + 1].float() if t.is_floating_point()
                                        else t[b:b + 1]) for t in tensors]
        outs.append(fn(*args))
    if n_out == 1:
        return torch.cat(outs)
    return tuple(torch.cat([o[i] for o in outs]) for i in range(n_out))


def shared_v(k, v):
    return None if v is k else v


def _v(k, v_or_none):
    return k if v_or_none is None else v_or_none


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("layout", ["mla_local", "gqa_nsa"])
def test_gpu_window_bf16(layout, B):
    gen = torch.Generator(device="cuda").manual_seed(1)
    pos = gpu_positions(B, gen)
    S = 512 if layout == "mla_local" else CTX  # ASA: ring of the window; NSA: every token
    q, k, v, kr = make(GPU_LAYOUTS[layout], B, S, dtype=torch.bfloat16, device="cuda", gen=gen)
    scale = 96 ** -0.5
    o = tk.window_decode(q, k, v, pos, 512, scale, k_rope=kr)
    o_ref = per_sequence(lambda q_, k_, v_, p_, r_: ref.window_decode(
        q_, k_, _v(k_, v_), p_, 512, scale, k_rope=r_), q, k, shared_v(k, v), pos, kr)
    check(o, o_ref.to(o.dtype), tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("layout", ["gla_global", "gqa_nsa"])
def test_gpu_compression_bf16(layout, B):
    gen = torch.Generator(device="cuda").manual_seed(2)
    pos = gpu_positions(B, gen)
    q, k, v, kr = make(GPU_LAYOUTS[layout], B, num_compressed(CTX, 32, 16), dtype=torch.bfloat16,
                       device="cuda", gen=gen)
    scale = 96 ** -0.5
    o, lse = tk.compression_decode(q, k, v, pos, 32, 16, scale, k_rope_cmp=kr)
    o_ref, lse_ref = per_sequence(lambda q_, k_, v_, p_, r_: ref.compression_decode(
        q_, k_, _v(k_, v_), p_, 32, 16, scale, k_rope_cmp=r_), q, k, shared_v(k, v), pos, kr,
        n_out=2)
    check(o, o_ref.to(o.dtype), lse, lse_ref, tol=1e-2, lse_tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("layout", ["gla_global", "gqa_nsa"])
def test_gpu_selected_bf16(layout, B):
    gen = torch.Generator(device="cuda").manual_seed(3)
    pos = gpu_positions(B, gen)
    H, Hk = GPU_LAYOUTS[layout][:2]
    q, k, v, kr = make(GPU_LAYOUTS[layout], B, CTX, dtype=torch.bfloat16, device="cuda", gen=gen)
    imp = torch.rand(B, Hk, CTX // 64, device="cuda", generator=gen)
    bidx = pick_blocks(imp, (pos // 64)[:, None], top_n=16, num_local=2)
    scale = 96 ** -0.5
    o = tk.selected_decode(q, k, v, bidx, pos, 64, scale, k_rope=kr)
    o_ref = per_sequence(lambda q_, k_, v_, b_, p_, r_: ref.selected_decode(
        q_, k_, _v(k_, v_), b_, p_, 64, scale, k_rope=r_), q, k, shared_v(k, v), bidx, pos, kr)
    check(o, o_ref.to(o.dtype), tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_gpu_causal_bf16(B):
    gen = torch.Generator(device="cuda").manual_seed(4)
    pos = gpu_positions(B, gen)
    q, k, v, _ = make(GPU_LAYOUTS["gqa_nsa"], B, CTX, dtype=torch.bfloat16, device="cuda", gen=gen)
    o = tk.causal_decode(q, k, v, pos, 0.125)
    o_ref = per_sequence(lambda q_, k_, v_, p_: ref.causal_decode(q_, k_, v_, p_, 0.125),
                         q, k, v, pos)
    check(o, o_ref.to(o.dtype), tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("layout", ["gla_global", "gqa_nsa"])
def test_gpu_select_blocks_decode_bf16(layout, B):
    """The kernel's picks agree with the float32 reference's on the same bf16 inputs (both sum
    fp32 products; only near-ties may differ)."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    pos = gpu_positions(B, gen)
    H, Hk = GPU_LAYOUTS[layout][:2]
    N = num_compressed(CTX, 32, 16)
    q, k, _, kr = make(GPU_LAYOUTS[layout], B, N, dtype=torch.bfloat16, device="cuda", gen=gen)
    scale = 96 ** -0.5
    _, lse = tk.compression_decode(q, k, k, pos, 32, 16, scale, k_rope_cmp=kr)
    kw = dict(num_groups=Hk, block_len=32, stride=16, select_block=64, num_blocks=CTX // 64,
              top_n=16, num_local=2, scale=scale)
    got = tk.select_blocks_decode(q, k, lse, pos, k_rope_cmp=kr, **kw)
    want = per_sequence(lambda q_, k_, l_, p_, r_: ref.select_blocks_decode(
        q_, k_, l_, p_, k_rope_cmp=r_, **kw), q, k, lse, pos, kr)
    assert got.shape == want.shape == (B, Hk, 16)
    same = (torch.sort(got, -1).values == torch.sort(want, -1).values).all(-1)
    assert same.float().mean().item() >= 0.95, same.float().mean().item()


@pytest.mark.gpu
@pytest.mark.parametrize("n_splits", [1, 4])
def test_gpu_fp32_all_functions(n_splits, monkeypatch):
    """float32 on the GPU (IEEE dots), split-K on and off, at mid-size shapes."""
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"SPLITS": n_splits})
    gen = torch.Generator(device="cuda").manual_seed(6)
    B, S = 8, 4096
    pos = torch.randint(0, S, (B,), device="cuda", generator=gen)
    pos[:3] = torch.tensor([0, 30, S - 1])
    for layout in GPU_LAYOUTS:
        H, Hk = GPU_LAYOUTS[layout][:2]
        q, k, v, kr = make(GPU_LAYOUTS[layout], B, S, device="cuda", gen=gen)
        check(tk.window_decode(q, k, v, pos, 512, 0.1, k_rope=kr),
              ref.window_decode(q, k, v, pos, 512, 0.1, k_rope=kr), tol=1e-4)
        check(tk.causal_decode(q, k, v, pos, 0.1, k_rope=kr),
              ref.causal_decode(q, k, v, pos, 0.1, k_rope=kr), tol=1e-4)
        N = num_compressed(S, 32, 16)
        o, lse = tk.compression_decode(q, k[:, :N], v[:, :N], pos, 32, 16, 0.1,
                                       k_rope_cmp=None if kr is None else kr[:, :N])
        o_ref, lse_ref = ref.compression_decode(q, k[:, :N], v[:, :N], pos, 32, 16, 0.1,
                                                k_rope_cmp=None if kr is None else kr[:, :N])
        check(o, o_ref, lse, lse_ref, tol=1e-4, lse_tol=1e-3)
        bidx = random_blocks(B, Hk, S, 64, 16, pos)
        check(tk.selected_decode(q, k, v, bidx, pos, 64, 0.1, k_rope=kr),
              ref.selected_decode(q, k, v, bidx, pos, 64, 0.1, k_rope=kr), tol=1e-4)


# kernel-friendly shapes: head_dim 64, GLA latent 2 x 128 + RoPE 32, NSA blocks 32/16/64
GPU_ARCH = dict(vocab_size=512, n_layers=4, d_model=256, n_heads=8, head_dim=64, n_kv_heads=2,
                mlp_hidden=512, seq_len=1024, latent_dim=256, rope_dim=32, window=128,
                compress_block=32, compress_stride=16, select_block=64, top_n=4,
                num_local_blocks=2, q_share=4)


def _gpu_models(pattern):
    from nsa_lit.config import ModelConfig
    from nsa_lit.model import Transformer

    torch.manual_seed(0)
    models = {b: Transformer(ModelConfig(**GPU_ARCH, layer_pattern=pattern,
                                         kernel_backend=b)).cuda()
              for b in ("triton", "reference")}
    models["reference"].load_state_dict(models["triton"].state_dict())
    return models


def _forced_decode_logits(models, dtype, steps=250):
    """Prefill prompts of lengths 5, 150, 300, then decode the same given tokens with each
    model: ``{backend: (steps, B, vocab)}`` float32 logits."""
    from nsa_lit.cache import new_caches

    gen = torch.Generator(device="cuda").manual_seed(7)
    tokens = torch.randint(0, 512, (3, 600), device="cuda", generator=gen)
    lengths = torch.tensor([5, 150, 300], device="cuda")
    rows = torch.arange(3, device="cuda")
    out = {}
    for b, m in models.items():
        caches = new_caches(m.cfg, 3, 600, dtype, "cuda")
        m(tokens[:, :300], caches, lengths)
        pos, logits = lengths.clone(), []
        for _ in range(steps):
            logits.append(m.decode(tokens[rows, pos], caches).float())
            pos += 1
        out[b] = torch.stack(logits)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["LG", "N", "F"])
@torch.no_grad()
def test_gpu_generate_triton_equals_reference_fp32(pattern):
    """float32: greedy generation gives the same tokens with the Triton decode kernels as with
    the reference (prompts of different lengths, past the window (128) and several selection
    blocks (64)), and teacher-forced decode logits agree closely."""
    from nsa_lit.generate import generate

    models = _gpu_models(pattern)
    logits = _forced_decode_logits(models, torch.float32)
    assert rel(logits["triton"], logits["reference"]) < 1e-4
    prompts = [list(range(1, 6)), [7] * 150, list(range(20, 320))]
    out = {b: generate(m, prompts, 150) for b, m in models.items()}
    assert out["triton"] == out["reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["LG", "N", "F"])
@torch.no_grad()
def test_gpu_decode_bf16_logits_close(pattern):
    """bf16 weights and caches: teacher-forced decode logits of the Triton kernels stay close
    to the reference's (both read the same bf16 caches; near-tied block picks may differ)."""
    models = _gpu_models(pattern)
    for m in models.values():
        m.bfloat16()
    logits = _forced_decode_logits(models, torch.bfloat16)
    assert torch.isfinite(logits["triton"]).all()
    assert rel(logits["triton"], logits["reference"]) < 3e-2


def test_split_count_follows_the_minimum_keys_per_split(monkeypatch):
    """About two programs per SM (4 "SMs" off CUDA), at least ``MIN_KEYS_PER_SPLIT`` keys each
    (``CONFIG_OVERRIDE`` can raise it), at most ``MAX_SPLITS``; ``SPLITS`` fixes the count."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {})
    assert tk._num_splits(1, 512, cpu) == 512 // tk.MIN_KEYS_PER_SPLIT  # 4 of 128 keys
    assert tk._num_splits(1, 10**6, cpu) == 8  # two programs on each of 4 "SMs"
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"MIN_KEYS_PER_SPLIT": 512})
    assert tk._num_splits(1, 512, cpu) == 1
    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {"SPLITS": 3})
    assert tk._num_splits(1, 512, cpu) == 3

