"""The model configurations the benchmarks build their cases from: every benchmarked shape is a
layer of one of these (``ModelConfig.layer`` -> ``LayerSpec``), never a restated number."""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_lit.config import Branch, LayerSpec, ModelConfig  # noqa: E402
from nsa_lit.model_stats import load_model_config  # noqa: E402

ASA_340M = ModelConfig()  # the 340M ASA defaults: MLA local, GLA global (2 groups), q_share 4
ASA_340M_ABSORBED = dataclasses.replace(ASA_340M, latent_form="absorbed")
ASA_340M_EXPANDED = dataclasses.replace(ASA_340M, latent_form="expanded")
FULL_340M = ModelConfig(layer_pattern="F")  # our full-attention 340M: 16 heads, 4 KV heads
NSA_340M = ModelConfig(layer_pattern="N")   # our NSA 340M: GQA, all three branches
# fla's NSA 340M shape, the anchor of the fla comparison: 32 query heads, 2 KV heads, head dim 64,
# blocks of 64 (compression block = stride = selection block), top-16
FLA_NSA_340M = ModelConfig(n_heads=32, n_kv_heads=2, head_dim=64, layer_pattern="N",
                           compress_block=64, compress_stride=64, select_block=64, top_n=16,
                           num_local_blocks=1)
FLA_NSA_NO_WINDOW = dataclasses.replace(FLA_NSA_340M,
                                        nsa_branches=[Branch.COMPRESSION, Branch.SELECTION])


# the 1.3B ASA: its GLA global layer's absorbed latent is 256 + RoPE 32 = 288 columns wide
ASA_1_3B = load_model_config(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "1.3b", "asa.yaml"))


def layer_spec(cfg: ModelConfig, kind: str, T: int | None = None) -> LayerSpec:
    """``cfg``'s layer of ``kind``, at sequence length ``T`` (default ``cfg.seq_len``)."""
    return (cfg if T is None else dataclasses.replace(cfg, seq_len=T)).layer(kind)


def branch_shape(cfg: ModelConfig, kind: str, branch: Branch) -> tuple[int, int, int, int, int]:
    """``(H, Hk, G, Dqk, Dv)`` of ``branch`` in ``cfg``'s layer ``kind`` as it trains: query
    heads, key/value heads the kernel reads, selection groups, and head dims."""
    spec = cfg.layer(kind)
    return (spec.n_heads, spec.attention_heads(branch), spec.kv_heads, *spec.dims(branch))
