"""Attention of one new query per sequence to a decode cache, Triton kernels (flash-decoding).

Same functions and signatures as :mod:`kernels.decode.reference` (read its docstring for the cache
layouts): ``causal_decode``, ``window_decode``, ``compression_decode`` (with the lse),
``select_blocks_decode`` and ``selected_decode``. Inference only (no autograd). Inputs the
kernels cannot serve raise ``ValueError``; nothing falls back silently.

Design
------
* **One generic split-K kernel** (``_decode_kernel``) with a compile-time *key source*:

  - ``RANGE`` (causal, window): the positions ``[lo, pos]`` with
    ``lo = max(0, pos - S + 1, pos - window + 1)`` (``window = S`` for causal), read from slot
    ``p % S``. This is exactly the reference's ``held >= 0 & held > pos - window`` on the slots
    (a slot of a ring of ``S`` holds the last ``S`` tokens), whether the cache is a ring
    (``S < positions``) or holds every token. Each sequence has its own ``pos``, hence its own
    range and ring offset; nothing is synchronised with the host.
  - ``CMP`` (compression): compressed tokens ``[0, n_vis)``, ``n_vis`` = blocks ended at ``pos``
    (at most ``N``), slot ``i``.
  - ``SEL`` (selected blocks): for each entry ``j`` of ``block_idx[b, g]`` (``-1`` padding and
    repeated entries skipped, as the reference's ``any`` does), the positions of block ``j``
    inside ``[max(0, pos - S + 1), pos]``, slot ``p % S``. One flat loop over (entry, key tile
    of the block), so the software pipeliner overlaps the loads of consecutive blocks (the
    index load runs a stage ahead of the key loads it addresses).

  Ring slots: a program never reads more than ``S`` consecutive positions, so a tile's slots are
  ``n0 % S + offsets`` with one conditional subtraction (one scalar modulo per tile).

* **Grid** ``(B * units * chunks, SPLITS)``. A *unit* is the set of query heads that share one key
  head (and, for ``SEL``, one selection group): ``U = H / Hk`` heads, ``gcd(H / Hk, H / G)`` for
  selection. All heads of a unit are the MMA rows of one program (``M = max(16, pow2(U))`` rows,
  at most 64; larger units are cut into chunks), so **each key tile is loaded once for all heads
  that read it**: the absorbed MLA local layer is an MQA decode (16 heads x one latent), a GLA
  global layer reads each latent group once for its 8 heads, GQA reads each kv head once for its
  ``H / Hk`` heads.
* **Latent (absorbed) caches**: the score is ``q[:, :Dk] . c + q[:, Dk:] . k_rope`` (two dots, the
  RoPE key read from its own tensor, never concatenated), and when ``v is k`` (the latent is the
  value) the latent tile already loaded for the scores is reused for ``P @ V``: the cache is read
  once per step.
* **Split-K** (flash-decoding): program ``s`` of ``SPLITS`` takes an even, ``BLOCK_N``-aligned
  share of its sequence's own key range (``SEL``: a share of the ``top_n`` block entries), keeps
  an online softmax in base 2 (fp32), and writes its normalised partial output and lse to an fp32
  scratch ``(B, H, SPLITS, Dv)``; ``_combine_kernel`` (one program per (sequence, head)) merges
  them. (Merging them in the main kernel's last program to finish, without the second launch,
  profiled slower: its serial loop over the splits seems to cost more than the launch saves;
  see ``docs/decoding.md``.) With ``SPLITS = 1`` the main kernel writes ``o`` and ``lse``
  directly. ``SPLITS`` is picked on the host from the grid size and the largest possible key
  range (the cache shape, no device sync): about two programs per SM, at least
  ``MIN_KEYS_PER_SPLIT`` keys each.
* **Gated branch sum** in the epilogue (the main kernel's, or the combine's with several
  splits): with ``gate_logit`` / ``add_to`` (see :mod:`kernels.decode.reference`) the row
  written is ``add_to + sigmoid(gate_logit) * o``, so a layer's branches accumulate their gated
  sum one launch after another, without a gating kernel.
* Empty key sets (a window/compression/selection that sees nothing yet) give ``o = 0`` and
  ``lse = -inf``, as the reference.
* Mixed dtypes (a cache in another dtype than the query, e.g. ``generate(cache_dtype=...)``)
  are computed in fp32, every operand upcast in the kernel, like the reference; the output has
  ``q``'s dtype.
* fp32 accumulation; bf16/fp16 operands on the tensor cores (16-row tiles compile to ``HMMA``
  on sm_90a, 64-row ones to ``HGMMA``: a decode step is bound by memory, not by the MMA); fp32
  inputs use IEEE dots. Batch and slot offsets are 64-bit; positions are int32 inside.
* Launch shapes (``_launch_cfg``) were chosen from ptxas reports for sm_90a compiled ahead of
  time (no GPU): no spills, 60-166 registers, 37-106 KB shared memory with 3 pipeline stages, for
  the 340M and 1.3B ASA/NSA shapes in bf16 and fp32. Not yet timed on a GPU:
  ``CONFIG_OVERRIDE`` (``SPLITS``, ``MIN_KEYS_PER_SPLIT``, ``BLOCK_N``, ``num_warps``,
  ``num_stages``, ``PICK_WARPS``; ``benchmarks/decode.py --decode_config``) is there for sweeps.

``select_blocks_decode``: the reference repeats the compressed keys to every head in fp32
(``B x N x H x (Dk + Dr)``: 1.3 GB at 32k context, batch 64), so a small kernel computes the
group probabilities ``p_g[b, g, i] = sum_{h in g} exp(q_h . k_i * scale - lse_h)`` straight from the
compressed cache (``_group_probs_kernel``, one program per (sequence, group, key tile), heads of
the group as MMA rows); a second (``_pick_kernel``, one program per (sequence, group)) re-bins
them to selection blocks from the few compressed tokens that overlap each block (no dense
overlap matrix) and picks the top-n as ``kernels.blocks.pick_blocks`` does (one max a pick,
over int64 keys that order blocks by importance, then lower index): two launches per
step instead of a matrix product and some 25 small PyTorch operations (a decode step at batch 1
is bound by its launches).
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from kernels.decode import reference as ref
from kernels.triton_utils import interpreter_tiles, interpreting, num_sms

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_DIM = 512       # Dk, Dv (latent width); the RoPE part up to MAX_ROPE_DIM
MAX_ROPE_DIM = 256
MAX_ROWS = 64       # query heads per program (more are cut into chunks)
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64

MODE_RANGE, MODE_CMP, MODE_SEL = 0, 1, 2
# float -inf's bits (0xFF800000) as the order-preserving int32 key of _pick_kernel
NEG_INF_KEY = tl.constexpr(-2139095041)

# Launch overrides for tests and benchmark sweeps: SPLITS, MIN_KEYS_PER_SPLIT, BLOCK_N,
# num_warps, num_stages (attention), PICK_WARPS (the block pick).
CONFIG_OVERRIDE: dict[str, int] = {}

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile(acc, l_i, m_i, q, qr, p, valid, slot, k_base, kr_base, v_base, sks, srs, svs,
          qk_scale,
          HAS_ROPE: tl.constexpr, SHARED_V: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
          DR: tl.constexpr, DRP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
          IEEE: tl.constexpr):
    """One key tile (``slot``: cache slots, ``valid``: which of them count) into the online
    softmax of the rows ``q`` (and ``qr``, the RoPE part)."""
    slot64 = slot.to(tl.int64)
    dk = tl.arange(0, DKP)
    k = tl.load(k_base + slot64[:, None] * sks + dk[None, :],
                mask=valid[:, None] & (dk[None, :] < DK), other=0.0)
    if IEEE:  # fp32 compute (fp32 inputs, or mixed dtypes: every operand upcast)
        k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if HAS_ROPE:
        dr = tl.arange(0, DRP)
        kr = tl.load(kr_base + slot64[:, None] * srs + dr[None, :],
                     mask=valid[:, None] & (dr[None, :] < DR), other=0.0)
        if IEEE:
            kr = kr.to(tl.float32)
            s += tl.dot(qr, tl.trans(kr), input_precision="ieee")
        else:
            s += tl.dot(qr, tl.trans(kr))
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    pr = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    if SHARED_V:
        v = k
    else:
        dv = tl.arange(0, DVP)
        v = tl.load(v_base + slot64[:, None] * svs + dv[None, :],
                    mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
        if IEEE:
            v = v.to(tl.float32)
    if IEEE:
        acc = tl.dot(pr.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(pr.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _ring(n0, offs, S):
    """Slots ``(n0 + offs) % S`` of a tile whose counted positions span at most ``S`` (a cache
    never holds more than ``S`` of the positions a program reads): one scalar modulo per tile;
    lanes past the span are masked by the caller."""
    slot = n0 % S + offs
    return tl.where(slot >= S, slot - S, slot)


@triton.jit
def _store_output(out, O, GATE, ADD, b64, h, row_ok, dv, o_mask, sob, soh, sgb, sgh, sab, sah,
                  GATED: tl.constexpr, ADDS: tl.constexpr):
    """Write the rows ``h`` of ``o``: ``out`` (fp32, normalised), times the gate (the sigmoid
    of its logit) and plus the running branch sum when the launch has them, rounded once."""
    h64 = h.to(tl.int64)
    if GATED:  # GATE holds logits
        g = tl.load(GATE + b64 * sgb + h64 * sgh, mask=row_ok, other=0.0).to(tl.float32)
        out = out * tl.sigmoid(g)[:, None]
    if ADDS:
        out += tl.load(ADD + b64 * sab + h64[:, None] * sah + dv[None, :], mask=o_mask,
                       other=0.0).to(tl.float32)
    tl.store(O + b64 * sob + h64[:, None] * soh + dv[None, :], out.to(O.dtype.element_ty),
             mask=o_mask)


@triton.jit
def _decode_kernel(
    Q, K, KR, V, POS, BIDX, O, LSE, OP, LP, GATE, ADD,
    sqb, sqh, skb, sks, skh, srb, srs, svb, svs, svh, sob, soh, sib, sig, sgb, sgh, sab, sah,
    H, S, REP, QG, U, NCH, window, block_len, stride, sel_block, n_sel, qk_scale,
    MODE: tl.constexpr, HAS_ROPE: tl.constexpr, SHARED_V: tl.constexpr, SPLITS: tl.constexpr,
    M: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
    DR: tl.constexpr, DRP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    NSEL_P: tl.constexpr, IEEE: tl.constexpr, GATED: tl.constexpr, ADDS: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    per_b = (H // U) * NCH
    b = pid // per_b
    rem = pid % per_b
    u = rem // NCH
    c = rem % NCH
    h0 = u * U + c * M                 # first head of this program
    r = tl.arange(0, M)
    row_ok = (c * M + r) < U
    h = h0 + r
    hk = (u * U) // REP                # key head of the unit
    b64 = b.to(tl.int64)
    pos = tl.load(POS + b).to(tl.int32)  # positions < 2**31; slot offsets are 64-bit

    q_rows = Q + b64 * sqb + h.to(tl.int64) * sqh
    dk = tl.arange(0, DKP)
    q = tl.load(q_rows[:, None] + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK),
                other=0.0)
    if HAS_ROPE:
        dr = tl.arange(0, DRP)
        qr = tl.load(q_rows[:, None] + DK + dr[None, :],
                     mask=row_ok[:, None] & (dr[None, :] < DR), other=0.0)
    else:
        qr = q
    if IEEE:
        q = q.to(tl.float32)
        qr = qr.to(tl.float32)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    kr_base = KR + b64 * srb
    v_base = V + b64 * svb + hk.to(tl.int64) * svh

    m_i = tl.full([M], -1.0e30, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, DVP], tl.float32)
    offs = tl.arange(0, BLOCK_N)

    if MODE == 2:  # selected blocks: this split's share of the block entries
        lo = tl.maximum(pos - S + 1, 0)   # oldest position the cache still holds
        hi = pos + 1
        g = (u * U) // QG
        idx_base = BIDX + b64 * sib + g.to(tl.int64) * sig
        tt = tl.arange(0, NSEL_P)
        per = tl.cdiv(n_sel, SPLITS)
        t_lo = pid_s * per
        t_hi = tl.minimum(t_lo + per, n_sel)
        # one flat loop over (entry, tile of the block) so the pipeliner overlaps the loads of
        # consecutive blocks (the index load is scheduled ahead of the key loads it addresses)
        tpb = tl.cdiv(sel_block, BLOCK_N)
        for it in range(t_lo * tpb, t_hi * tpb):
            t = it // tpb
            sub = it - t * tpb
            j = tl.load(idx_base + t)
            prev = tl.load(idx_base + tt, mask=tt < t, other=-1)
            n_dup = tl.sum(((prev == j) & (tt < t)).to(tl.int32), 0)
            use = (j >= 0) & (n_dup == 0)
            jc = tl.minimum(tl.maximum(j, 0), hi // sel_block + 1).to(tl.int32)  # int32-safe
            in_blk = sub * BLOCK_N + offs
            p = jc * sel_block + in_blk
            valid = (in_blk < sel_block) & (p >= lo) & (p < hi) & use
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, qr, p, valid, p % S, k_base, kr_base,
                                  v_base, sks, srs, svs, qk_scale, HAS_ROPE, SHARED_V, DK, DKP,
                                  DR, DRP, DV, DVP, IEEE)
    else:
        if MODE == 0:  # causal / window over a (ring) cache of S slots
            lo = tl.maximum(tl.maximum(pos - S + 1, pos - window + 1), 0)
            hi = pos + 1
        else:          # compressed tokens whose block has ended
            lo = pos * 0
            ended = tl.maximum(pos - block_len + 1, 0) // stride + 1
            hi = tl.where(pos >= block_len - 1, tl.minimum(ended, S), 0)
        hi = tl.maximum(hi, lo)
        chunk = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
        s_lo = lo + pid_s * chunk
        s_hi = tl.minimum(s_lo + chunk, hi)
        for n0 in range(s_lo, s_hi, BLOCK_N):
            p = n0 + offs
            if MODE == 0:
                slot = _ring(n0, offs, S)
            else:
                slot = p
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, qr, p, p < s_hi, slot, k_base, kr_base,
                                  v_base, sks, srs, svs, qk_scale, HAS_ROPE, SHARED_V, DK, DKP,
                                  DR, DRP, DV, DVP, IEEE)

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    dv = tl.arange(0, DVP)
    o_mask = row_ok[:, None] & (dv[None, :] < DV)
    if SPLITS == 1:
        _store_output(out, O, GATE, ADD, b64, h, row_ok, dv, o_mask, sob, soh, sgb, sgh, sab,
                      sah, GATED, ADDS)
        tl.store(LSE + b64 * H + h, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        row = (b64 * H + h) * SPLITS + pid_s
        tl.store(OP + row[:, None] * DV + dv[None, :], out, mask=o_mask)
        tl.store(LP + row, lse2, mask=row_ok)


@triton.jit
def _combine_kernel(OP, LP, O, LSE, GATE, ADD, sob, soh, sgb, sgh, sab, sah, H,
                    SPLITS: tl.constexpr, SP: tl.constexpr, DV: tl.constexpr,
                    DVP: tl.constexpr, GATED: tl.constexpr, ADDS: tl.constexpr):
    """Merge the ``SPLITS`` partial outputs (normalised, with their base-2 lse) of one
    (sequence, head): ``o = sum_s 2^(lse_s - lse) o_s``, then the gated epilogue."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SP)
    dv = tl.arange(0, DVP)
    lp = tl.load(LP + bh * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    mx = tl.max(lp, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.sum(tl.exp2(lp - mx), 0)
    acc = tl.zeros([DVP], tl.float32)
    for i in range(SPLITS):
        w = tl.exp2(tl.load(LP + bh * SPLITS + i) - mx)
        acc += w * tl.load(OP + (bh * SPLITS + i) * DV + dv, mask=dv < DV, other=0.0)
    out = acc / tl.where(tot > 0, tot, 1.0)
    b = bh // H
    h = (bh % H) + tl.zeros([1], tl.int64)  # one row of _store_output's (rows, DVP) layout
    _store_output(out[None, :], O, GATE, ADD, b, h, h >= 0, dv, (dv < DV)[None, :], sob, soh,
                  sgb, sgh, sab, sah, GATED, ADDS)
    lse = tl.where(tot > 0, (mx + tl.log2(tl.where(tot > 0, tot, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + bh, lse)


@triton.jit
def _group_probs_kernel(
    Q, K, KR, LSE, POS, PG,
    sqb, sqh, skb, sks, skh, srb, srs, slb, slh,
    H, N, G, REP, QG, U, NCH, block_len, stride, qk_scale,
    HAS_ROPE: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr,
    DKP: tl.constexpr, DR: tl.constexpr, DRP: tl.constexpr, IEEE: tl.constexpr,
):
    """``PG[b, g, i] = sum over the heads h of group g of exp(q_h . k_i * scale - lse_h)`` for
    the compressed tokens ``i`` of one tile that the query at ``POS[b]`` sees (else 0)."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    b64 = b.to(tl.int64)
    pos = tl.load(POS + b).to(tl.int64)
    ended = tl.maximum(pos - block_len + 1, 0) // stride + 1
    n_vis = tl.where(pos >= block_len - 1, tl.minimum(ended, N), 0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    vis = n < n_vis
    n64 = n.to(tl.int64)
    total = tl.zeros([BLOCK_N], tl.float32)
    r = tl.arange(0, M)
    dk = tl.arange(0, DKP)
    dr = tl.arange(0, DRP)
    if pid_n * BLOCK_N < n_vis:
        for uc in range(0, (QG // U) * NCH):  # the units (and row chunks) of the group
            u = uc // NCH
            c = uc % NCH
            h_unit = g * QG + u * U
            row_ok = (c * M + r) < U
            h = h_unit + c * M + r
            hk = h_unit // REP
            q_rows = Q + b64 * sqb + h.to(tl.int64) * sqh
            q = tl.load(q_rows[:, None] + dk[None, :],
                        mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
            k = tl.load(K + b64 * skb + hk.to(tl.int64) * skh + n64[:, None] * sks + dk[None, :],
                        mask=vis[:, None] & (dk[None, :] < DK), other=0.0)
            if IEEE:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)),
                           input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            if HAS_ROPE:
                qr = tl.load(q_rows[:, None] + DK + dr[None, :],
                             mask=row_ok[:, None] & (dr[None, :] < DR), other=0.0)
                kr = tl.load(KR + b64 * srb + n64[:, None] * srs + dr[None, :],
                             mask=vis[:, None] & (dr[None, :] < DR), other=0.0)
                if IEEE:
                    s += tl.dot(qr.to(tl.float32), tl.trans(kr.to(tl.float32)),
                                input_precision="ieee")
                else:
                    s += tl.dot(qr, tl.trans(kr))
            lse = tl.load(LSE + b64 * slb + h.to(tl.int64) * slh, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
            pr = tl.exp2(s * qk_scale - lse[:, None])
            pr = tl.where(row_ok[:, None] & vis[None, :], pr, 0.0)
            total += tl.sum(pr, 0)
    tl.store(PG + pid_bg.to(tl.int64) * N + n64, total, mask=n < N)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


@triton.jit
def _pick_kernel(PG, POS, OUT, N, NS, G, block_len, stride, select_block, num_local,
                 TOP_N: tl.constexpr, TOP_P: tl.constexpr, NSP: tl.constexpr, R: tl.constexpr):
    """The blocks of one (sequence, group), ``OUT[b, g, :TOP_N]``: selection block ``j``'s
    importance ``sum_i PG[b, g, i] * overlap(i, j) / stride`` over the (at most ``R``)
    compressed tokens ``i`` that share raw tokens with it (``kernels.blocks.overlap_weights``
    without its dense matrix), then ``kernels.blocks.pick_blocks``: the visible blocks
    (``<= POS[b] // select_block``), the forced ones (block 0 and the ``num_local`` ending with
    the query's) first, then the highest importance (ties: the lower index); ascending, ``-1``
    padding last."""
    pid = tl.program_id(0)
    b = pid // G
    pos = tl.load(POS + b).to(tl.int64)
    cur = pos // select_block
    j = tl.arange(0, NSP)
    j64 = j.to(tl.int64)
    lo = j64 * select_block
    hi = lo + select_block
    # the first compressed token that reaches into block j: i * stride + block_len > lo
    first = tl.where(lo - block_len < 0, 0, (lo - block_len) // stride + 1)
    row = PG + pid.to(tl.int64) * N
    score = tl.zeros([NSP], tl.float32)
    for r in tl.static_range(R):
        i = first + r
        start = i * stride
        w = tl.minimum(start + block_len, hi) - tl.maximum(start, lo)
        ok = (i < N) & (w > 0) & (j < NS)
        p = tl.load(row + i, mask=ok, other=0.0)
        score += p * (tl.maximum(w, 0).to(tl.float32) / stride)
    live = j < NS
    visible = live & (j64 <= cur)
    forced = visible & ((j == 0) | (j64 > cur - num_local))
    score = tl.where(forced, float("inf"), score)
    score = tl.where(visible, score, float("-inf"))
    # one int64 key per block, (score, -j) in lexicographic order: the float's bits made
    # order-preserving as an int32 above the complemented index, so one max is the best block
    # and, among equal scores, the lowest index (one reduction a pick, not a max and an argmax)
    bits = score.to(tl.int32, bitcast=True)
    key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32) | (NSP - 1 - j).to(tl.int64)
    neg_inf = tl.full([NSP], NEG_INF_KEY, tl.int64) << 32  # -inf's key, index bits 0
    t = tl.arange(0, TOP_P)
    picks = tl.full([TOP_P], NS + 1, tl.int32)  # past TOP_N: sorted last, never stored
    for k in tl.static_range(TOP_N):
        best = tl.max(key, 0)
        at = (NSP - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
        none = best < (NEG_INF_KEY << 32) + NSP  # only invisible (or taken) blocks are left
        picks = tl.where(t == k, tl.where(none, NS, at), picks)  # none: padding (-1 below)
        key = tl.where(j == at, neg_inf, key)
    picks = tl.sort(picks, 0)
    picks = tl.where(picks >= NS, -1, picks)
    tl.store(OUT + pid.to(tl.int64) * TOP_N + t, picks.to(tl.int64), mask=t < TOP_N)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def _need_int(name: str, x, lo: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or int(x) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {x!r}")
    return int(x)


def _check_index(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    if x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")


def _check(q, k, v, k_rope, positions, *, kname="k", vname="v", rname="k_rope", scale=1.0):
    """Validate one decode call; returns ``(B, H, S, Hk, Dk, Dr, Dv, shared_v)``."""
    for name, x in (("q", q), (kname, k), (vname, v)) + (((rname, k_rope),) if k_rope is not None
                                                          else ()):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be float16, bfloat16 or float32, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton decode kernels need CUDA tensors (or TRITON_INTERPRET=1), got "
                         f"{q.device}")
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, Dq), got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"{kname} must be (B, S, Hk, Dk), got shape {tuple(k.shape)}")
    if v.dim() != 4:
        raise ValueError(f"{vname} must be (B, S, Hk, Dv), got shape {tuple(v.shape)}")
    B, H, Dq = q.shape
    _, S, Hk, Dk = k.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch size differs: q {B}, {kname} {k.shape[0]}, {vname} {v.shape[0]}")
    if v.shape[1] != S or v.shape[2] != Hk:
        raise ValueError(f"{vname} {tuple(v.shape)} must match {kname} {tuple(k.shape)} in "
                         f"slots and heads")
    Dv = v.shape[3]
    Dr = 0
    if k_rope is not None:
        if k_rope.dim() != 4 or tuple(k_rope.shape[:3]) != (B, S, 1):
            raise ValueError(f"{rname} must be (B={B}, S={S}, 1, Dr), got {tuple(k_rope.shape)}")
        Dr = k_rope.shape[3]
        if not 1 <= Dr <= MAX_ROPE_DIM:
            raise ValueError(f"{rname} width Dr={Dr} is not supported (1..{MAX_ROPE_DIM})")
    if Dq != Dk + Dr:
        raise ValueError(f"q width ({Dq}) must equal the key width {Dk}" +
                         (f" + the RoPE width {Dr}" if k_rope is not None else ""))
    if Hk < 1 or H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hk})")
    for name, d in (("key width Dk", Dk), ("value width Dv", Dv)):
        if not 1 <= d <= MAX_DIM:
            raise ValueError(f"{name}={d} is not supported (1..{MAX_DIM})")
    if not isinstance(positions, torch.Tensor) or positions.shape != (B,):
        raise ValueError(f"positions must be a (B={B},) tensor, got "
                         f"{tuple(getattr(positions, 'shape', ()))}")
    _check_index("positions", positions, q)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a Python number, got {type(scale).__name__}")
    for name, x in (("q", q), (kname, k), (vname, v), (rname, k_rope)):
        if x is not None and x.numel() and x.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride on its last dim (got {x.stride()})")
    shared = (v.data_ptr() == k.data_ptr() and v.shape == k.shape and v.stride() == k.stride())
    return B, H, S, Hk, Dk, Dr, Dv, shared


def _fp32_compute(*tensors) -> bool:
    """fp32 dots for fp32 inputs, and for mixed dtypes (every operand upcast in the kernel, as
    the reference computes in fp32); tensor-core dots when everything is bf16 (or fp16)."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return dtypes == {torch.float32} or len(dtypes) > 1


def _launch_cfg(width: int, acc: int, fp32: bool, mixed: bool,
                device: torch.device) -> dict[str, int]:
    """Tile and launch shape. ``width``: padded elements loaded per key (latent/key + RoPE +
    separate value); ``acc``: accumulator elements per program (rows x padded value width).
    Chosen from ptxas reports for sm_90a (no spills, <= ~160 registers, <= 110 KB shared):
    340M ASA local (16 x 256+32): 64 keys, 8 warps, 3 stages (101 regs, 85 KB); GLA global
    (8 heads x 128+32) and GQA (4 x 64/64): 64 keys, 4 warps, 3 stages (96 / 60 regs);
    1.3B ASA local (32 x 512+32): 32 keys, 8 warps (154 regs, 106 KB)."""
    if interpreter_tiles(device):
        cfg = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    elif mixed:  # in-register upcasts: the smallest tiles, no pipelining (no spills at 340M)
        cfg = {"BLOCK_N": 16, "num_warps": 8, "num_stages": 1}
    elif fp32:  # IEEE fp32 dots run on the FMA units: small tiles, 8 warps (no spills)
        big = acc > 16 * 256 or width > 320
        cfg = {"BLOCK_N": 16 if big else 32, "num_warps": 8, "num_stages": 1 if big else 2}
    elif acc > 16 * 256:
        cfg = {"BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    elif width >= 256:
        cfg = {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    else:
        cfg = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    cfg.update({k: v for k, v in CONFIG_OVERRIDE.items() if k in cfg})
    return cfg


def _num_splits(programs: int, max_work: int, device: torch.device) -> int:
    if "SPLITS" in CONFIG_OVERRIDE:
        return max(1, int(CONFIG_OVERRIDE["SPLITS"]))
    want = triton.cdiv(2 * num_sms(device), max(programs, 1))
    min_work = int(CONFIG_OVERRIDE.get("MIN_KEYS_PER_SPLIT", MIN_KEYS_PER_SPLIT))
    cap = max(1, triton.cdiv(max_work, max(min_work, 1)))
    return max(1, min(want, cap, MAX_SPLITS))


def _check_gated(gate_logit, add_to, q: torch.Tensor, Dv: int):
    """``gate_logit (B, H)`` and ``add_to (B, H, Dv)`` (see :mod:`kernels.decode.reference`), each
    None or a floating tensor on ``q``'s device; ``add_to`` made unit-stride in its last dim."""
    B, H = q.shape[:2]
    for name, x, shape in (("gate_logit", gate_logit, (B, H)), ("add_to", add_to, (B, H, Dv))):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(getattr(x, 'shape', ()))}")
        if x.dtype not in _DTYPES or x.device != q.device:
            raise ValueError(f"{name} must be a float tensor on {q.device}, got {x.dtype} on "
                             f"{x.device}")
    if add_to is not None and add_to.stride(-1) != 1:
        add_to = add_to.contiguous()
    return gate_logit, add_to


def _no_keys(q: torch.Tensor, Dv: int, gate_logit, add_to) -> torch.Tensor:
    """The output where no key is seen: ``o = 0``, through the gated epilogue."""
    B, H = q.shape[:2]
    return ref.gated_sum(torch.zeros((B, H, Dv), device=q.device, dtype=q.dtype), gate_logit,
                         add_to)


def _attend(mode, q, k, v, k_rope, positions, scale, dims, *, window=1, block_len=1, stride=1,
            block_idx=None, sel_block=1, gate_logit=None, add_to=None):
    B, H, S, Hk, Dk, Dr, Dv, shared = dims
    gate_logit, add_to = _check_gated(gate_logit, add_to, q, Dv)
    if B == 0 or H == 0 or S == 0:
        return (_no_keys(q, Dv, gate_logit, add_to),
                torch.full((B, H), float("-inf"), device=q.device, dtype=torch.float32))
    # every (sequence, head) row is written by exactly one program (or by the combine)
    o = torch.empty((B, H, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H), device=q.device, dtype=torch.float32)
    rep = H // Hk
    if mode == MODE_SEL:
        G = block_idx.shape[1]
        qg = H // G
        unit = math.gcd(rep, qg)
        n_sel = block_idx.shape[2]
    else:
        qg, unit, n_sel = H, rep, 1
    rows = min(_pow2(unit), MAX_ROWS)
    nch = triton.cdiv(unit, rows)
    DKP, DRP = _pow2(Dk), (_pow2(Dr) if Dr else 16)
    DVP = DKP if shared else _pow2(Dv)
    fp32 = _fp32_compute(q, k, v, k_rope)
    mixed = len({t.dtype for t in (q, k, v, k_rope) if t is not None}) > 1
    cfg = _launch_cfg(DKP + (DRP if Dr else 0) + (0 if shared else DVP), rows * DVP, fp32,
                      mixed, q.device)
    programs = B * (H // unit) * nch
    if mode == MODE_SEL:
        max_work = n_sel * sel_block
        splits = min(n_sel, _num_splits(programs, max_work, q.device))
        splits = max(splits, 1)
    else:
        max_work = min(S, window) if mode == MODE_RANGE else S
        splits = _num_splits(programs, max_work, q.device)
    if splits > 1:
        op = torch.empty((B, H, splits, Dv), device=q.device, dtype=torch.float32)
        lp = torch.empty((B, H, splits), device=q.device, dtype=torch.float32)
    else:
        op = lp = lse  # unused
    kr = k_rope if k_rope is not None else k
    bidx = block_idx if block_idx is not None else positions
    sib, sig = (block_idx.stride(0), block_idx.stride(1)) if block_idx is not None else (0, 0)
    gated = (gate_logit if gate_logit is not None else lse, add_to if add_to is not None else o)
    strides = (*(gate_logit.stride() if gate_logit is not None else (0, 0)),
               *(add_to.stride()[:2] if add_to is not None else (0, 0)))
    flags = {"GATED": gate_logit is not None, "ADDS": add_to is not None}
    _decode_kernel[(programs, splits)](
        q, k, kr, v, positions, bidx, o, lse, op, lp, *gated,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        kr.stride(0), kr.stride(1), v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), sib, sig, *strides,
        H, S, rep, qg, unit, nch, int(window), int(block_len), int(stride), int(sel_block),
        n_sel, float(scale) * LOG2E,
        MODE=mode, HAS_ROPE=k_rope is not None, SHARED_V=shared, SPLITS=splits, M=rows,
        BLOCK_N=cfg["BLOCK_N"], DK=Dk, DKP=DKP, DR=Dr, DRP=DRP, DV=Dv, DVP=DVP,
        NSEL_P=_pow2(n_sel, 2), IEEE=fp32, **flags,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _combine_kernel[(B * H,)](
            op, lp, o, lse, *gated, o.stride(0), o.stride(1), *strides, H,
            SPLITS=splits, SP=_pow2(splits, 2), DV=Dv, DVP=_pow2(Dv), **flags, num_warps=4)
    return o, lse


def _index_positions(positions: torch.Tensor) -> torch.Tensor:
    return positions.contiguous()


# --------------------------------------------------------------------------------------------
# public functions: the signatures of kernels.decode.reference
# --------------------------------------------------------------------------------------------


def causal_decode(q, k, v, positions, scale: float, k_rope=None, *, gate_logit=None,
                  add_to=None) -> torch.Tensor:
    """See :func:`kernels.decode.reference.causal_decode`."""
    dims = _check(q, k, v, k_rope, positions, scale=scale)
    S = dims[2]
    return _attend(MODE_RANGE, q, k, v, k_rope, _index_positions(positions), scale, dims,
                   window=max(S, 1), gate_logit=gate_logit, add_to=add_to)[0]


def window_decode(q, k, v, positions, window: int, scale: float, k_rope=None, *, gate_logit=None,
                  add_to=None) -> torch.Tensor:
    """See :func:`kernels.decode.reference.window_decode`."""
    dims = _check(q, k, v, k_rope, positions, scale=scale)
    window = _need_int("window", window)
    window = min(window, max(dims[2], 1))  # a cache of S slots never holds more than S tokens
    return _attend(MODE_RANGE, q, k, v, k_rope, _index_positions(positions), scale, dims,
                   window=window, gate_logit=gate_logit, add_to=add_to)[0]


def compression_decode(q, k_cmp, v_cmp, positions, block_len: int, stride: int, scale: float,
                       k_rope_cmp=None, *, gate_logit=None, add_to=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`kernels.decode.reference.compression_decode`; returns ``(o, lse)``."""
    dims = _check(q, k_cmp, v_cmp, k_rope_cmp, positions, kname="k_cmp", vname="v_cmp",
                  rname="k_rope_cmp", scale=scale)
    block_len = _need_int("block_len", block_len)
    stride = _need_int("stride", stride)
    return _attend(MODE_CMP, q, k_cmp, v_cmp, k_rope_cmp, _index_positions(positions), scale,
                   dims, block_len=block_len, stride=stride, gate_logit=gate_logit, add_to=add_to)


def selected_decode(q, k, v, block_idx, positions, select_block: int, scale: float,
                    k_rope=None, *, gate_logit=None, add_to=None) -> torch.Tensor:
    """See :func:`kernels.decode.reference.selected_decode`."""
    dims = _check(q, k, v, k_rope, positions, scale=scale)
    B, H = dims[0], dims[1]
    select_block = _need_int("select_block", select_block)
    if not isinstance(block_idx, torch.Tensor) or block_idx.dim() != 3 or block_idx.shape[0] != B:
        raise ValueError(f"block_idx must be (B={B}, G, n), got "
                         f"{tuple(getattr(block_idx, 'shape', ()))}")
    _check_index("block_idx", block_idx, q)
    G = block_idx.shape[1]
    if G < 1 or H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of selection groups ({G})")
    if block_idx.shape[2] == 0:
        return _no_keys(q, dims[6], *_check_gated(gate_logit, add_to, q, dims[6]))
    return _attend(MODE_SEL, q, k, v, k_rope, _index_positions(positions), scale, dims,
                   block_idx=block_idx.to(torch.int64).contiguous(), sel_block=select_block,
                   gate_logit=gate_logit, add_to=add_to)[0]


def select_blocks_decode(q, k_cmp, lse, positions, *, num_groups: int, block_len: int,
                         stride: int, select_block: int, num_blocks: int, top_n: int,
                         num_local: int, scale: float, k_rope_cmp=None) -> torch.Tensor:
    """See :func:`kernels.decode.reference.select_blocks_decode`: group probabilities by one
    Triton kernel, re-binning and the top-n pick by another."""
    B, H, _, Hk, Dk, Dr, _, _ = _check(q, k_cmp, k_cmp, k_rope_cmp, positions, kname="k_cmp",
                                       vname="k_cmp", rname="k_rope_cmp", scale=scale)
    G = _need_int("num_groups", num_groups)
    for name, x in (("block_len", block_len), ("stride", stride), ("select_block", select_block),
                    ("num_blocks", num_blocks), ("top_n", top_n)):
        _need_int(name, x)
    _need_int("num_local", num_local, lo=0)
    if H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of num_groups ({G})")
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H):
        raise ValueError(f"lse must be (B={B}, H={H}), got {tuple(getattr(lse, 'shape', ()))}")
    if lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 on {q.device}, got {lse.dtype} on {lse.device}")
    N = k_cmp.shape[1]
    pg = torch.empty((B, G, N), device=q.device, dtype=torch.float32)  # written in full
    if B and N:
        rep, qg = H // Hk, H // G
        unit = math.gcd(rep, qg)
        rows = min(_pow2(unit), MAX_ROWS)
        fp32 = _fp32_compute(q, k_cmp, k_rope_cmp)
        big = rows * _pow2(Dk) > 16 * 256
        small = interpreter_tiles(q.device)
        if small:
            block_n, warps = 16, 4
        elif fp32:
            mixed = len({t.dtype for t in (q, k_cmp, k_rope_cmp) if t is not None}) > 1
            block_n, warps = (16 if big or mixed else 32), 8
        else:
            block_n, warps = 64, (8 if rows * _pow2(Dk) >= 16 * 256 else 4)
        block_n = CONFIG_OVERRIDE.get("BLOCK_N", block_n)
        kr = k_rope_cmp if k_rope_cmp is not None else k_cmp
        _group_probs_kernel[(triton.cdiv(N, block_n), B * G)](
            q, k_cmp, kr, lse, positions.contiguous(), pg,
            q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
            kr.stride(0), kr.stride(1), lse.stride(0), lse.stride(1),
            H, N, G, rep, qg, unit, triton.cdiv(unit, rows), int(block_len), int(stride),
            float(scale) * LOG2E,
            HAS_ROPE=k_rope_cmp is not None, M=rows, BLOCK_N=block_n, DK=Dk, DKP=_pow2(Dk),
            DR=Dr, DRP=_pow2(Dr) if Dr else 16, IEEE=fp32, num_warps=warps,
            num_stages=1 if small else 2,
        )
    out = torch.empty((B, G, int(top_n)), device=q.device, dtype=torch.int64)
    if B:
        _pick_kernel[(B * G,)](
            pg, positions.contiguous(), out, N, int(num_blocks), G, int(block_len), int(stride),
            int(select_block), int(num_local), TOP_N=int(top_n), TOP_P=_pow2(top_n, 2),
            NSP=_pow2(num_blocks), R=-(-(int(select_block) + int(block_len)) // int(stride)) + 1,
            num_warps=CONFIG_OVERRIDE.get("PICK_WARPS", 4))
    return out
