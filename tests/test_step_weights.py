"""Merged decode weights (nsa_lit.step_weights): one GEMM per input of a step, the latent
up-projections absorbed, always current with the parameters."""
import pytest
import torch
from torch import nn

from nsa_lit.attention import layer
from nsa_lit.cache import new_caches
from nsa_lit.model import Transformer
from nsa_lit.step_weights import MergedWeights, ParameterWatch, stack
from test_model import VARIANTS, config

T = 32


def step_logits(model, tokens, prompt):
    """Prefill ``prompt`` tokens, then decode the rest one step at a time; the logits of each
    decoded position ``(B, T - prompt, vocab)``."""
    caches = new_caches(model.cfg, tokens.shape[0], T, torch.float64)
    model(tokens[:, :prompt], caches)
    return torch.stack([model.decode(tokens[:, t], caches) for t in range(prompt, T)], dim=1)


@pytest.mark.parametrize("name, extra", [("asa", {}), ("asa_global_mla", {}), ("full", {}),
                                         ("nsa", {}), ("nsa", {"nsa_kv": "per_branch"})])
@torch.no_grad()
def test_decode_follows_parameter_changes(name, extra):
    """After the weights change in place (an optimiser step), and again after a new set is
    loaded, the decode steps give the training forward's logits of the changed model: the merged
    weights are rebuilt, not stale."""
    torch.manual_seed(0)
    model = Transformer(config(name, **extra)).double().eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, T))
    caches = new_caches(model.cfg, 2, T, torch.float64)
    model(tokens[:, :10], caches)
    model.decode(tokens[:, 10], caches)  # builds the merged weights
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    torch.testing.assert_close(step_logits(model, tokens, 12), model(tokens)[:, 12:],
                               rtol=0, atol=1e-10)
    model.load_state_dict(Transformer(config(name, **extra)).double().state_dict())
    torch.testing.assert_close(step_logits(model, tokens, 12), model(tokens)[:, 12:],
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_a_step_runs_its_projections_as_merged_gemms(name):
    """In a decode step no layer calls its query, key/value, latent, RoPE-key, gate or MLP
    gate/up projections one by one (they run as one GEMM of the merged ``w_in``); latent layers
    do not call ``wo`` either (``W_uv`` is absorbed into ``w_out``), grouped ones call it once."""
    torch.manual_seed(0)
    model = Transformer(config(name)).double().eval()
    calls: dict[str, int] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(
                lambda m, i, o, path=path: calls.__setitem__(path, calls.get(path, 0) + 1))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, T))
    caches = new_caches(model.cfg, 2, T, torch.float64)
    model(tokens[:, :10], caches)
    calls.clear()
    model.decode(tokens[:, 10], caches)
    want = {"lm_head": 1}
    for i, block in enumerate(model.blocks):
        want[f"blocks.{i}.mlp.w_down"] = 1
        if not block.attn.spec.latent:
            want[f"blocks.{i}.attn.wo"] = 1
    assert calls == want


@torch.no_grad()
def test_merged_weight_shapes(monkeypatch):
    """Latent layers: the query rows are ``H * (group_dim + rope_dim)`` (``W_uk`` absorbed),
    then the latent, the RoPE key and the gate; ``w_out`` is ``(d_model, H * group_dim)``.
    Grouped layers: ``wq``, ``wk``, ``wv`` (and the gate) stacked, no ``w_out``. The MLP: its gate
    and up projections."""
    monkeypatch.setattr(layer, "MERGED_UP_PROJECTIONS_MIN_BATCH", 2)  # keeps w_in_heads too
    for name in ("asa", "nsa"):
        model = Transformer(config(name))
        model.refresh_step_weights()
        cfg = model.cfg
        for block in model.blocks:
            attn, spec = block.attn, block.attn.spec
            w = attn.step_weights.tensors
            gate = 0 if attn.gate is None else attn.gate.out_features
            if spec.latent:
                rows = (cfg.n_heads * (spec.group_dim + cfg.rope_dim) + cfg.latent_dim
                        + cfg.rope_dim + gate)
                assert w["w_out"].shape == (cfg.d_model, cfg.n_heads * spec.group_dim)
                # small batches' stack: the query without W_uk (head_dim + rope_dim a head)
                assert w["w_in_heads"].shape == (
                    rows - cfg.n_heads * (spec.group_dim - cfg.head_dim), cfg.d_model)
            else:
                rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + gate
                assert w["w_out"] is None and "w_in_heads" not in w
            assert w["w_in"].shape == (rows, cfg.d_model)
            assert (w["b_in"] is None) == (attn.gate is None)
            assert block.mlp.step_weights.tensors["w_in"].shape == (2 * cfg.mlp_hidden,
                                                                    cfg.d_model)


@torch.no_grad()
def test_per_head_stack_is_kept_only_while_small_batches_use_it(monkeypatch):
    """``w_in_heads`` costs memory: built when ``MERGED_UP_PROJECTIONS_MIN_BATCH`` > 1, dropped
    when it is back at 1, each on the next refresh."""
    model = Transformer(config("asa"))
    attn = next(b.attn for b in model.blocks if b.attn.spec.latent)
    for threshold, kept in ((1, False), (3, True), (1, False)):
        monkeypatch.setattr(layer, "MERGED_UP_PROJECTIONS_MIN_BATCH", threshold)
        model.refresh_step_weights()
        assert ("w_in_heads" in attn.step_weights.tensors) is kept


def test_merged_weights_rebuild_in_place_when_a_parameter_changes():
    lin = nn.Linear(4, 3)
    merged = MergedWeights(lambda: {"w": lin.weight * 2, "none": None}, lambda: [lin.weight])
    first = merged.refresh()["w"]
    torch.testing.assert_close(first, lin.weight.detach() * 2)
    assert merged.refresh()["w"] is first  # nothing changed: not rebuilt
    with torch.no_grad():
        lin.weight.add_(1.0)  # in place: same tensor, new values (a CUDA graph keeps its address)
    assert merged.refresh()["w"] is first
    torch.testing.assert_close(first, lin.weight.detach() * 2)
    lin.double()  # new dtype: a new tensor
    again = merged.refresh()["w"]
    assert again is not first and again.dtype == torch.float64


def test_stack_pads_missing_biases_with_zeros():
    w1, w2, b2 = torch.ones(2, 3), torch.full((1, 3), 2.0), torch.tensor([5.0])
    weight, bias = stack([(w1, None), (w2, b2)])
    assert weight.shape == (3, 3) and bias.tolist() == [0.0, 0.0, 5.0]
    assert stack([(w1, None)])[1] is None


def test_parameter_watch_sees_updates_replacements_and_moves():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    watch = ParameterWatch(model)
    state = watch.state()
    assert watch.state() == state  # nothing changed
    with torch.no_grad():
        model[0].weight.add_(1.0)  # in place: the version counter moves
    assert watch.state() != state
    state = watch.state()
    model[1].bias = nn.Parameter(torch.zeros(2))  # a new object in the module
    assert watch.state() != state
    state = watch.state()
    model.double()  # new storage
    assert watch.state() != state


@torch.no_grad()
def test_refresh_is_skipped_unless_something_changed_or_forced():
    """One cheap check of the whole model per step; writes through ``.data`` bypass the version
    counters, which ``force=True`` covers."""
    torch.manual_seed(0)
    model = Transformer(config("asa")).double().eval()
    model.refresh_step_weights()
    w_in = model.blocks[0].attn.step_weights.tensors["w_in"]
    before = w_in.clone()
    model.blocks[0].attn.wq.weight.data.mul_(2.0)  # invisible to the version counters
    model.refresh_step_weights()
    assert torch.equal(w_in, before)
    model.refresh_step_weights(force=True)
    assert not torch.equal(w_in, before)  # rebuilt in place
    assert model.blocks[0].attn.step_weights.tensors["w_in"] is w_in
