"""Attention layers: key/value sources, block compression, and the composed layer."""
from nsa_lit.attention.compressor import BlockCompressor
from nsa_lit.attention.kv import BranchKV, GroupedKV, LatentKV
from nsa_lit.attention.layer import Attention

__all__ = ["Attention", "BlockCompressor", "BranchKV", "GroupedKV", "LatentKV"]
