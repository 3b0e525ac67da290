"""Attention to compressed tokens, Triton kernels (forward and backward).

Same function and signature as :func:`kernels.compression.reference.compression_attention`:
``q (B, T, H, Dqk)``, ``k_cmp (B, N, Hk, Dqk)``, ``v_cmp (B, N, Hk, Dv)`` -> ``o (B, T, H, Dv)``
(in ``q.dtype``) and ``lse (B, T, H)`` (float32, detached; ``-inf`` and ``o = 0`` for queries that
see no compressed token). Query ``t`` sees compressed token ``i`` iff
``i * stride + block_len - 1 <= t``.

Design (FlashAttention-2 style, fp32 accumulation):

* GQA/GLA packing: one program owns ``BLOCK_T`` consecutive queries of *all* ``REP = H // Hk``
  heads that read one key/value head, so the MMA's M dimension is ``BLOCK_T * REP`` rows (row
  ``m`` is query ``t0 + m // REP_PAD``, head ``m % REP_PAD``; the heads of one query are adjacent
  in memory, so the tile load is contiguous).
* Causality over the short key axis: a program visits only the key tiles its last query can see;
  tiles that its first query sees entirely run without the mask. Programs are launched heaviest
  first (reversed query-tile order).
* Head dims that are not a power of two are split into two power-of-two parts
  (160 = 128 + 32, 96 = 64 + 32, 24 = 16 + 16 masked), so QK^T does no padded work; the value dim
  is padded to a power of two with masks.
* Backward: ``delta = rowsum(dO * O)`` is computed inside the dq kernel (grid over query tiles,
  the forward's loop); dk/dv come from a kernel whose programs own one key tile and one chunk of
  the query axis (all heads of the group inside the tile, so no atomics across heads); when the
  query axis is split into several chunks, each chunk writes an fp32 partial that one ``sum``
  reduces (deterministic).
* Streamed tiles (keys and values in the forward and dq loops, queries and output gradients in
  the dk/dv loop) come through TMA tensor descriptors where the head dims are whole tiles and
  the heads of a row tile fill it (``_kv_descriptors``, ``_qdo_descriptors``; ``TMA`` in the tile
  configs); otherwise by row offsets with masks.
* Offsets are 64-bit (``B * T * H * D`` may pass 2**31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_device import load_rows, mm, qk
from kernels.triton_utils import (interpreter_tiles, interpreting, num_sms, row_major,
                                  split_descriptors, split_dim, tma_descriptor)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256

# Tile overrides for benchmarking sweeps: {"fwd": {...}, "dq": {...}, "dkdv": {...}}; keys
# BLOCK_M (rows = queries x heads), BLOCK_N (compressed tokens), num_warps, num_stages, TMA,
# SPLITS (dk/dv only).
CONFIG_OVERRIDE: dict[str, dict[str, int | bool | None]] = {}
# dk/dv: the longest query chunk a key tile's program streams by default (see _dkdv_splits)
MAX_SPLIT_TOKENS = 16384


# --------------------------------------------------------------------------------------------
# device helpers (the ones other kernels share live in kernels.triton_utils)
# --------------------------------------------------------------------------------------------


@triton.jit
def _kv_tiles(k_base, v_base, KDA, KDB, VD, b, hk, n0, n, skn, svn, N, D: tl.constexpr,
              DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
              BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Key tiles ``(BLOCK_N, DA)``, ``(BLOCK_N, DB)`` and value tile ``(BLOCK_N, DVP)`` of the
    compressed tokens ``n = n0 + arange(BLOCK_N)``: through the descriptors when ``TMA``, else
    by row offsets; zeros past ``N`` either way."""
    if TMA:
        ka = KDA.load([b.to(tl.int32), n0, hk, 0]).reshape([BLOCK_N, DA])
        kb = ka
        if DB > 0:
            kb = KDB.load([b.to(tl.int32), n0, hk, DA]).reshape([BLOCK_N, DB])
        vv = VD.load([b.to(tl.int32), n0, hk, 0]).reshape([BLOCK_N, DVP])
    else:
        n64 = n.to(tl.int64)
        dv = tl.arange(0, DVP)
        ka, kb = load_rows(k_base, n64 * skn, n < N, D, DA, DB)
        vv = tl.load(v_base + n64[:, None] * svn + dv[None, :],
                     mask=(n[:, None] < N) & (dv[None, :] < DV), other=0.0)
    return ka, kb, vv


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KDA, KDB, VD,
    sqb, sqt, sqh, skb, skn, skh, svb, svn, svh, sob, sot, soh, slb, slt,
    T, N, HK, qk_scale,
    BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
    REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    IEEE: tl.constexpr, TMA: tl.constexpr,
):
    M: tl.constexpr = BLOCK_T * REP_PAD
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) query tiles first
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    t0 = pid_t * BLOCK_T

    m = tl.arange(0, M)
    t = t0 + m // REP_PAD
    hh = m % REP_PAD
    row_ok = (t < T) & (hh < REP)
    h = (hk * REP + hh).to(tl.int64)
    t64 = t.to(tl.int64)

    q_off = b * sqb + t64 * sqt + h * sqh
    qa, qb = load_rows(Q, q_off, row_ok, D, DA, DB)

    k_base = K + b * skb + hk.to(tl.int64) * skh
    v_base = V + b * svb + hk.to(tl.int64) * svh
    nn = tl.arange(0, BLOCK_N)
    dv = tl.arange(0, DVP)

    m_i = tl.full([M], -1.0e30, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, DVP], tl.float32)

    t_hi = tl.minimum(t0 + BLOCK_T, T) - 1
    n_hi = tl.minimum(tl.maximum(t_hi - BLOCK_LEN + 1 + STRIDE, 0) // STRIDE, N)
    n_full = tl.minimum(tl.maximum(t0 - BLOCK_LEN + 1 + STRIDE, 0) // STRIDE, N)
    n_full = (n_full // BLOCK_N) * BLOCK_N

    for n0 in range(0, n_full, BLOCK_N):
        n = n0 + nn
        ka, kb, vv = _kv_tiles(k_base, v_base, KDA, KDB, VD, b, hk, n0, n, skn, svn, N, D, DA,
                               DB, DV, DVP, BLOCK_N, TMA)
        s = qk(qa, qb, ka, kb, DB, IEEE) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mm(p.to(vv.dtype), vv, acc * alpha[:, None], IEEE)
        m_i = m_new

    for n0 in range(n_full, n_hi, BLOCK_N):
        n = n0 + nn
        ka, kb, vv = _kv_tiles(k_base, v_base, KDA, KDB, VD, b, hk, n0, n, skn, svn, N, D, DA,
                               DB, DV, DVP, BLOCK_N, TMA)
        s = qk(qa, qb, ka, kb, DB, IEEE) * qk_scale
        vis = (n[None, :] * STRIDE + (BLOCK_LEN - 1) <= t[:, None]) & (n[None, :] < N)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mm(p.to(vv.dtype), vv, acc * alpha[:, None], IEEE)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_off = b * sob + t64 * sot + h * soh
    tl.store(O + o_off[:, None] + dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + b * slb + t64 * slt + h, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# backward: dq (and delta)
# --------------------------------------------------------------------------------------------


@triton.jit
def _dq_tile(dqa, dqb, qa, qb, do, lse2, delta, t, n0, n, k_base, v_base, KDA, KDB, VD, b, hk,
             skn, svn, N, qk_scale,
             MASK: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
             D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
             DVP: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    ka, kb, vv = _kv_tiles(k_base, v_base, KDA, KDB, VD, b, hk, n0, n, skn, svn, N, D, DA, DB,
                           DV, DVP, BLOCK_N, TMA)
    s = qk(qa, qb, ka, kb, DB, IEEE) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASK:
        vis = (n[None, :] * STRIDE + (BLOCK_LEN - 1) <= t[:, None]) & (n[None, :] < N)
        p = tl.where(vis, p, 0.0)
    dp = qk(do, do, vv, vv, 0, IEEE)
    ds = (p * (dp - delta[:, None])).to(ka.dtype)
    dqa = mm(ds, ka, dqa, IEEE)
    if DB > 0:
        dqb = mm(ds, kb, dqb, IEEE)
    return dqa, dqb


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, KDA, KDB, VD,
    sqb, sqt, sqh, skb, skn, skh, svb, svn, svh, sob, sot, soh, sdob, sdot, sdoh,
    slb, slt, sdqb, sdqt, sdqh,
    T, N, HK, qk_scale, scale,
    BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
    REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    IEEE: tl.constexpr, TMA: tl.constexpr,
):
    M: tl.constexpr = BLOCK_T * REP_PAD
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    t0 = pid_t * BLOCK_T

    m = tl.arange(0, M)
    t = t0 + m // REP_PAD
    hh = m % REP_PAD
    row_ok = (t < T) & (hh < REP)
    h = (hk * REP + hh).to(tl.int64)
    t64 = t.to(tl.int64)
    dv = tl.arange(0, DVP)
    dv_ok = dv[None, :] < DV

    qa, qb = load_rows(Q, b * sqb + t64 * sqt + h * sqh, row_ok, D, DA, DB)
    o = tl.load(O + (b * sob + t64 * sot + h * soh)[:, None] + dv[None, :],
                mask=row_ok[:, None] & dv_ok, other=0.0)
    do = tl.load(DO + (b * sdob + t64 * sdot + h * sdoh)[:, None] + dv[None, :],
                 mask=row_ok[:, None] & dv_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    l_off = b * slb + t64 * slt + h
    tl.store(DELTA + l_off, delta, mask=row_ok)
    lse = tl.load(LSE + l_off, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)

    k_base = K + b * skb + hk.to(tl.int64) * skh
    v_base = V + b * svb + hk.to(tl.int64) * svh
    nn = tl.arange(0, BLOCK_N)
    dqa = tl.zeros([M, DA], tl.float32)
    dqb = tl.zeros([M, DB if DB > 0 else 16], tl.float32)

    t_hi = tl.minimum(t0 + BLOCK_T, T) - 1
    n_hi = tl.minimum(tl.maximum(t_hi - BLOCK_LEN + 1 + STRIDE, 0) // STRIDE, N)
    n_full = tl.minimum(tl.maximum(t0 - BLOCK_LEN + 1 + STRIDE, 0) // STRIDE, N)
    n_full = (n_full // BLOCK_N) * BLOCK_N

    for n0 in range(0, n_full, BLOCK_N):
        dqa, dqb = _dq_tile(dqa, dqb, qa, qb, do, lse2, delta, t, n0, n0 + nn, k_base, v_base,
                            KDA, KDB, VD, b, hk, skn, svn, N, qk_scale, False, BLOCK_LEN, STRIDE,
                            D, DA, DB, DV, DVP, BLOCK_N, IEEE, TMA)
    for n0 in range(n_full, n_hi, BLOCK_N):
        dqa, dqb = _dq_tile(dqa, dqb, qa, qb, do, lse2, delta, t, n0, n0 + nn, k_base, v_base,
                            KDA, KDB, VD, b, hk, skn, svn, N, qk_scale, True, BLOCK_LEN, STRIDE,
                            D, DA, DB, DV, DVP, BLOCK_N, IEEE, TMA)

    dq_off = b * sdqb + t64 * sdqt + h * sdqh
    da = tl.arange(0, DA)
    tl.store(DQ + dq_off[:, None] + da[None, :], (dqa * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (da[None, :] < D))
    if DB > 0:
        db = DA + tl.arange(0, DB)
        tl.store(DQ + dq_off[:, None] + db[None, :], (dqb * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (db[None, :] < D))


# --------------------------------------------------------------------------------------------
# backward: dk, dv
# --------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_tile(dka, dkb, dvacc, ka, kb, vv, nn, tt, mr, h, hh_ok, Q, DO, LSE, DELTA, QDA, QDB,
               DOD, b, hk, sqb, sqt, sqh, sdob, sdot, sdoh, slb, slt, T, qk_scale,
               MASK: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
               REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
               D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
               DVP: tl.constexpr, IEEE: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
               TMA: tl.constexpr):
    M: tl.constexpr = BLOCK_T * REP_PAD
    dv = tl.arange(0, DVP)
    t = tt + mr // REP_PAD
    row_ok = (t < T) & hh_ok
    t64 = t.to(tl.int64)
    if TMA:  # rows (query, head) of BLOCK_T queries x REP heads; zeros past T
        b32 = b.to(tl.int32)
        qa = QDA.load([b32, tt, hk * REP, 0]).reshape([M, DA])
        qb = qa
        if DB > 0:
            qb = QDB.load([b32, tt, hk * REP, DA]).reshape([M, DB])
        do = DOD.load([b32, tt, hk * REP, 0]).reshape([M, DVP])
    else:
        qa, qb = load_rows(Q, b * sqb + t64 * sqt + h * sqh, row_ok, D, DA, DB)
        do = tl.load(DO + (b * sdob + t64 * sdot + h * sdoh)[:, None] + dv[None, :],
                     mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    l_off = b * slb + t64 * slt + h
    lse = tl.load(LSE + l_off, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
    st = qk(ka, kb, qa, qb, DB, IEEE) * qk_scale  # (BLOCK_N, M)
    pt = tl.exp2(st - lse2[None, :])
    if MASK:
        vis = nn[:, None] * STRIDE + (BLOCK_LEN - 1) <= t[None, :]
        pt = tl.where(vis, pt, 0.0)
    if DO_DV:
        dvacc = mm(pt.to(do.dtype), do, dvacc, IEEE)
    if DO_DK:
        dpt = qk(vv, vv, do, do, 0, IEEE)
        dst = (pt * (dpt - delta[None, :])).to(qa.dtype)
        dka = mm(dst, qa, dka, IEEE)
        if DB > 0:
            dkb = mm(dst, qb, dkb, IEEE)
    return dka, dkb, dvacc


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, QDA, QDB, DOD,
    sqb, sqt, sqh, skb, skn, skh, svb, svn, svh, sdob, sdot, sdoh, slb, slt,
    sdks, sdkb, sdkn, sdkh, sdvs, sdvb, sdvn, sdvh,
    T, N, HK, CHUNK, qk_scale, scale,
    BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
    REP: tl.constexpr, REP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    IEEE: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, TMA: tl.constexpr,
):
    M: tl.constexpr = BLOCK_T * REP_PAD
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    n0 = pid_n * BLOCK_N

    nn = n0 + tl.arange(0, BLOCK_N)
    n_ok = nn < N
    n64 = nn.to(tl.int64)
    dv = tl.arange(0, DVP)
    dv_ok = dv[None, :] < DV
    ka, kb = load_rows(K + b * skb + hk.to(tl.int64) * skh, n64 * skn, n_ok, D, DA, DB)
    vv = tl.load(V + b * svb + hk.to(tl.int64) * svh + n64[:, None] * svn + dv[None, :],
                 mask=n_ok[:, None] & dv_ok, other=0.0)

    dka = tl.zeros([BLOCK_N, DA if DO_DK else 16], tl.float32)
    dkb = tl.zeros([BLOCK_N, DB if (DB > 0 and DO_DK) else 16], tl.float32)
    dvacc = tl.zeros([BLOCK_N, DVP if DO_DV else 16], tl.float32)

    # queries of this chunk that see at least one key of the tile; those before t_all miss some
    t_first = n0 * STRIDE + BLOCK_LEN - 1
    t_all = (n0 + BLOCK_N - 1) * STRIDE + BLOCK_LEN - 1
    c_lo = pid_s * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, T)
    lo = tl.maximum(c_lo, (t_first // BLOCK_T) * BLOCK_T)
    mid = tl.minimum(tl.maximum(lo, ((t_all + BLOCK_T - 1) // BLOCK_T) * BLOCK_T), c_hi)

    mr = tl.arange(0, M)
    hh = mr % REP_PAD
    h = (hk * REP + hh).to(tl.int64)
    hh_ok = hh < REP
    for tt in range(lo, mid, BLOCK_T):
        dka, dkb, dvacc = _dkdv_tile(
            dka, dkb, dvacc, ka, kb, vv, nn, tt, mr, h, hh_ok, Q, DO, LSE, DELTA, QDA, QDB, DOD,
            b, hk, sqb, sqt, sqh, sdob, sdot, sdoh, slb, slt, T, qk_scale, True,
            BLOCK_LEN, STRIDE, REP, REP_PAD, BLOCK_T, D, DA, DB, DV, DVP, IEEE, DO_DK, DO_DV, TMA)
    for tt in range(mid, c_hi, BLOCK_T):
        dka, dkb, dvacc = _dkdv_tile(
            dka, dkb, dvacc, ka, kb, vv, nn, tt, mr, h, hh_ok, Q, DO, LSE, DELTA, QDA, QDB, DOD,
            b, hk, sqb, sqt, sqh, sdob, sdot, sdoh, slb, slt, T, qk_scale, False,
            BLOCK_LEN, STRIDE, REP, REP_PAD, BLOCK_T, D, DA, DB, DV, DVP, IEEE, DO_DK, DO_DV, TMA)

    ps = pid_s.to(tl.int64)
    if DO_DK:
        dk_off = ps * sdks + b * sdkb + n64 * sdkn + hk.to(tl.int64) * sdkh
        da = tl.arange(0, DA)
        tl.store(DK + dk_off[:, None] + da[None, :], (dka * scale).to(DK.dtype.element_ty),
                 mask=n_ok[:, None] & (da[None, :] < D))
        if DB > 0:
            db = DA + tl.arange(0, DB)
            tl.store(DK + dk_off[:, None] + db[None, :], (dkb * scale).to(DK.dtype.element_ty),
                     mask=n_ok[:, None] & (db[None, :] < D))
    if DO_DV:
        dv_off = ps * sdvs + b * sdvb + n64 * sdvn + hk.to(tl.int64) * sdvh
        tl.store(DV_ + dv_off[:, None] + dv[None, :], dvacc.to(DV_.dtype.element_ty),
                 mask=n_ok[:, None] & dv_ok)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(q, k_cmp, v_cmp, block_len, stride, scale) -> None:
    """Raise ValueError naming the first quantity these kernels cannot serve."""
    for name, x in (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if not (q.dtype == k_cmp.dtype == v_cmp.dtype):
        raise ValueError(
            f"q, k_cmp, v_cmp must share one dtype, got {q.dtype}, {k_cmp.dtype}, {v_cmp.dtype}")
    if not (q.device == k_cmp.device == v_cmp.device):
        raise ValueError("q, k_cmp, v_cmp must be on one device")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    B, T, H, D = q.shape
    Bk, N, Hk, Dk = k_cmp.shape
    Bv, Nv, Hv, Dv = v_cmp.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch size differs: q {B}, k_cmp {Bk}, v_cmp {Bv}")
    if Nv != N:
        raise ValueError(f"k_cmp has {N} compressed tokens but v_cmp has {Nv}")
    if Hv != Hk:
        raise ValueError(f"k_cmp has {Hk} heads but v_cmp has {Hv}")
    if Dk != D:
        raise ValueError(f"q head dim ({D}) differs from k_cmp head dim ({Dk})")
    if Hk < 1 or H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hk})")
    if H // Hk > 128:
        raise ValueError(f"query heads per key/value head ({H // Hk}) must be at most 128")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q/k head dim ({D}) must be in [1, {MAX_HEAD_DIM}]")
    if not 1 <= Dv <= MAX_HEAD_DIM:
        raise ValueError(f"v head dim ({Dv}) must be in [1, {MAX_HEAD_DIM}]")
    if int(block_len) != block_len or block_len < 1:
        raise ValueError(f"block_len must be a positive integer, got {block_len}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number, got {type(scale).__name__}")


def _config(kind: str, rep_pad: int, width: int, fp32: bool, device: torch.device) -> dict[str, int]:
    """Tile sizes. ``width`` = padded Dqk + padded Dv. Chosen from ptxas reports for sm_90
    (no or few spills at the 340M shapes; shared memory under the 227 KB per-block limit) and
    sweeps on an H200 (benchmarks/results/compression_selection_*.json; for narrow heads
    h200-compression-sweep{,2}-upprojected.json: 9.72 -> 8.30 ms fwd+bwd at 64k)."""
    if interpreter_tiles(device):
        cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    elif fp32:  # exact fp32 dots run on FMA units: small tiles
        cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    elif width <= 192:  # e.g. the expanded MLA heads, 96 + 64 (H200 sweep, 2026-11-30)
        cfg = {"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
               "dq": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
               "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}}[kind]
    elif width <= 320:
        cfg = {"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
               "dq": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
               "dkdv": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}}[kind]
    else:
        cfg = {"fwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
               "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
               "dkdv": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}}[kind]
    # TMA descriptors for the streamed tiles where they can serve; SPLITS (dk/dv): at most this
    # many query chunks per key tile (chunks round up to whole BLOCK_T tiles, so fewer may
    # result), None for the heuristic of _dkdv_splits
    cfg = dict(cfg, TMA=True, SPLITS=None)
    cfg.update(CONFIG_OVERRIDE.get(kind, {}))
    block_m = max(cfg["BLOCK_M"], rep_pad, 16)
    cfg["BLOCK_T"] = max(block_m // rep_pad, 1)
    if cfg["BLOCK_T"] * rep_pad < 16:
        cfg["BLOCK_T"] = triton.cdiv(16, rep_pad)
    return cfg


def _kv_descriptors(k, v, cfg, DA: int, DB: int, DVP: int):
    """``(KDA, KDB, VD, TMA)``: descriptors of the key and value tiles the forward and dq loops
    stream (blocks ``[1, BLOCK_N, 1, width]`` of ``(B, N, Hk, width)``) when ``cfg["TMA"]`` asks
    and the tiles are whole head dims; else ``(k, k, v, False)``."""
    D, Dv, bn = k.shape[-1], v.shape[-1], cfg["BLOCK_N"]
    if cfg["TMA"] and DA + DB == D and DVP == Dv:
        kd, vd = split_descriptors(k, [1, bn, 1], DA, DB), tma_descriptor(v, [1, bn, 1, DVP])
        if kd is not None and vd is not None:
            return *kd, vd, True
    return k, k, v, False


def _qdo_descriptors(q, do, cfg, rep: int, rep_pad: int, DA: int, DB: int, DVP: int):
    """``(QDA, QDB, DOD, TMA)``: descriptors of the query and output-gradient tiles the dk/dv
    loop streams (blocks ``[1, BLOCK_T, REP, width]`` of ``(B, T, H, width)``) when
    ``cfg["TMA"]`` asks, the rows are whole (``REP`` a power of two) and so are the head dims;
    else ``(q, q, do, False)``."""
    D, Dv, bt = q.shape[-1], do.shape[-1], cfg["BLOCK_T"]
    if cfg["TMA"] and rep == rep_pad and DA + DB == D and DVP == Dv:
        qd, dd = split_descriptors(q, [1, bt, rep], DA, DB), tma_descriptor(do, [1, bt, rep, DVP])
        if qd is not None and dd is not None:
            return *qd, dd, True
    return q, q, do, False


def _forward(q, k, v, block_len, stride, scale):
    B, T, H, D = q.shape
    N, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // Hk
    rep_pad = triton.next_power_of_2(rep)
    DA, DB = split_dim(D)
    DVP = max(16, triton.next_power_of_2(Dv))
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    cfg = _config("fwd", rep_pad, DA + DB + DVP, q.dtype == torch.float32, q.device)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), B * Hk)
    if B * T * H > 0:
        kda, kdb, vd, tma = _kv_descriptors(k, v, cfg, DA, DB, DVP)
        _fwd_kernel[grid](
            q, k, v, o, lse, kda, kdb, vd,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1),
            T, N, Hk, scale * LOG2E,
            BLOCK_LEN=block_len, STRIDE=stride, REP=rep, REP_PAD=rep_pad,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], D=D, DA=DA, DB=DB, DV=Dv, DVP=DVP,
            IEEE=q.dtype == torch.float32, TMA=tma,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return o, lse


def _backward(q, k, v, o, lse, do, block_len, stride, scale):
    B, T, H, D = q.shape
    N, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // Hk
    rep_pad = triton.next_power_of_2(rep)
    DA, DB = split_dim(D)
    DVP = max(16, triton.next_power_of_2(Dv))
    ieee = q.dtype == torch.float32
    do = row_major(do)
    if B * T * H == 0 or N == 0:  # gradients are contiguous (the operator's contract)
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    dq = q.new_empty(q.shape)
    delta = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    common = dict(BLOCK_LEN=block_len, STRIDE=stride, REP=rep, REP_PAD=rep_pad, D=D, DA=DA,
                  DB=DB, DV=Dv, DVP=DVP, IEEE=ieee)

    cfg = _config("dq", rep_pad, DA + DB + DVP, ieee, q.device)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), B * Hk)
    kda, kdb, vd, tma = _kv_descriptors(k, v, cfg, DA, DB, DVP)
    _bwd_dq_kernel[grid](
        q, k, v, o, do, lse, delta, dq, kda, kdb, vd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        T, N, Hk, scale * LOG2E, scale,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], **common, TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )

    cfg = _config("dkdv", rep_pad, DA + DB + DVP, ieee, q.device)
    block_t, block_n = cfg["BLOCK_T"], cfg["BLOCK_N"]
    n_tiles = triton.cdiv(N, block_n)
    splits, chunk = _dkdv_splits(T, n_tiles * B * Hk, block_t, cfg["SPLITS"], num_sms(q.device))
    if splits == 1:
        dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
        dk_s, dv_s = dk.unsqueeze(0), dv.unsqueeze(0)
    else:
        dk_s = torch.empty(splits, *k.shape, dtype=torch.float32, device=q.device)
        dv_s = torch.empty(splits, *v.shape, dtype=torch.float32, device=q.device)
    grid = (n_tiles, B * Hk, splits)
    qda, qdb, dod, tma = _qdo_descriptors(q, do, cfg, rep, rep_pad, DA, DB, DVP)
    _bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, dk_s, dv_s, qda, qdb, dod,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        dk_s.stride(0), dk_s.stride(1), dk_s.stride(2), dk_s.stride(3),
        dv_s.stride(0), dv_s.stride(1), dv_s.stride(2), dv_s.stride(3),
        T, N, Hk, chunk, scale * LOG2E, scale,
        BLOCK_T=block_t, BLOCK_N=block_n, **common, DO_DK=True, DO_DV=True, TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        dk = dk_s.sum(0).to(k.dtype)
        dv = dv_s.sum(0).to(v.dtype)
    return dq, dk, dv


def _dkdv_splits(T: int, programs: int, block_t: int, want: int | None, sms: int):
    """``(splits, chunk)``: the query axis of the dk/dv pass cut into ``splits`` chunks of
    ``chunk`` tokens (whole ``block_t`` tiles), each with its own fp32 partials, for ``programs``
    key-tile programs. ``want`` (cfg["SPLITS"]) asks for a count; by default, enough chunks for
    ~8 programs per multiprocessor (causal: about half the chunks of the early key tiles are
    busy) and none longer than ``MAX_SPLIT_TOKENS``. On an H200 at the 96/64 shape
    (``results/h200-compression-sweep4-upprojected.json``, ``h200-compression-splits-8k.json``):
    4 chunks of 16k at T = 65536 took 7.64-7.68 ms fwd+bwd against 7.79 for 2, 8 took 7.73; at
    8192 (batch 8), 2 beat 1, 4 and 8."""
    want = want or max(triton.cdiv(8 * sms, max(programs, 1)), triton.cdiv(T, MAX_SPLIT_TOKENS))
    splits = max(1, min(want, triton.cdiv(T, block_t), 64))
    chunk = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    return triton.cdiv(T, chunk), chunk


def op_forward(q, k_cmp, v_cmp, block_len, stride, scale):
    """``torch.ops.nsa_lit.compression_attention``: ``(o, lse)``."""
    return _forward(q, k_cmp, v_cmp, block_len, stride, scale)


def op_backward(do, q, k_cmp, v_cmp, o, lse, block_len, stride, scale):
    """``torch.ops.nsa_lit.compression_attention_backward``: ``(dq, dk_cmp, dv_cmp)``."""
    return _backward(q, k_cmp, v_cmp, o, lse, do, block_len, stride, scale)


def compression_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_len: int, stride: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`kernels.compression.reference.compression_attention`."""
    check_inputs(q, k_cmp, v_cmp, block_len, stride, scale)
    q, k_cmp, v_cmp = row_major(q), row_major(k_cmp), row_major(v_cmp)
    return torch.ops.nsa_lit.compression_attention(q, k_cmp, v_cmp, int(block_len), int(stride),
                                                   float(scale))
