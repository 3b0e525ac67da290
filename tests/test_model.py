"""Whole-model behaviour of every attention variant: causality, gradients, equal forms, configs."""

import pytest
import torch

from nsa_lit.config import ModelConfig
from nsa_lit.model import Transformer
from nsa_lit.model_stats import count_parameters, kv_elements_per_token

SMALL = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2,
             mlp_hidden=64, seq_len=64, latent_dim=16, rope_dim=4, window=12, compress_block=8,
             compress_stride=4, select_block=8, top_n=3, num_local_blocks=1, q_share=4,
             kernel_backend="reference")

VARIANTS = {
    "full": dict(layer_pattern="F"),
    "nsa": dict(layer_pattern="N"),
    "nsa_mean_pool": dict(layer_pattern="N", compress_method="mean"),
    "nsa_no_window": dict(layer_pattern="N", nsa_branches=["compression", "selection"]),
    "nsa_no_compression": dict(layer_pattern="N", nsa_branches=["selection", "window"],
                               compress_method="mean"),
    "nsa_no_selection": dict(layer_pattern="N", nsa_branches=["compression", "window"]),
    "nsa_window_only": dict(layer_pattern="N", nsa_branches=["window"]),
    "asa": dict(layer_pattern="LG"),
    "asa_expanded": dict(layer_pattern="LG", latent_form="expanded"),
    "asa_absorbed": dict(layer_pattern="LG", latent_form="absorbed"),
    "alternating_gqa": dict(layer_pattern="LG", local_kv="grouped", global_kv="grouped"),
    "mla_local_only": dict(layer_pattern="LG", global_kv="grouped"),
    "asa_global_mla": dict(layer_pattern="LG", global_latent_groups=1),
    "asa_no_q_share": dict(layer_pattern="LG", q_share=1),
    "asa_llg": dict(layer_pattern="LLG", n_layers=3),
    "asa_gl": dict(layer_pattern="GL"),
}


def config(name, **extra):
    return ModelConfig(**{**SMALL, **VARIANTS[name], **extra})


@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name):
    torch.manual_seed(1)
    model = Transformer(config(name)).double().eval()
    tokens = torch.randint(0, 97, (2, 64))
    base = model(tokens)
    # cut points at, inside and at the end of query-sharing groups and selection blocks
    for t in (0, 4, 5, 14, 31, 40, 62):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, 97, changed[:, t + 1:].shape)
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-10,
                                   msg=f"{name}: a change after {t} moved an output at <= {t}")
        if t < 60:
            assert not torch.allclose(out[:, t + 2:], base[:, t + 2:]), "the change had no effect"


@pytest.mark.parametrize("name", VARIANTS)
def test_every_parameter_gets_a_finite_gradient(name):
    model = Transformer(config(name))
    tokens = torch.randint(0, 97, (2, 64))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        if "position" not in pname:  # zero-initialised intra-block position embeddings aside
            assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("groups", [1, 2])
def test_absorbed_expanded_and_auto_forms_agree(groups):
    # auto: window and compression expanded, selection absorbed (a mix inside the global layer)
    kw = dict(global_latent_groups=groups)
    models = {form: Transformer(config("asa", latent_form=form, **kw)).double()
              for form in ("absorbed", "expanded", "auto")}
    for model in models.values():
        model.load_state_dict(models["absorbed"].state_dict())
    tokens = torch.randint(0, 97, (2, 64))
    out = {form: model(tokens) for form, model in models.items()}
    torch.testing.assert_close(out["absorbed"], out["expanded"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["auto"], out["expanded"], rtol=1e-9, atol=1e-9)


def test_absorbed_selection_reads_values_through_the_keys(monkeypatch):
    """The absorbed form's selected-attention values are the latent ``c = k[..., :latent/groups]``:
    the layer says so explicitly (``v=None, value_dim``), so the Triton kernel reads each key tile
    once for both; the result equals attention with those values passed as a tensor."""
    import kernels

    calls = []
    original = kernels.selected_attention

    def spy(q, k, v, *args, value_dim=None, **kwargs):
        assert v is None and value_dim is not None
        out = original(q, k, v, *args, value_dim=value_dim, **kwargs)
        separate = original(q.detach(), k.detach(), k.detach()[..., :value_dim].clone(), *args,
                            **kwargs)
        torch.testing.assert_close(out, separate, rtol=0, atol=0)
        calls.append(value_dim)
        return out

    monkeypatch.setattr(kernels, "selected_attention", spy)
    cfg = config("asa", global_latent_groups=2)
    Transformer(cfg)(torch.randint(0, 97, (1, 64))).sum().backward()
    assert calls == [cfg.latent_dim // 2]


def test_wide_latent_global_layer_runs_the_triton_kernels():
    """A global latent wider than 256 columns with its RoPE part (256 + 4 here; 256 + 32 in
    configs/1.3b/asa.yaml and configs/340m/asa_global_mla.yaml): the Triton kernels (in the
    interpreter) give the reference's logits and gradients. The selected-attention kernel used to
    reject keys over 256 columns, so those configs could not train on a GPU."""
    cfg = {b: config("asa", d_model=256, latent_dim=256, global_latent_groups=1, select_block=16,
                     kernel_backend=b)
           for b in ("triton", "reference")}
    torch.manual_seed(0)
    models = {b: Transformer(c) for b, c in cfg.items()}
    models["triton"].load_state_dict(models["reference"].state_dict())
    tokens = torch.randint(0, 97, (1, 64))
    grads = {}
    for b, model in models.items():
        logits = model(tokens)
        logits.square().mean().backward()
        grads[b] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], rtol=1e-4, atol=1e-5)
    for n, g in grads["triton"][1].items():
        torch.testing.assert_close(g, grads["reference"][1][n], rtol=1e-3, atol=1e-5, msg=n)


def test_query_sharing_reuses_the_first_querys_blocks():
    # LG: the only selection is in layer 2. With shared weights, the first query of every group
    # of 4 sees the same blocks with and without sharing, so its logits agree exactly; the
    # other queries differ once there are more visible blocks than top_n.
    shared = Transformer(config("asa")).double()
    unshared = Transformer(config("asa", q_share=1)).double()
    unshared.load_state_dict(shared.state_dict())
    tokens = torch.randint(0, 97, (2, 64))
    a, b = shared(tokens), unshared(tokens)
    first = torch.arange(0, 64, 4)
    torch.testing.assert_close(a[:, first], b[:, first], rtol=1e-10, atol=1e-10)
    others = torch.tensor([t for t in range(32, 64) if t % 4])
    assert (a[:, others] - b[:, others]).abs().amax() > 1e-4


@pytest.mark.parametrize("field,value,message", [
    ("n_kv_heads", 3, "n_kv_heads"),
    ("global_latent_groups", 3, "global_latent_groups"),
    ("latent_dim", 17, "global_latent_groups"),
    ("compress_block", 10, "compress_block"),
    ("select_block", 10, "select_block"),
    ("seq_len", 60, "seq_len"),
    ("layer_pattern", "LXG", "layer_pattern"),
    ("layer_pattern", "LLG", "layer_pattern"),
    ("nsa_branches", [], "nsa_branches"),
    ("nsa_branches", ["window", "window"], "nsa_branches"),
    ("nsa_branches", ["cmp"], "nsa_branches"),
    ("q_share", 3, "q_share"),
    ("top_n", 1, "top_n"),
    ("kernel_backend", "cuda", "kernel_backend"),
    ("head_dim", 7, "head_dim"),
    ("window", 0, "window"),
])
def test_bad_config_names_the_field(field, value, message):
    kw = {**SMALL, "layer_pattern": "NLG" if field == "nsa_branches" else "LG", "n_layers": 2}
    if field == "nsa_branches":
        kw["n_layers"] = 3
    kw[field] = value
    with pytest.raises(ValueError, match=f"`{message}`"):
        ModelConfig(**kw)


def test_kv_elements_formula():
    full = config("full")
    assert kv_elements_per_token(full, 64) == 2 * 2 * 8 * 2  # 2 (K,V) * heads * dim * layers
    asa = config("asa")
    # local: last `window` latents; global: all latents + compressed latents; width 16 + 4
    local = 12 * 20
    global_ = (64 + (64 - 8) // 4 + 1) * 20
    assert asa.layer("L").kv_elements(64) == local
    assert asa.layer("G").kv_elements(64) == global_
    assert kv_elements_per_token(asa, 64) == (local + global_) / 64


def test_parameter_count_matches_the_built_model():
    cfg = config("asa")
    model = Transformer(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] - counts["non_embedding"] == 2 * 97 * 32
