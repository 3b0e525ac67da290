"""``LayerSpec``: the one description of a layer that the layer, its decode cache and the model
statistics read; degenerate configs fail at construction, naming the field and the bound."""
from pathlib import Path

import pytest
import torch

from nsa_lit.attention import Attention
from nsa_lit.cache import BranchKVCache, LatentKVCache, LatentWindowCache, layer_cache
from nsa_lit.config import Branch, Form, KVSource, ModelConfig
from nsa_lit.model_stats import kv_elements_per_token, load_model_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_layer_cache_and_stats_agree_with_the_spec(path):
    cfg = load_model_config(path)
    context = cfg.seq_len
    assert len(cfg.layers) == cfg.n_layers
    for kind in sorted(set(cfg.layer_pattern)):
        spec = cfg.layer(kind)
        assert cfg.layer(cfg.layer_kinds.index(kind)) == spec
        with torch.device("meta"):
            layer = Attention(cfg, kind)
        # the layer: branches, gate, query width, key/value source and groups, compressors
        assert layer.spec == spec and layer.branches == spec.branches
        assert (layer.gate is None) == (len(spec.branches) == 1)
        if layer.gate is not None:
            assert layer.gate.out_features == cfg.n_heads * len(spec.branches)
        assert layer.wq.out_features == cfg.n_heads * spec.query_dim
        assert hasattr(layer.kv, "w_dkv") == spec.latent
        if spec.latent:
            assert layer.kv.groups == spec.kv_heads and layer.kv.group_dim == spec.group_dim
        else:
            assert layer.kv.n_kv_heads == spec.kv_heads
        # per-branch key/values: one projection per branch of kv_branches, else one for all
        assert set(getattr(layer.kv, "heads", {})) == {str(b) for b in spec.kv_branches}
        compressors = [n for n, _ in layer.named_children() if n.endswith("_compressor")]
        assert len(compressors) == (2 if spec.compresses else 0)
        # the decode cache: type, slots, compressed tokens, kept selection, bytes
        cache = layer_cache(cfg, kind, 2, context, torch.bfloat16, device="meta")
        assert cache.latent == spec.latent
        assert isinstance(cache, BranchKVCache) == spec.kv_per_branch
        if spec.kv_per_branch:  # compression: compressed tokens; selection: the kept blocks
            assert {b: c.slots for b, c in cache.caches.items()} == spec.branch_slots(context)
            assert sum(c.slots for c in cache.caches.values()) == spec.cache_slots(context)
        else:
            assert cache.slots == spec.cache_slots(context)
        cmp_cache = cache.for_branch(Branch.COMPRESSION) if spec.compresses else cache
        assert (cmp_cache.compressed is not None) == spec.compresses
        if spec.compresses:
            assert cmp_cache.compressed[0].shape[1] == spec.compressed_tokens(context)
        sel_cache = cache.for_branch(Branch.SELECTION) if spec.selects else cache
        assert (sel_cache.block_idx is not None) == spec.selects
        if spec.selects:
            assert sel_cache.block_idx.shape == (2, spec.kv_heads, spec.top_n)
            assert sel_cache.q_share == spec.q_share
        assert cache.bytes_allocated() == 2 * 2 * spec.kv_elements(context)
        if spec.latent:
            assert isinstance(cache, LatentKVCache if spec.compresses else LatentWindowCache)
    # model_stats: the per-token cache formula is the specs' sum
    assert kv_elements_per_token(cfg, context) == \
        sum(cfg.layer(k).kv_elements(context) for k in cfg.layer_kinds) / context


def test_asa_spec_by_hand():
    cfg = ModelConfig()  # 340M ASA defaults
    local, global_ = cfg.layer(0), cfg.layer(1)
    assert (local.kind, global_.kind) == ("L", "G") and cfg.layer("G") == global_
    assert local.branches == (Branch.WINDOW,) and local.kv is KVSource.LATENT
    assert (local.kv_heads, local.group_dim, local.q_share) == (1, 256, 1)
    assert local.form(Branch.WINDOW) is Form.EXPANDED and local.dims("window") == (96, 64)
    assert local.cache_slots(8192) == 512 and local.cache_width == 288 and not local.compresses
    assert global_.branches == (Branch.COMPRESSION, Branch.SELECTION)
    assert (global_.kv_heads, global_.group_dim, global_.q_share) == (2, 128, 4)
    assert global_.compressed_form is Form.EXPANDED
    assert global_.token_forms == {Form.ABSORBED}
    assert global_.dims(Branch.SELECTION) == (160, 128)
    assert global_.attention_heads(Branch.COMPRESSION) == 16
    assert global_.attention_heads(Branch.SELECTION) == 2
    assert global_.scale == pytest.approx(96 ** -0.5)
    assert global_.kv_elements(8192) == (8192 + (8192 - 32) // 16 + 1) * 288
    nsa = ModelConfig(layer_pattern="N", nsa_branches=["selection", "window"],
                      compress_method="mean").layer("N")
    assert nsa.compresses and nsa.selects and nsa.compressed_form is Form.GROUPED
    assert Branch.COMPRESSION not in nsa.branches and nsa.q_share == 1
    with pytest.raises(ValueError, match="unknown layer kind 'X'"):
        cfg.layer("X")


SMALL = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2,
             mlp_hidden=64, seq_len=64, latent_dim=16, rope_dim=4, window=12, compress_block=8,
             compress_stride=4, select_block=8, top_n=3, num_local_blocks=1, q_share=4)


@pytest.mark.parametrize("overrides, message", [
    # selection over every block is full attention
    (dict(top_n=8), r"`top_n`: must be < seq_len / select_block \(8 selection blocks\)"),
    (dict(top_n=9), r"`top_n`: must be < seq_len / select_block \(8 selection blocks\)"),
    (dict(layer_pattern="N", top_n=8), r"`top_n`: must be < seq_len / select_block"),
    # a window over the whole sequence is full attention
    (dict(window=64), r"`window`: must be < seq_len \(64\)"),
    (dict(layer_pattern="N", nsa_branches=["window"], window=80), r"`window`: must be < seq_len"),
    # the latent compresses the hidden state
    (dict(latent_dim=64), r"`latent_dim`: must be <= d_model \(32\)"),
    (dict(local_kv="grouped", global_kv="latent", latent_dim=48), r"`latent_dim`: must be <= d_model"),
    # the ones that existed before
    (dict(seq_len=60), r"`seq_len`: must be a multiple of select_block \(8\)"),
    (dict(top_n=1), r"`top_n`: must be >= 1 \+ num_local_blocks \(2\)"),
    (dict(compress_block=6), r"`compress_block`: must be a multiple of compress_stride \(4\)"),
    # the query's current block is always selected (DESIGN: selection)
    (dict(num_local_blocks=0, top_n=3), r"`num_local_blocks`: must be >= 1 when a layer selects"),
    (dict(layer_pattern="N", num_local_blocks=0), r"`num_local_blocks`: must be >= 1"),
    # selection without compression scores blocks with compressor MLPs no loss trains
    (dict(layer_pattern="N", nsa_branches=["selection", "window"]),
     r"`compress_method`: must be 'mean' when a layer selects blocks without the compression"),
])
def test_degenerate_configs_fail_naming_the_field_and_bound(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, **overrides})


@pytest.mark.parametrize("overrides", [
    dict(layer_pattern="F", window=64, top_n=8, latent_dim=64),  # fields no layer reads
    dict(layer_pattern="N", q_share=3),  # query sharing: global layers only
    dict(layer_pattern="N", nsa_branches=["selection", "window"], compress_method="mean"),
    dict(layer_pattern="N", nsa_branches=["compression", "window"], num_local_blocks=0),
    dict(layer_pattern="N", nsa_branches=["compression", "selection"], window=64),
    dict(local_kv="grouped", global_kv="grouped", latent_dim=64),
    dict(layer_pattern="L", top_n=8),
])
def test_bounds_apply_only_where_a_layer_uses_the_field(overrides):
    ModelConfig(**{**SMALL, **overrides})
