"""CUDA-graph decoding (nsa_lit.decode_graph) replays exactly what eager decoding computes."""
import pytest
import torch

from nsa_lit.cache import new_caches
from nsa_lit.config import ModelConfig
from nsa_lit.decode_graph import GraphedDecode
from nsa_lit.generate import generate
from nsa_lit.model import Transformer
from test_gpu_training import ARCH
from test_model import VARIANTS

pytestmark = pytest.mark.gpu
T = 256  # window 128, compression blocks 32 / stride 16, selection blocks 64, q_share 4
PROMPTS = torch.tensor([1, 70, 130])
ONE_LENGTH = torch.tensor([70, 70, 70])  # one position: a graph per StepPlan


def _model(name, backend):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**ARCH, **VARIANTS[name], "kernel_backend": backend})
    return Transformer(cfg).cuda().float().eval()


@pytest.mark.parametrize("backend, compiled, prompts", [
    ("triton", False, PROMPTS), ("reference", False, PROMPTS), ("triton", True, PROMPTS),
    ("triton", False, ONE_LENGTH), ("triton", True, ONE_LENGTH)])
@pytest.mark.parametrize("name", ["asa", "nsa", "full", "alternating_gqa"])
@torch.no_grad()
def test_graph_replays_equal_eager_steps(name, backend, compiled, prompts):
    """Two copies of the same prefilled caches, one decoded eagerly and one through the graphs,
    across compression/selection blocks, query-sharing groups and the window's wrap-around:
    the logits of every step and the final caches agree. Prompts of one length replay one graph
    per step plan (several where the layers compress), others one masked graph. ``compiled``:
    the graphs replay a copy of the model whose steps ``compile_decode`` compiled
    (``decode.py --modes compiled``); the fused code rounds differently, hence the wider
    tolerance."""
    model = graphed_model = _model(name, backend)
    tol = 1e-5
    if compiled:
        torch._dynamo.reset()
        graphed_model, tol = _model(name, backend), 1e-4
        graphed_model.compile_decode()
    tokens = torch.randint(0, 512, (3, T), device="cuda")
    eager, graphed = (new_caches(model.cfg, 3, T, torch.float32, "cuda") for _ in range(2))
    for caches in (eager, graphed):
        model(tokens[:, : int(prompts.max())], caches, prompts.cuda())
    step = GraphedDecode(graphed_model, graphed)
    rows, pos = torch.arange(3, device="cuda"), prompts.cuda().clone()
    for i in range(T - int(prompts.max())):
        want = model.decode(tokens[rows, pos], eager)
        got = step(tokens[rows, pos])
        torch.testing.assert_close(got, want, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name} step {i}: {m}")
        pos += 1
    one_plan = name == "full" or prompts is PROMPTS
    assert (len(step.graphs) == 1) if one_plan else (len(step.graphs) > 1), list(step.graphs)
    for a, b in zip(eager, graphed):
        assert a.longest == b.longest == T
        assert torch.equal(a.lengths, b.lengths)
        for x, y in zip([*a.raw, *(a.compressed or ())], [*b.raw, *(b.compressed or ())]):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    if compiled:
        torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True])
def test_graph_replays_per_head_up_projections(compiled, monkeypatch):
    """Steps of latent layers through ``wq``, ``wo`` and the per-head ``W_uk`` / ``W_uv``
    (batches under ``MERGED_UP_PROJECTIONS_MIN_BATCH``) replay in graphs as they run eagerly
    (the CPU tests check them against the training forward)."""
    from nsa_lit.attention import layer

    monkeypatch.setattr(layer, "MERGED_UP_PROJECTIONS_MIN_BATCH", 4)
    test_graph_replays_equal_eager_steps("asa", "triton", compiled, PROMPTS)


@pytest.mark.parametrize("prompts", [[[5, 6, 7], list(range(1, 100)), [9] * 17], [[5, 6, 7]]],
                         ids=["lengths_differ", "one_prompt"])
@pytest.mark.parametrize("name", ["asa", "nsa"])
def test_generate_with_and_without_graphs(name, prompts):
    model = _model(name, "triton")
    eager = generate(model, prompts, 80, cuda_graph=False)
    graphed = generate(model, prompts, 80, cuda_graph=True)
    assert graphed == eager


@torch.no_grad()
def test_graph_replay_refuses_a_full_cache():
    model = _model("asa", "triton")
    caches = new_caches(model.cfg, 2, 6, torch.float32, "cuda")
    step = GraphedDecode(model, caches)
    for _ in range(6):
        step(torch.zeros(2, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="decode cache full"):
        step(torch.zeros(2, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match=r"tokens must be \(2,\)"):
        step(torch.zeros(3, dtype=torch.long, device="cuda"))


@pytest.mark.parametrize("name", ["asa", "full"])
@torch.no_grad()
def test_graph_replays_follow_parameter_changes(name):
    """Weights changed in place between replays (an optimiser step): the next replays use the
    changed model (the merged step weights are refreshed in place, at the addresses the graphs
    captured), and give its eager steps' logits."""
    model = _model(name, "triton")
    tokens = torch.randint(0, 512, (2, T), device="cuda")
    eager, graphed = (new_caches(model.cfg, 2, T, torch.float32, "cuda") for _ in range(2))
    for caches in (eager, graphed):
        model(tokens[:, :70], caches)
    step = GraphedDecode(model, graphed)
    for t in range(70, 150):
        if t == 110:  # every plan's graph captured by now
            for p in model.parameters():
                p.mul_(1.05)
        got = step(tokens[:, t])  # first: the replay itself must refresh the weights
        want = model.decode(tokens[:, t], eager)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name} step {t}: {m}")
