"""Attention (and loss) kernels: Triton implementations beside PyTorch references, behind one
dispatch."""
from kernels.dispatch import (
    BACKENDS,
    causal_attention,
    causal_decode,
    compression_attention,
    compression_decode,
    select_blocks,
    select_blocks_decode,
    selected_attention,
    selected_decode,
    sliding_window_attention,
    window_decode,
    xent_grad,
)

__all__ = [
    "BACKENDS",
    "causal_attention",
    "causal_decode",
    "compression_attention",
    "compression_decode",
    "select_blocks",
    "select_blocks_decode",
    "selected_attention",
    "selected_decode",
    "sliding_window_attention",
    "window_decode",
    "xent_grad",
]
