"""Attention benchmarks on one GPU: forward and forward+backward median ms and TFLOP/s.

    python3 benchmarks/attention.py                                  # every case, every T
    python3 benchmarks/attention.py --cases window,flex --T 8192,65536 --out h200-window

Every call processes ``--tokens`` tokens (default 65,536): batch = tokens / T. A case is a named
builder that makes its inputs for one T and reports its forward FLOPs, counted analytically from
what the branch computes (2 * visible keys * (Dqk + Dv) per query and head; inputs from seed 0,
so every run times the same block picks); forward+backward
counts the backward as 2.5 forward passes (FlashAttention's convention), so 3.5x in all.
``--cases`` selects cases by name or by group. ``--out NAME`` writes
``benchmarks/results/NAME.json`` (a value with a ``/`` or ending in ``.json`` is used as the path);
the file is rewritten after every measurement, so a run cut short keeps what it measured.
``--profile N`` also prints, per case and T, the N operators that take the most GPU time in
forward+backward (``torch.profiler``), to see where a layer spends its time outside the kernels
(also stored in the results as ``profile``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_configs import (  # noqa: E402
    ASA_340M,
    ASA_340M_ABSORBED,
    FLA_NSA_340M,
    FLA_NSA_NO_WINDOW,
    FULL_340M,
    NSA_340M,
    layer_spec,
)
from nsa_lit.config import Branch, Form, LayerSpec, ModelConfig  # noqa: E402
from nsa_lit.model_stats import (  # noqa: E402  (FLOP counting shared with the library)
    attention_flops,
    attention_flop_parts,
    matmul_flops_per_token,
    visible_causal,
    visible_window,
)
from results_log import ResultsLog, run_record  # noqa: E402

BWD_FLOP_FACTOR = 2.5
DEFAULT_T = (8192, 16384, 32768, 65536)
BENCH_REP_MS = 1000  # timed calls per measurement: ~1 s, at least 10 samples of a 100 ms call


@dataclass
class Bench:
    """One built problem: ``fwd()`` returns the output (or the outputs of branches a layer mixes
    later); gradients flow to ``inputs``. ``flops_fwd_bwd``: forward + backward FLOPs, counted by
    kind of work (default: all of ``flops_fwd`` is attention, :func:`fwd_bwd_flops`)."""

    fwd: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]
    inputs: list[torch.Tensor]
    flops_fwd: float
    shape: dict = field(default_factory=dict)
    flops_fwd_bwd: float | None = None

    def __post_init__(self) -> None:
        if self.flops_fwd_bwd is None:
            self.flops_fwd_bwd = fwd_bwd_flops(attention=self.flops_fwd)


def fwd_bwd_flops(attention: float = 0.0, matmul: float = 0.0, scoring: float = 0.0) -> float:
    """Forward + backward FLOPs from forward FLOPs by kind: attention ``1 + BWD_FLOP_FACTOR``
    (flash backward recomputes the scores), matrix products 3 (two products per weight
    backward), block scoring 1 (no gradient)."""
    return attention * (1 + BWD_FLOP_FACTOR) + 3.0 * matmul + scoring


@dataclass
class Case:
    """A named benchmark of layer ``kind`` of ``cfg``: ``build(T, B)`` makes its inputs."""

    name: str
    group: str
    cfg: ModelConfig
    kind: str
    build: Callable[[int, int], Bench]
    needs: Callable[[], str | None] = lambda: None


def case(name: str, group: str, builder: Callable, cfg: ModelConfig, kind: str,
         needs: Callable[[], str | None] | None = None, **options) -> Case:
    """``Case`` of ``builder(cfg, kind, **options)``."""
    return Case(name, group, cfg, kind, builder(cfg, kind, **options), needs or (lambda: None))


DEVICE = "cuda"  # the tests build cases on the CPU


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)


def visible_nsa(T: int, block: int, top_n: int) -> float:
    """Mean compressed tokens (whole blocks ended) plus selected raw tokens per query, as fla's
    ``parallel_nsa`` computes them."""
    total = 0.0
    for t in range(T):
        total += (t + 1) // block + min(top_n, -(-(t + 1) // block)) * block
    return total / T


def window_case(cfg: ModelConfig, kind: str, kv_heads: int | None = None, tma: bool = True):
    """Our sliding-window kernel (through the dispatcher) at the window branch's shape in layer
    ``kind`` of ``cfg`` (its training form); ``kv_heads`` overrides the key/value heads (1: MQA);
    ``tma=False``: tiles by row offsets even where TMA descriptors could serve."""
    def build(T: int, B: int) -> Bench:
        from kernels import dispatch
        from kernels.sliding_window.triton_kernel import _sliding_window_attention

        spec = layer_spec(cfg, kind, T)
        H, Hk = spec.n_heads, kv_heads or spec.attention_heads(Branch.WINDOW)
        Dqk, Dv = spec.dims(Branch.WINDOW)
        q, k, v = _randn(B, T, H, Dqk), _randn(B, T, Hk, Dqk), _randn(B, T, Hk, Dv)

        def fwd():
            if tma:
                return dispatch.sliding_window_attention(q, k, v, spec.window, spec.scale)
            return _sliding_window_attention(q, k, v, spec.window, spec.scale,
                                             cfg={"tma": False})

        return Bench(
            fwd=fwd,
            inputs=[q, k, v],
            flops_fwd=attention_flops(B * T, H, Dqk, Dv, visible_window(T, spec.window)),
            shape=dict(H=H, Hk=Hk, Dqk=Dqk, Dv=Dv, window=spec.window),
        )

    return build


def flex_window_case(cfg: ModelConfig, kind: str, kv_heads: int | None = None):
    """FlexAttention's sliding window at the shape of :func:`window_case`."""
    def build(T: int, B: int) -> Bench:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # a fresh compile per (case, T): each shape and mask adds a dynamo cache entry, and past
        # its recompile limit (8) dynamo would silently run FlexAttention eagerly
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)

        spec = layer_spec(cfg, kind, T)
        H, Hk = spec.n_heads, kv_heads or spec.attention_heads(Branch.WINDOW)
        Dqk, Dv = spec.dims(Branch.WINDOW)
        window = spec.window

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        mask = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
        q, k, v = _randn(B, H, T, Dqk), _randn(B, Hk, T, Dqk), _randn(B, Hk, T, Dv)
        return Bench(
            fwd=lambda: flex(q, k, v, block_mask=mask, scale=spec.scale, enable_gqa=Hk != H),
            inputs=[q, k, v],
            flops_fwd=attention_flops(B * T, H, Dqk, Dv, visible_window(T, window)),
            shape=dict(H=H, Hk=Hk, Dqk=Dqk, Dv=Dv, window=window),
        )

    return build


def sdpa_causal_case(cfg: ModelConfig, kind: str):
    """SDPA causal attention at the width of ``cfg``'s layer ``kind`` (keys and values expanded
    to every query head before timing, so the fastest SDPA backend serves it)."""
    def build(T: int, B: int) -> Bench:
        import torch.nn.functional as F

        spec = layer_spec(cfg, kind, T)
        H, D = spec.n_heads, spec.head_dim
        q, k, v = _randn(B, H, T, D), _randn(B, H, T, D), _randn(B, H, T, D)
        return Bench(
            fwd=lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5),
            inputs=[q, k, v],
            flops_fwd=attention_flops(B * T, H, D, D, visible_causal(T)),
            shape=dict(H=H, Hk=spec.kv_heads, Dqk=D, Dv=D,
                       note="k, v expanded to H heads before timing"),
        )

    return build


def fla_nsa_case(cfg: ModelConfig, kind: str = "N"):
    """fla's ``parallel_nsa`` (compression + selection, no window) at ``cfg``'s NSA shape."""
    def build(T: int, B: int) -> Bench:
        from fla.ops.nsa import parallel_nsa

        spec = layer_spec(cfg, kind, T)
        H, Hk, D = spec.n_heads, spec.kv_heads, spec.head_dim
        block, top_n = spec.select_block, spec.top_n
        q, k, v = _randn(B, T, H, D), _randn(B, T, Hk, D), _randn(B, T, Hk, D)
        g_cmp = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
        g_slc = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
        return Bench(
            fwd=lambda: parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=top_n,
                                     block_size=block, window_size=0, scale=D ** -0.5),
            inputs=[q, k, v, g_cmp, g_slc],
            flops_fwd=attention_flops(B * T, H, D, D, visible_nsa(T, block, top_n)),
            shape=dict(H=H, Hk=Hk, Dqk=D, Dv=D, block=block, top_n=top_n, window_size=0),
        )

    return build


def branch_inputs(spec: LayerSpec, B: int, T: int) -> tuple[dict, list[torch.Tensor]]:
    """Random inputs of every form that ``spec``'s branches read, shaped as the layer passes
    them (per-token keys/values where a branch reads them, compressed ones in the compression
    form; absorbed values are the keys' first columns), and the tensors to differentiate."""
    from kernels.blocks import num_compressed
    from nsa_lit.attention.branches import BranchInputs

    inputs, leaves = {}, []
    N = num_compressed(T, spec.compress_block, spec.compress_stride)
    for form in sorted(set(spec.forms.values())):
        branch = next(b for b, f in spec.forms.items() if f is form)
        (dqk, dv), heads = spec.dims(branch), spec.attention_heads(branch)
        absorbed = form is Form.ABSORBED

        def keys_values(n):
            k = _randn(B, n, heads, dqk)
            v = k[..., :dv] if absorbed else _randn(B, n, heads, dv)
            leaves.extend([k] if absorbed else [k, v])
            return k, v

        q = _randn(B, T, spec.n_heads, dqk)
        leaves.append(q)
        k, v = keys_values(T) if form in spec.token_forms else (None, None)
        k_cmp, v_cmp = keys_values(N) if form is spec.compressed_form else (None, None)
        inputs[form] = BranchInputs(q, k, v, k_cmp, v_cmp, values_in_keys=absorbed)
    return inputs, leaves


def branches_case(cfg: ModelConfig, kind: str):
    """The attention branches of ``cfg``'s layer ``kind`` as the layer runs them
    (:func:`nsa_lit.attention.branches.run_branches`: for a global layer, compression, block
    selection and selected attention), without projections; one output per branch, each in its
    form's space (absorbed outputs before ``W_uv``). FLOPs: ``attention_flop_parts``."""
    def build(T: int, B: int) -> Bench:
        from nsa_lit.attention.branches import run_branches

        spec = layer_spec(cfg, kind, T)
        inputs, leaves = branch_inputs(spec, B, T)

        def fwd():
            outputs, _ = run_branches(spec, inputs)
            return tuple(outputs[b] for b in spec.branches)

        shape = dict(kind=kind, H=spec.n_heads, G=spec.kv_heads,
                     branches=[str(b) for b in spec.branches],
                     dims={str(b): spec.dims(b) for b in spec.forms},
                     forms={str(b): str(f) for b, f in spec.forms.items()},
                     block_len=spec.compress_block, stride=spec.compress_stride,
                     select_block=spec.select_block, top_n=spec.top_n,
                     num_local=spec.num_local_blocks, q_share=spec.q_share)
        trained, scoring = attention_flop_parts(spec, T)
        return Bench(fwd=fwd, inputs=leaves, flops_fwd=(trained + scoring) * B * T, shape=shape,
                     flops_fwd_bwd=fwd_bwd_flops(attention=trained, scoring=scoring) * B * T)

    return build


def layer_case(cfg: ModelConfig, kind: str, compiled: bool = False):
    """A whole attention layer of ``cfg`` (projections, compressors, gate included);
    FLOPs: ``nsa_lit.model_stats``' matrix products and attention of the layer.
    ``compiled``: the layer under ``torch.compile`` as ``LanguageModel(compile=True)`` does it."""
    def build(T: int, B: int) -> Bench:
        from nsa_lit.attention import Attention
        from nsa_lit.model import COMPILE_OPTIONS

        layer = Attention(dataclasses.replace(cfg, seq_len=T), kind).to(DEVICE, torch.bfloat16)
        spec = layer.spec
        x = _randn(B, T, cfg.d_model)
        trained, scoring = attention_flop_parts(spec, T)
        matmul = matmul_flops_per_token(layer)
        flops = (matmul + trained + scoring) * B * T
        if compiled:
            # a fresh compiler cache per case: dynamo's recompile limit (8 per code object)
            # would otherwise send later layers and shapes of one run back to eager code
            torch._dynamo.reset()
        run = torch.compile(layer, options=COMPILE_OPTIONS) if compiled else layer
        return Bench(fwd=lambda: run(x), inputs=[x, *layer.parameters()], flops_fwd=flops,
                     flops_fwd_bwd=fwd_bwd_flops(trained, matmul, scoring) * B * T,
                     shape=dict(kind=kind, branches=[str(b) for b in spec.branches],
                                kv=str(spec.kv), compiled=compiled,
                                layer_pattern=cfg.layer_pattern, latent_form=cfg.latent_form))

    return build


def _has_module(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        import importlib.util

        return None if importlib.util.find_spec(name) else f"{name} is not installed"

    return check


CASES: list[Case] = [
    # the window branch of the ASA local layer as it trains (expanded MLA: 16 heads, 96 / 64)
    case("window-asa", "window", window_case, ASA_340M, "L"),
    case("flex-window-asa", "flex-mla", flex_window_case, ASA_340M, "L"),
    # the same head dims over one shared key/value head (MQA)
    case("window-mla", "window", window_case, ASA_340M, "L", kv_heads=1),
    case("window-mla-rows", "window-rows", window_case, ASA_340M, "L", kv_heads=1, tma=False),
    case("flex-window-mla", "flex-mla", flex_window_case, ASA_340M, "L", kv_heads=1),
    # fla's NSA 340M shape (32 heads, 2 KV heads, head dim 64): window, full attention, NSA
    case("window-gqa", "window", window_case, FLA_NSA_340M, "N"),
    case("flex-window-gqa", "flex", flex_window_case, FLA_NSA_340M, "N"),
    case("sdpa-causal-gqa", "sdpa", sdpa_causal_case, FLA_NSA_340M, "N"),
    case("fla-nsa-gqa", "fla", fla_nsa_case, FLA_NSA_340M, "N", _has_module("fla")),
    case("nsa-gqa", "sparse", branches_case, FLA_NSA_NO_WINDOW, "N"),
    # full attention at the width of the 340M configs (16 heads, 4 KV heads)
    case("sdpa-causal-340m", "sdpa", sdpa_causal_case, FULL_340M, "F"),
    # ASA global-layer branches at the 340M defaults: every branch absorbed (GLA, 2 latent
    # groups, q.k over 128 latent + 32 RoPE dims, values 128), and as latent_form=auto trains
    # them (compression expanded, selection absorbed); l=32, d=16, l'=64, top-16, q_share 4
    case("asa-global", "sparse", branches_case, ASA_340M_ABSORBED, "G"),
    case("asa-global-auto", "sparse", branches_case, ASA_340M, "G"),
    case("layer-full", "layer", layer_case, FULL_340M, "F"),
    case("layer-asa-local", "layer", layer_case, ASA_340M, "L"),
    case("layer-asa-global", "layer", layer_case, ASA_340M, "G"),
    case("layer-nsa", "layer", layer_case, NSA_340M, "N"),
    case("layer-full-compiled", "layer-compiled", layer_case, FULL_340M, "F", compiled=True),
    case("layer-asa-local-compiled", "layer-compiled", layer_case, ASA_340M, "L", compiled=True),
    case("layer-asa-global-compiled", "layer-compiled", layer_case, ASA_340M, "G",
         compiled=True),
]


def select(cases: list[Case], spec: str | None) -> list[Case]:
    if not spec:
        return list(cases)
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = wanted - {c.name for c in cases} - {c.group for c in cases}
    if unknown:
        raise SystemExit(f"unknown case or group: {sorted(unknown)}; known: "
                         f"{sorted({c.name for c in cases} | {c.group for c in cases})}")
    return [c for c in cases if c.name in wanted or c.group in wanted]


def output_grads(out: torch.Tensor | tuple[torch.Tensor, ...]):
    """Random output gradients, one dense tensor per output, as a layer's backward passes them
    (a ``.sum()`` instead would add a reduction and, in backward, expanded gradients that the
    kernels must first copy)."""
    if isinstance(out, tuple):
        return tuple(torch.randn_like(o) for o in out)
    return torch.randn_like(out)


def measure(bench: Bench) -> tuple[float, float]:
    import triton.testing

    grad = None

    def fwd_bwd():
        nonlocal grad
        out = bench.fwd()
        if grad is None:
            grad = output_grads(out)
        torch.autograd.grad(out, bench.inputs, grad)

    # rep (ms of timed calls) large enough for several samples of a 100 ms call at 64k
    fwd_ms = triton.testing.do_bench(bench.fwd, rep=BENCH_REP_MS, return_mode="median")
    fwd_bwd_ms = triton.testing.do_bench(fwd_bwd, rep=BENCH_REP_MS, return_mode="median")
    return fwd_ms, fwd_bwd_ms


def profile(bench: Bench, top: int, iters: int = 5) -> str:
    """The ``top`` operators by GPU time over ``iters`` forward+backward calls, as a table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    grad = output_grads(bench.fwd())
    torch.autograd.grad(bench.fwd(), bench.inputs, grad)  # compile and autotune first
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.autograd.grad(bench.fwd(), bench.inputs, grad)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top,
                                     max_name_column_width=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", help="comma-separated case names or groups "
                        f"(default: all of {[c.name for c in CASES]})")
    parser.add_argument("--T", default=",".join(map(str, DEFAULT_T)),
                        help="comma-separated sequence lengths")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per call")
    parser.add_argument("--out", help="results name (benchmarks/results/NAME.json) or path")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N operators with the most GPU time per case and T")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA device")
    cases = select(CASES, args.cases)
    lengths = [int(t) for t in args.T.split(",") if t.strip()]
    for T in lengths:
        if T <= 0 or args.tokens % T:
            raise SystemExit(f"--tokens={args.tokens} must be a multiple of every T (T={T})")

    record = run_record("attention.py", argv, tokens=args.tokens, bwd_flop_factor=BWD_FLOP_FACTOR)
    print(f"# {record['device']}, torch {record['torch']}, triton {record['triton']}", flush=True)
    log = ResultsLog(record, f"{'case':<18} {'T':>6} {'B':>3} {'fwd ms':>9} {'TFLOP/s':>8} "
                             f"{'f+b ms':>9} {'TFLOP/s':>8}", args.out)
    for case in cases:
        reason = case.needs()
        if reason:
            print(f"{case.name:<18} skipped: {reason}", flush=True)
            log.add({"case": case.name, "group": case.group, "skipped": reason})
            continue
        for T in lengths:
            B = args.tokens // T
            row = {"case": case.name, "group": case.group, "T": T, "B": B}
            try:
                torch.manual_seed(0)  # the same inputs (and, for ASA, block picks) every run
                bench = case.build(T, B)
                fwd_ms, fb_ms = measure(bench)
                flops_fb = bench.flops_fwd_bwd
                row.update(shape=bench.shape, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                           flops_fwd=bench.flops_fwd, flops_fwd_bwd=flops_fb,
                           fwd_tflops=bench.flops_fwd / fwd_ms * 1e-9,
                           fwd_bwd_tflops=flops_fb / fb_ms * 1e-9)
                line = (f"{case.name:<18} {T:>6} {B:>3} {fwd_ms:>9.3f} {row['fwd_tflops']:>8.1f} "
                        f"{fb_ms:>9.3f} {row['fwd_bwd_tflops']:>8.1f}")
            except Exception as err:  # one broken case must not lose the others
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
                line = f"{case.name:<18} {T:>6} {B:>3} error: {row['error'][:60]}"
            if args.profile and "error" not in row:
                try:  # kept in the results too: the table is what a profile run is for
                    row["profile"] = profile(bench, args.profile)
                    print(f"## {case.name} T={T}: top {args.profile} operators, 5 fwd+bwd calls\n"
                          + row["profile"], flush=True)
                except Exception:  # the timing above stands
                    traceback.print_exc()
            log.add(row, line)
            bench = None
            torch.cuda.empty_cache()
    log.summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
