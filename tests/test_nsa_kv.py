"""NSA with per-branch key/values (``nsa_kv: per_branch``) and the KV-cache baselines: the layer,
its decode cache, its parameter and cache counts, the configs and the multi-baseline KV report."""
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kernels.blocks import num_compressed
from nsa_lit import kv_report
from nsa_lit.attention import Attention, BranchKV, GroupedKV
from nsa_lit.cache import BranchKVCache, GroupedKVCache, layer_cache
from nsa_lit.config import Branch, ModelConfig
from nsa_lit.model import Transformer
from nsa_lit.model_stats import count_parameters, load_model_config
from test_decode import decode_matches_forward

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2,
             mlp_hidden=64, seq_len=64, latent_dim=16, rope_dim=4, window=12, compress_block=8,
             compress_stride=4, select_block=8, top_n=3, num_local_blocks=1, q_share=4,
             kernel_backend="reference", layer_pattern="N", nsa_kv="per_branch")
C, S, W = Branch.COMPRESSION, Branch.SELECTION, Branch.WINDOW
# nsa_branches -> the branches that own a key/value projection (compression whenever selecting)
BRANCH_SETS = {
    "all": (["compression", "selection", "window"], (C, S, W)),
    "no_window": (["compression", "selection"], (C, S)),
    "no_selection": (["compression", "window"], (C, W)),
    "window_only": (["window"], (W,)),
}


def per_branch(name="all", **extra) -> ModelConfig:
    return ModelConfig(**{**SMALL, "nsa_branches": BRANCH_SETS[name][0], **extra})


@pytest.mark.parametrize("name", BRANCH_SETS)
def test_layer_has_one_projection_per_branch_and_keeps_shapes(name):
    cfg = per_branch(name)
    spec = cfg.layer("N")
    assert spec.kv_per_branch and spec.kv_branches == BRANCH_SETS[name][1]
    layer = Attention(cfg, "N")
    assert isinstance(layer.kv, BranchKV)
    assert set(layer.kv.heads) == {str(b) for b in spec.kv_branches}
    x = torch.randn(2, 40, cfg.d_model)
    kv = layer.kv(x, layer.rope)
    for branch, (k, v) in kv.items():
        assert k.shape == v.shape == (2, 40, cfg.n_kv_heads, cfg.head_dim), branch
    # the branches really read different keys: the projections are distinct modules
    weights = [layer.kv.heads[str(b)].wk.weight for b in spec.kv_branches]
    assert len({w.data_ptr() for w in weights}) == len(weights)
    assert layer(x).shape == x.shape
    # the shared layer keeps one projection and its parameter names
    shared = Attention(ModelConfig(**{**SMALL, "nsa_kv": "shared"}), "N")
    assert isinstance(shared.kv, GroupedKV) and not shared.spec.kv_per_branch


@pytest.mark.parametrize("name", BRANCH_SETS)
def test_causal(name):
    model = Transformer(per_branch(name)).double().eval()
    tokens = torch.randint(0, 97, (2, 64))
    base = model(tokens)
    for t in (0, 14, 31, 62):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, 97, changed[:, t + 1:].shape)
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-10)
        if t < 60:
            assert not torch.allclose(out[:, t + 2:], base[:, t + 2:])


@pytest.mark.parametrize("name", BRANCH_SETS)
def test_gradients_reach_every_branch_projection(name):
    cfg = per_branch(name)
    model = Transformer(cfg)
    tokens = torch.randint(0, 97, (2, 64))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for i, block in enumerate(model.blocks):
        for branch in cfg.layer("N").kv_branches:
            for proj in ("wk", "wv"):
                grad = getattr(block.attn.kv.heads[str(branch)], proj).weight.grad
                assert grad is not None and torch.isfinite(grad).all(), (i, branch, proj)
                assert grad.abs().sum() > 0, f"layer {i}: {branch}.{proj} gets no gradient"


@pytest.mark.parametrize("name", BRANCH_SETS)
def test_per_branch_with_tied_projections_is_the_shared_layer(name):
    """Per-branch projections all set to one shared projection give exactly the shared layer;
    changing one branch's projection then changes the output (that branch reads its own)."""
    split = per_branch(name)
    shared = Attention(ModelConfig(**{**vars(split), "nsa_kv": "shared"}), "N").double()
    layer = Attention(split, "N").double()
    state = {}
    for key, value in shared.state_dict().items():
        if key.startswith("kv."):
            for branch in split.layer("N").kv_branches:
                state[key.replace("kv.", f"kv.heads.{branch}.")] = value
        else:
            state[key] = value
    layer.load_state_dict(state)
    x = torch.randn(2, 64, split.d_model, dtype=torch.float64)
    torch.testing.assert_close(layer(x), shared(x), rtol=0, atol=1e-12)
    for branch in split.layer("N").kv_branches:
        layer.load_state_dict(state)
        with torch.no_grad():
            layer.kv.heads[str(branch)].wk.weight.mul_(3.0)
        assert (layer(x) - shared(x)).abs().amax() > 1e-6, f"{branch}'s keys are not read"


def test_parameter_counts_shared_vs_per_branch():
    for name, (branches, owners) in BRANCH_SETS.items():
        shared = ModelConfig(**{**SMALL, "nsa_kv": "shared", "nsa_branches": branches})
        split = per_branch(name)
        projection = 2 * split.d_model * split.n_kv_heads * split.head_dim  # wk + wv, one branch
        extra = (len(owners) - 1) * projection * split.n_layers
        assert count_parameters(split)["total"] - count_parameters(shared)["total"] == extra, name
    # the 340M configs as written: three projections instead of one in each of 24 layers
    nsa = load_model_config(ROOT / "configs/340m/nsa.yaml")
    nsa_pb = load_model_config(ROOT / "configs/340m/nsa_per_branch.yaml")
    assert count_parameters(nsa_pb)["total"] - count_parameters(nsa)["total"] == \
        2 * 24 * 2 * 1024 * 4 * 64


@pytest.mark.parametrize("name", BRANCH_SETS)
@pytest.mark.parametrize("max_len", [64, 44, 10, 5])
def test_kv_elements_count_the_cached_tensors(name, max_len):
    """``LayerSpec.kv_elements`` equals (a) a count by hand of each branch's cache and (b) the
    elements of the tensors the decode cache holds."""
    cfg = per_branch(name)
    spec = cfg.layer("N")
    cache = layer_cache(cfg, "N", 1, max_len)
    assert isinstance(cache, BranchKVCache) and set(cache.caches) == set(spec.kv_branches)
    width = 2 * cfg.n_kv_heads * cfg.head_dim
    raw = {C: min(max_len, cfg.compress_block), S: max_len, W: min(max_len, cfg.window)}
    n_cmp = num_compressed(max_len, cfg.compress_block, cfg.compress_stride)
    by_hand = width * (sum(raw[b] for b in spec.kv_branches) + (n_cmp if C in spec.kv_branches else 0))
    held = 0
    for branch, sub in cache.caches.items():
        assert sub.slots == raw[branch], branch
        assert (sub.compressed is not None) == (branch is C)
        assert (sub.block_idx is not None) == (branch is S)
        held += sum(t.numel() for t in list(sub.raw) + list(sub.compressed or ()))
    assert spec.kv_elements(max_len) == by_hand == held
    assert cache.bytes_allocated() == 4 * held


@pytest.mark.parametrize("name", BRANCH_SETS)
@torch.no_grad()
def test_decode_gives_the_full_forward_logits(name):
    """Prefill prompts of different lengths, decode to the end: every logit equals the training
    forward's (compression blocks, selection, the window's ring wrap-around); each branch's cache
    then holds that branch's own projected keys/values."""
    cfg = per_branch(name)
    model = Transformer(cfg).double()
    T, prompts = 64, torch.tensor([20, 31, 45])  # decode across blocks and the ring wrap
    tokens, caches, pos = decode_matches_forward(model, prompts, T, name)
    # the first layer's caches against its projections of the embedded tokens
    attn = model.blocks[0].attn
    kv = attn.kv(model.blocks[0].attn_norm(model.embed(tokens)), attn.rope)
    cache = caches[0]
    assert cache.longest == T and cache.lengths.tolist() == pos.tolist()
    for b, n in enumerate(cache.lengths.tolist()):
        for branch, sub in cache.caches.items():
            k, v = kv[branch]
            p = torch.arange(max(0, n - sub.slots), n)  # the last `slots` tokens, p in slot p % slots
            torch.testing.assert_close(sub.raw[0][b, p % sub.slots], k[b, p], rtol=0, atol=1e-12)
            torch.testing.assert_close(sub.raw[1][b, p % sub.slots], v[b, p], rtol=0, atol=1e-12)
        if C in cache.caches:
            done = num_compressed(n, cfg.compress_block, cfg.compress_stride)
            k_cmp, v_cmp = attn._compress(*kv[C])
            got = cache.caches[C].compressed
            torch.testing.assert_close(got[0][b, :done], k_cmp[b, :done], rtol=0, atol=1e-12)
            torch.testing.assert_close(got[1][b, :done], v_cmp[b, :done], rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides, message", [
    (dict(layer_pattern="LG"), r"`nsa_kv`: 'per_branch' .* has local/global layers \['G', 'L'\]"),
    (dict(layer_pattern="NL"), r"`nsa_kv`: .* has local/global layers \['L'\]"),
    (dict(layer_pattern="F"), r"`nsa_kv`: .* has no NSA layer"),
    (dict(nsa_kv="split"), r"`nsa_kv`: must be 'shared' or 'per_branch', got 'split'"),
    (dict(nsa_branches=["selection", "window"], compress_method="mean"),
     r"`nsa_kv`: 'per_branch' with selection but without the compression branch"),
])
def test_invalid_per_branch_configs_fail_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, "n_layers": 2, **overrides})


def test_shared_is_the_default_and_changes_nothing():
    cfg = ModelConfig(**{k: v for k, v in SMALL.items() if k != "nsa_kv"})
    assert cfg.nsa_kv == "shared" and cfg.layer("N").kv_branches == ()
    cache = layer_cache(cfg, "N", 1, 64)
    assert type(cache) is GroupedKVCache and cache.slots == 64


# -- baseline configs and the KV report ----------------------------------------------------------
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_baseline_configs():
    import bench_configs
    for size in ("340m", "1.3b"):
        nsa = load_model_config(ROOT / f"configs/{size}/nsa.yaml")
        paper = load_model_config(ROOT / f"configs/{size}/nsa_paper_groups.yaml")
        assert paper.n_heads // paper.n_kv_heads == 16 and paper.n_heads == nsa.n_heads
        assert (paper.layer_pattern, paper.nsa_kv) == ("N", "shared")
        pb = load_model_config(ROOT / f"configs/{size}/nsa_per_branch.yaml")
        assert pb.nsa_kv == "per_branch"
        assert {**vars(pb), "nsa_kv": "shared"} == vars(nsa)  # differs from nsa in nsa_kv only
    assert load_model_config(ROOT / "configs/340m/nsa.yaml").nsa_kv == "shared"
    fla = load_model_config(ROOT / "configs/340m/nsa_fla_340m.yaml")
    ref = bench_configs.FLA_NSA_340M
    for field in ("n_heads", "n_kv_heads", "head_dim", "layer_pattern", "compress_block",
                  "compress_stride", "select_block", "top_n", "num_local_blocks", "window",
                  "nsa_branches", "nsa_kv"):
        assert getattr(fla, field) == getattr(ref, field), field


def write_config(path: Path, **arch) -> str:
    path.write_text(yaml.safe_dump({"model": {"arch": {**SMALL, "nsa_kv": "shared", **arch}}}))
    return str(path)


def test_kv_report_gives_a_ratio_per_baseline(tmp_path, capsys):
    asa = write_config(tmp_path / "asa.yaml", layer_pattern="LG")
    nsa = write_config(tmp_path / "nsa.yaml")
    paper = write_config(tmp_path / "nsa_paper_groups.yaml", n_kv_heads=1)
    split = write_config(tmp_path / "nsa_per_branch.yaml", nsa_kv="per_branch")
    full = write_config(tmp_path / "full.yaml", layer_pattern="F")
    paths = [asa, nsa, paper, split, full]
    rows = kv_report.main(["--config", *paths, "--context", "32", "64", "--dtype", "fp32"])
    out = capsys.readouterr().out
    for name in ("vs nsa", "vs nsa_paper_groups", "vs nsa_per_branch", "bytes/token"):
        assert name in out
    assert " NO" not in out and "vs full" not in out and "vs asa" not in out
    by = {(r["config"], r["context"]): r for r in rows}
    for context in (32, 64):
        for path in paths:
            row = by[(path, context)]
            assert set(row["ratios"]) == {nsa, paper, split}  # the NSA-only configs
            for base in (nsa, paper, split):
                assert row["ratios"][base] == row["allocated"] / by[(base, context)]["allocated"]
            assert row["ratio"] == row["ratios"][nsa]
            assert row["bytes_per_token"] == row["allocated"] / context
        # fewer key/value heads: the paper grouping caches half of nsa's 2 heads
        assert by[(paper, context)]["ratios"][nsa] == 0.5
    # an explicit baseline list replaces the default
    rows, bases = kv_report.report([asa], [64], dtype="fp32", baseline=[paper, nsa])
    assert bases == [paper, nsa] and rows[0]["ratio"] == by[(asa, 64)]["ratios"][paper]
