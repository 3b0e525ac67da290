"""``@triton.jit`` device functions that several Triton kernels call (host-side helpers are in
:mod:`kernels.triton_utils`)."""
import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, row_off, row_mask, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """Rows ``row_off`` (element offsets from ``ptr``, where ``row_mask``) of a unit-stride
    operand of width ``D``, split as :func:`kernels.triton_utils.split_dim` splits it: ``(rows, DA)`` and
    ``(rows, DB)`` tiles, zeros at masked rows and at columns ``>= D``; with ``DB == 0`` the
    second tile is the first again."""
    da = tl.arange(0, DA)
    xa = tl.load(ptr + row_off[:, None] + da[None, :],
                 mask=row_mask[:, None] & (da[None, :] < D), other=0.0)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        xb = tl.load(ptr + row_off[:, None] + db[None, :],
                     mask=row_mask[:, None] & (db[None, :] < D), other=0.0)
    else:
        xb = xa
    return xa, xb


@triton.jit
def qk(qa, qb, ka, kb, DB: tl.constexpr, IEEE: tl.constexpr):
    """Scores of split rows: ``(M, DA) x (N, DA)^T`` plus, when ``DB > 0``, ``(M, DB) x (N, DB)^T``
    -> ``(M, N)`` float32. ``IEEE``: exact fp32 products (else the dtype's tensor-core path,
    tf32 for fp32 inputs)."""
    if IEEE:
        s = tl.dot(qa, tl.trans(ka), input_precision="ieee")
        if DB > 0:
            s += tl.dot(qb, tl.trans(kb), input_precision="ieee")
    else:
        s = tl.dot(qa, tl.trans(ka))
        if DB > 0:
            s += tl.dot(qb, tl.trans(kb))
    return s


@triton.jit
def mm(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` (float32 ``acc``); ``IEEE``: exact fp32 products."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
