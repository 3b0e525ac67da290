"""Sliding-window causal attention in Triton: forward and backward, FlashAttention-2 style.

Same function and semantics as :mod:`kernels.sliding_window.reference`: query ``t`` attends key
``s`` iff ``t - window < s <= t``; ``q (B, T, H, Dqk)``, ``k (B, T, Hk, Dqk)``,
``v (B, T, Hk, Dv)`` with ``H % Hk == 0`` (query head ``h`` reads key/value head
``h // (H // Hk)``) -> ``o (B, T, H, Dv)`` in ``q.dtype``.

Design
------
* **Rows = (token, head) pairs of one KV group.** A program's query tile has ``BLOCK_M`` rows:
  ``BLOCK_M // GP`` consecutive tokens times ``GP`` consecutive query heads that share one KV
  head (``GP`` divides ``H // Hk``). Every key/value tile loaded serves ``GP`` heads, and a tile
  spans only ``BLOCK_M // GP`` tokens, so the band of keys it visits (``window + tokens``) wastes
  less on masked scores. ``GP = 1`` is the plain one-head-per-program layout.
* **Only the band is visited.** A query tile visits the key blocks that intersect
  ``[t0 - window + 1, t_last]``: cost O(T * window). Only the blocks at the window's far edge
  and on the diagonal need the mask; the autotuned ``SPLIT`` picks how: one loop masking every
  block, one loop masking the edge blocks only (a runtime branch; fastest on an H200), or three
  loops (masked, unmasked, masked).
* **Split head dim.** ``Dqk`` that is not a power of two is split into two power-of-two parts
  (96 = 64 + 32, the MLA nope + RoPE widths) summed by two chained dots instead of padding to
  128; other widths are padded with masked loads. ``Dv`` is padded to a power of two.
* **Forward** keeps the running max / sum in base 2 and saves ``lse`` (base 2, float32,
  ``(B, T, H)``). **Backward**: kernel 1 (per query tile) computes ``delta = rowsum(dO * O)``,
  stores it, and accumulates ``dq`` over the band; kernel 2 (per key block and KV head) loops
  over the group's query heads and the band's query tiles and accumulates ``dk`` and ``dv`` for
  the whole group, so GQA needs no reduction pass and no atomics.
* fp32 accumulation; bf16/fp16 operands go to the tensor cores, float32 uses IEEE dots.
  Offsets that can pass 2**31 (batch, token and head bases) are 64-bit.
* On a GPU each kernel is autotuned over a small set of tile shapes (key: head dims, group
  size, window, precision, TMA); under ``TRITON_INTERPRET=1`` a fixed small configuration runs.
* **Tiles by TMA** (Hopper or newer, or the interpreter) where no tile has padding columns
  (they would read the next head's): in the forward and dq loops a key block is ``BLOCK_N``
  consecutive rows of one key/value head, read through tensor descriptors of ``k`` and ``v``
  (one per power-of-two piece of ``Dqk``); in the dk/dv loop a query tile is ``BLOCK_M // GP``
  tokens x ``GP`` heads of ``q`` and ``dO`` (dO through its own strides). Rows past T read
  zeros. The descriptors are built before the autotuner picks a configuration, so the
  configurations' pre-hooks (``_kv_block_hook``, ``_qdo_block_hook``) set their tiles.
  ``cfg["tma"] = False`` keeps the row loads.
"""
from __future__ import annotations

import json
import numbers

import torch
import triton
import triton.language as tl

from kernels.triton_utils import interpreter_tiles, row_major, split_descriptors, tma_descriptor

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load2d(ptrs, rmask, cmask, USE_R: tl.constexpr, USE_C: tl.constexpr):
    if USE_R:
        if USE_C:
            x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        if USE_C:
            x = tl.load(ptrs, mask=cmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _k_tiles(kb, k_off, KD1, KD2, b32, hk32, n0, kmask, DQK: tl.constexpr, D1: tl.constexpr,
             D2: tl.constexpr, PAD1: tl.constexpr, PAD2: tl.constexpr, BLOCK_N: tl.constexpr,
             MASK: tl.constexpr, TMA: tl.constexpr):
    """Key tiles ``(BLOCK_N, D1)`` and ``(BLOCK_N, D2)`` (the second = the first when
    ``D2 == 0``) of keys ``n0 .. n0 + BLOCK_N - 1``: through the descriptors when ``TMA`` (rows
    past T read zeros), else by row offsets from ``kb``."""
    if TMA:
        k1 = KD1.load([b32, n0, hk32, 0]).reshape([BLOCK_N, D1])
        k2 = k1
        if D2 > 0:
            k2 = KD2.load([b32, n0, hk32, D1]).reshape([BLOCK_N, D2])
    else:
        d1 = tl.arange(0, D1)
        k1 = _load2d(kb + k_off[:, None] + d1[None, :], kmask, d1 < DQK, MASK, PAD1)
        k2 = k1
        if D2 > 0:
            d2 = D1 + tl.arange(0, D2)
            k2 = _load2d(kb + k_off[:, None] + d2[None, :], kmask, d2 < DQK, MASK, PAD2)
    return k1, k2


@triton.jit
def _v_tile(vb, v_off, VD, b32, hk32, n0, kmask, DV: tl.constexpr, DVP: tl.constexpr,
            PADV: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """Value tile ``(BLOCK_N, DVP)`` of the same keys, as :func:`_k_tiles` loads key tiles."""
    if TMA:
        v = VD.load([b32, n0, hk32, 0]).reshape([BLOCK_N, DVP])
    else:
        dv = tl.arange(0, DVP)
        v = _load2d(vb + v_off[:, None] + dv[None, :], kmask, dv < DV, MASK, PADV)
    return v


@triton.jit
def _fwd_loop(acc, l_i, m_i, q1, q2, k_base, v_base, skt, svt, KD1, KD2, VD, b32, hk32,
              start, end, fs, fe, tok, T, window, qk_scale,
              DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
              DVP: tl.constexpr, PAD1: tl.constexpr, PAD2: tl.constexpr, PADV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, EDGE: tl.constexpr,
              PREC: tl.constexpr, TMA: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    start64 = start.to(tl.int64)
    kb = k_base + start64 * skt
    vb = v_base + start64 * svt
    k_off = offs_n * skt
    v_off = offs_n * svt
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        kmask = cols < T
        k1, k2 = _k_tiles(kb, k_off, KD1, KD2, b32, hk32, n0, kmask, DQK, D1, D2, PAD1, PAD2,
                          BLOCK_N, MASK, TMA)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
        if D2 > 0:
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PREC)
        s = s * qk_scale
        if MASK:
            if EDGE:
                if (n0 < fs) | (n0 >= fe):
                    diff = tok[:, None] - cols[None, :]
                    s = tl.where((diff >= 0) & (diff < window), s, float("-inf"))
            else:
                diff = tok[:, None] - cols[None, :]
                s = tl.where((diff >= 0) & (diff < window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _v_tile(vb, v_off, VD, b32, hk32, n0, kmask, DV, DVP, PADV, BLOCK_N, MASK, TMA)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
        kb += BLOCK_N * skt
        vb += BLOCK_N * svt
    return acc, l_i, m_i


@triton.jit
def _sw_fwd_kernel(Q, K, V, O, LSE, KD1, KD2, VD,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                   T, H, G, window, qk_scale,
                   DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                   DVP: tl.constexpr, PAD1: tl.constexpr, PAD2: tl.constexpr,
                   PADV: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GP: tl.constexpr,
                   SPLIT: tl.constexpr):
    BT = BLOCK_M // GP
    n_t = tl.cdiv(T, BT)
    pid = tl.program_id(0)
    pid_t = pid % n_t
    pid_bh = pid // n_t
    NP = H // GP
    b = (pid_bh // NP).to(tl.int64)
    h0 = (pid_bh % NP) * GP
    hk = h0 // G
    b32, hk32 = b.to(tl.int32), hk.to(tl.int32)  # descriptor coordinates (TMA)
    t0 = pid_t * BT

    r = tl.arange(0, BLOCK_M)
    r_tok = r // GP
    r_head = r % GP
    tok = t0 + r_tok
    row_ok = tok < T
    d1 = tl.arange(0, D1)
    dv = tl.arange(0, DVP)

    q_rows = Q + b * sqb + t0.to(tl.int64) * sqt + h0.to(tl.int64) * sqh \
        + (r_tok.to(tl.int64) * sqt + r_head * sqh)
    q1 = _load2d(q_rows[:, None] + d1[None, :], row_ok, d1 < DQK, True, PAD1)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        q2 = _load2d(q_rows[:, None] + d2[None, :], row_ok, d2 < DQK, True, PAD2)
    else:
        q2 = q1
    k_base = K + b * skb + hk.to(tl.int64) * skh
    v_base = V + b * svb + hk.to(tl.int64) * svh

    # Key blocks: masked [lo, fs), full [fs, fe), masked [fe, hi).
    hi = tl.cdiv(tl.minimum(t0 + BT, T), BLOCK_N) * BLOCK_N
    lo = (tl.maximum(t0 - window + 1, 0) // BLOCK_N) * BLOCK_N
    fs = tl.cdiv(tl.maximum(t0 + BT - window, 0), BLOCK_N) * BLOCK_N
    fs = tl.minimum(tl.maximum(fs, lo), hi)
    fe = ((t0 + 1) // BLOCK_N) * BLOCK_N
    fe = tl.maximum(tl.minimum(fe, hi), fs)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], dtype=tl.float32)
    if SPLIT == 1:
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q1, q2, k_base, v_base, skt, svt, KD1, KD2,
                                  VD, b32, hk32, lo, fs, fs, fe,
                                  tok, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1, PAD2,
                                  PADV, BLOCK_N, True, False, PREC, TMA)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q1, q2, k_base, v_base, skt, svt, KD1, KD2,
                                  VD, b32, hk32, fs, fe, fs, fe,
                                  tok, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1, PAD2,
                                  PADV, BLOCK_N, False, False, PREC, TMA)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q1, q2, k_base, v_base, skt, svt, KD1, KD2,
                                  VD, b32, hk32, fe, hi, fs, fe,
                                  tok, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1, PAD2,
                                  PADV, BLOCK_N, True, False, PREC, TMA)
    else:
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q1, q2, k_base, v_base, skt, svt, KD1, KD2,
                                  VD, b32, hk32, lo, hi, fs, fe,
                                  tok, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1, PAD2,
                                  PADV, BLOCK_N, True, SPLIT == 2, PREC, TMA)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_rows = O + b * sob + t0.to(tl.int64) * sot + h0.to(tl.int64) * soh \
        + (r_tok.to(tl.int64) * sot + r_head * soh)
    tl.store(o_rows[:, None] + dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv < DV)[None, :])
    lse_ptrs = LSE + b * T * H + tok.to(tl.int64) * H + h0 + r_head
    tl.store(lse_ptrs, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _dq_loop(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, skt, svt, KD1, KD2, VD, b32,
             hk32, start, end, fs, fe, tok, T, window, qk_scale,
             DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
             DVP: tl.constexpr, PAD1: tl.constexpr, PAD2: tl.constexpr, PADV: tl.constexpr,
             BLOCK_N: tl.constexpr, MASK: tl.constexpr, EDGE: tl.constexpr,
             PREC: tl.constexpr, TMA: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    start64 = start.to(tl.int64)
    kb = k_base + start64 * skt
    vb = v_base + start64 * svt
    k_off = offs_n * skt
    v_off = offs_n * svt
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        kmask = cols < T
        k1, k2 = _k_tiles(kb, k_off, KD1, KD2, b32, hk32, n0, kmask, DQK, D1, D2, PAD1, PAD2,
                          BLOCK_N, MASK, TMA)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
        if D2 > 0:
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:
            if EDGE:
                if (n0 < fs) | (n0 >= fe):
                    diff = tok[:, None] - cols[None, :]
                    p = tl.where((diff >= 0) & (diff < window), p, 0.0)
            else:
                diff = tok[:, None] - cols[None, :]
                p = tl.where((diff >= 0) & (diff < window), p, 0.0)
        v = _v_tile(vb, v_off, VD, b32, hk32, n0, kmask, DV, DVP, PADV, BLOCK_N, MASK, TMA)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=PREC)
        if D2 > 0:
            dq2 = tl.dot(ds, k2, dq2, input_precision=PREC)
        kb += BLOCK_N * skt
        vb += BLOCK_N * svt
    return dq1, dq2


@triton.jit
def _sw_bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, KD1, KD2, VD,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                      sdob, sdot, sdoh, sdqb, sdqt, sdqh,
                      T, H, G, window, qk_scale, scale,
                      DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                      DVP: tl.constexpr, PAD1: tl.constexpr, PAD2: tl.constexpr,
                      PADV: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GP: tl.constexpr,
                   SPLIT: tl.constexpr):
    BT = BLOCK_M // GP
    n_t = tl.cdiv(T, BT)
    pid = tl.program_id(0)
    pid_t = pid % n_t
    pid_bh = pid // n_t
    NP = H // GP
    b = (pid_bh // NP).to(tl.int64)
    h0 = (pid_bh % NP) * GP
    hk = h0 // G
    b32, hk32 = b.to(tl.int32), hk.to(tl.int32)  # descriptor coordinates (TMA)
    t0 = pid_t * BT

    r = tl.arange(0, BLOCK_M)
    r_tok = r // GP
    r_head = r % GP
    tok = t0 + r_tok
    row_ok = tok < T
    d1 = tl.arange(0, D1)
    dv = tl.arange(0, DVP)
    t064 = t0.to(tl.int64)
    h064 = h0.to(tl.int64)
    r_tok64 = r_tok.to(tl.int64)

    q_rows = Q + b * sqb + t064 * sqt + h064 * sqh + (r_tok64 * sqt + r_head * sqh)
    q1 = _load2d(q_rows[:, None] + d1[None, :], row_ok, d1 < DQK, True, PAD1)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        q2 = _load2d(q_rows[:, None] + d2[None, :], row_ok, d2 < DQK, True, PAD2)
    else:
        q2 = q1
    o_rows = O + b * sob + t064 * sot + h064 * soh + (r_tok64 * sot + r_head * soh)
    do_rows = DO + b * sdob + t064 * sdot + h064 * sdoh + (r_tok64 * sdot + r_head * sdoh)
    o = _load2d(o_rows[:, None] + dv[None, :], row_ok, dv < DV, True, PADV)
    do = _load2d(do_rows[:, None] + dv[None, :], row_ok, dv < DV, True, PADV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_off = b * T * H + tok.to(tl.int64) * H + h0 + r_head
    tl.store(DELTA + row_off, delta, mask=row_ok)
    lse = tl.load(LSE + row_off, mask=row_ok, other=0.0)

    k_base = K + b * skb + hk.to(tl.int64) * skh
    v_base = V + b * svb + hk.to(tl.int64) * svh
    hi = tl.cdiv(tl.minimum(t0 + BT, T), BLOCK_N) * BLOCK_N
    lo = (tl.maximum(t0 - window + 1, 0) // BLOCK_N) * BLOCK_N
    fs = tl.cdiv(tl.maximum(t0 + BT - window, 0), BLOCK_N) * BLOCK_N
    fs = tl.minimum(tl.maximum(fs, lo), hi)
    fe = ((t0 + 1) // BLOCK_N) * BLOCK_N
    fe = tl.maximum(tl.minimum(fe, hi), fs)

    dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if D2 > 0:
        dq2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    else:
        dq2 = tl.zeros([16, 16], dtype=tl.float32)
    if SPLIT == 1:
        dq1, dq2 = _dq_loop(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, skt, svt, KD1,
                            KD2, VD, b32, hk32, lo, fs,
                            fs, fe, tok, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1, PAD2,
                            PADV, BLOCK_N, True, False, PREC, TMA)
        dq1, dq2 = _dq_loop(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, skt, svt, KD1,
                            KD2, VD, b32, hk32, fs, fe,
                            fs, fe, tok, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1, PAD2,
                            PADV, BLOCK_N, False, False, PREC, TMA)
        dq1, dq2 = _dq_loop(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, skt, svt, KD1,
                            KD2, VD, b32, hk32, fe, hi,
                            fs, fe, tok, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1, PAD2,
                            PADV, BLOCK_N, True, False, PREC, TMA)
    else:
        dq1, dq2 = _dq_loop(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, skt, svt, KD1,
                            KD2, VD, b32, hk32, lo, hi,
                            fs, fe, tok, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1, PAD2,
                            PADV, BLOCK_N, True, SPLIT == 2, PREC, TMA)

    dq_rows = DQ + b * sdqb + t064 * sdqt + h064 * sdqh + (r_tok64 * sdqt + r_head * sdqh)
    tl.store(dq_rows[:, None] + d1[None, :], (dq1 * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (d1 < DQK)[None, :])
    if D2 > 0:
        tl.store(dq_rows[:, None] + d2[None, :], (dq2 * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (d2 < DQK)[None, :])


@triton.jit
def _dkdv_loop(dk1, dk2, dv_acc, k1, k2, v, q_base, do_base, lse_base, delta_base,
               QD1, QD2, DOD, b32, h032,
               sqt, sqh, sdot, sdoh, H, start, end, fs, fe, keys, T, window, qk_scale,
               DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
               DVP: tl.constexpr, PAD1: tl.constexpr, PAD2: tl.constexpr, PADV: tl.constexpr,
               BLOCK_M: tl.constexpr, GP: tl.constexpr, MASK: tl.constexpr,
               EDGE: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    BT = BLOCK_M // GP
    r = tl.arange(0, BLOCK_M)
    r_tok = r // GP
    r_head = r % GP
    d1 = tl.arange(0, D1)
    dv = tl.arange(0, DVP)
    start64 = start.to(tl.int64)
    qb = q_base + start64 * sqt
    dob = do_base + start64 * sdot
    lb = lse_base + start64 * H
    dlb = delta_base + start64 * H
    q_off = r_tok * sqt + r_head * sqh
    do_off = r_tok * sdot + r_head * sdoh
    row_off = r_tok * H + r_head
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
    for t0 in range(start, end, BT):
        tok = t0 + r_tok
        rmask = tok < T
        if TMA:  # rows (token, head) of BT tokens x GP heads; zeros past T
            q1 = QD1.load([b32, t0, h032, 0]).reshape([BLOCK_M, D1])
        else:
            q1 = _load2d(qb + q_off[:, None] + d1[None, :], rmask, d1 < DQK, MASK, PAD1)
        sT = tl.dot(k1, tl.trans(q1), input_precision=PREC)
        if D2 > 0:
            if TMA:
                q2 = QD2.load([b32, t0, h032, D1]).reshape([BLOCK_M, D2])
            else:
                q2 = _load2d(qb + q_off[:, None] + d2[None, :], rmask, d2 < DQK, MASK, PAD2)
            sT = tl.dot(k2, tl.trans(q2), sT, input_precision=PREC)
        if MASK:
            lse = tl.load(lb + row_off, mask=rmask, other=0.0)
        else:
            lse = tl.load(lb + row_off)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])
        if MASK:
            if EDGE:
                if (t0 < fs) | (t0 >= fe):
                    diff = tok[None, :] - keys[:, None]
                    pT = tl.where((diff >= 0) & (diff < window), pT, 0.0)
            else:
                diff = tok[None, :] - keys[:, None]
                pT = tl.where((diff >= 0) & (diff < window), pT, 0.0)
        if TMA:
            do = DOD.load([b32, t0, h032, 0]).reshape([BLOCK_M, DVP])
        else:
            do = _load2d(dob + do_off[:, None] + dv[None, :], rmask, dv < DV, MASK, PADV)
        dv_acc = tl.dot(pT.to(do.dtype), do, dv_acc, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        if MASK:
            delta = tl.load(dlb + row_off, mask=rmask, other=0.0)
        else:
            delta = tl.load(dlb + row_off)
        dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(dsT, q1, dk1, input_precision=PREC)
        if D2 > 0:
            dk2 = tl.dot(dsT, q2, dk2, input_precision=PREC)
        qb += BT * sqt
        dob += BT * sdot
        lb += BT * H
        dlb += BT * H
    return dk1, dk2, dv_acc


@triton.jit
def _sw_bwd_dkdv_kernel(Q, K, V, DO, DK, DVG, LSE, DELTA, QD1, QD2, DOD,
                        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                        sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
                        T, H, G, window, qk_scale, scale,
                        DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr,
                        D2: tl.constexpr, DVP: tl.constexpr, PAD1: tl.constexpr,
                        PAD2: tl.constexpr, PADV: tl.constexpr, PREC: tl.constexpr,
                        TMA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GP: tl.constexpr,
                   SPLIT: tl.constexpr):
    BT = BLOCK_M // GP
    n_n = tl.cdiv(T, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_n
    pid_bk = pid // n_n
    Hk = H // G
    b = (pid_bk // Hk).to(tl.int64)
    hk = (pid_bk % Hk).to(tl.int64)
    s0 = pid_n * BLOCK_N

    offs_n = tl.arange(0, BLOCK_N)
    keys = s0 + offs_n
    kmask = keys < T
    d1 = tl.arange(0, D1)
    dv = tl.arange(0, DVP)
    s064 = s0.to(tl.int64)
    k_rows = K + b * skb + s064 * skt + hk * skh + offs_n * skt
    v_rows = V + b * svb + s064 * svt + hk * svh + offs_n * svt
    k1 = _load2d(k_rows[:, None] + d1[None, :], kmask, d1 < DQK, True, PAD1)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        k2 = _load2d(k_rows[:, None] + d2[None, :], kmask, d2 < DQK, True, PAD2)
        dk2 = tl.zeros([BLOCK_N, D2], dtype=tl.float32)
    else:
        k2 = k1
        dk2 = tl.zeros([16, 16], dtype=tl.float32)
    v = _load2d(v_rows[:, None] + dv[None, :], kmask, dv < DV, True, PADV)
    dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, DVP], dtype=tl.float32)

    # Query tiles [lo, hi): every tile that sees one of these keys; tiles in [fs, fe) see all of
    # them (SPLIT == 2 skips their mask). One loop: separate masked and unmasked loops (as in the
    # forward) cost more registers than they save here.
    lo = (s0 // BT) * BT
    hi = tl.cdiv(tl.minimum(s0 + BLOCK_N - 1 + window, T), BT) * BT
    fs = tl.cdiv(s0 + BLOCK_N - 1, BT) * BT
    fs = tl.minimum(tl.maximum(fs, lo), hi)
    fe = (tl.minimum(s0 + window, T) // BT) * BT
    fe = tl.maximum(tl.minimum(fe, hi), fs)
    for g in range(0, G // GP):
        h0 = (hk * G + g * GP).to(tl.int64)
        q_base = Q + b * sqb + h0 * sqh
        do_base = DO + b * sdob + h0 * sdoh
        lse_base = LSE + b * T * H + h0
        delta_base = DELTA + b * T * H + h0
        dk1, dk2, dv_acc = _dkdv_loop(dk1, dk2, dv_acc, k1, k2, v, q_base, do_base, lse_base,
                                      delta_base, QD1, QD2, DOD, b.to(tl.int32),
                                      h0.to(tl.int32), sqt, sqh, sdot, sdoh, H, lo, hi, fs, fe,
                                      keys, T, window, qk_scale, DQK, DV, D1, D2, DVP, PAD1,
                                      PAD2, PADV, BLOCK_M, GP, True, SPLIT == 2, PREC, TMA)

    dk_rows = DK + b * sdkb + s064 * sdkt + hk * sdkh + offs_n * sdkt
    dv_rows = DVG + b * sdvb + s064 * sdvt + hk * sdvh + offs_n * sdvt
    tl.store(dk_rows[:, None] + d1[None, :], (dk1 * scale).to(DK.dtype.element_ty),
             mask=kmask[:, None] & (d1 < DQK)[None, :])
    if D2 > 0:
        tl.store(dk_rows[:, None] + d2[None, :], (dk2 * scale).to(DK.dtype.element_ty),
                 mask=kmask[:, None] & (d2 < DQK)[None, :])
    tl.store(dv_rows[:, None] + dv[None, :], dv_acc.to(DVG.dtype.element_ty),
             mask=kmask[:, None] & (dv < DV)[None, :])


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, GP, SPLIT, num_warps, num_stages). BLOCK_M counts rows = tokens x packed
# heads; GP is an upper bound, lowered at launch to the largest power of two dividing H // Hk.
# SPLIT: 0 = one loop, every block masked; 1 = separate loops for the masked edge blocks and the
# unmasked inside of the band (forward and dq only); 2 = one loop that masks edge blocks only.
# Chosen on an H200 (2026-11-30, bf16, window 512, MLA 16/1 heads 96/64 and GQA 32/2 heads
# 64/64) from every candidate's time, and from register / spill counts of sm_90 builds for head
# dims up to 128 (each list keeps one spill-free config for 128/128). Winners then: fwd
# (128, 64, 16, 2, 8|4, 3); dq (128, 32, 16, 2|1, 8, 3); dk/dv (64, 64, 16, 0|2, 4, 3). One head
# per tile (GP = 1) lost by 20-60%; three loops (SPLIT 1) lost to one loop with edge masking.
_FWD_CONFIGS = [
    (128, 64, 16, 2, 8, 3),
    (128, 64, 16, 2, 4, 3),
    (128, 64, 16, 0, 8, 3),
    (128, 64, 16, 0, 4, 3),
    (64, 64, 16, 2, 4, 3),
]
_DQ_CONFIGS = [
    (128, 32, 16, 2, 8, 3),
    (128, 32, 16, 1, 8, 3),
    (64, 64, 16, 0, 4, 3),
    (64, 64, 16, 2, 4, 3),
    (128, 64, 16, 0, 8, 3),
]
_DKDV_CONFIGS = [
    (64, 64, 16, 0, 4, 3),
    (64, 64, 16, 2, 4, 3),
    (32, 64, 16, 2, 4, 3),
    (32, 128, 16, 0, 8, 3),
]
# Fixed configurations: the CPU interpreter (no autotuning there), and float32 on a GPU (IEEE
# dots run on the FMA units; a correctness path, small tiles keep it free of spills).
_INTERPRETER_CONFIG = (16, 16, 2, 2, 4, 1)
_FP32_CONFIG = (32, 32, 2, 0, 8, 2)


def _kv_block_hook(nargs: dict) -> None:
    """Autotuner pre-hook of the forward and dq kernels: the K/V descriptors' tiles follow the
    configuration's ``BLOCK_N`` (the descriptors are built before a configuration is chosen)."""
    if nargs.get("TMA"):
        for name in ("KD1", "KD2", "VD"):
            desc = nargs[name]
            desc.block_shape = [1, nargs["BLOCK_N"], 1, desc.block_shape[-1]]


def _qdo_block_hook(nargs: dict) -> None:
    """Autotuner pre-hook of the dk/dv kernel: the q/dO descriptors' tiles are the
    configuration's rows, ``BLOCK_M // GP`` tokens x ``GP`` heads."""
    if nargs.get("TMA"):
        gp = nargs["GP"]
        for name in ("QD1", "QD2", "DOD"):
            desc = nargs[name]
            desc.block_shape = [1, nargs["BLOCK_M"] // gp, gp, desc.block_shape[-1]]


def _triton_configs(table, hook=None):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "GP": gp, "SPLIT": sp}, num_warps=w,
                          num_stages=s, pre_hook=hook) for m, n, gp, sp, w, s in table]


def _max_pack(G: int) -> int:
    """Largest power of two dividing the group size ``G = H // Hk``."""
    return G & -G


def _fit(cfg: tuple, G: int) -> tuple:
    m, n, gp, sp, w, s = cfg
    return (m, n, max(1, min(gp, _max_pack(G), m)), int(sp), w, s)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    G = int(args["G"])
    out, seen = [], set()
    for c in configs:
        kw = c.kwargs
        fitted = _fit((kw["BLOCK_M"], kw["BLOCK_N"], kw["GP"], kw["SPLIT"], c.num_warps,
                       c.num_stages), G)
        if fitted not in seen:
            seen.add(fitted)
            out.extend(_triton_configs([fitted], c.pre_hook))
    return out


_TUNE_KEY = ["DQK", "DV", "G", "window", "PREC"]
_fwd_tuned = triton.autotune(_triton_configs(_FWD_CONFIGS, _kv_block_hook),
                             key=_TUNE_KEY + ["TMA"],
                             prune_configs_by={"early_config_prune": _prune})(_sw_fwd_kernel)
_dq_tuned = triton.autotune(_triton_configs(_DQ_CONFIGS, _kv_block_hook),
                            key=_TUNE_KEY + ["TMA"],
                            prune_configs_by={"early_config_prune": _prune})(_sw_bwd_dq_kernel)
_dkdv_tuned = triton.autotune(_triton_configs(_DKDV_CONFIGS, _qdo_block_hook),
                              key=_TUNE_KEY + ["TMA"],
                              prune_configs_by={"early_config_prune": _prune})(_sw_bwd_dkdv_kernel)


def _launch(kernel, tuned, grid_fn, cfg, G, args, consts, hook=None):
    """Run ``kernel`` with ``cfg`` (a 6-tuple), a fixed config, or autotuned; ``hook`` (the
    configurations' pre-hook) also runs before a fixed-config launch."""
    if cfg is None and interpreter_tiles(args[0].device):
        cfg = _INTERPRETER_CONFIG
    elif cfg is None and consts["PREC"] == "ieee":
        cfg = _FP32_CONFIG
    elif cfg is None:
        tuned[lambda meta: (grid_fn(meta["BLOCK_M"], meta["BLOCK_N"], meta["GP"]),)](*args,
                                                                                   **consts)
        return
    m, n, gp, sp, w, s = _fit(cfg, G)
    if hook is not None:
        hook({**dict(zip(kernel.arg_names, args)), **consts, "BLOCK_M": m, "BLOCK_N": n,
              "GP": gp})
    kernel[(grid_fn(m, n, gp),)](*args, **consts, BLOCK_M=m, BLOCK_N=n, GP=gp, SPLIT=sp,
                                 num_warps=w, num_stages=s)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _split_dim(d: int) -> tuple[int, int]:
    """Split width ``d`` into power-of-two tiles ``(D1, D2)`` (``D2 = 0``: one padded tile)."""
    full = max(16, triton.next_power_of_2(d))
    d1 = 1 << (d.bit_length() - 1)
    if d1 < 16 or d1 == d:
        return full, 0
    d2 = max(16, triton.next_power_of_2(d - d1))
    return (d1, d2) if d1 + d2 < full else (full, 0)


def _check(q, k, v, window, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, T, heads, dim), "
                             f"got shape {tuple(getattr(x, 'shape', ()))}")
    B, T, H, Dqk = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    if tuple(k.shape) != (B, T, Hk, Dqk):
        raise ValueError(f"k must have shape (B={B}, T={T}, Hk, Dqk={Dqk}), got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, Hk):
        raise ValueError(f"v must have shape (B={B}, T={T}, Hk={Hk}, Dv), got {tuple(v.shape)}")
    if Hk == 0 or H % Hk:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hk={Hk}")
    for name, d in (("Dqk", Dqk), ("Dv", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"head dim {name}={d} is not supported (1..{MAX_HEAD_DIM})")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number, got {type(scale).__name__}")


def _consts(q, k, v, window):
    Dqk, Dv = q.shape[3], v.shape[3]
    D1, D2 = _split_dim(Dqk)
    DVP = max(16, triton.next_power_of_2(Dv))
    return dict(
        DQK=Dqk, DV=Dv, D1=D1, D2=D2, DVP=DVP,
        PAD1=D1 > Dqk, PAD2=D2 > 0 and D1 + D2 > Dqk, PADV=DVP > Dv,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _tile_descriptors(x, y, consts, cfg):
    """``(XD1, XD2, YD, TMA)``: descriptors of the tiles a loop streams from ``x`` (the two
    power-of-two pieces of ``Dqk``) and ``y`` (width ``DVP``): K/V for the forward and dq loops,
    q/dO for the dk/dv loop, blocks ``[1, rows, heads, width]`` of ``(B, T, heads, width)`` whose
    rows and heads each launch sets (:func:`_kv_block_hook`, :func:`_qdo_block_hook`). Only when
    ``cfg`` does not turn TMA off (``"tma": False``) and the tiles are whole head dims (padding
    columns would read the next head's); else ``(x, x, y, False)``."""
    if (cfg or {}).get("tma", True) and not (consts["PAD1"] or consts["PAD2"] or consts["PADV"]):
        xd = split_descriptors(x, [1, 16, 1], consts["D1"], consts["D2"])
        yd = tma_descriptor(y, [1, 16, 1, consts["DVP"]])
        if xd is not None and yd is not None:
            return *xd, yd, True
    return x, x, y, False


def _forward(q, k, v, window, scale, cfg):
    B, T, H, _ = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    o = torch.empty((B, T, H, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, T, H), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    consts = _consts(q, k, v, window)
    kd1, kd2, vd, consts["TMA"] = _tile_descriptors(k, v, consts, cfg)
    args = (q, k, v, o, lse, kd1, kd2, vd, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *o.stride()[:3], T, H, G, window, scale * LOG2E)

    def grid(m, n, gp):
        return triton.cdiv(T, m // gp) * B * (H // gp)

    _launch(_sw_fwd_kernel, _fwd_tuned, grid, cfg.get("fwd") if cfg else None, G, args, consts,
            _kv_block_hook)
    return o, lse


def _backward(do, q, k, v, o, lse, window, scale, cfg):
    B, T, H, Dqk = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    dq = torch.empty((B, T, H, Dqk), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, T, Hk, Dqk), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, T, Hk, Dv), device=q.device, dtype=v.dtype)
    if dq.numel() == 0 or dv.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, T, H), device=q.device, dtype=torch.float32)
    consts = _consts(q, k, v, window)

    def grid_q(m, n, gp):
        return triton.cdiv(T, m // gp) * B * (H // gp)

    def grid_k(m, n, gp):
        return triton.cdiv(T, n) * B * Hk

    kd1, kd2, vd, tma = _tile_descriptors(k, v, consts, cfg)
    args = (q, k, v, o, do, dq, lse, delta, kd1, kd2, vd, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3], T, H, G, window,
            scale * LOG2E, scale)
    _launch(_sw_bwd_dq_kernel, _dq_tuned, grid_q, cfg.get("dq") if cfg else None, G, args,
            {**consts, "TMA": tma}, _kv_block_hook)
    qd1, qd2, dod, tma = _tile_descriptors(q, do, consts, cfg)
    args = (q, k, v, do, dk, dv, lse, delta, qd1, qd2, dod, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], T, H, G,
            window, scale * LOG2E, scale)
    _launch(_sw_bwd_dkdv_kernel, _dkdv_tuned, grid_k, cfg.get("dkdv") if cfg else None, G, args,
            {**consts, "TMA": tma}, _qdo_block_hook)
    return dq, dk, dv


def encode_config(cfg: dict | None) -> str:
    """A launch configuration (see :func:`_sliding_window_attention`) as the operators' JSON."""
    return json.dumps(cfg, sort_keys=True) if cfg else ""


def _decode_config(config: str) -> dict | None:
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in json.loads(config).items()} if config else None


def op_forward(q, k, v, window, scale, config):
    """``torch.ops.nsa_lit.sliding_window_attention``: ``(o, lse)``."""
    return _forward(q, k, v, window, scale, _decode_config(config))


def op_backward(do, q, k, v, o, lse, window, scale, config):
    """``torch.ops.nsa_lit.sliding_window_attention_backward``: ``(dq, dk, dv)``."""
    return _backward(row_major(do), q, k, v, o, lse, window, scale, _decode_config(config))


def _sliding_window_attention(q, k, v, window, scale, cfg=None):
    """:func:`sliding_window_attention` with an optional fixed launch configuration.

    ``cfg`` maps ``"fwd"``, ``"dq"``, ``"dkdv"`` to ``(BLOCK_M, BLOCK_N, GP, SPLIT, num_warps,
    num_stages)`` tuples (tests use it to cover several tilings; a missing one autotunes on a
    GPU) and ``"tma"`` to False to load every streamed tile by row offsets even where TMA could
    serve.
    """
    _check(q, k, v, window, scale)
    q, k, v = row_major(q), row_major(k), row_major(v)
    window = min(int(window), max(q.shape[1], 1))
    o, _ = torch.ops.nsa_lit.sliding_window_attention(q, k, v, window, float(scale),
                                                      encode_config(cfg))
    return o


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """``q (B, T, H, Dqk)``, ``k (B, T, Hk, Dqk)``, ``v (B, T, Hk, Dv)`` -> ``o (B, T, H, Dv)``.

    Query ``t`` attends key ``s`` iff ``t - window < s <= t``. Differentiable in q, k, v.
    Raises ValueError for inputs it cannot serve (shapes, head counts, head dims, dtypes).
    """
    return _sliding_window_attention(q, k, v, window, scale)
