"""Attention kernels: Triton implementations beside PyTorch references, behind one dispatch."""
from kernels.dispatch import (
    BACKENDS,
    causal_attention,
    compression_attention,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)

__all__ = [
    "BACKENDS",
    "causal_attention",
    "compression_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
]
