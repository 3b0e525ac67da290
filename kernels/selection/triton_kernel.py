"""Block importance and top-n block selection, Triton kernel.

Same function and signature as :func:`kernels.selection.reference.select_blocks`; returns
``block_idx (B, T, G, top_n)`` int64 (valid indices ascending, ``-1`` padding last), no gradient.

Importance kernel, grid ``(ceil(Tq / BLOCK_R), B * G)`` with ``Tq = ceil(T / q_share)``: a program
owns ``BLOCK_R`` *first* queries ``t0 = r * q_share`` (query sharing: only those rows are ever
computed) of one selection group ``g``.

Phase 1, importance. Heads are packed as in the compression kernel: a "unit" is a set of
``SUB = H / lcm(G, Hk)`` heads that share both the selection group and the key/value head, so one
MMA of ``BLOCK_R * SUB`` rows covers them; a group has ``U = lcm(G, Hk) / G`` units (1 for GQA and
absorbed GLA, ``H / G`` for the up-projected form). For each visible key tile the probabilities
``exp(q.k * scale - lse)`` are recomputed (never stored), summed over the heads of the group, and
re-binned to selection blocks with a small product against the overlap counts of
``kernels.blocks.overlap_weights`` (exact integers; the probabilities split into a
tf32-exact high part and the rest, so two tf32 MMAs give fp32 accuracy). Key tiles are aligned so that a tile starts on a
selection-block boundary (``BLOCK_N * stride % select_block == 0``); the tile's weights are then the
same for every tile: ``JB = BLOCK_N * stride / select_block`` blocks are complete after the tile,
and the ``JC`` blocks its last tokens spill into are carried in registers to the next tile. The
complete block scores go to a small fp32 scratch row ``(B, G, Tq, Ns)`` (L2-resident; the ``(T, N)``
probability matrix never exists).

Phase 2, top-n (``_topn_rows``): each row's ``Ns`` scores are loaded into registers, forced
blocks (block 0 and the ``num_local`` blocks ending with the current block of ``t0``) set to
+inf, and each block gets one int64 key (score bits above, ``NS_PAD - 1 - j`` below; blocks
after the current one get -1), so ``top_n`` rounds of one row max-reduction pick the best block
and, **among equal scores, the lower block index** (the reference uses a stable descending sort,
which agrees). The picks are sorted ascending in registers (``tl.sort``), empty picks become
``-1``, and the row is written to all ``q_share`` queries of its group. By default phase 2 is a
second, light launch over the L2-resident scratch ("split": few registers, so many programs per
SM hide the reductions' latency); ``CONFIG_OVERRIDE["TOPN"] = "fused"`` runs it at the end of the
importance program instead (after a barrier). A causal row ranks only its first ``cur + 1``
blocks, so the split phase is one launch per power-of-two row width (``TOPN_MIN_WIDTH`` up to
the padded block count), each over the rows whose current block fits it (about two thirds of
the work of padding every row to the longest). On an H200 (T = 65536, ASA shapes) split took
1.30 ms in all, fused 1.41 ms; ``torch.topk`` alone on the importance tensor took 1.07 ms, more
than the whole Triton top-n phase (0.42 ms).

Rows longer than ``MAX_NS_IN_REGISTERS`` selection blocks fall back to ``torch`` top-k on the
kernel's importance tensor (same tie-break).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.blocks import num_selection_blocks, pick_blocks
from kernels.triton_device import load_rows, qk
from kernels.triton_utils import interpreter_tiles, interpreting, row_major, split_dim

LOG2E = 1.4426950408889634
MAX_NS_IN_REGISTERS = 16384
MAX_HEAD_DIM = 256
_BIG = 1 << 30

CONFIG_OVERRIDE: dict[str, int] = {}


@triton.jit
def _rebin(pg, w_main, w_carry, carry):
    """``(pg @ w_main + carry, pg @ w_carry)`` at ~fp32 accuracy on the tensor cores: ``pg`` is
    split into a tf32-exact high part and the remainder (two tf32 MMAs); the weights are exact
    small integers. (An fp32 FMA dot would hold whole K-slices of both operands per thread.)"""
    hi = (pg.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    lo = pg - hi
    score = tl.dot(hi, w_main, carry, input_precision="tf32")
    score = tl.dot(lo, w_main, score, input_precision="tf32")
    nxt = tl.dot(hi, w_carry, input_precision="tf32")
    nxt = tl.dot(lo, w_carry, nxt, input_precision="tf32")
    return score, nxt


@triton.jit
def _topn_rows(IMP, OUT, r2, r_end, pid_bg, b, g, T, Tq, Ns, G,
               Q_SHARE: tl.constexpr, SEL: tl.constexpr, TOP_N: tl.constexpr,
               TOPN_PAD: tl.constexpr, NUM_LOCAL: tl.constexpr, RB: tl.constexpr,
               NS_PAD: tl.constexpr):
    """Phase 2 for rows ``r2 < r_end`` (first queries ``r2 * Q_SHARE``) of group ``g``: forced
    blocks, causality, top-n (ties: lower index), ascending order, written to all ``Q_SHARE``
    queries. Every row's current block must be below ``NS_PAD`` (the columns it reads)."""
    js = tl.arange(0, NS_PAD)[None, :]
    kk = tl.arange(0, TOPN_PAD)[None, :]
    ok2 = r2 < r_end
    t02 = r2 * Q_SHARE
    cur = (t02 // SEL)[:, None]
    row2 = IMP + (pid_bg.to(tl.int64) * Tq + r2.to(tl.int64)) * Ns
    sc = tl.load(row2[:, None] + js, mask=ok2[:, None] & (js <= cur), other=0.0)
    forced = (js == 0) | ((js <= cur) & (js > cur - NUM_LOCAL))
    sc = tl.where(forced, float("inf"), sc)
    # one int64 key per block: the float bits above, NS_PAD-1-j below, so a single
    # max-reduction gives the best score and, among equal scores, the lowest index. Scores are
    # >= 0 (sums of probabilities) or +inf, so every key is >= 0; blocks after the current one,
    # and picked ones, get the key -1.
    bits = sc.to(tl.int32, bitcast=True)
    key = (bits.to(tl.int64) << 32) | (NS_PAD - 1 - js).to(tl.int64)
    key_min = tl.full([RB, NS_PAD], -1, tl.int64)
    key = tl.where(js <= cur, key, key_min)
    picks = tl.full([RB, TOPN_PAD], 1 << 30, tl.int32)
    for k in range(TOP_N):
        best = tl.max(key, 1)
        idx = (NS_PAD - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
        pick = tl.where(best >= 0, idx, 1 << 30)
        picks = tl.where(kk == k, pick[:, None], picks)
        key = tl.where(key == best[:, None], key_min, key)
    picks = tl.sort(picks, 1)
    res = tl.where(picks >= (1 << 30), -1, picks).to(tl.int64)
    for qq in tl.static_range(Q_SHARE):
        t = t02 + qq
        off = ((b * T + t.to(tl.int64)) * G + g) * TOP_N
        tl.store(OUT + off[:, None] + kk, res, mask=(ok2 & (t < T))[:, None] & (kk < TOP_N))


@triton.jit
def _select_kernel(
    Q, K, LSE, IMP, OUT,
    sqb, sqt, sqh, skb, skn, skh, slb, slt, slh,
    T, N, Tq, Ns, G, n_units, qk_scale,
    SUB: tl.constexpr, SUB_PAD: tl.constexpr, U: tl.constexpr, REP_KV: tl.constexpr,
    Q_SHARE: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
    SEL: tl.constexpr, TOP_N: tl.constexpr, TOPN_PAD: tl.constexpr, NUM_LOCAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, JB: tl.constexpr, JC: tl.constexpr,
    TAIL: tl.constexpr, JB_PAD: tl.constexpr, NS_PAD: tl.constexpr, RB: tl.constexpr,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, IEEE: tl.constexpr,
    DO_TOPN: tl.constexpr,
):
    M: tl.constexpr = BLOCK_R * SUB_PAD
    pid_r = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) rows first
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    r0 = pid_r * BLOCK_R

    # ---------------- phase 1: importance of the selection blocks -------------------------
    m = tl.arange(0, M)
    r = r0 + m // SUB_PAD
    hh = m % SUB_PAD
    t0 = r * Q_SHARE
    row_ok = (r < Tq) & (hh < SUB)
    t64 = t0.to(tl.int64)

    # overlap counts of one aligned key tile (kernels.blocks.overlap_weights times stride; exact
    # small integers, so exact in tf32; the division by stride happens at the store)
    ii = tl.arange(0, BLOCK_N)[:, None]
    cc = tl.arange(0, JB_PAD)[None, :]
    tok_lo = ii * STRIDE
    tok_hi = tok_lo + BLOCK_LEN
    ov_m = tl.minimum(tok_hi, (cc + 1) * SEL) - tl.maximum(tok_lo, cc * SEL)
    w_main = tl.where(cc < JB, tl.maximum(ov_m, 0).to(tl.float32), 0.0)
    ov_c = tl.minimum(tok_hi, (cc + JB + 1) * SEL) - tl.maximum(tok_lo, (cc + JB) * SEL)
    w_carry = tl.where(cc < JC, tl.maximum(ov_c, 0).to(tl.float32), 0.0)

    r_last = tl.minimum(r0 + BLOCK_R, Tq) - 1
    n_hi = tl.minimum(tl.maximum(r_last * Q_SHARE - BLOCK_LEN + 1 + STRIDE, 0) // STRIDE, N)
    n_tiles = tl.cdiv(n_hi, BLOCK_N)
    n_full = tl.minimum(tl.maximum(r0 * Q_SHARE - BLOCK_LEN + 1 + STRIDE, 0) // STRIDE, N)
    full_tiles = n_full // BLOCK_N

    rr = r0 + tl.arange(0, BLOCK_R)
    cj = tl.arange(0, JB_PAD)
    imp_row = IMP + (pid_bg.to(tl.int64) * Tq + rr.to(tl.int64)) * Ns
    r_ok = rr < Tq
    nn = tl.arange(0, BLOCK_N)
    carry = tl.zeros([BLOCK_R, JB_PAD], tl.float32)

    if U == 1:
        h = (g * SUB + hh).to(tl.int64)
        qa, qb = load_rows(Q, b * sqb + t64 * sqt + h * sqh, row_ok, D, DA, DB)
        lse = tl.load(LSE + b * slb + t64 * slt + h * slh, mask=row_ok, other=0.0)
        lse2 = tl.where((lse == lse) & (tl.abs(lse) < float("inf")), lse * 1.4426950408889634, 0.0)
        lse2 = tl.where(hh < SUB, lse2, float("inf"))  # padded heads add nothing
        k_base = K + b * skb + ((g * SUB) // REP_KV).to(tl.int64) * skh
        for kt in range(0, n_tiles):
            n = kt * BLOCK_N + nn
            ka, kb = load_rows(k_base, n.to(tl.int64) * skn, n < N, D, DA, DB)
            s = qk(qa, qb, ka, kb, DB, IEEE) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            if kt >= full_tiles:
                vis = (n[None, :] * STRIDE + (BLOCK_LEN - 1) <= t0[:, None]) & (n[None, :] < N)
                p = tl.where(vis, p, 0.0)
            if SUB_PAD > 1:
                pg = tl.sum(tl.reshape(p, (BLOCK_R, SUB_PAD, BLOCK_N)), 1)
            else:
                pg = p
            score, carry = _rebin(pg, w_main, w_carry, carry)
            j = kt * JB + cj
            tl.store(imp_row[:, None] + j[None, :], score / STRIDE,
                     mask=r_ok[:, None] & (cj[None, :] < JB) & (j[None, :] < Ns))
    else:
        for kt in range(0, n_tiles):
            n = kt * BLOCK_N + nn
            pg = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
            for u in range(0, n_units):
                unit = g * U + u
                h = (unit * SUB + hh).to(tl.int64)
                qa, qb = load_rows(Q, b * sqb + t64 * sqt + h * sqh, row_ok, D, DA, DB)
                lse = tl.load(LSE + b * slb + t64 * slt + h * slh, mask=row_ok, other=0.0)
                lse2 = tl.where((lse == lse) & (tl.abs(lse) < float("inf")),
                                lse * 1.4426950408889634, 0.0)
                lse2 = tl.where(hh < SUB, lse2, float("inf"))
                k_base = K + b * skb + ((unit * SUB) // REP_KV).to(tl.int64) * skh
                ka, kb = load_rows(k_base, n.to(tl.int64) * skn, n < N, D, DA, DB)
                s = qk(qa, qb, ka, kb, DB, IEEE) * qk_scale
                p = tl.exp2(s - lse2[:, None])
                if kt >= full_tiles:
                    vis = ((n[None, :] * STRIDE + (BLOCK_LEN - 1) <= t0[:, None])
                           & (n[None, :] < N))
                    p = tl.where(vis, p, 0.0)
                if SUB_PAD > 1:
                    pg += tl.sum(tl.reshape(p, (BLOCK_R, SUB_PAD, BLOCK_N)), 1)
                else:
                    pg += p
            score, carry = _rebin(pg, w_main, w_carry, carry)
            j = kt * JB + cj
            tl.store(imp_row[:, None] + j[None, :], score / STRIDE,
                     mask=r_ok[:, None] & (cj[None, :] < JB) & (j[None, :] < Ns))
    # blocks the last tile spills into, and any later block up to the current block of the last
    # row (no visible token reaches those: zero), so that every visible block is written
    j = n_tiles * JB + cj
    tl.store(imp_row[:, None] + j[None, :], carry / STRIDE,
             mask=r_ok[:, None] & (cj[None, :] < TAIL) & (j[None, :] < Ns))
    # (only when k_cmp holds fewer tokens than the rows could see: zeros up to the last row's
    # current block)
    cur_last = (r_last * Q_SHARE) // SEL
    zero = tl.zeros([BLOCK_R, JB_PAD], tl.float32)
    for j0 in range(n_tiles * JB + TAIL, cur_last + 1, JB_PAD):
        j = j0 + cj
        tl.store(imp_row[:, None] + j[None, :], zero,
                 mask=r_ok[:, None] & (j[None, :] <= cur_last) & (j[None, :] < Ns))

    if DO_TOPN:
        tl.debug_barrier()  # the program's own importance rows, written above, are read below
        for c0 in range(0, BLOCK_R, RB):
            _topn_rows(IMP, OUT, r0 + c0 + tl.arange(0, RB), Tq, pid_bg, b, g, T, Tq, Ns, G,
                       Q_SHARE, SEL, TOP_N, TOPN_PAD, NUM_LOCAL, RB, NS_PAD)


@triton.jit
def _topn_kernel(IMP, OUT, R0, R_END, T, Tq, Ns, G,
                 Q_SHARE: tl.constexpr, SEL: tl.constexpr, TOP_N: tl.constexpr,
                 TOPN_PAD: tl.constexpr, NUM_LOCAL: tl.constexpr, RB: tl.constexpr,
                 NS_PAD: tl.constexpr):
    """Phase 2 as its own launch (few registers, so many programs per SM hide the latency of
    the row reductions), over rows ``R0 .. R_END - 1`` whose blocks fit in ``NS_PAD`` columns."""
    pid_bg = tl.program_id(1)
    _topn_rows(IMP, OUT, R0 + tl.program_id(0) * RB + tl.arange(0, RB), R_END, pid_bg,
               (pid_bg // G).to(tl.int64), pid_bg % G, T, Tq, Ns, G,
               Q_SHARE, SEL, TOP_N, TOPN_PAD, NUM_LOCAL, RB, NS_PAD)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check(q, k_cmp, lse, num_groups, block_len, stride, select_block, top_n, num_local,
           q_share, scale) -> None:
    for name, x in (("q", q), ("k_cmp", k_cmp)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if q.dtype != k_cmp.dtype:
        raise ValueError(f"q and k_cmp must share one dtype, got {q.dtype} and {k_cmp.dtype}")
    B, T, H, D = q.shape
    if k_cmp.shape[0] != B:
        raise ValueError(f"batch size differs: q {B}, k_cmp {k_cmp.shape[0]}")
    if k_cmp.shape[3] != D:
        raise ValueError(f"q head dim ({D}) differs from k_cmp head dim ({k_cmp.shape[3]})")
    Hk = k_cmp.shape[2]
    if Hk < 1 or H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hk})")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, T, H):
        raise ValueError(f"lse must have shape (B, T, H) = {(B, T, H)}, got "
                         f"{tuple(getattr(lse, 'shape', ()))}")
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32, got {lse.dtype}")
    if not (q.device == k_cmp.device == lse.device):
        raise ValueError("q, k_cmp and lse must be on one device")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    for name, v, lo in (("num_groups", num_groups, 1), ("block_len", block_len, 1),
                        ("stride", stride, 1), ("select_block", select_block, 1),
                        ("top_n", top_n, 1), ("num_local", num_local, 0), ("q_share", q_share, 1)):
        if int(v) != v or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v}")
    if H % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the query heads ({H})")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q/k head dim ({D}) must be in [1, {MAX_HEAD_DIM}]")
    if top_n > 128:
        raise ValueError(f"top_n ({top_n}) must be at most 128")
    if q_share > 64:
        raise ValueError(f"q_share ({q_share}) must be at most 64")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number, got {type(scale).__name__}")


def _tile_plan(block_len: int, stride: int, select_block: int, min_block_n: int):
    """Key tile ``BLOCK_N`` aligned to selection blocks: ``JB`` blocks are complete after a tile,
    ``JC <= JB`` more receive its last tokens (carried to the next tile), and the last tile's
    ``TAIL >= JC`` blocks cover every block up to the current one of the program's last row."""
    need = select_block // math.gcd(stride, select_block)
    if not _is_pow2(need):
        raise ValueError(
            f"select_block / gcd(stride, select_block) = {need} must be a power of two "
            f"(stride={stride}, select_block={select_block})")
    block_n = max(min_block_n, need, 16)
    while True:
        jb = block_n * stride // select_block
        last = (block_n - 1) * stride + block_len - 1  # last raw token of the tile, tile-relative
        jc = max(0, last // select_block + 1 - jb)
        tail = max(jc, (block_len - 1) // select_block + 1)
        jb_pad = max(16, triton.next_power_of_2(jb))
        if jc <= jb and tail <= jb_pad:
            return block_n, jb, jc, tail, jb_pad
        if block_n >= 1024:
            raise ValueError(
                f"block_len ({block_len}) is too long for select_block ({select_block}) and "
                f"stride ({stride}): a compressed token spans more selection blocks than supported")
        block_n *= 2


def _config(q: torch.Tensor, units: int) -> dict:
    if interpreter_tiles(q.device):
        cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    elif q.dtype == torch.float32:  # exact fp32 dots run on FMA units: small key tiles
        cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1}
    else:  # from ptxas reports for sm_90 and H200 timings; several head units per group
        # (per-head keys, e.g. expanded MLA): longer key tiles. Those 128-key tiles spill about
        # 190 bytes a thread at 255 registers in the 340M ASA global layer (Triton 3.6 and 3.8,
        # benchmarks/kernel_resources.py) and still beat the spill-free 64-key tiles on an H200
        # (h200-compression-sweep{,2}-upprojected.json: 1.04-1.06 vs 1.20 ms at 64k)
        cfg = {"BLOCK_M": 128 if units == 1 else 64,
               "BLOCK_N": 64 if units == 1 or q.shape[-1] > 128 else 128, "num_warps": 4,
               "num_stages": 2}
    # top-n: in the importance kernel ("fused") or a launch of its own ("split"), over rows
    # of RB_ELEMS elements per chunk, TOPN_WARPS warps for the split launch
    # (TOPN_MIN_WIDTH: the split launch's narrowest row width, see _topn_buckets)
    cfg.update({"TOPN": "split", "RB_ELEMS": 512 * cfg["num_warps"], "TOPN_WARPS": None,
                "TOPN_ELEMS": 2048, "TOPN_MIN_WIDTH": 128})
    cfg.update(CONFIG_OVERRIDE)
    return cfg


def _launch(q, k, lse, num_groups, block_len, stride, select_block, top_n, num_local, q_share,
            scale, do_topn, imp=None):
    B, T, H, D = q.shape
    N, Hk = k.shape[1], k.shape[2]
    G = num_groups
    Tq = triton.cdiv(T, q_share)
    Ns = num_selection_blocks(T, select_block)
    lcm = G * Hk // math.gcd(G, Hk)
    sub = H // lcm
    units = lcm // G
    sub_pad = triton.next_power_of_2(sub)
    DA, DB = split_dim(D)
    cfg = _config(q, units)
    block_n, jb, jc, tail, jb_pad = _tile_plan(block_len, stride, select_block, cfg["BLOCK_N"])
    block_r = max(cfg["BLOCK_M"] // sub_pad, 16)
    ns_pad = triton.next_power_of_2(max(Ns, 1))
    rb = min(block_r, max(1, cfg["RB_ELEMS"] // ns_pad))
    fused = do_topn and cfg["TOPN"] == "fused"
    out = torch.empty(B, T, G, top_n, dtype=torch.int64, device=q.device)
    if imp is None:
        imp = torch.empty(B, G, Tq, Ns, dtype=torch.float32, device=q.device)
    if B * T == 0:
        return out, imp
    topn_args = dict(Q_SHARE=q_share, SEL=select_block, TOP_N=top_n,
                     TOPN_PAD=triton.next_power_of_2(top_n), NUM_LOCAL=num_local, NS_PAD=ns_pad)
    grid = (triton.cdiv(Tq, block_r), B * G)
    _select_kernel[grid](
        q, k, lse, imp, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        T, N, Tq, Ns, G, units, float(scale) * LOG2E,
        SUB=sub, SUB_PAD=sub_pad, U=units, REP_KV=H // Hk, BLOCK_LEN=block_len, STRIDE=stride,
        BLOCK_R=block_r, BLOCK_N=block_n, JB=jb, JC=jc, TAIL=tail, JB_PAD=jb_pad, RB=rb,
        D=D, DA=DA, DB=DB, IEEE=q.dtype == torch.float32, DO_TOPN=fused, **topn_args,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if do_topn and not fused:
        # causal rows read only their first cur + 1 scores: one launch per power-of-two width,
        # over the rows whose current block fits it (a row of width w costs top_n passes over w)
        r0 = 0
        for width, r_end in _topn_buckets(Tq, ns_pad, select_block, q_share,
                                          cfg["TOPN_MIN_WIDTH"]):
            rb2 = max(1, cfg["TOPN_ELEMS"] // width)
            warps = cfg["TOPN_WARPS"] or min(16, max(4, width // 512))
            _topn_kernel[(triton.cdiv(r_end - r0, rb2), B * G)](
                imp, out, r0, r_end, T, Tq, Ns, G, RB=rb2, **dict(topn_args, NS_PAD=width),
                num_warps=warps)
            r0 = r_end
    return out, imp


def _topn_buckets(Tq: int, ns_pad: int, select_block: int, q_share: int, min_width: int):
    """``[(width, r_end), ...]``: consecutive row ranges (ending at ``r_end``) of the split top-n
    launches, each row in the first range whose width (a power of two from ``min_width``, rounded
    up to one, to ``ns_pad``) holds its current block ``r * q_share // select_block``; empty
    ranges dropped."""
    out, r0, width = [], 0, min(triton.next_power_of_2(max(1, min_width)), ns_pad)
    while r0 < Tq:
        # rows r with r * q_share < width * select_block, i.e. current block < width
        r_end = Tq if width >= ns_pad else min(Tq, -(-width * select_block // q_share))
        if r_end > r0:
            out.append((width, r_end))
            r0 = r_end
        width *= 2
    return out


def block_importance_first(
    q, k_cmp, lse, *, num_groups: int, block_len: int, stride: int, select_block: int,
    q_share: int, scale: float,
) -> torch.Tensor:
    """The kernel's importance for the first query of each query-sharing group:
    ``(B, ceil(T / q_share), G, Ns)`` float32, equal to
    ``reference.block_importance(...)[:, ::q_share]`` (for tests and analysis)."""
    _check(q, k_cmp, lse, num_groups, block_len, stride, select_block, 1, 0, q_share, scale)
    q, k_cmp, lse = row_major(q.detach()), row_major(k_cmp.detach()), lse.detach()
    B, T, H, _ = q.shape
    imp = torch.zeros(B, num_groups, triton.cdiv(T, q_share), num_selection_blocks(T, select_block),
                      dtype=torch.float32, device=q.device)
    _launch(q, k_cmp, lse, num_groups, int(block_len), int(stride), int(select_block), 1, 0,
            int(q_share), scale, False, imp=imp)
    return imp.permute(0, 2, 1, 3)


def _topn_torch(imp, T, *, select_block, top_n, num_local, q_share):
    """Fallback top-n on the importance of first queries ``(B, G, Tq, Ns)`` (very long rows):
    :func:`kernels.blocks.pick_blocks`, spread to every query of each group."""
    first = torch.arange(imp.shape[2], device=imp.device) * q_share
    idx = pick_blocks(imp, first // select_block, top_n=top_n, num_local=num_local)
    idx = idx.permute(0, 2, 1, 3).repeat_interleave(q_share, dim=1)[:, :T]
    return idx.contiguous()


def op_forward(q, k_cmp, lse, num_groups, block_len, stride, select_block, top_n, num_local,
               q_share, scale):
    """``torch.ops.nsa_lit.select_blocks``: ``block_idx (B, T, num_groups, top_n)`` int64."""
    T = q.shape[1]
    if num_selection_blocks(T, select_block) > MAX_NS_IN_REGISTERS:
        imp = block_importance_first(
            q, k_cmp, lse, num_groups=num_groups, block_len=block_len, stride=stride,
            select_block=select_block, q_share=q_share, scale=scale).permute(0, 2, 1, 3)
        return _topn_torch(imp, T, select_block=select_block, top_n=top_n, num_local=num_local,
                           q_share=q_share)
    out, _ = _launch(q, k_cmp, lse, num_groups, block_len, stride, select_block, top_n,
                     num_local, q_share, scale, True)
    return out


def select_blocks(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, num_groups: int, block_len: int,
    stride: int, select_block: int, top_n: int, num_local: int, q_share: int, scale: float,
) -> torch.Tensor:
    """See :func:`kernels.selection.reference.select_blocks`."""
    _check(q, k_cmp, lse, num_groups, block_len, stride, select_block, top_n, num_local,
           q_share, scale)
    q, k_cmp = row_major(q.detach()), row_major(k_cmp.detach())
    return torch.ops.nsa_lit.select_blocks(q, k_cmp, lse.detach(), int(num_groups),
                                           int(block_len), int(stride), int(select_block),
                                           int(top_n), int(num_local), int(q_share), float(scale))
