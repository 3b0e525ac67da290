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
import datetime
import math
import os
import platform
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_lit.model_stats import (  # noqa: E402  (FLOP counting shared with the library)
    attention_flops,
    layer_attention_flops,
    matmul_flops_per_token,
    visible_causal,
    visible_compressed,
    visible_selected,
    visible_window,
)
from results_log import ResultsLog  # noqa: E402

BWD_FLOP_FACTOR = 2.5
DEFAULT_T = (8192, 16384, 32768, 65536)


@dataclass
class Bench:
    """One built problem: ``fwd()`` returns the output (or the outputs of branches a layer mixes
    later); gradients flow to ``inputs``."""

    fwd: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]
    inputs: list[torch.Tensor]
    flops_fwd: float
    shape: dict = field(default_factory=dict)


@dataclass
class Case:
    name: str
    group: str
    build: Callable[[int, int], Bench]
    needs: Callable[[], str | None] = lambda: None


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)


def visible_nsa(T: int, block: int, top_n: int) -> float:
    """Mean compressed tokens (whole blocks ended) plus selected raw tokens per query."""
    total = 0.0
    for t in range(T):
        total += (t + 1) // block + min(top_n, -(-(t + 1) // block)) * block
    return total / T


def window_case(H: int, Hk: int, Dqk: int, Dv: int, window: int = 512, tma: bool = True):
    """Our sliding-window kernel (through the dispatcher); ``tma=False``: tiles by row offsets
    even where TMA descriptors could serve (to measure what they bring)."""
    def build(T: int, B: int) -> Bench:
        from kernels import dispatch
        from kernels.sliding_window.triton_kernel import _sliding_window_attention

        q, k, v = _randn(B, T, H, Dqk), _randn(B, T, Hk, Dqk), _randn(B, T, Hk, Dv)
        scale = Dqk ** -0.5

        def fwd():
            if tma:
                return dispatch.sliding_window_attention(q, k, v, window, scale)
            return _sliding_window_attention(q, k, v, window, scale, cfg={"tma": False})

        return Bench(
            fwd=fwd,
            inputs=[q, k, v],
            flops_fwd=attention_flops(B * T, H, Dqk, Dv, visible_window(T, window)),
            shape=dict(H=H, Hk=Hk, Dqk=Dqk, Dv=Dv, window=window),
        )

    return build


def flex_window_case(H: int, Hk: int, Dqk: int, Dv: int, window: int = 512):
    def build(T: int, B: int) -> Bench:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        global _FLEX
        if "_FLEX" not in globals():
            _FLEX = torch.compile(flex_attention, dynamic=False)

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        mask = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
        q, k, v = _randn(B, H, T, Dqk), _randn(B, Hk, T, Dqk), _randn(B, Hk, T, Dv)
        scale = Dqk ** -0.5
        return Bench(
            fwd=lambda: _FLEX(q, k, v, block_mask=mask, scale=scale, enable_gqa=Hk != H),
            inputs=[q, k, v],
            flops_fwd=attention_flops(B * T, H, Dqk, Dv, visible_window(T, window)),
            shape=dict(H=H, Hk=Hk, Dqk=Dqk, Dv=Dv, window=window),
        )

    return build


def sdpa_causal_case(H: int, Hk: int, D: int):
    def build(T: int, B: int) -> Bench:
        import torch.nn.functional as F

        q, k, v = _randn(B, H, T, D), _randn(B, H, T, D), _randn(B, H, T, D)
        scale = D ** -0.5
        return Bench(
            fwd=lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
            inputs=[q, k, v],
            flops_fwd=attention_flops(B * T, H, D, D, visible_causal(T)),
            shape=dict(H=H, Hk=Hk, Dqk=D, Dv=D, note="k, v expanded to H heads before timing"),
        )

    return build


def fla_nsa_case(H: int, Hk: int, D: int, block: int = 64, top_n: int = 16):
    def build(T: int, B: int) -> Bench:
        from fla.ops.nsa import parallel_nsa

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


def sparse_case(H: int, G: int, Dqk: int, Dv: int, block_len: int, stride: int,
                select_block: int, top_n: int, num_local: int, q_share: int):
    """Compression + block selection + selected attention over G key/value groups, the branch
    computation of a global layer (ASA in the absorbed GLA form, or NSA over GQA heads)."""
    def build(T: int, B: int) -> Bench:
        from kernels import dispatch
        from kernels.compression.reference import num_compressed

        N = num_compressed(T, block_len, stride)
        q, k, v = _randn(B, T, H, Dqk), _randn(B, T, G, Dqk), _randn(B, T, G, Dv)
        k_cmp, v_cmp = _randn(B, N, G, Dqk), _randn(B, N, G, Dv)
        scale = 1 / math.sqrt(Dqk)

        def fwd():
            o_cmp, lse = dispatch.compression_attention(q, k_cmp, v_cmp, block_len, stride, scale)
            idx = dispatch.select_blocks(
                q.detach(), k_cmp.detach(), lse, num_groups=G, block_len=block_len, stride=stride,
                select_block=select_block, top_n=top_n, num_local=num_local, q_share=q_share,
                scale=scale)
            return o_cmp + dispatch.selected_attention(q, k, v, idx, select_block, scale,
                                                       q_share=q_share)

        n_cmp = visible_compressed(T, block_len, stride)
        flops = (attention_flops(B * T, H, Dqk, Dv, n_cmp)
                 + attention_flops(B * T // q_share, H, Dqk, 0, n_cmp)  # importance scores
                 + attention_flops(B * T, H, Dqk, Dv, visible_selected(T, select_block, top_n)))
        return Bench(fwd=fwd, inputs=[q, k, v, k_cmp, v_cmp], flops_fwd=flops,
                     shape=dict(H=H, G=G, Dqk=Dqk, Dv=Dv, block_len=block_len, stride=stride,
                                select_block=select_block, top_n=top_n, num_local=num_local,
                                q_share=q_share))

    return build


def asa_global_auto_case(H: int = 16, G: int = 2, head_dim: int = 64, rope_dim: int = 32,
                         latent: int = 256, block_len: int = 32, stride: int = 16,
                         select_block: int = 64, top_n: int = 16, num_local: int = 2,
                         q_share: int = 4):
    """The global layer's branches as ``latent_form="auto"`` runs them: compression and block
    scoring in the expanded form (per-head keys head_dim + rope_dim, values head_dim), selected
    attention in the absorbed form (G latent heads: keys latent/G + rope_dim, values latent/G)."""
    def build(T: int, B: int) -> Bench:
        from kernels import dispatch
        from kernels.compression.reference import num_compressed

        N = num_compressed(T, block_len, stride)
        dqk, dv, lqk, lv = head_dim + rope_dim, head_dim, latent // G + rope_dim, latent // G
        q_exp, k_cmp, v_cmp = _randn(B, T, H, dqk), _randn(B, N, H, dqk), _randn(B, N, H, dv)
        q_abs, k_abs = _randn(B, T, H, lqk), _randn(B, T, G, lqk)
        v_abs = k_abs[..., :lv]  # the latent values are the keys' first columns, as in the layer
        scale = 1 / math.sqrt(dqk)

        def fwd():
            o_cmp, lse = dispatch.compression_attention(q_exp, k_cmp, v_cmp, block_len, stride,
                                                        scale)
            idx = dispatch.select_blocks(
                q_exp.detach(), k_cmp.detach(), lse, num_groups=G, block_len=block_len,
                stride=stride, select_block=select_block, top_n=top_n, num_local=num_local,
                q_share=q_share, scale=scale)
            o_sel = dispatch.selected_attention(q_abs, k_abs, v_abs, idx, select_block, scale,
                                                q_share=q_share)
            return o_cmp, o_sel  # the two live in different spaces before W_uv

        n_cmp = visible_compressed(T, block_len, stride)
        flops = (attention_flops(B * T, H, dqk, dv, n_cmp)
                 + attention_flops(B * T // q_share, H, dqk, 0, n_cmp)
                 + attention_flops(B * T, H, lqk, lv, visible_selected(T, select_block, top_n)))
        return Bench(fwd=fwd, inputs=[q_exp, k_cmp, v_cmp, q_abs, k_abs], flops_fwd=flops,
                     shape=dict(H=H, G=G, expanded=(dqk, dv), absorbed=(lqk, lv),
                                block_len=block_len, stride=stride, select_block=select_block,
                                top_n=top_n, num_local=num_local, q_share=q_share))

    return build


def layer_case(kind: str, compiled: bool = False, **overrides):
    """A whole attention layer of the 340M config (projections, compressors, gate included);
    FLOPs: ``nsa_lit.model_stats``' matrix products and attention of the layer.
    ``compiled``: the layer under ``torch.compile`` as ``LanguageModel(compile=True)`` does it."""
    def build(T: int, B: int) -> Bench:
        from nsa_lit.attention import Attention
        from nsa_lit.config import ModelConfig
        from nsa_lit.model import COMPILE_OPTIONS

        cfg = ModelConfig(**{"seq_len": T, **overrides})
        layer = Attention(cfg, kind).cuda().to(torch.bfloat16)
        x = _randn(B, T, cfg.d_model)
        flops = (matmul_flops_per_token(layer, cfg) + layer_attention_flops(cfg, kind, T)) * B * T
        if compiled:
            # a fresh compiler cache per case: dynamo's recompile limit (8 per code object)
            # would otherwise send later layers and shapes of one run back to eager code
            torch._dynamo.reset()
        run = torch.compile(layer, options=COMPILE_OPTIONS) if compiled else layer
        return Bench(fwd=lambda: run(x), inputs=[x, *layer.parameters()], flops_fwd=flops,
                     shape=dict(kind=kind, branches=list(cfg.branches(kind)),
                                kv=cfg.kv_source(kind), compiled=compiled, **overrides))

    return build


def _has_module(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        import importlib.util

        return None if importlib.util.find_spec(name) else f"{name} is not installed"

    return check


CASES: list[Case] = [
    Case("window-mla", "window", window_case(H=16, Hk=1, Dqk=96, Dv=64)),
    Case("window-gqa", "window", window_case(H=32, Hk=2, Dqk=64, Dv=64)),
    Case("window-mla-rows", "window-rows", window_case(H=16, Hk=1, Dqk=96, Dv=64, tma=False)),
    Case("flex-window-gqa", "flex", flex_window_case(H=32, Hk=2, Dqk=64, Dv=64)),
    Case("flex-window-mla", "flex-mla", flex_window_case(H=16, Hk=1, Dqk=96, Dv=64)),
    Case("sdpa-causal-gqa", "sdpa", sdpa_causal_case(H=32, Hk=2, D=64)),
    # full attention at the width of the 340M configs (16 heads, 4 KV heads)
    Case("sdpa-causal-340m", "sdpa", sdpa_causal_case(H=16, Hk=4, D=64)),
    Case("fla-nsa-gqa", "fla", fla_nsa_case(H=32, Hk=2, D=64), _has_module("fla")),
    # ASA global-layer branches at the 340M defaults, absorbed GLA form: 2 latent groups,
    # q.k over 128 latent + 32 RoPE dims, values 128, l=32, d=16, l'=64, top-16, q_share 4
    Case("asa-global", "sparse", sparse_case(H=16, G=2, Dqk=160, Dv=128, block_len=32, stride=16,
                                             select_block=64, top_n=16, num_local=2, q_share=4)),
    Case("asa-global-auto", "sparse", asa_global_auto_case()),
    # our NSA branches at fla's anchor configuration (32 heads, 2 KV heads, blocks of 64, top-16)
    Case("nsa-gqa", "sparse", sparse_case(H=32, G=2, Dqk=64, Dv=64, block_len=64, stride=64,
                                          select_block=64, top_n=16, num_local=1, q_share=1)),
    Case("layer-full", "layer", layer_case("F", layer_pattern="F")),
    Case("layer-asa-local", "layer", layer_case("L")),
    Case("layer-asa-global", "layer", layer_case("G")),
    Case("layer-nsa", "layer", layer_case("N", layer_pattern="N")),
    Case("layer-full-compiled", "layer-compiled", layer_case("F", True, layer_pattern="F")),
    Case("layer-asa-local-compiled", "layer-compiled", layer_case("L", True)),
    Case("layer-asa-global-compiled", "layer-compiled", layer_case("G", True)),
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

    fwd_ms = triton.testing.do_bench(bench.fwd, return_mode="median")
    fwd_bwd_ms = triton.testing.do_bench(fwd_bwd, return_mode="median")
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


def environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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

    record = {**environment(), "tokens": args.tokens, "bwd_flop_factor": BWD_FLOP_FACTOR}
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
                flops_fb = bench.flops_fwd * (1 + BWD_FLOP_FACTOR)
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
