"""Host-side helpers shared by the Triton kernels. No Triton import at module level: the
dispatch uses :func:`interpreting` too, and ``import kernels`` must work where Triton is not
installed (the PyTorch references run there). The ``@triton.jit`` device functions several
kernels call are in :mod:`kernels.triton_device`.

A kernel module imports shared code only from here, :mod:`kernels.triton_device`,
:mod:`kernels.blocks` (block geometry) and :mod:`kernels.masked_attention`, never another
kernel's private names.
"""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors in the Triton interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


GPU_TILES_ENV = "NSA_LIT_GPU_TILES"


def gpu_tiles_requested() -> bool:
    """True under ``NSA_LIT_GPU_TILES=1``: launchers choose tiles, stages and SM counts as for an
    H100 even for CPU tensors. ``benchmarks/kernel_resources.py`` sets it to compile a GPU's
    launches on CPU without running them."""
    return os.environ.get(GPU_TILES_ENV, "0") == "1"


def interpreter_tiles(device: torch.device) -> bool:
    """Whether launchers take their small interpreter tiles (one pipeline stage, no autotuning)
    for tensors on ``device``: under ``TRITON_INTERPRET=1`` or off CUDA, unless
    :func:`gpu_tiles_requested`."""
    return (interpreting() or device.type != "cuda") and not gpu_tiles_requested()


def next_pow2(x: int) -> int:
    """Smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def split_dim(d: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two tiles ``(d1, d2)``, ``d2 = 0`` when one suffices:
    ``d1`` the largest power of two <= d (at least 16), ``d2`` the remainder rounded up to a power
    of two (at least 16); the kernels mask the padding (160 -> 128 + 32, 96 -> 64 + 32)."""
    if d <= 16:
        return 16, 0
    d1 = 1 << (d.bit_length() - 1)
    if d1 == d:
        return d1, 0
    return d1, max(16, next_pow2(d - d1))


def row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride on its last dim (a copy only when needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 4 elsewhere (interpreter runs), an
    H100's 132 when :func:`gpu_tiles_requested`."""
    if device.type != "cuda":
        return 132 if gpu_tiles_requested() else 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def tma_descriptor(x: torch.Tensor, block: list[int]):
    """A TMA tensor descriptor of ``x`` for tiles of shape ``block`` (``x``'s shape and strides;
    tiles reaching past an edge read zeros there), or None where TMA cannot read ``x``: it needs
    a Hopper or newer GPU (or the interpreter), a non-empty tensor of rank 1 to 5, a unit last
    stride, a 16-byte aligned base, other strides positive (no broadcast dims) and, like tile
    rows, multiples of 16 bytes, and tile dims that are powers of two up to 256."""
    esize = x.element_size()
    if not (len(block) == x.dim() <= 5 and x.numel() > 0 and x.stride(-1) == 1
            and x.data_ptr() % 16 == 0
            and all(s > 0 and s * esize % 16 == 0 for s in x.stride()[:-1])
            and block[-1] * esize % 16 == 0
            and all(0 < b <= 256 and b & (b - 1) == 0 for b in block)):
        return None
    if not (interpreting() or (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9)):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, list(x.shape), list(x.stride()), list(block))


def split_descriptors(x: torch.Tensor, prefix: list[int], d1: int, d2: int):
    """``(desc1, desc2)`` for the two column pieces ``[0, d1)`` and ``[d1, d1 + d2)`` of ``x``'s
    last dim in tiles ``prefix + [width]`` (``desc2 = desc1`` when ``d2 == 0``), or None unless
    TMA serves both (:func:`tma_descriptor`)."""
    a = tma_descriptor(x, [*prefix, d1])
    b = tma_descriptor(x, [*prefix, d2]) if d2 else a
    return None if a is None or b is None else (a, b)
