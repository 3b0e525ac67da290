"""Host-side kernel helpers (no kernel launches)."""
from __future__ import annotations

import torch

from kernels.triton_utils import split_descriptors, tma_descriptor


def test_tma_descriptor_takes_aligned_row_major_tensors():
    x = torch.zeros(2, 8, 4, 16)  # float32: rows of 64 bytes
    d = tma_descriptor(x, [1, 4, 2, 16])
    assert d is not None and list(d.shape) == [2, 8, 4, 16] and list(d.strides) == list(x.stride())
    assert tma_descriptor(x[:, :, 1:3], [1, 4, 2, 16]) is not None  # strided view, aligned base


def test_tma_descriptor_refuses_what_tma_cannot_read(monkeypatch):
    x = torch.zeros(8, 16)
    assert tma_descriptor(x.t(), [4, 4]) is None                      # last stride not 1
    assert tma_descriptor(torch.zeros(8, 3), [4, 4]) is None          # 12-byte rows
    assert tma_descriptor(x, [4, 2]) is None                          # 8-byte tile rows
    assert tma_descriptor(x.view(-1)[1:125].view(31, 4), [4, 4]) is None  # base off by 4 bytes
    assert tma_descriptor(x, [4]) is None                             # tile rank != tensor rank
    assert tma_descriptor(x, [3, 4]) is None                          # tile dim not a power of 2
    assert tma_descriptor(torch.zeros(0, 16), [4, 4]) is None         # empty
    assert tma_descriptor(torch.zeros(1, 16).expand(8, 16), [4, 4]) is None  # broadcast rows
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tma_descriptor(x, [4, 4]) is None                          # CPU tensor, no interpreter


def test_split_descriptors_need_both_pieces():
    x = torch.zeros(2, 8, 48)  # float32 columns 32 + 16
    a, b = split_descriptors(x, [1, 4], 32, 16)
    assert list(a.block_shape) == [1, 4, 32] and list(b.block_shape) == [1, 4, 16]
    one = split_descriptors(x, [1, 4], 32, 0)
    assert one is not None and one[0] is one[1]
    assert split_descriptors(x, [1, 4], 32, 2) is None  # 8-byte tile rows for the second piece
