"""Decoding: caches, incremental decode == full forward for every variant, generation, reports."""
import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from nsa_lit import generate as gen
from nsa_lit import kv_report
from nsa_lit.cache import (GroupedKVCache, LatentKVCache, LatentWindowCache, StepPlan,
                           layer_cache, new_caches)
from nsa_lit.data.tokenizer import train_bpe
from nsa_lit.lit_module import LanguageModel, OptimConfig
from nsa_lit.model import Transformer
from nsa_lit.attention import layer as layer_module
from test_model import SMALL, VARIANTS, config

T = 64  # SMALL: window 12, compression blocks 8 / stride 4, selection blocks 8, top_n 3, q_share 4
PROMPTS = torch.tensor([1, 14, 31])  # decode starts at, inside and across q_share groups
ONE_LENGTH = torch.tensor([14, 14])  # every sequence at one position: steps follow a StepPlan


def cache_state(cache):
    state = {"lengths": cache.lengths, "raw0": cache.raw[0], "raw1": cache.raw[1]}
    if cache.compressed is not None:
        state.update(cmp0=cache.compressed[0], cmp1=cache.compressed[1])
    if cache.block_idx is not None:
        state["block_idx"] = cache.block_idx
    return state


def decode_matches_forward(model: Transformer, prompts: torch.Tensor, T: int, name: str):
    """Random tokens ``(len(prompts), T)``: prefill sequence ``b``'s first ``prompts[b]`` tokens into
    fresh float64 caches, then decode one token a step to ``T``; every prefill and decode logit must
    equal the training forward's. Returns ``(tokens, caches, positions)`` (positions all ``T``)."""
    cfg = model.cfg
    B = len(prompts)
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    full = model(tokens)
    caches = new_caches(cfg, B, T, torch.float64)
    prefill = model(tokens[:, : int(prompts.max())], caches, prompts)
    for b, n in enumerate(prompts.tolist()):
        torch.testing.assert_close(prefill[b, :n], full[b, :n], rtol=0, atol=1e-12)
    rows, pos = torch.arange(B), prompts.clone()
    while int(pos.max()) < T:
        logits = model.decode(tokens[rows, pos], caches)
        torch.testing.assert_close(logits, full[rows, pos], rtol=0, atol=1e-10,
                                   msg=lambda m: f"{name} at positions {pos.tolist()}: {m}")
        pos += 1
    return tokens, caches, pos


@pytest.mark.parametrize("prompts", [PROMPTS, ONE_LENGTH], ids=["lengths_differ", "one_length"])
@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_decode_gives_the_full_forward_logits_at_every_position(name, prompts):
    """Prefill prompts of different lengths (each step computes the compressor and the block
    scores for all, keeping each sequence's own) or of one length (each step does what its
    ``StepPlan`` says), then decode to the end of the longest: every logit equals the training
    forward's, across compression and selection blocks, query-sharing groups and the window's
    ring wrap-around; and the decoded caches equal a prefill of the whole text."""
    cfg = config(name)
    model = Transformer(cfg).double()
    tokens, caches, pos = decode_matches_forward(model, prompts, T, name)
    reference = new_caches(cfg, len(prompts), T, torch.float64)
    model(tokens, reference, pos)
    for layer, (got, want) in enumerate(zip(caches, reference)):
        want = cache_state(want)
        for key, value in cache_state(got).items():
            torch.testing.assert_close(value, want[key], rtol=0, atol=1e-12,
                                       msg=lambda m: f"{name} layer {layer} {key}: {m}")


LATENT_VARIANTS = [n for n in VARIANTS
                   if any(config(n).layer(kind).latent for kind in config(n).layer_pattern)]


@pytest.mark.parametrize("name", LATENT_VARIANTS)
@torch.no_grad()
def test_small_batches_decode_through_per_head_up_projections(name, monkeypatch):
    """Below ``MERGED_UP_PROJECTIONS_MIN_BATCH`` a latent layer's step multiplies by ``wq`` and
    ``wo`` and applies ``W_uk`` / ``W_uv`` per head instead of the merged weights: the same
    logits as the training forward at every position, and ``wo`` runs once a latent layer."""
    monkeypatch.setattr(layer_module, "MERGED_UP_PROJECTIONS_MIN_BATCH", len(PROMPTS) + 1)
    model = Transformer(config(name)).double()
    calls = []
    for block in model.blocks:
        if block.attn.spec.latent:
            block.attn.wo.register_forward_hook(lambda *_: calls.append(1))
    decode_matches_forward(model, PROMPTS, T, name)
    steps = T - int(PROMPTS.max())  # decode_matches_forward steps every sequence together
    latent_layers = sum(block.attn.spec.latent for block in model.blocks)
    assert len(calls) == 2 * latent_layers + steps * latent_layers  # 2 forwards, then the steps


def test_step_plan_is_known_when_every_sequence_is_at_one_position():
    """``cache.plan()``: a compression block ends at the new token ``p`` when ``p - 7`` is a
    multiple of the stride 4 (blocks of 8); a query-sharing group opens when ``p % 4 == 0``;
    ``None`` when the sequences are at different positions; ``False`` for what a cache lacks."""
    cfg = config("asa")
    model = Transformer(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    uniform, mixed = new_caches(cfg, 2, 40, torch.float64), new_caches(cfg, 2, 40, torch.float64)
    model(tokens[:, :14], uniform, torch.tensor([14, 14]))
    model(tokens[:, :14], mixed, torch.tensor([14, 13]))
    local, glob = uniform  # layer_pattern "LG"
    for p in range(14, 40):
        assert local.plan() == StepPlan(compress=False, select=False)
        assert glob.plan() == StepPlan(compress=p >= 7 and (p - 7) % 4 == 0, select=p % 4 == 0)
        assert mixed[1].plan() == StepPlan(None, None)
        model.decode(tokens[:, p], uniform)
        model.decode(tokens[:, p], mixed)
    assert layer_cache(config("full"), 0, 2, 40).plan() == StepPlan(False, False)
    nsa = config("nsa", nsa_kv="per_branch")
    assert layer_cache(nsa, 0, 1, 40).plan() == StepPlan(False, True)  # p = 0: no block yet
    assert layer_cache(config("nsa_no_compression"), 0, 1, 40).plan() == StepPlan(False, True)


@pytest.mark.parametrize("prompts, calls", [(ONE_LENGTH, 4), (torch.tensor([14, 13]), 16)])
@torch.no_grad()
def test_a_known_plan_skips_the_compressor_and_the_block_scoring(monkeypatch, prompts, calls):
    """16 steps of the ASA global layer: with every sequence at one position the compressor runs
    only when a block ends (4 times) and blocks are scored only when a query-sharing group opens
    (4 times); at different positions both run every step, their results masked."""
    import kernels
    from nsa_lit.attention import Attention

    counts = {"compress": 0, "score": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Attention, "_compress", counted("compress", Attention._compress))
    monkeypatch.setattr(kernels, "select_blocks_decode",
                        counted("score", kernels.select_blocks_decode))
    cfg = config("asa")
    model = Transformer(cfg).double()
    caches = new_caches(cfg, 2, 40, torch.float64)
    model(torch.randint(0, 97, (2, 14)), caches, prompts)
    counts.update(compress=0, score=0)
    for _ in range(16):
        model.decode(torch.randint(0, 97, (2,)), caches)
    assert counts == {"compress": calls, "score": calls}


@pytest.mark.parametrize("name", ["asa", "nsa"])
@torch.no_grad()
def test_decode_from_an_empty_cache(name):
    cfg = config(name)
    model = Transformer(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    full = model(tokens)
    caches = new_caches(cfg, 2, 40, torch.float64)
    steps = torch.stack([model.decode(tokens[:, t], caches) for t in range(40)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["asa", "nsa", "full"])
@torch.no_grad()
def test_decode_updates_the_caches_in_place(name):
    """What lets a decode step be captured as a CUDA graph (nsa_lit.decode_graph): every
    step writes into the same tensors (a graph replays on fixed addresses), and the host-side
    ``longest`` follows the lengths."""
    cfg = config(name)
    model = Transformer(cfg).double()
    caches = new_caches(cfg, 2, 40, torch.float64)
    model(torch.randint(0, 97, (2, 9)), caches, torch.tensor([9, 5]))

    def storage(cache):
        tensors = [cache.lengths, *cache.raw, *(cache.compressed or ()), cache.block_idx]
        return [t.data_ptr() for t in tensors if t is not None]

    before = [storage(c) for c in caches]
    for _ in range(20):
        model.decode(torch.randint(0, 97, (2,)), caches)
    assert [storage(c) for c in caches] == before
    for cache in caches:
        assert cache.lengths.tolist() == [29, 25] and cache.longest == 29


@torch.no_grad()
@pytest.mark.parametrize("prompts", [torch.tensor([5, 14]), ONE_LENGTH],
                         ids=["lengths_differ", "one_length"])
def test_compiled_decode_equals_eager_and_compiles_once(prompts):
    """``compile_decode``: the same logits and caches as the eager step, across compression
    block ends, query-sharing groups and the window's wrap-around, and no recompilation as the
    positions advance (the host bookkeeping, ``reserve``, stays outside the compiled code): one
    compilation per step plan, all seen in the first 4 steps (the plans repeat every 4 here)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = config("asa")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    caches = [new_caches(cfg, 2, 40) for _ in range(2)]
    for c in caches:
        model(tokens[:, :14], c, prompts)
    eager = [model.decode(tokens[:, 14 + i], caches[0]) for i in range(20)]
    model.compile_decode()
    graphs, plans = [], set()
    for i in range(20):
        plans |= {(c.latent, c.compressed is not None, c.plan()) for c in caches[1]}
        torch.testing.assert_close(model.decode(tokens[:, 14 + i], caches[1]), eager[i],
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")
        graphs.append(counters["stats"]["unique_graphs"])
    for a, b in zip(caches[0], caches[1]):
        for name, t in cache_state(a).items():
            torch.testing.assert_close(cache_state(b)[name], t, rtol=1e-5, atol=1e-5)
        assert b.longest == a.longest == 34
    assert graphs[-1] == graphs[3] > 0, graphs  # compiled in the first steps, then reused
    # local: one plan; global: one (masked) plan, or three (a block ends, a group opens, neither)
    assert len(plans) == (4 if len(set(prompts.tolist())) == 1 else 2), plans
    assert graphs[-1] == len(plans), (graphs, plans)  # one graph per (layer kind, plan)
    torch._dynamo.reset()


def test_graphed_decode_needs_cuda():
    from nsa_lit.decode_graph import GraphedDecode

    model = Transformer(config("asa"))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphedDecode(model, new_caches(model.cfg, 1, 8))


def test_query_sharing_keeps_the_first_querys_blocks():
    # decode of a shared-selection model differs from the same weights without sharing exactly
    # where the training forward says so; a decode that re-selected at every step would not.
    shared = Transformer(config("asa")).double()
    unshared = Transformer(config("asa", q_share=1)).double()
    unshared.load_state_dict(shared.state_dict())
    tokens = torch.randint(0, 97, (1, T))
    for model in (shared, unshared):
        caches = new_caches(model.cfg, 1, T, torch.float64)
        with torch.no_grad():
            steps = torch.stack([model.decode(tokens[:, t], caches) for t in range(T)], dim=1)
            torch.testing.assert_close(steps, model(tokens), rtol=0, atol=1e-10)
    with torch.no_grad():
        assert (shared(tokens) - unshared(tokens))[:, 32:].abs().amax() > 1e-4


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("max_len", [64, 44, 5])
def test_caches_hold_what_the_formula_says(name, max_len):
    cfg = config(name)
    for kind in set(cfg.layer_kinds):
        cache = layer_cache(cfg, kind, 2, max_len, torch.float64)
        expected = 2 * cfg.layer(kind).kv_elements(max_len) * 8
        assert cache.bytes_allocated() == expected, (name, kind)
        meta = layer_cache(cfg, kind, 2, max_len, torch.float64, device="meta")
        assert meta.bytes_allocated() == expected
        latent = cfg.layer(kind).latent
        want = {("L", True): LatentWindowCache, ("G", True): LatentKVCache}.get(
            (kind, latent), GroupedKVCache)
        assert type(cache) is want
        if want is LatentWindowCache:  # a ring of the window, never more
            assert cache.raw[0].shape == (2, min(cfg.window, max_len), 1, cfg.latent_dim)
            assert cache.raw[1].shape == (2, min(cfg.window, max_len), 1, cfg.rope_dim)


def test_cache_limits_are_clear():
    cfg = config("asa")
    with pytest.raises(ValueError, match=r"max_len \(65\) exceeds the model's seq_len \(64\)"):
        new_caches(cfg, 1, 65)
    model = Transformer(cfg)
    caches = new_caches(cfg, 1, 4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), caches)
        model.decode(torch.zeros(1, dtype=torch.long), caches)
        with pytest.raises(ValueError, match="max_len=4"):
            model.decode(torch.zeros(1, dtype=torch.long), caches)


# -- generation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asa_model():
    torch.manual_seed(0)
    return Transformer(config("asa")).double()


def test_greedy_generation_continues_like_the_full_forward(asa_model):
    prompts = [[5, 6, 7], list(range(10, 30)), [3]]
    out = gen.generate(asa_model, prompts, 12)
    for prompt, new in zip(prompts, out):
        seq = list(prompt)
        for token in new:  # greedy by re-running the training forward on the whole text
            logits = asa_model(torch.tensor([seq]))[0, -1]
            assert token == int(logits.argmax())
            seq.append(token)
        assert len(new) == 12
    # a batch gives each prompt what it gets alone
    assert [gen.generate(asa_model, [p], 12)[0] for p in prompts] == out


def test_sampling_top_k_1_and_tiny_top_p_are_greedy(asa_model):
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    greedy = gen.generate(asa_model, prompts, 10)
    assert gen.generate(asa_model, prompts, 10, temperature=2.0, top_k=1, seed=3) == greedy
    assert gen.generate(asa_model, prompts, 10, temperature=2.0, top_p=1e-6, seed=3) == greedy
    a = gen.generate(asa_model, prompts, 10, temperature=5.0, seed=1)
    assert a == gen.generate(asa_model, prompts, 10, temperature=5.0, seed=1)
    assert a != greedy


def test_sample_next_respects_top_k_and_top_p():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().expand(4000, -1)
    g = torch.Generator().manual_seed(0)

    def drawn(**kw):
        return set(gen.sample_next(logits, 1.0, generator=g, **kw).tolist())

    assert drawn() == {0, 1, 2, 3, 4}
    assert drawn(top_k=3) == {1, 3, 4}
    assert drawn(top_p=0.65) == {1, 3}  # 0.4 + 0.3 reaches 0.65; 0.4 alone does not
    assert drawn(top_p=0.71) == {1, 3, 4}
    assert drawn(top_k=3, top_p=0.5) == {1, 3}
    assert gen.sample_next(logits[:2], 0.0).tolist() == [1, 1]
    counts = torch.bincount(gen.sample_next(logits, 1.0, generator=g), minlength=5) / 4000
    torch.testing.assert_close(counts, probs, rtol=0, atol=0.03)


def test_generation_stops_at_eos(asa_model):
    greedy = gen.generate(asa_model, [[4, 5, 6]], 8)[0]
    eos = greedy[2]
    stop = greedy.index(eos) + 1
    assert gen.generate(asa_model, [[4, 5, 6], [4, 5, 6]], 8, eos_id=eos) == [greedy[:stop]] * 2


def test_bad_generation_requests_are_refused(asa_model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate(asa_model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match=r"prompt 0 has 60 tokens.*seq_len \(64\)"):
        gen.generate(asa_model, [list(range(60))], 5)
    with pytest.raises(ValueError, match=r"seq_len \(64\)"):
        gen.generate(asa_model, [list(range(70))], 1)
    with pytest.raises(ValueError, match="vocab_size"):
        gen.generate(asa_model, [[97]], 1)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(asa_model, [[1]], 1, temperature=1.0, top_p=0.0)
    assert len(gen.generate(asa_model, [list(range(59))], 5)[0]) == 5  # exactly fits


# -- KV report -----------------------------------------------------------------------------------
def test_kv_report_measures_the_caches(tmp_path, capsys):
    paths = []
    for name in ("asa", "nsa", "full"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": {"arch": {**SMALL, **VARIANTS[name]}}}))
        paths.append(str(path))
    rows = kv_report.main(["--config", *paths, "--context", "32", "64", "128", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "vs nsa" in out and " NO" not in out
    assert len(rows) == 9 and all(r["allocated"] == r["formula"] for r in rows)
    by = {(r["config"], r["context"]): r for r in rows}
    asa, nsa = by[(paths[0], 64)], by[(paths[1], 64)]
    assert nsa["ratio"] == 1.0 and asa["ratio"] == asa["allocated"] / nsa["allocated"] < 0.5
    cfg = config("asa")
    assert asa["allocated"] == 4 * sum(spec.kv_elements(64) for spec in cfg.layers)
    meta, _ = kv_report.report(paths, [128], dtype="bf16", device="meta")
    assert [r["allocated"] for r in meta] == [by[(p, 128)]["allocated"] // 2 for p in paths]


# -- predict from a checkpoint -------------------------------------------------------------------
class ToyData(L.LightningDataModule):
    def __init__(self, tokenizer: str, data_dir: str, vocab_size: int = 300):
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab_size, (16, 33), generator=g)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4)


def train_tiny_checkpoint(tmp, tokenizer: str, tokenizer_dir, *, vocab_size: int, seq_len: int,
                          data_vocab: int = 300, steps: int = 2):
    """A tiny ASA model trained ``steps`` steps on :class:`ToyData` (whose hyperparameters name
    ``tokenizer`` in ``tokenizer_dir``), saved as ``tmp/tiny.ckpt``: ``(path, LanguageModel)``."""
    module = LanguageModel(config("asa", vocab_size=vocab_size, seq_len=seq_len), OptimConfig(warmup_steps=1))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    trainer.fit(module, datamodule=ToyData(tokenizer, str(tokenizer_dir), vocab_size=data_vocab))
    path = tmp / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path, module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    train_bpe("bpe:300", iter(["the quick brown fox jumps over the lazy dog"] * 50), tmp)
    path, module = train_tiny_checkpoint(tmp, "bpe:300", tmp, vocab_size=320, seq_len=32)
    return path, module.model


def test_predict_generates_from_a_prompt_file(checkpoint, tmp_path, capsys):
    path, trained = checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown\n\nover the lazy dog\n")
    completions = gen.main(["--ckpt_path", str(path), "--prompt_file", str(prompts),
                            "--per_line", "--max_new_tokens", "6", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 2 and "the quick brown" in out
    model, data = gen.load_checkpoint(path)
    tokenizer = gen.checkpoint_tokenizer(model.cfg, data)
    for text, completion in zip(["the quick brown", "over the lazy dog"], completions):
        expected = gen.generate(trained, [tokenizer.encode(text)], 6, eos_id=tokenizer.eos_id)[0]
        assert completion == tokenizer.decode([t for t in expected if t != tokenizer.eos_id])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        gen.main(["--ckpt_path", str(path), "--prompt_file", str(empty)])


def test_predict_with_compiled_decode_steps_writes_the_same_text(checkpoint, tmp_path):
    path, _ = checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown\nover the lazy dog\n")
    args = ["--ckpt_path", str(path), "--prompt_file", str(prompts), "--per_line",
            "--max_new_tokens", "12", "--device", "cpu"]
    torch._dynamo.reset()
    assert gen.main(args + ["--compile"]) == gen.main(args)
    torch._dynamo.reset()


def test_checkpoint_mismatch_is_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    model, data = gen.load_checkpoint(path)
    big = tmp_path / "big"
    train_bpe("bpe:400", iter([" ".join(f"w{i}x{i * 7}" for i in range(400))] * 3), big)
    with pytest.raises(ValueError, match=r"has \d+ tokens, more than .*vocab_size \(320\)"):
        gen.checkpoint_tokenizer(model.cfg, data, "bpe:400", str(big))
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"]["arch"]["d_model"] = 48
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match="weights do not fit its model.arch"):
        gen.load_checkpoint(bad)
