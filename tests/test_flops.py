"""FLOP accounting (nsa_lit.model_stats): visible keys, attention and training FLOPs per token."""
import dataclasses

import pytest

from nsa_lit import model_stats as ms
from nsa_lit.config import ModelConfig


@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_visible_key_counts_match_brute_force(T):
    assert ms.visible_window(T, 16) == pytest.approx(sum(min(t + 1, 16) for t in range(T)) / T)
    assert ms.visible_causal(T) == pytest.approx(sum(t + 1 for t in range(T)) / T)
    assert ms.visible_compressed(T, 32, 16) == pytest.approx(
        sum(len([i for i in range(T) if i * 16 + 31 <= t]) for t in range(T)) / T)
    selected = sum(len([s for s in range(t + 1) if s // 64 >= t // 64 - 15]) if t // 64 < 16
                   else 15 * 64 + t % 64 + 1 for t in range(T)) / T
    assert ms.visible_selected(T, 64, 16) == pytest.approx(selected)


def test_full_attention_training_flops_by_hand():
    cfg = ModelConfig(layer_pattern="F", n_layers=4, seq_len=1024)
    d, H, dh, Hk, f, V = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_kv_heads, cfg.mlp_hidden, \
        cfg.vocab_size
    per_layer = d * H * dh + 2 * d * Hk * dh + H * dh * d + 3 * d * f
    weights = 2 * (4 * per_layer + d * V)
    attention = 4 * 2 * H * (dh + dh) * (1024 + 1) / 2
    assert ms.training_flops_per_token(cfg) == pytest.approx(3 * (weights + attention))


def test_compressor_mlps_count_once_per_compressed_token_and_group():
    asa = ModelConfig(n_layers=2, layer_pattern="LG", seq_len=512)
    mean = dataclasses.replace(asa, compress_method="mean")
    l, s, dc, dr = asa.compress_block, asa.compress_stride, asa.latent_dim // 2, asa.rope_dim
    latent_mlp = l * dc * dc + dc * dc   # Linear(l*dc -> dc), Linear(dc -> dc), 2 groups
    rope_mlp = l * dr * dr + dr * dr     # one RoPE key
    expected = 3 * 2 * (latent_mlp * 2 + rope_mlp) / s  # one global layer
    got = ms.training_flops_per_token(asa) - ms.training_flops_per_token(mean)
    assert got == pytest.approx(expected)


def test_attention_flops_follow_the_training_form():
    cfg = ModelConfig(seq_len=4096)
    T = cfg.seq_len
    n_cmp = ms.visible_compressed(T, 32, 16)
    n_sel = ms.visible_selected(T, 64, 16)
    # auto: compression expanded (96 / 64 per head), selection absorbed (128 + 32 / 128 latent)
    expected = 2 * 16 * (n_cmp * (96 + 64) + n_cmp * 96 / 4 + n_sel * (160 + 128))
    assert ms.layer_attention_flops(cfg, "G", T) == pytest.approx(expected)
    expanded = dataclasses.replace(cfg, latent_form="expanded")
    assert ms.layer_attention_flops(expanded, "G", T) == pytest.approx(
        2 * 16 * (n_cmp * (96 + 64) + n_cmp * 96 / 4 + n_sel * (96 + 64)))
    # local MLA layer: the window, expanded
    assert ms.layer_attention_flops(cfg, "L", T) == pytest.approx(
        2 * 16 * ms.visible_window(T, 512) * (96 + 64))
    # NSA without the compression branch still computes the compression attention
    no_cmp = ModelConfig(layer_pattern="N", nsa_branches=["selection", "window"],
                         compress_method="mean", seq_len=T)
    assert ms.layer_attention_flops(no_cmp, "N", T) == pytest.approx(
        2 * 16 * (n_cmp * 128 + n_cmp * 64 + n_sel * 128 + ms.visible_window(T, 512) * 128))
