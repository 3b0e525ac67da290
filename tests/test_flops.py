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
    asa = ModelConfig(n_layers=2, layer_pattern="LG", seq_len=2048)
    mean = dataclasses.replace(asa, compress_method="mean")
    l, s, dc, dr = asa.compress_block, asa.compress_stride, asa.latent_dim // 2, asa.rope_dim
    latent_mlp = l * dc * dc + dc * dc   # Linear(l*dc -> dc), Linear(dc -> dc), 2 groups
    rope_mlp = l * dr * dr + dr * dr     # one RoPE key
    expected = 3 * 2 * (latent_mlp * 2 + rope_mlp) / s  # one global layer
    got = ms.training_flops_per_token(asa) - ms.training_flops_per_token(mean)
    assert got == pytest.approx(expected)


def test_latent_up_projections_count_as_each_form_applies_them():
    import torch

    from nsa_lit.attention import Attention

    cfg = ModelConfig(seq_len=2048)
    uk = uv = cfg.n_heads * cfg.head_dim * cfg.latent_dim // 2  # GLA: 2 groups of 128
    uk_mla = cfg.n_heads * cfg.head_dim * cfg.latent_dim        # MLA: one latent of 256

    def up_flops(c, kind):
        with torch.device("meta"):
            layer = Attention(c, kind)
        linear = sum(2.0 * m.weight.numel() * (1 if "compressor" not in n else
                                               (2 if "latent" in n else 1) / c.compress_stride)
                     for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear))
        return ms.matmul_flops_per_token(layer) - linear

    # local, window expanded: per-head keys and values of every token
    assert up_flops(cfg, "L") == pytest.approx(2 * (uk_mla + uk_mla))
    # global, auto: absorbed query + W_uv on the selection output per token; compressed tokens
    # expanded (one in 16)
    assert up_flops(cfg, "G") == pytest.approx(2 * (uk + uv + (uk + uv) / 16))
    # global, absorbed: one absorbed query, W_uv on both branch outputs
    absorbed = dataclasses.replace(cfg, latent_form="absorbed")
    assert up_flops(absorbed, "G") == pytest.approx(2 * (uk + 2 * uv))


def test_scoring_without_gradient_counts_once_in_training():
    cfg = ModelConfig(seq_len=4096)
    T = cfg.seq_len
    n_cmp, n_sel = ms.visible_compressed(T, 32, 16), ms.visible_selected(T, 64, 16)
    trained = 2 * 16 * (n_cmp * (96 + 64) + n_sel * (160 + 128))
    scoring = 2 * 16 * n_cmp * 96 / 4
    assert ms.layer_attention_flops(cfg.layer("G"), T, training=True) == pytest.approx(
        3 * trained + scoring)
    no_cmp = ModelConfig(layer_pattern="N", nsa_branches=["selection", "window"],
                         compress_method="mean", seq_len=T)
    w = ms.visible_window(T, 512)
    assert ms.layer_attention_flops(no_cmp.layer("N"), T, training=True) == pytest.approx(
        3 * 2 * 16 * (n_sel * 128 + w * 128) + 2 * 16 * (n_cmp * 128 + n_cmp * 64))


def test_attention_flops_follow_the_training_form():
    cfg = ModelConfig(seq_len=4096)
    T = cfg.seq_len
    n_cmp = ms.visible_compressed(T, 32, 16)
    n_sel = ms.visible_selected(T, 64, 16)
    # auto: compression expanded (96 / 64 per head), selection absorbed (128 + 32 / 128 latent)
    expected = 2 * 16 * (n_cmp * (96 + 64) + n_cmp * 96 / 4 + n_sel * (160 + 128))
    assert ms.layer_attention_flops(cfg.layer("G"), T) == pytest.approx(expected)
    expanded = dataclasses.replace(cfg, latent_form="expanded")
    assert ms.layer_attention_flops(expanded.layer("G"), T) == pytest.approx(
        2 * 16 * (n_cmp * (96 + 64) + n_cmp * 96 / 4 + n_sel * (96 + 64)))
    # local MLA layer: the window, expanded
    assert ms.layer_attention_flops(cfg.layer("L"), T) == pytest.approx(
        2 * 16 * ms.visible_window(T, 512) * (96 + 64))
    # NSA without the compression branch still computes the compression attention
    no_cmp = ModelConfig(layer_pattern="N", nsa_branches=["selection", "window"],
                         compress_method="mean", seq_len=T)
    assert ms.layer_attention_flops(no_cmp.layer("N"), T) == pytest.approx(
        2 * 16 * (n_cmp * 128 + n_cmp * 64 + n_sel * 128 + ms.visible_window(T, 512) * 128))
