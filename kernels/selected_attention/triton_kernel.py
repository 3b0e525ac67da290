"""Attention to the raw tokens of selected blocks (NSA's selection branch), Triton, fwd + bwd.

Same semantics and signature as :func:`kernels.selected_attention.reference.selected_attention`:
query ``t`` of head ``h`` reads key/value head ``h // (H // Hk)`` and attends the keys ``s <= t``
whose block ``s // select_block`` is listed in ``block_idx[b, t, h // (H // G)]``.

Design
------
*Rows.* A program owns a *chunk* of ``TOK`` consecutive queries times ``HP`` query heads that share
one key/value head and one selection group (``HP`` divides ``gcd(H // Hk, H // G)``), i.e. a tile of
``ROWS = TOK * HP`` query rows (padded to a power of two >= 16) that all read the same K/V tiles.

* ``shared`` chunks: ``TOK`` divides ``q_share``, so every row of the chunk has the same block
  list (the ``q_share`` promise).
* ``union`` chunks: ``TOK`` spans several ``q_share`` groups; the program walks the *union* of
  their block lists (each distinct block once) and masks every row by its own token's list. When
  neighbouring queries select the same blocks (they do in practice: forced first/local blocks,
  similar importance) each K/V block is loaded once for all of them; when they select disjoint
  blocks it costs what padding would.

Default tiling (``Config``): where one ``q_share`` group fills a 16-row tile (GLA absorbed form:
4 queries x 8 heads = 32 rows) forward and dq take union chunks of ``union_groups = 2`` groups
(64 rows, rows-major products) and dk/dv the 32-row shared chunks; where it does not (GQA with
4 heads per KV head, per-head K/V) union chunks of 16 rows throughout. Keys wider than 256
columns (``WIDE``: the 256 + 32 latent of the 1.3B ASA and 340M global-MLA configs) take 16-key
tiles, 16-row chunks, 2-token dk/dv chunks and one dk/dv accumulator for dk and dv
(``Config.one_acc``): the tiling that holds 256-wide fp32 accumulators without spilling
registers on sm_90a (``benchmarks/kernel_resources.py``), not yet timed on a GPU.

*Values inside the keys.* The absorbed latent form attends keys ``[c ; k_R]`` with values ``c``;
the caller says so with ``v=None, value_dim=Dv`` (values ``k[..., :Dv]``). When the values lie in
the first power-of-two tile of ``Dqk`` (128 of 160) the kernels read every key tile once and use
it as the value tile (columns past ``Dv`` meet zero-padded ``dO`` and masked stores), and add the
value gradient into the key gradient (``_Plan.VK``). Wider values are read as a separate tensor,
the view ``k[..., :Dv]``, whose gradient autograd adds into ``k``'s.

*Key tiles by TMA.* A selected block is ``BK`` consecutive rows of one key head, so the rows-major
forward and dq kernels load it through a tensor descriptor of ``k`` viewed as ``(B, T, Hk * Dqk)``
(one descriptor per power-of-two piece of ``Dqk``) instead of gathering rows with computed
addresses (``Config.tma``; only where the pieces add up to ``Dqk`` exactly, since a descriptor
tile would read the next head's columns, and on Hopper or newer). The dk/dv kernel likewise
reads each chunk's q and dO tiles (``TOK`` tokens x ``HP`` heads) through descriptors of the
``(B, T, H, width)`` tensors, with dO's own strides, when a chunk is exactly those rows.

The per-chunk lists (ascending, deduplicated, -1 padded, entries outside ``[0, num_blocks)``
dropped) are built once by ``_chunk_list_kernel``; the kernels loop over exactly the valid entries
(no branches in the loop, so Triton can software-pipeline the K/V loads).

*Forward.* Online softmax over the listed blocks (``exp2``, fp32 accumulation), output in the input
dtype, log-sum-exp (natural log, fp32, ``-inf`` for a row that sees nothing) saved for backward.

*Backward.* (1) A query-major kernel recomputes ``P`` and writes ``dq`` (and
``delta = rowsum(dO*O)``).
(2) ``dk, dv`` need the reverse map: the chunk lists are inverted into a CSR (stable sort of the
(batch, group, key block) keys, so each key block's chunks come ascending), each key block's list
is cut into segments of at most ``seg`` chunks (a hot block such as block 0, which every query
selects, would otherwise serialise on one program), and a key-block-major kernel accumulates
``dk, dv`` for its segment in registers and adds it once into fp32 buffers (one atomic add of a
``BK x D`` tile per segment). Two alternatives stay selectable for measurement: ``atomic_kv`` (the
dq kernel also adds its ``dk, dv`` tile contribution atomically, no CSR) and ``atomic_q`` (the
key-major kernel also adds ``dq`` atomically, no dq kernel).

Head dims that are not powers of two are split into two power-of-two pieces (160 = 128 + 32,
96 = 64 + 32) instead of padding to the next power of two; ``Dv`` is padded with masks.
All element offsets are 64-bit.

Measured (H200, bf16, 65,536 tokens per call, random top-16 selection of 64-key blocks;
``benchmarks/results/selected_attention_2026-11-30.json``): GLA absorbed layout (16 heads, 2 latent
groups, 160/128, q_share 4) 4.1 ms forward, 12.9 ms forward+backward at T=65536. Backward
strategy: the CSR key-block-major dk/dv kernel (12.9 ms) beats adding dq atomically from it
(``atomic_q``, 21.5 ms) and adding dk/dv atomically from the dq kernel (``atomic_kv``, 34.5 ms
with the first sweep's settings against 28.6 for CSR). Keys-major products ("keys" order) won for
32-row programs and for dq; 4 warps beat 8 everywhere. Forward and dq stream the gathered K/V at
about 4.9 TB/s (HBM plus L2 hits): they are bound by the gather, not by the tensor cores.

Later sweeps, block picks correlated across queries as in trained models (``--importance smooth``;
``benchmarks/results/h200-selected-attention-{vk,vk-sweep,defaults}.json``), GLA absorbed fwd+bwd
at 8k / 64k: 10.7 / 11.5 ms with separate values -> 9.8 / 10.6 reading the values through the
keys -> 8.0 / 9.7 with 64-row union chunks for forward and dq (rows-major products; keys-major:
8.9 / 11.1), 32-row shared chunks for dk/dv (union chunks there: 12.5 / 17.6) and 3 pipeline
stages in the dk/dv kernel (2 stages: 8.2 / 10.1; 3 stages also won for the GQA and per-head
layouts). At 64k two neighbouring groups' lists merge into 24.3 distinct blocks on average
instead of 2 x 16. Session 4 (``h200-selected-attention-{chunk-list-sweep,segments,tma}.json``):
chunk lists by one Triton kernel (0.70 -> 0.10 ms at 64k), CSR bounds by binary search, and key
tiles by TMA: 7.17 / 8.92 ms (gathered keys 7.78 / 9.64); 8 warps (12.4 / 15.6) and 128-row
union chunks of 4 groups (8.8 / 12.5) were slower. Session 5 (``h200-tma-next-*.json``,
``h200-selected-attention-uniform-sweep.json``): q and dO tiles of the dk/dv kernel by TMA
(7.18 / 8.78 ms, smooth picks), and 3 forward pipeline stages, faster in all four sweeps that
timed them (smooth and uniform picks, 8k and 64k: 0.04 to 0.13 ms of the forward).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import torch
import triton
import triton.language as tl

from kernels.blocks import num_selection_blocks
from kernels.selected_attention.reference import key_values
from kernels.triton_device import load_rows
from kernels.triton_utils import (interpreting, next_pow2, row_major, split_descriptors, split_dim,
                                  tma_descriptor)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_DIM = 512
_BWD_MODES = ("csr", "atomic_kv", "atomic_q")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _key_tiles(K, KD1, KD2, b, hk, k0, krow, kvalid, D: tl.constexpr, D1: tl.constexpr,
               D2: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    """Key tile ``k0 .. k0 + BK`` of sequence ``b``, head ``hk``: ``(BK, D1)`` and ``(BK, D2)``
    (the second is the first again when ``D2 == 0``). ``TMA``: through the descriptors
    ``KD1, KD2`` (rows past T read as zeros); else gathered rows ``krow`` (zeros where not
    ``kvalid``; ``KD1, KD2, k0`` unused)."""
    if TMA:
        k1 = KD1.load([b.to(tl.int32), k0, hk * D]).reshape([BK, D1])
    else:
        d1 = tl.arange(0, D1)
        k1 = tl.load(K + krow[:, None] * D + d1[None, :],
                     mask=kvalid[:, None] & (d1[None, :] < D), other=0.0)
    k2 = k1
    if D2 > 0:
        if TMA:
            k2 = KD2.load([b.to(tl.int32), k0, hk * D + D1]).reshape([BK, D2])
        else:
            d2 = D1 + tl.arange(0, D2)
            k2 = tl.load(K + krow[:, None] * D + d2[None, :],
                         mask=kvalid[:, None] & (d2[None, :] < D), other=0.0)
    return k1, k2


@triton.jit
def _value_tile(V, k1, krow, kvalid, dv, DV: tl.constexpr, VK: tl.constexpr):
    """Value tile of the key rows ``krow``: the key tile ``k1`` itself when the values lie in
    its columns (``VK``), else gathered rows (zeros where not ``kvalid`` or past ``DV``)."""
    if VK:
        v = k1
    else:
        v = tl.load(V + krow[:, None] * DV + dv[None, :],
                    mask=kvalid[:, None] & (dv[None, :] < DV), other=0.0)
    return v


@triton.jit
def _chunk_rows(NC, NHS, REP_K, REP_G, T, H, HP: tl.constexpr, TOK: tl.constexpr,
                ROWS: tl.constexpr):
    """The query rows of a query-major program: chunk ``c`` (late, long chunks first; grid dim 0)
    of sequence ``b`` (int64), heads ``h0 .. h0 + HP`` (grid dim 1) with their key head ``hk``
    and selection group ``g``; row ``r`` is token ``r // HP`` of the chunk, head ``h0 + r % HP``:
    its position ``t``, whether it exists (``rvalid``) and its flat row ``(b*T + t)*H + head``
    (int64)."""
    c = NC - 1 - tl.program_id(0)
    pid1 = tl.program_id(1)
    b = (pid1 // NHS).to(tl.int64)
    h0 = (pid1 % NHS) * HP
    r = tl.arange(0, ROWS)
    tok = r // HP
    t = c * TOK + tok
    rvalid = (tok < TOK) & (t < T)
    qrow = (b * T + t) * H + h0 + r % HP
    return c, b, h0, h0 // REP_K, h0 // REP_G, t, rvalid, qrow


@triton.jit
def _chunk_blocks(CL, BI, b, c, g, t, rvalid, T, G, NSEL, NC, L, LPAD: tl.constexpr,
                  NPAD: tl.constexpr, UNION: tl.constexpr):
    """Chunk ``c``'s key blocks: the offset ``lbase`` of its list in ``CL`` (``(B, NC, G, L)``,
    ascending, -1 padded), the list's length ``nv`` and, for union chunks, each row's own
    ``(ROWS, NPAD)`` block list ``bl`` (-1 padded; the chunk list again otherwise, unused)."""
    lbase = ((b * NC + c) * G + g) * L
    lcol = tl.arange(0, LPAD)
    lrow = tl.load(CL + lbase + lcol, mask=lcol < L, other=-1)
    nv = tl.sum((lrow >= 0).to(tl.int32), axis=0)
    bl = lrow
    if UNION:
        bcol = tl.arange(0, NPAD)
        brow = ((b * T + t) * G + g) * NSEL
        bl = tl.load(BI + brow[:, None] + bcol[None, :],
                     mask=rvalid[:, None] & (bcol[None, :] < NSEL), other=-1)
    return lbase, nv, bl


@triton.jit
def _rows_listing(bl, j):
    """Which rows of a union chunk listed key block ``j`` themselves (``bl``: their lists)."""
    return tl.max((bl == j).to(tl.int32), axis=1) > 0


@triton.jit
def _dq_row_terms(DO, O, LSE, DELTA, b, t, h0, qrow, rvalid, dv, sdob, sdot, sdoh,
                  DV: tl.constexpr, HP: tl.constexpr, ROWS: tl.constexpr):
    """What the dq kernels need of each query row besides q: its output gradient ``do``
    (``(ROWS, DVP)``, zero past ``DV``), ``delta = rowsum(do * o)`` (also stored to ``DELTA``)
    and its log-sum-exp in base 2 (``+inf`` where the row saw no key, so its ``p`` is 0)."""
    omask = rvalid[:, None] & (dv[None, :] < DV)
    r = tl.arange(0, ROWS)
    dorow = b * sdob + t.to(tl.int64) * sdot + (h0 + r % HP).to(tl.int64) * sdoh
    do = tl.load(DO + dorow[:, None] + dv[None, :], mask=omask, other=0.0)
    o = tl.load(O + qrow[:, None] * DV + dv[None, :], mask=omask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + qrow, delta, mask=rvalid)
    lse = tl.load(LSE + qrow, mask=rvalid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return do, delta, lse2


@triton.jit
def _sel_fwd_kernel(
    Q, K, V, CL, BI, O, LSE, KD1, KD2,
    T, H, HK, G, NSEL, NC, L, REP_K, REP_G, NHS, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DVP: tl.constexpr,
    HP: tl.constexpr, TOK: tl.constexpr, ROWS: tl.constexpr, LPAD: tl.constexpr,
    NPAD: tl.constexpr, UNION: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    NSUB: tl.constexpr, PREC: tl.constexpr, VK: tl.constexpr, TMA: tl.constexpr,
):
    """Forward, rows-major: S = Q K^T over the chunk's key blocks. ``TMA``: the key tiles come
    through the tensor descriptors ``KD1, KD2`` (see ``_key_descriptors``)."""
    c, b, h0, hk, g, t, rvalid, qrow = _chunk_rows(NC, NHS, REP_K, REP_G, T, H, HP, TOK, ROWS)
    q1, q2 = load_rows(Q, qrow * D, rvalid, D, D1, D2)
    dv = tl.arange(0, DVP)

    lbase, nv, bl = _chunk_blocks(CL, BI, b, c, g, t, rvalid, T, G, NSEL, NC, L, LPAD, NPAD, UNION)

    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DVP], tl.float32)
    kk = tl.arange(0, BK)
    for it in range(nv * NSUB):
        j = tl.load(CL + lbase + it // NSUB)
        kpos = j * BS + (it % NSUB) * BK + kk
        kvalid = kpos < T
        krow = (b * T + kpos) * HK + hk
        k1, k2 = _key_tiles(K, KD1, KD2, b, hk, j * BS + (it % NSUB) * BK, krow, kvalid,
                            D, D1, D2, BK, TMA)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
        if D2 > 0:
            s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
        vis = kpos[None, :] <= t[:, None]
        if UNION:
            vis = vis & _rows_listing(bl, j)[:, None]
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _value_tile(V, k1, krow, kvalid, dv, DV, VK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    l_ok = l_i > 0
    l_safe = tl.where(l_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + qrow[:, None] * DV + dv[None, :], o.to(O.dtype.element_ty),
             mask=rvalid[:, None] & (dv[None, :] < DV))
    lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + qrow, lse, mask=rvalid)


@triton.jit
def _sel_fwd_t_kernel(
    Q, K, V, CL, BI, O, LSE,
    T, H, HK, G, NSEL, NC, L, REP_K, REP_G, NHS, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DVP: tl.constexpr,
    HP: tl.constexpr, TOK: tl.constexpr, ROWS: tl.constexpr, LPAD: tl.constexpr,
    NPAD: tl.constexpr, UNION: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    NSUB: tl.constexpr, PREC: tl.constexpr, VK: tl.constexpr,
):
    """Forward, keys-major orientation: S^T = K Q^T (BK x ROWS) and O^T += V^T P^T, so both
    products have M >= 64 (wgmma on Hopper) even when a program has only 16 or 32 query rows."""
    c, b, h0, hk, g, t, rvalid, qrow = _chunk_rows(NC, NHS, REP_K, REP_G, T, H, HP, TOK, ROWS)
    q1, q2 = load_rows(Q, qrow * D, rvalid, D, D1, D2)
    dv = tl.arange(0, DVP)

    lbase, nv, bl = _chunk_blocks(CL, BI, b, c, g, t, rvalid, T, G, NSEL, NC, L, LPAD, NPAD, UNION)

    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([DVP, ROWS], tl.float32)
    kk = tl.arange(0, BK)
    for it in range(nv * NSUB):
        j = tl.load(CL + lbase + it // NSUB)
        kpos = j * BS + (it % NSUB) * BK + kk
        kvalid = kpos < T
        krow = (b * T + kpos) * HK + hk
        k1, k2 = _key_tiles(K, K, K, b, hk, 0, krow, kvalid, D, D1, D2, BK, False)
        s = tl.dot(k1, tl.trans(q1), input_precision=PREC)
        if D2 > 0:
            s += tl.dot(k2, tl.trans(q2), input_precision=PREC)
        vis = kpos[:, None] <= t[None, :]
        if UNION:
            vis = vis & _rows_listing(bl, j)[None, :]
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = _value_tile(V, k1, krow, kvalid, dv, DV, VK)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=PREC)
        m_i = m_new

    l_ok = l_i > 0
    l_safe = tl.where(l_ok, l_i, 1.0)
    o = acc / l_safe[None, :]
    tl.store(O + qrow[None, :] * DV + dv[:, None], o.to(O.dtype.element_ty),
             mask=rvalid[None, :] & (dv[:, None] < DV))
    lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + qrow, lse, mask=rvalid)


@triton.jit
def _sel_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, CL, BI, DQ, DELTA, DK32, DV32, KD1, KD2,
    sdob, sdot, sdoh,
    T, H, HK, G, NSEL, NC, L, REP_K, REP_G, NHS, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DVP: tl.constexpr,
    HP: tl.constexpr, TOK: tl.constexpr, ROWS: tl.constexpr, LPAD: tl.constexpr,
    NPAD: tl.constexpr, UNION: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    NSUB: tl.constexpr, PREC: tl.constexpr, ATOMIC_KV: tl.constexpr, VK: tl.constexpr,
    TMA: tl.constexpr,
):
    """dq (and delta; dk, dv too when ``ATOMIC_KV``), rows-major; ``TMA`` as in the forward."""
    c, b, h0, hk, g, t, rvalid, qrow = _chunk_rows(NC, NHS, REP_K, REP_G, T, H, HP, TOK, ROWS)
    q1, q2 = load_rows(Q, qrow * D, rvalid, D, D1, D2)
    d1 = tl.arange(0, D1)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
    dv = tl.arange(0, DVP)
    do, delta, lse2 = _dq_row_terms(DO, O, LSE, DELTA, b, t, h0, qrow, rvalid, dv, sdob, sdot, sdoh,
                                    DV, HP, ROWS)

    lbase, nv, bl = _chunk_blocks(CL, BI, b, c, g, t, rvalid, T, G, NSEL, NC, L, LPAD, NPAD, UNION)

    dq1 = tl.zeros([ROWS, D1], tl.float32)
    if D2 > 0:
        dq2 = tl.zeros([ROWS, D2], tl.float32)
    kk = tl.arange(0, BK)
    for it in range(nv * NSUB):
        j = tl.load(CL + lbase + it // NSUB)
        kpos = j * BS + (it % NSUB) * BK + kk
        kvalid = kpos < T
        krow = (b * T + kpos) * HK + hk
        k1, k2 = _key_tiles(K, KD1, KD2, b, hk, j * BS + (it % NSUB) * BK, krow, kvalid,
                            D, D1, D2, BK, TMA)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
        if D2 > 0:
            s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
        vis = kpos[None, :] <= t[:, None]
        if UNION:
            vis = vis & _rows_listing(bl, j)[:, None]
        p = tl.where(vis, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        v = _value_tile(V, k1, krow, kvalid, dv, DV, VK)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dsc = ds.to(k1.dtype)
        dq1 += tl.dot(dsc, k1, input_precision=PREC)
        if D2 > 0:
            dq2 += tl.dot(dsc, k2, input_precision=PREC)
        if ATOMIC_KV:
            dvb = tl.dot(tl.trans(p.to(v.dtype)), do, input_precision=PREC)
            if VK:  # dv adds into the key columns it was read from
                tl.atomic_add(DK32 + krow[:, None] * D + dv[None, :], dvb,
                              mask=kvalid[:, None] & (dv[None, :] < DV), sem="relaxed")
            else:
                tl.atomic_add(DV32 + krow[:, None] * DV + dv[None, :], dvb,
                              mask=kvalid[:, None] & (dv[None, :] < DV), sem="relaxed")
            dk1b = tl.dot(tl.trans(dsc), q1, input_precision=PREC) * sm_scale
            tl.atomic_add(DK32 + krow[:, None] * D + d1[None, :], dk1b,
                          mask=kvalid[:, None] & (d1[None, :] < D), sem="relaxed")
            if D2 > 0:
                dk2b = tl.dot(tl.trans(dsc), q2, input_precision=PREC) * sm_scale
                tl.atomic_add(DK32 + krow[:, None] * D + d2[None, :], dk2b,
                              mask=kvalid[:, None] & (d2[None, :] < D), sem="relaxed")

    qmask1 = rvalid[:, None] & (d1[None, :] < D)
    tl.store(DQ + qrow[:, None] * D + d1[None, :], (dq1 * sm_scale).to(DQ.dtype.element_ty),
             mask=qmask1)
    if D2 > 0:
        tl.store(DQ + qrow[:, None] * D + d2[None, :], (dq2 * sm_scale).to(DQ.dtype.element_ty),
                 mask=rvalid[:, None] & (d2[None, :] < D))


@triton.jit
def _sel_bwd_dq_t_kernel(
    Q, K, V, O, DO, LSE, CL, BI, DQ, DELTA,
    sdob, sdot, sdoh,
    T, H, HK, G, NSEL, NC, L, REP_K, REP_G, NHS, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DVP: tl.constexpr,
    HP: tl.constexpr, TOK: tl.constexpr, ROWS: tl.constexpr, LPAD: tl.constexpr,
    NPAD: tl.constexpr, UNION: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    NSUB: tl.constexpr, PREC: tl.constexpr, VK: tl.constexpr,
):
    """dq, keys-major orientation: S^T = K Q^T, dP^T = V dO^T, dQ^T += K^T dS^T."""
    c, b, h0, hk, g, t, rvalid, qrow = _chunk_rows(NC, NHS, REP_K, REP_G, T, H, HP, TOK, ROWS)
    q1, q2 = load_rows(Q, qrow * D, rvalid, D, D1, D2)
    d1 = tl.arange(0, D1)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
    dv = tl.arange(0, DVP)
    do, delta, lse2 = _dq_row_terms(DO, O, LSE, DELTA, b, t, h0, qrow, rvalid, dv, sdob, sdot, sdoh,
                                    DV, HP, ROWS)

    lbase, nv, bl = _chunk_blocks(CL, BI, b, c, g, t, rvalid, T, G, NSEL, NC, L, LPAD, NPAD, UNION)

    dq1 = tl.zeros([D1, ROWS], tl.float32)
    if D2 > 0:
        dq2 = tl.zeros([D2, ROWS], tl.float32)
    kk = tl.arange(0, BK)
    for it in range(nv * NSUB):
        j = tl.load(CL + lbase + it // NSUB)
        kpos = j * BS + (it % NSUB) * BK + kk
        kvalid = kpos < T
        krow = (b * T + kpos) * HK + hk
        k1, k2 = _key_tiles(K, K, K, b, hk, 0, krow, kvalid, D, D1, D2, BK, False)
        s = tl.dot(k1, tl.trans(q1), input_precision=PREC)
        if D2 > 0:
            s += tl.dot(k2, tl.trans(q2), input_precision=PREC)
        vis = kpos[:, None] <= t[None, :]
        if UNION:
            vis = vis & _rows_listing(bl, j)[None, :]
        p = tl.where(vis, tl.exp2(s * qk_scale - lse2[None, :]), 0.0)
        v = _value_tile(V, k1, krow, kvalid, dv, DV, VK)
        dp = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsc = (p * (dp - delta[None, :])).to(k1.dtype)
        dq1 += tl.dot(tl.trans(k1), dsc, input_precision=PREC)
        if D2 > 0:
            dq2 += tl.dot(tl.trans(k2), dsc, input_precision=PREC)

    tl.store(DQ + qrow[None, :] * D + d1[:, None], (dq1 * sm_scale).to(DQ.dtype.element_ty),
             mask=rvalid[None, :] & (d1[:, None] < D))
    if D2 > 0:
        tl.store(DQ + qrow[None, :] * D + d2[:, None], (dq2 * sm_scale).to(DQ.dtype.element_ty),
                 mask=rvalid[None, :] & (d2[:, None] < D))


@triton.jit
def _sel_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, BI, SEG_KEY, SEG_LO, SEG_HI, ECHUNK, DK32, DV32, DQ32,
    QD1, QD2, DOD, sdob, sdot, sdoh,
    T, H, HK, G, NSEL, NB, REP_K, REP_G, HSG, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DVP: tl.constexpr,
    HP: tl.constexpr, TOK: tl.constexpr, ROWS: tl.constexpr, NPAD: tl.constexpr,
    UNION: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    ATOMIC_Q: tl.constexpr, VK: tl.constexpr, TMA: tl.constexpr, ONE_ACC: tl.constexpr,
):
    """dk, dv of one CSR segment (a key tile and up to ``seg`` query chunks), keys-major.
    ``TMA``: each chunk's q and dO tiles come through the descriptors ``QD1, QD2, DOD`` (see
    ``_chunk_descriptors``) instead of gathered rows. ``ONE_ACC`` (with ``VK``): the value
    gradient adds into the first key tile's accumulator as it goes (``dS`` is scaled before its
    cast to the input dtype), so the program holds one ``BK x D1`` fp32 accumulator, not two."""
    sid = tl.program_id(0)
    pid1 = tl.program_id(1)
    lo = tl.load(SEG_LO + sid)
    hi = tl.load(SEG_HI + sid)
    key = tl.load(SEG_KEY + sid)
    live = hi > lo
    j = key % NB
    bg = key // NB
    g = bg % G
    b = (bg // G).to(tl.int64)
    sub = pid1 // HSG
    h0 = g * REP_G + (pid1 % HSG) * HP
    hk = h0 // REP_K

    kk = tl.arange(0, BK)
    kpos = j * BS + sub * BK + kk
    kvalid = (kpos < T) & live
    krow = (b * T + kpos) * HK + hk
    d1 = tl.arange(0, D1)
    dv = tl.arange(0, DVP)
    k1, k2 = _key_tiles(K, K, K, b, hk, 0, krow, kvalid, D, D1, D2, BK, False)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        dk2 = tl.zeros([BK, D2], tl.float32)
    v = _value_tile(V, k1, krow, kvalid, dv, DV, VK)
    dk1 = tl.zeros([BK, D1], tl.float32)
    if not ONE_ACC:
        dvacc = tl.zeros([BK, DVP], tl.float32)
    ds_scale = sm_scale if ONE_ACC else 1.0  # the scale applied to dS before its cast

    r = tl.arange(0, ROWS)
    tok = r // HP
    hoff = h0 + r % HP
    if UNION:
        bcol = tl.arange(0, NPAD)
    for e in range(lo, hi):
        c = tl.load(ECHUNK + e)
        t = c * TOK + tok
        rvalid = (tok < TOK) & (t < T)
        qrow = (b * T + t) * H + hoff
        if TMA:
            t0 = c * TOK
            q1 = QD1.load([b.to(tl.int32), t0, h0, 0]).reshape([ROWS, D1])
        else:
            q1 = tl.load(Q + qrow[:, None] * D + d1[None, :],
                         mask=rvalid[:, None] & (d1[None, :] < D), other=0.0)
        sT = tl.dot(k1, tl.trans(q1), input_precision=PREC)
        if D2 > 0:
            if TMA:
                q2 = QD2.load([b.to(tl.int32), t0, h0, D1]).reshape([ROWS, D2])
            else:
                q2 = tl.load(Q + qrow[:, None] * D + d2[None, :],
                             mask=rvalid[:, None] & (d2[None, :] < D), other=0.0)
            sT += tl.dot(k2, tl.trans(q2), input_precision=PREC)
        if TMA:
            do = DOD.load([b.to(tl.int32), t0, h0, 0]).reshape([ROWS, DVP])
        else:
            dorow = b * sdob + t.to(tl.int64) * sdot + hoff.to(tl.int64) * sdoh
            do = tl.load(DO + dorow[:, None] + dv[None, :],
                         mask=rvalid[:, None] & (dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + qrow, mask=rvalid, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + qrow, mask=rvalid, other=0.0)
        vis = (kpos[:, None] <= t[None, :]) & rvalid[None, :]
        if UNION:
            brow = ((b * T + t) * G + g) * NSEL
            bl = tl.load(BI + brow[:, None] + bcol[None, :],
                         mask=rvalid[:, None] & (bcol[None, :] < NSEL), other=-1)
            vis = vis & _rows_listing(bl, j)[None, :]
        pT = tl.where(vis, tl.exp2(sT * qk_scale - lse2[None, :]), 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        if ONE_ACC:
            dk1 += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        else:
            dvacc += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dsc = (dsT * ds_scale).to(q1.dtype)
        dk1 += tl.dot(dsc, q1, input_precision=PREC)
        if D2 > 0:
            dk2 += tl.dot(dsc, q2, input_precision=PREC)
        if ATOMIC_Q:
            dq1 = tl.dot(tl.trans(dsc), k1, input_precision=PREC) * (sm_scale / ds_scale)
            tl.atomic_add(DQ32 + qrow[:, None] * D + d1[None, :], dq1,
                          mask=rvalid[:, None] & (d1[None, :] < D), sem="relaxed")
            if D2 > 0:
                dq2 = tl.dot(tl.trans(dsc), k2, input_precision=PREC) * (sm_scale / ds_scale)
                tl.atomic_add(DQ32 + qrow[:, None] * D + d2[None, :], dq2,
                              mask=rvalid[:, None] & (d2[None, :] < D), sem="relaxed")

    dk_scale = sm_scale / ds_scale
    if ONE_ACC:  # dv is already in dk1
        tl.atomic_add(DK32 + krow[:, None] * D + d1[None, :], dk1,
                      mask=kvalid[:, None] & (d1[None, :] < D), sem="relaxed")
    elif VK:  # v is k's first D1 columns: one gradient for both
        tl.atomic_add(DK32 + krow[:, None] * D + d1[None, :], dk1 * sm_scale + dvacc,
                      mask=kvalid[:, None] & (d1[None, :] < D), sem="relaxed")
    else:
        tl.atomic_add(DV32 + krow[:, None] * DV + dv[None, :], dvacc,
                      mask=kvalid[:, None] & (dv[None, :] < DV), sem="relaxed")
        tl.atomic_add(DK32 + krow[:, None] * D + d1[None, :], dk1 * sm_scale,
                      mask=kvalid[:, None] & (d1[None, :] < D), sem="relaxed")
    if D2 > 0:
        tl.atomic_add(DK32 + krow[:, None] * D + d2[None, :], dk2 * dk_scale,
                      mask=kvalid[:, None] & (d2[None, :] < D), sem="relaxed")


@triton.jit
def _chunk_list_kernel(
    BI, CL, T, G, NSEL, NB, NC, L, STEP,
    NG: tl.constexpr, LPAD: tl.constexpr,
):
    """One (batch, chunk, group) row of the chunk lists: the blocks listed by the chunk's ``NG``
    query groups (first tokens ``(c * NG + i) * STEP``), each valid block once, ascending, -1
    padded to ``L``. Deduplicated and ranked by comparing all pairs of entries (``LPAD`` is 16 to
    64 for top-16 selections; wider rows only cost registers)."""
    pid = tl.program_id(0)
    g = pid % G
    c = (pid // G) % NC
    b = (pid // (G * NC)).to(tl.int64)
    e = tl.arange(0, LPAD)
    t = (c * NG + e // NSEL) * STEP
    ok = (e < NG * NSEL) & (t < T)
    j = tl.load(BI + ((b * T + t) * G + g) * NSEL + e % NSEL, mask=ok, other=-1).to(tl.int32)
    ok = ok & (j >= 0) & (j < NB)
    ji = j[:, None]
    jj = j[None, :]
    earlier = e[None, :] < e[:, None]
    dup = tl.max((ok[None, :] & earlier & (jj == ji)).to(tl.int32), axis=1) > 0
    keep = ok & ~dup
    rank = tl.sum((keep[None, :] & (jj < ji)).to(tl.int32), axis=1)
    # out[p] = the kept block of rank p (rows: positions p, columns: entries)
    hit = keep[None, :] & (rank[None, :] == e[:, None])
    out = tl.max(tl.where(hit, jj, -1), axis=1)
    tl.store(CL + pid.to(tl.int64) * L + e, out, mask=e < L)


@triton.jit
def _csr_key_kernel(CL, KEY, E, G, NB, NC, L, NK, BLOCK: tl.constexpr):
    """Sort key of each chunk-list entry ``(b, c, g, l)`` of ``CL (B, NC, G, L)``:
    ``(b * G + g) * NB + block``, or ``NK`` (after every real key) for padding."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < E
    j = tl.load(CL + e, mask=ok, other=-1)
    g = (e // L) % G
    b = e // (L * G * NC)
    tl.store(KEY + e, tl.where(j >= 0, (b * G + g) * NB + j, NK), mask=ok)


@triton.jit
def _lower_bound(X, n, x, steps, BLOCK: tl.constexpr, RIGHT: tl.constexpr):
    """Per lane, the first position ``i`` in ``X[0:n]`` (ascending) with ``X[i] >= x`` (``RIGHT``:
    ``X[i] > x``), ``n`` where none is; ``steps`` halvings reach it."""
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.zeros([BLOCK], tl.int32) + n
    for _ in range(steps):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        v = tl.load(X + mid, mask=active, other=0)
        if RIGHT:
            right = active & (v <= x)
        else:
            right = active & (v < x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _csr_bounds_kernel(SKEY, ORDER, ECHUNK, BOUNDS, E, NK, GL, NC, steps, BLOCK: tl.constexpr):
    """``ECHUNK[e]``: the chunk of sorted entry ``e`` (``ORDER``: its index in the chunk lists);
    ``BOUNDS[k]``, ``k = 0 .. NK``: the first sorted entry whose key is ``>= k``, so key ``k``'s
    entries are ``BOUNDS[k] .. BOUNDS[k + 1] - 1``."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < E
    o = tl.load(ORDER + i, mask=ok, other=0)
    tl.store(ECHUNK + i, ((o // GL) % NC).to(tl.int32), mask=ok)
    tl.store(BOUNDS + i, _lower_bound(SKEY, E, i, steps, BLOCK, False), mask=i <= NK)


@triton.jit
def _csr_seg_end_kernel(BOUNDS, SEG_END, NK, SEG, BLOCK: tl.constexpr):
    """One program: ``SEG_END[k]`` = segments of keys ``0 .. k`` (``ceil(count / SEG)`` each)."""
    carry = tl.full([], 0, tl.int32)
    for k0 in range(0, NK, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        ok = k < NK
        cnt = tl.load(BOUNDS + k + 1, mask=ok, other=0) - tl.load(BOUNDS + k, mask=ok, other=0)
        nseg = (cnt + SEG - 1) // SEG
        tl.store(SEG_END + k, tl.cumsum(nseg, 0) + carry, mask=ok)
        carry += tl.sum(nseg, 0)


@triton.jit
def _csr_segment_kernel(BOUNDS, SEG_END, SEG_KEY, SEG_LO, SEG_HI, NK, SMAX, SEG, steps,
                        BLOCK: tl.constexpr):
    """Segment ``s``: key ``kid`` (the first whose ``SEG_END`` passes ``s``), sorted entries
    ``lo .. hi - 1``; past the last real segment, key ``NK - 1`` and ``lo = hi = 0``."""
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = s < SMAX
    kid = _lower_bound(SEG_END, NK, s, steps, BLOCK, True)
    valid = kid < NK
    kid = tl.minimum(kid, NK - 1)
    start = tl.load(BOUNDS + kid, mask=ok, other=0)
    end = tl.load(BOUNDS + kid + 1, mask=ok, other=0)
    first = tl.load(SEG_END + kid, mask=ok, other=0) - (end - start + SEG - 1) // SEG
    lo = start + (s - first) * SEG
    hi = tl.minimum(lo + SEG, end)
    tl.store(SEG_KEY + s, kid, mask=ok)
    tl.store(SEG_LO + s, tl.where(valid, lo, 0), mask=ok)
    tl.store(SEG_HI + s, tl.where(valid, hi, 0), mask=ok)


# ---------------------------------------------------------------------------------------------
# Planning: shapes -> tiling
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Tuning knobs (``None`` = heuristic). Defaults chosen on an H200 (see module docstring)."""

    tok: int | None = None          # queries per program (chunk); None: see union_groups
    union_groups: int = 2           # shared layouts (one q_share group fills >= 16 rows): forward
    #                                 and dq chunks span this many q_share groups (union chunks of
    #                                 <= max_rows rows); 1: one group per chunk
    max_rows: int | None = None     # cap on TOK * HP when tok is None; None: 64 (16 for WIDE)
    bk: int | None = None           # key tile (divides select_block); None: 64 (16 for WIDE)
    fwd_order: str | None = None    # "rows": S = Q K^T; "keys": S^T = K Q^T; None: by chunk shape
    dq_order: str | None = None     # same choice for the dq kernel (csr mode)
    bwd: str = "csr"                # "csr" | "atomic_kv" | "atomic_q"
    seg: int = 64                   # chunks per key-block segment in the dk/dv kernel
    dkdv_tok: int | None = None     # queries per chunk of the dk/dv pass; None: q_share (shared
    #                                 chunks) when the forward's are unions of q_share groups of a
    #                                 shared layout, gcd(2, q_share) for WIDE, else tok
    fwd_warps: int = 4
    fwd_stages: int = 3
    dq_warps: int = 4
    dq_stages: int = 2
    dkdv_warps: int = 4
    dkdv_stages: int = 3
    one_acc: bool | None = None     # dk/dv kernel, values in the keys: dv adds into dk's
    #                                 accumulator (dS scaled before its cast); None: for WIDE
    tma: bool = True                # tiles through TMA tensor descriptors where they can serve
    #                                 (Hopper+ or the interpreter; head dims that are whole tiles;
    #                                 row-major tensors): keys of the rows-major forward and dq
    #                                 kernels, each chunk's q and dO in the dk/dv kernel


DEFAULT_CONFIG = Config()


@dataclass(frozen=True)
class _Plan:
    B: int
    T: int
    H: int
    HK: int
    G: int
    NSEL: int
    D: int
    DV: int
    D1: int
    D2: int
    DVP: int
    HP: int
    TOK: int
    QS: int
    ROWS: int
    UNION: bool
    NC: int
    L: int
    LPAD: int
    NPAD: int
    BS: int
    BK: int
    NSUB: int
    NB: int
    NHS: int
    HSG: int
    REP_K: int
    REP_G: int
    VK: bool     # values are k[..., :DV] (v=None, value_dim=DV), read through the first key tile
    ONE_ACC: bool  # with VK: one accumulator for dk's first tile and dv in the dk/dv kernel
    KV_TOK: int  # queries per chunk of the dk/dv pass
    FWD_ORDER: str
    DQ_ORDER: str


def _key_tile(select_block: int, bk: int | None) -> int:
    if bk is None:
        if select_block % 64 == 0:
            bk = 64
        elif select_block in (16, 32):
            bk = select_block
        else:
            raise ValueError(
                f"select_block ({select_block}) must be 16, 32 or a multiple of 64 for the Triton "
                "kernel (it is tiled in key tiles of 16, 32 or 64)")
    if bk not in (16, 32, 64, 128) or select_block % bk:
        raise ValueError(f"select_block ({select_block}) must be a multiple of the key tile ({bk})")
    return bk


def _plan(q, k, v, block_idx, select_block, q_share, cfg: Config, value_dim=None) -> _Plan:
    """Validate the inputs and tile the problem. ``v=None, value_dim=Dv``: values ``k[..., :Dv]``
    (see :func:`selected_attention`); ``VK`` when they fit the first key tile."""
    if not all(isinstance(x, torch.Tensor) for x in (q, k, block_idx)) or not (
            v is None or isinstance(v, torch.Tensor)):
        raise TypeError("q, k, v and block_idx must be tensors (v may be None with value_dim)")
    keys_hold_values = value_dim is not None
    v = key_values(k, v, value_dim)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, T, heads, dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"batch size of k ({k.shape[0]}) and v ({v.shape[0]}) must equal q's ({B})")
    if k.shape[1] != T or v.shape[1] != T:
        raise ValueError(
            f"sequence length of k ({k.shape[1]}) and v ({v.shape[1]}) must equal q's ({T})")
    HK = k.shape[2]
    if v.shape[2] != HK:
        raise ValueError(f"key heads ({HK}) and value heads ({v.shape[2]}) must be equal")
    if k.shape[3] != D:
        raise ValueError(f"Dqk of k ({k.shape[3]}) must equal q's ({D})")
    DV = v.shape[3]
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} not supported (bfloat16, float16 or float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == block_idx.device):
        raise ValueError("q, k, v and block_idx must be on one device")
    if min(B, T, H, HK, D, DV) < 1:
        raise ValueError(f"empty dimension in q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if H % HK:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HK})")
    if D > _MAX_DIM or DV > _MAX_DIM:
        raise ValueError(f"Dqk ({D}) and Dv ({DV}) must be at most {_MAX_DIM} for this kernel")
    if block_idx.dim() != 4 or block_idx.shape[0] != B or block_idx.shape[1] != T:
        raise ValueError(f"block_idx must have shape (B={B}, T={T}, G, n); got "
                         f"{tuple(block_idx.shape)}")
    if block_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"block_idx must be int64 or int32, got {block_idx.dtype}")
    G, NSEL = block_idx.shape[2], block_idx.shape[3]
    if G < 1 or H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of selection groups G ({G})")
    if NSEL < 1:
        raise ValueError("block_idx must list at least one block per query (n >= 1)")
    if not isinstance(select_block, int) or select_block < 1:
        raise ValueError(f"select_block must be a positive int, got {select_block!r}")
    if not isinstance(q_share, int) or q_share < 1:
        raise ValueError(f"q_share must be a positive int, got {q_share!r}")
    if select_block % q_share:
        raise ValueError(f"q_share ({q_share}) must divide select_block ({select_block})")
    if cfg.dkdv_tok is not None and (not isinstance(cfg.dkdv_tok, int) or cfg.dkdv_tok < 1):
        raise ValueError(f"dkdv_tok must be a positive int or None, got {cfg.dkdv_tok!r}")
    if cfg.bwd not in _BWD_MODES:
        raise ValueError(f"bwd mode must be one of {_BWD_MODES}, got {cfg.bwd!r}")
    if not isinstance(cfg.union_groups, int) or cfg.union_groups < 1:
        raise ValueError(f"union_groups must be a positive int, got {cfg.union_groups!r}")
    if cfg.fwd_order not in (None, "rows", "keys") or cfg.dq_order not in (None, "rows", "keys"):
        raise ValueError(f"fwd_order / dq_order must be 'rows' or 'keys', got {cfg.fwd_order!r}, "
                         f"{cfg.dq_order!r}")
    # WIDE: keys over 256 columns (a latent of 256 + RoPE 32 in the 1.3B ASA and the 340M
    # global-MLA configs). The tiles that fit 256-wide fp32 accumulators without spilling, from
    # ptxas on sm_90a (benchmarks/kernel_resources.py; not yet timed on a GPU): 16-key tiles,
    # 16-row chunks, 2-token dk/dv chunks and one dk/dv accumulator
    wide = D > 256
    BK = _key_tile(select_block, cfg.bk if cfg.bk is not None else (16 if wide else None))
    max_rows = cfg.max_rows if cfg.max_rows is not None else (16 if wide else 64)

    REP_K, REP_G = H // HK, H // G
    hp = math.gcd(REP_K, REP_G)
    HP = max(d for d in range(1, min(hp, 64) + 1) if hp % d == 0)

    shared = HP * q_share >= 16  # one q_share group of queries fills a 16-row tile
    if cfg.tok is not None:
        TOK = int(cfg.tok)
        if TOK < 1:
            raise ValueError(f"tok must be >= 1, got {TOK}")
        union = q_share % TOK != 0
    elif shared:
        TOK = max(d for d in range(1, q_share + 1)
                  if q_share % d == 0 and (HP * d <= max_rows or d == 1))
        union = False
        if TOK == q_share and HP * q_share * cfg.union_groups <= max_rows:
            TOK, union = q_share * cfg.union_groups, cfg.union_groups > 1
    else:
        TOK = q_share * -(-16 // (HP * q_share))
        union = TOK != q_share
    QS = q_share if (union and TOK % q_share == 0) else (TOK if not union else 1)
    ROWS = max(16, next_pow2(TOK * HP))
    NC = -(-T // TOK)
    L = (TOK // QS) * NSEL if union else NSEL
    D1, D2 = split_dim(D)
    NB = num_selection_blocks(T, select_block)
    KV_TOK = cfg.dkdv_tok or (q_share if shared and union and TOK % q_share == 0
                              else math.gcd(2, q_share) if wide else TOK)
    # measured (module docstring): wide union chunks multiply rows by keys; others keys by rows
    wide_union = union and ROWS >= 64
    FWD_ORDER = cfg.fwd_order or ("rows" if wide_union or ROWS < 32 else "keys")
    DQ_ORDER = cfg.dq_order or ("rows" if wide_union else "keys")
    # values inside the first key tile: that tile (D1 wide; do is zero-padded past Dv) is the
    # value tile, so the value width is padded to D1
    VK = keys_hold_values and DV <= D1
    DVP = D1 if VK else max(16, next_pow2(DV))
    if B * T * max(H * max(D, DV), G * NSEL) >= 2**62:
        raise ValueError("tensor too large for 64-bit offsets")
    return _Plan(B=B, T=T, H=H, HK=HK, G=G, NSEL=NSEL, D=D, DV=DV, D1=D1, D2=D2, DVP=DVP,
                 HP=HP, TOK=TOK, QS=QS, ROWS=ROWS, UNION=union, NC=NC, L=L,
                 LPAD=next_pow2(L), NPAD=next_pow2(NSEL), BS=select_block, BK=BK,
                 NSUB=select_block // BK, NB=NB, NHS=H // HP, HSG=REP_G // HP,
                 REP_K=REP_K, REP_G=REP_G, VK=VK, KV_TOK=KV_TOK, FWD_ORDER=FWD_ORDER,
                 ONE_ACC=VK and (cfg.one_acc if cfg.one_acc is not None else wide),
                 DQ_ORDER=DQ_ORDER)


def _chunk_lists(block_idx: torch.Tensor, p: _Plan) -> torch.Tensor:
    """Per (batch, chunk, group): the blocks the chunk reads, ascending, unique, -1 padded.

    ``(B, NC, G, L)`` int32. Shared chunks take their first query's row; union chunks merge the
    rows of the first query of each ``q_share`` group they span. Entries outside
    ``[0, num_blocks)`` are dropped. One Triton program per row, no host synchronisation.
    """
    B, T, G, n = block_idx.shape
    ng, step = (p.TOK // p.QS, p.QS) if p.UNION else (1, p.TOK)
    clist = torch.empty(B, p.NC, G, p.L, device=block_idx.device, dtype=torch.int32)
    _chunk_list_kernel[(B * p.NC * G,)](
        block_idx.contiguous(), clist, T, G, n, p.NB, p.NC, p.L, step,
        NG=ng, LPAD=p.LPAD, num_warps=4 if p.LPAD <= 64 else 8 if p.LPAD <= 128 else 16)
    return clist


def _lists(block_idx: torch.Tensor, p: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels read: per-row block lists (``block_idx`` as int32; union chunks mask each
    row by its own) or, for shared chunks, the chunk lists themselves; and the chunk lists."""
    clist = _chunk_lists(block_idx, p)
    return (block_idx.to(torch.int32).contiguous() if p.UNION else clist), clist


def _dkdv_plan(q, k, v, block_idx, select_block, q_share, cfg: Config, p: _Plan) -> _Plan:
    """Plan of the dk/dv pass: ``p`` itself unless it chunks the queries by ``p.KV_TOK``
    (``v`` as :func:`_plan` took it: None when the values are read through the keys)."""
    if p.KV_TOK == p.TOK or cfg.bwd == "atomic_kv":  # atomic_kv has no dk/dv pass
        return p
    return _plan(q, k, v, block_idx, select_block, q_share, replace(cfg, tok=p.KV_TOK),
                 value_dim=p.DV if v is None else None)


def _dkdv_lists(block_idx, p: _Plan, p_kv: _Plan, bi32, clist):
    """``(bi32, clist)`` of the dk/dv pass, reusing the forward's where they are the same."""
    if p_kv is p:
        return bi32, clist
    bi_kv, clist_kv = _lists(block_idx, p_kv)
    return (bi32 if p_kv.UNION and p.UNION else bi_kv), clist_kv  # per-row lists: the same


def _segments(clist: torch.Tensor, p: _Plan, seg: int):
    """Invert the chunk lists: for each (batch, group, key block), the chunks that read it.

    Returns ``seg_key, seg_lo, seg_hi`` (one row per segment of at most ``seg`` chunks, padded to a
    static upper bound with empty segments), ``ent_chunk`` (chunk of each sorted entry) and that
    bound. Four kernels around one stable sort (sort keys; chunk of each sorted entry and each
    key's bounds; segment ends; segments); no host synchronisation.
    """
    clist = clist.contiguous()
    B, NC, G, L = clist.shape
    dev = clist.device
    NK = B * G * p.NB
    E = clist.numel()
    smax = E // seg + min(E, NK) + 1
    if max(E, NK, smax) >= 2**30:  # int32 indices, with room for the kernels' block padding
        raise ValueError(f"too many (query chunk, block) pairs ({E}) for the dk/dv index")
    block = 1024
    key = torch.empty(E, device=dev, dtype=torch.int32)
    _csr_key_kernel[(triton.cdiv(E, block),)](clist, key, E, G, p.NB, NC, L, NK, BLOCK=block)
    skey, order = torch.sort(key, stable=True)  # stable: ascending chunks within a key block
    ent_chunk = torch.empty(E, device=dev, dtype=torch.int32)
    bounds = torch.empty(NK + 1, device=dev, dtype=torch.int32)
    _csr_bounds_kernel[(triton.cdiv(max(E, NK + 1), block),)](
        skey, order, ent_chunk, bounds, E, NK, G * L, NC, _search_steps(E), BLOCK=block)
    seg_end = torch.empty(NK, device=dev, dtype=torch.int32)
    _csr_seg_end_kernel[(1,)](bounds, seg_end, NK, seg, BLOCK=block)
    seg_key, seg_lo, seg_hi = (torch.empty(smax, device=dev, dtype=torch.int32)
                               for _ in range(3))
    _csr_segment_kernel[(triton.cdiv(smax, block),)](
        bounds, seg_end, seg_key, seg_lo, seg_hi, NK, smax, seg, _search_steps(NK), BLOCK=block)
    return seg_key, seg_lo, seg_hi, ent_chunk, smax


def _search_steps(n: int) -> int:
    """Halvings that take a binary search over ``n`` sorted items down to one position."""
    return max(1, (n + 1).bit_length())


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _key_descriptors(k: torch.Tensor, p: _Plan, cfg: Config):
    """``(KD1, KD2, TMA)`` for the rows-major forward and dq kernels: TMA descriptors of the two
    key tiles (blocks ``[1, BK, D1]``, ``[1, BK, D2]`` of ``k`` viewed as ``(B, T, HK * D)``, so
    rows past T read as zeros) when ``cfg.tma`` asks and TMA can serve ``k``; else
    ``(k, k, False)``."""
    if cfg.tma and p.D1 + p.D2 == p.D and k.is_contiguous():
        kd = split_descriptors(k.view(p.B, p.T, p.HK * p.D), [1, p.BK], p.D1, p.D2)
        if kd is not None:
            return *kd, True
    return k, k, False


def _chunk_descriptors(q: torch.Tensor, do: torch.Tensor, p: _Plan, cfg: Config):
    """``(QD1, QD2, DOD, TMA)`` for the dk/dv kernel: descriptors of a chunk's query and
    output-gradient tiles (blocks ``[1, TOK, HP, width]`` of the ``(B, T, H, width)`` tensors,
    rows past T read as zeros) when ``cfg.tma`` asks and the chunk is exactly ``TOK x HP`` rows
    of whole head dims; else ``(q, q, do, False)``."""
    if cfg.tma and p.TOK * p.HP == p.ROWS and p.D1 + p.D2 == p.D and p.DVP == p.DV:
        qd = split_descriptors(q, [1, p.TOK, p.HP], p.D1, p.D2)
        dd = tma_descriptor(do, [1, p.TOK, p.HP, p.DV])
        if qd is not None and dd is not None:
            return *qd, dd, True
    return q, q, do, False


def _forward(q, k, v, bi32, clist, p: _Plan, scale: float, cfg: Config):
    o = torch.empty(p.B, p.T, p.H, p.DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(p.B, p.T, p.H, device=q.device, dtype=torch.float32)
    grid = (p.NC, p.B * p.NHS)
    if p.FWD_ORDER == "keys":
        kernel, descs, extra = _sel_fwd_t_kernel, (), {}
    else:
        kd1, kd2, tma = _key_descriptors(k, p, cfg)
        kernel, descs, extra = _sel_fwd_kernel, (kd1, kd2), dict(TMA=tma)
    kernel[grid](
        q, k, v, clist, bi32, o, lse, *descs,
        p.T, p.H, p.HK, p.G, p.NSEL, p.NC, p.L, p.REP_K, p.REP_G, p.NHS, scale * LOG2E,
        D=p.D, DV=p.DV, D1=p.D1, D2=p.D2, DVP=p.DVP, HP=p.HP, TOK=p.TOK, ROWS=p.ROWS,
        LPAD=p.LPAD, NPAD=p.NPAD, UNION=p.UNION, BS=p.BS, BK=p.BK, NSUB=p.NSUB,
        PREC=_prec(q.dtype), VK=p.VK, **extra,
        num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages,
    )
    return o, lse


def _common(p: _Plan, dtype) -> dict:
    return dict(D=p.D, DV=p.DV, D1=p.D1, D2=p.D2, DVP=p.DVP, HP=p.HP, TOK=p.TOK, ROWS=p.ROWS,
                NPAD=p.NPAD, UNION=p.UNION, BS=p.BS, BK=p.BK, PREC=_prec(dtype), VK=p.VK)


def _bwd_dq(q, k, v, o, lse, do, bi32, clist, p: _Plan, scale: float, cfg: Config, dk32, dv32):
    """Query-major backward kernel: ``dq`` (and ``delta``; ``dk, dv`` too in atomic_kv mode)."""
    dq = torch.empty_like(q)
    delta = torch.empty(p.B, p.T, p.H, device=q.device, dtype=torch.float32)
    args = (p.T, p.H, p.HK, p.G, p.NSEL, p.NC, p.L, p.REP_K, p.REP_G, p.NHS, scale * LOG2E, scale)
    if cfg.bwd == "csr" and p.DQ_ORDER == "keys":
        _sel_bwd_dq_t_kernel[(p.NC, p.B * p.NHS)](
            q, k, v, o, do, lse, clist, bi32, dq, delta, *do.stride()[:3], *args,
            LPAD=p.LPAD, NSUB=p.NSUB, **_common(p, q.dtype),
            num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
        )
    else:
        kd1, kd2, tma = _key_descriptors(k, p, cfg)
        _sel_bwd_dq_kernel[(p.NC, p.B * p.NHS)](
            q, k, v, o, do, lse, clist, bi32, dq, delta, dk32, dv32, kd1, kd2, *do.stride()[:3],
            *args,
            LPAD=p.LPAD, NSUB=p.NSUB, ATOMIC_KV=cfg.bwd == "atomic_kv", TMA=tma,
            **_common(p, q.dtype),
            num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
        )
    return dq, delta


def _bwd_dkdv(q, k, v, do, lse, delta, bi32, segs, p: _Plan, scale: float, cfg: Config,
              dk32, dv32, dq32):
    """Key-block-major backward kernel over the CSR segments: adds into ``dk32, dv32``."""
    seg_key, seg_lo, seg_hi, ent_chunk, smax = segs
    qd1, qd2, dod, tma = _chunk_descriptors(q, do, p, cfg)
    _sel_bwd_dkdv_kernel[(smax, p.NSUB * p.HSG)](
        q, k, v, do, lse, delta, bi32, seg_key, seg_lo, seg_hi, ent_chunk, dk32, dv32, dq32,
        qd1, qd2, dod, *do.stride()[:3],
        p.T, p.H, p.HK, p.G, p.NSEL, p.NB, p.REP_K, p.REP_G, p.HSG, scale * LOG2E, scale,
        ATOMIC_Q=cfg.bwd == "atomic_q", TMA=tma, ONE_ACC=p.ONE_ACC, **_common(p, q.dtype),
        num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
    )


def _backward(q, k, v, o, lse, do, bi32, clist, p: _Plan, scale: float, cfg: Config,
              kv_lists: tuple[torch.Tensor, torch.Tensor, _Plan] | None = None):
    """``kv_lists``: ``(bi32, clist, plan)`` of the dk/dv pass when it chunks the queries
    differently (``_Plan.KV_TOK``); default: the forward's."""
    bi_kv, clist_kv, p_kv = kv_lists or (bi32, clist, p)
    dev = q.device
    dk32 = torch.zeros(p.B, p.T, p.HK, p.D, device=dev, dtype=torch.float32)
    # with values in the keys, the kernels add dv into dk32 and never touch dv32
    dv32 = dk32 if p.VK else torch.zeros(p.B, p.T, p.HK, p.DV, device=dev, dtype=torch.float32)
    if cfg.bwd in ("csr", "atomic_kv"):
        dq, delta = _bwd_dq(q, k, v, o, lse, do, bi32, clist, p, scale, cfg, dk32, dv32)
        dq32 = dq  # not written by the dk/dv kernel outside atomic_q mode
    else:
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dq32 = torch.zeros(p.B, p.T, p.H, p.D, device=dev, dtype=torch.float32)
        dq = None
    if cfg.bwd in ("csr", "atomic_q"):
        segs = _segments(clist_kv, p_kv, cfg.seg)
        _bwd_dkdv(q, k, v, do, lse, delta, bi_kv, segs, p_kv, scale, cfg, dk32, dv32, dq32)
    if dq is None:
        dq = dq32.to(q.dtype)
    return dq, dk32.to(k.dtype), (None if p.VK else dv32.to(v.dtype))


def _row_major(q, k, v, p: _Plan):
    """Contiguous ``q, k, v``; values that live in the keys (``p.VK``, ``v`` None) are read
    through ``k``."""
    k = k.contiguous()
    if not p.VK and v is None:
        raise ValueError("v is None but the plan does not read the values through the keys")
    return q.contiguous(), k, (k if p.VK else v.contiguous())


def encode_config(cfg: Config) -> str:
    """``cfg`` as the operators' JSON (``""``: the defaults)."""
    return "" if cfg == DEFAULT_CONFIG else json.dumps(asdict(cfg), sort_keys=True)


def _decode_config(config: str) -> Config:
    return Config(**json.loads(config)) if config else DEFAULT_CONFIG


def chunk_list_shape(q, k, v, block_idx, select_block, q_share, value_dim, config: str):
    """The shape of the chunk lists ``torch.ops.nsa_lit.selected_attention`` returns."""
    p = _plan(q, k, v, block_idx, select_block, q_share, _decode_config(config), value_dim)
    return p.B, p.NC, p.G, p.L


def op_forward(q, k, v, block_idx, select_block, scale, q_share, value_dim, config):
    """``torch.ops.nsa_lit.selected_attention``: ``(o, lse, chunk lists)`` from row-major ``q, k,
    v`` (``v`` None: the values are ``k[..., :value_dim]``, in the first key tile)."""
    cfg = _decode_config(config)
    p = _plan(q, k, v, block_idx, select_block, q_share, cfg, value_dim)
    q, k, v = _row_major(q, k, v, p)
    bi32, clist = _lists(block_idx, p)
    o, lse = _forward(q, k, v, bi32, clist, p, float(scale), cfg)
    return o, lse, clist


def op_backward(do, q, k, v, o, lse, block_idx, clist, select_block, scale, q_share, value_dim,
                config):
    """``torch.ops.nsa_lit.selected_attention_backward``: ``[dq, dk, dv]`` (``[dq, dk]`` when
    ``v`` is None: ``dk`` holds the values' gradient too)."""
    cfg = _decode_config(config)
    p = _plan(q, k, v, block_idx, select_block, q_share, cfg, value_dim)
    p_kv = _dkdv_plan(q, k, v, block_idx, select_block, q_share, cfg, p)
    bi32 = block_idx.to(torch.int32).contiguous() if p.UNION else clist
    bi_kv, clist_kv = _dkdv_lists(block_idx, p, p_kv, bi32, clist)
    q, k, v = _row_major(q, k, v, p)
    # dO is read through its strides (the layer's comes back from the W_uv up-projection
    # head-major); only rows that are not unit-stride are copied
    dq, dk, dv = _backward(q, k, v, o, lse, row_major(do), bi32, clist, p, float(scale), cfg,
                           (bi_kv, clist_kv, p_kv))
    return [dq, dk] if p.VK else [dq, dk, dv]


def _check_device(q: torch.Tensor) -> None:
    if not (q.is_cuda or interpreting()):
        raise RuntimeError("the Triton selected_attention kernel needs CUDA tensors "
                           "(or TRITON_INTERPRET=1)")


def _resolve(q, k, v, block_idx, select_block, q_share, cfg: Config, value_dim):
    """Validate; returns ``(plan, v, value_dim)`` with values wider than the first key tile
    turned into the view ``k[..., :value_dim]`` (autograd adds its gradient into ``k``'s), so
    that ``v is None`` exactly when the kernels read the values through the keys."""
    p = _plan(q, k, v, block_idx, select_block, q_share, cfg, value_dim)
    if value_dim is not None and not p.VK:
        v, value_dim = k[..., :value_dim], None
    return p, v, value_dim


def selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, block_idx: torch.Tensor,
    select_block: int, scale: float, q_share: int = 1, *, value_dim: int | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``q (B, T, H, Dqk)``, ``k (B, T, Hk, Dqk)``, ``v (B, T, Hk, Dv)``,
    ``block_idx (B, T, G, n)`` -> ``o (B, T, H, Dv)`` in ``q.dtype``; differentiable in q, k, v.

    ``v=None, value_dim=Dv``: the values are ``k[..., :Dv]`` (absorbed latent form). When they
    lie in the first key tile the kernels read each key tile once for both and add the value
    gradient into ``k``'s; give exactly one of ``v`` and ``value_dim``.

    ``q_share`` promises that aligned groups of ``q_share`` queries carry identical block indices
    (the kernel then reads the first query's row for the whole group). Raises ``ValueError`` for
    shapes it cannot serve (``select_block`` not 16, 32 or a multiple of 64; ``q_share`` not
    dividing ``select_block``; head counts that do not divide; dims above 256; dtypes other than
    bf16 / fp16 / fp32) and for a ``v``/``value_dim`` pair that is not exactly one of them.
    """
    o, _, _ = _call(q, k, v, block_idx, select_block, scale, q_share, value_dim, config)
    return o


def selected_attention_with_lse(q, k, v, block_idx, select_block, scale, q_share=1, *,
                                value_dim: int | None = None, config: Config | None = None):
    """Forward only (no autograd): ``(o, lse)`` with ``lse (B, T, H)`` float32, natural log.
    ``v``/``value_dim`` as in :func:`selected_attention`."""
    with torch.no_grad():
        o, lse, _ = _call(q, k, v, block_idx, select_block, scale, q_share, value_dim, config)
    return o, lse


def _call(q, k, v, block_idx, select_block, scale, q_share, value_dim, config: Config | None):
    """Validate, then ``torch.ops.nsa_lit.selected_attention`` on contiguous inputs:
    ``(o, lse, chunk lists)``."""
    cfg = config or DEFAULT_CONFIG
    _, v, value_dim = _resolve(q, k, v, block_idx, select_block, q_share, cfg, value_dim)
    _check_device(q)
    return torch.ops.nsa_lit.selected_attention(
        q.contiguous(), k.contiguous(), None if v is None else v.contiguous(), block_idx,
        select_block, float(scale), q_share, value_dim, encode_config(cfg))


__all__ = ["selected_attention", "selected_attention_with_lse", "Config", "DEFAULT_CONFIG"]
