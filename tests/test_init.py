"""A model built on the meta device, materialised and initialised by ``init_weights`` (the FSDP2
path, nsa_lit.parallel.materialize) against one built on the CPU: every parameter and buffer
set, constants exact, random tensors from the same distributions."""
import math

import pytest
import torch

from nsa_lit.config import ModelConfig
from nsa_lit.lit_module import LanguageModel, build_on_meta
from nsa_lit.model import Transformer
from nsa_lit.parallel import materialize
from test_model import SMALL, VARIANTS

# wider than SMALL so that the smallest random tensor has >= 256 elements (tighter statistics);
# every variant family: ASA (latent KV, GLA groups, MLP compressors with biases, gates), NSA
# (grouped KV, compressors), full attention
WIDE = dict(SMALL, d_model=64, head_dim=16, mlp_hidden=128, latent_dim=32, rope_dim=16)
CONFIGS = {name: ModelConfig(**{**WIDE, **VARIANTS[name]})
           for name in ("asa", "nsa", "full", "nsa_mean_pool")}


def meta_then_materialize(cfg: ModelConfig) -> Transformer:
    """Built on meta, allocated on the CPU, every element set to NaN (so that anything
    ``init_weights`` misses shows), then initialised."""
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    model.init_weights()
    return model


def tensors(model: Transformer) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("name", CONFIGS)
def test_meta_build_sets_every_tensor_like_a_cpu_build(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    cpu = tensors(Transformer(cfg))
    torch.manual_seed(1)  # different draws: the comparison is of distributions
    meta = tensors(meta_then_materialize(cfg))
    assert meta.keys() == cpu.keys()
    n_random = 0
    for key, ref in cpu.items():
        got = meta[key]
        assert got.shape == ref.shape and got.dtype == ref.dtype, key
        assert torch.isfinite(got).all(), f"{name}: {key} was left uninitialised"
        if "rope." in key or ref.min() == ref.max():
            # RoPE tables, norm weights (1), compressor positions and biases (0): exact
            assert torch.equal(got, ref), f"{name}: {key} differs from the CPU build"
            continue
        # Normal(0, s): over n elements the sample mean has sd s / sqrt(n) and the sample sd a
        # relative sd of 1 / sqrt(2n), so the two builds' values differ by sd s sqrt(2/n) and
        # 1 / sqrt(n): 5 of those (a 1-in-1.7-million miss per comparison); a wrong std (e.g.
        # a missed 1/sqrt(2 n_layers) = 1/2 residual scaling, or nn.Linear's own init) is off
        # by >= 2x that for every tensor here (n >= 256)
        n_random += 1
        n, s = ref.numel(), ref.std().item()
        assert n >= 256, key
        assert abs(got.mean().item() - ref.mean().item()) <= 5 * s * math.sqrt(2 / n), key
        assert abs(got.std().item() / s - 1) <= 5 / math.sqrt(n), key
    assert n_random >= 10


@pytest.mark.parametrize("name", CONFIGS)
def test_init_stds_are_the_documented_ones(name):
    """Both builds against the stated init: Normal(0, init_std), residual output projections
    init_std / sqrt(2 n_layers), norms 1, latent up-projections Normal(0, init_std)."""
    cfg = CONFIGS[name]
    for model in (Transformer(cfg), meta_then_materialize(cfg)):
        for key, t in tensors(model).items():
            if key.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
            elif key.endswith(("norm.weight", "latent_norm")):
                assert torch.equal(t, torch.ones_like(t)), key
                continue
            elif key.endswith(("bias", "position")):
                assert torch.equal(t, torch.zeros_like(t)), key
                continue
            elif "rope." in key:
                continue
            else:
                std = cfg.init_std
            assert abs(t.std().item() / std - 1) <= 5 / math.sqrt(2 * t.numel()), key


def test_rope_tables_do_not_depend_on_where_they_are_computed():
    """``Rotary.reset_parameters`` computes on the CPU in fp32 and copies: the same tables after
    ``.double()`` (cast) and after a reset of a double model."""
    model = Transformer(CONFIGS["asa"]).double()
    rope = model.blocks[0].attn.rope
    cos = rope.cos.clone()
    rope.reset_parameters()
    assert rope.cos.dtype == torch.float64 and torch.equal(rope.cos, cos)


def test_language_model_built_on_meta_is_initialised_by_configure_model():
    """What the CLI does under a model-parallel strategy, without the strategy: build_on_meta,
    then configure_model (called again, as load_from_checkpoint does: nothing changes)."""
    cfg = CONFIGS["asa"]
    with build_on_meta():
        module = LanguageModel(cfg)
    assert all(p.is_meta for p in module.model.parameters())
    assert not any(t.is_meta for t in module.val_loss.metric_state.values())
    module.configure_model()
    state = {k: v.clone() for k, v in module.model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in state.values())
    module.configure_model()
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in state.items())
    assert not materialize(module.model, "cpu")  # nothing left on meta
    out = module(torch.randint(0, cfg.vocab_size, (1, 16)))
    assert out.shape == (1, 16, cfg.vocab_size) and torch.isfinite(out).all()
