"""Decode throughput: tokens per second of one-token steps against caches filled to a context.

    python3 benchmarks/decode.py                                   # 340M ASA / NSA / full, 8k and 32k, batch 1 and 64
    python3 benchmarks/decode.py --contexts 32768 --batches 64 --modes graph --out h200-decode

For every config, context and batch size: a model with random weights (bf16 on CUDA), decode
caches of ``context + warmup + steps`` tokens filled with random entries up to ``context`` (the
content does not change the work a step does), then ``steps`` timed calls of ``model.decode``
(one new token per sequence, every layer, LM head included), in each ``--modes``: ``graph``
replays the step as one CUDA graph (:class:`nsa_lit.decode_graph.GraphedDecode`, what
``generate`` does on CUDA), ``eager`` launches every kernel from Python, ``compiled`` compiles
each block's step (``Transformer.compile_decode``: fewer, fused kernels) and, on CUDA, replays
it as a CUDA graph; its compilation happens in the warm-up steps (``warmup_s``). A step's work
depends on its plan (``nsa_lit.cache.StepPlan``: whether a compression block ends, whether a
query-sharing group opens), which repeats every 16 tokens at 340M; the graph modes capture one
graph per plan in the warm-up (a capture in the timed steps is flagged), and the default 32 timed
steps are two such periods. Reports tokens/s (batch x steps / seconds), ms per step and the cache
bytes. ``--kernels`` also profiles 16 more steps outside any graph (eager, or the compiled step in
``compiled`` mode) and records the GPU kernels they launch per step: their number, their summed
time and the most expensive names. ``--decode_config JSON`` sets launch overrides of the Triton
decode kernels (split-K sweeps, e.g. ``{"MIN_KEYS_PER_SPLIT": 512}``) for every run.
``--merged_min_batch N``: latent layers multiply by the merged ``W_uk`` / ``W_uv`` weights from
batch N on, by ``wq``, ``wo`` and the per-head up-projections below it. ``--out NAME`` writes
``benchmarks/results/NAME.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_lit.attention import layer as layer_module  # noqa: E402
from nsa_lit.cache import new_caches  # noqa: E402
from nsa_lit.decode_graph import GraphedDecode  # noqa: E402
from nsa_lit.model import Transformer  # noqa: E402
from nsa_lit.model_stats import load_model_config  # noqa: E402
from kernel_time import by_group, kernel_times, top_kernels, totals  # noqa: E402
from results_log import ResultsLog, run_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILED_STEPS = 16  # --kernels: one period of the 340M step plans
DEFAULT_CONFIGS = [os.path.join(ROOT, "configs/340m", f"{v}.yaml") for v in ("asa", "nsa", "full")]


def fill_randomly(caches, context: int) -> None:
    """Caches as if ``context`` tokens had been decoded: random raw and compressed entries,
    ``lengths = context``, and the next step opening a query-sharing group (``context`` is a
    multiple of the selection block)."""
    for cache in caches:
        parts = cache.caches.values() if hasattr(cache, "caches") else [cache]  # per-branch NSA
        for part in parts:
            for buf in list(part.raw) + list(part.compressed or ()):
                buf.normal_()
        cache.lengths.fill_(context)
        cache.longest = cache.shortest = context


def kernel_profile(step, tokens: torch.Tensor, steps: int = PROFILED_STEPS, top: int = 40) -> dict:
    """The GPU kernels of ``steps`` calls ``tokens = step(tokens).argmax(-1)``, per step: count,
    summed milliseconds, the time per kernel group (``kernel_time.by_group``) and the ``top``
    kernels by time (``kernel_time.top_kernels``: ``(name, group, ms, launches)``; results before
    2026-12-08 hold ``[name, launches, us]``)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tokens = step(tokens).argmax(-1)
        torch.cuda.synchronize()
    times = kernel_times(prof)
    ms, launches = totals(times, per=steps)
    return {"kernels_per_step": launches, "kernel_ms_per_step": ms,
            "kernel_groups": by_group(times, per=steps),
            "top_kernels": top_kernels(times, top, per=steps)}


def step_weight_bytes(model: Transformer) -> int:
    """Bytes of the merged decode weights (``nsa_lit.step_weights``), copies beside the
    parameters."""
    merged = [m for block in model.blocks for m in (block.attn.step_weights,
                                                    block.mlp.step_weights)]
    return sum(t.numel() * t.element_size() for m in merged for t in (m.tensors or {}).values()
               if t is not None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(config_path: str, context: int, batch: int, steps: int, warmup: int,
            device: torch.device, dtype: torch.dtype, mode: str = "eager",
            kernels: bool = False, compile_options: dict | None = None) -> dict:
    cfg = load_model_config(config_path)
    select = cfg.select_block
    max_len = -(-(context + warmup + steps + PROFILED_STEPS) // select) * select
    cfg = dataclasses.replace(cfg, seq_len=max(cfg.seq_len, max_len))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    caches = new_caches(cfg, batch, max_len, dtype=dtype, device=device)
    fill_randomly(caches, context)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device=device)
    if mode == "compiled":
        torch._dynamo.reset()  # Block.decode's code is shared by every model: fresh limits
        model.compile_decode(compile_options)
    if mode == "graph" or (mode == "compiled" and device.type == "cuda"):
        step = GraphedDecode(model, caches)  # per plan: an eager warm-up step, then a capture
    else:
        def step(tokens):
            return model.decode(tokens, caches)
    start = time.perf_counter()
    for _ in range(warmup):
        tokens = step(tokens).argmax(-1)
    sync(device)
    warmup_s = time.perf_counter() - start
    graphs = len(getattr(step, "graphs", ()))
    start = time.perf_counter()
    for _ in range(steps):
        tokens = step(tokens).argmax(-1)
    sync(device)
    seconds = time.perf_counter() - start
    graphed = {}
    if hasattr(step, "graphs"):  # GraphedDecode: one graph per step plan; none new while timed
        graphed = {"graphs": len(step.graphs), "captured_while_timed": len(step.graphs) > graphs}
        if graphed["captured_while_timed"]:
            print(f"warning: {config_path} captured a graph in the timed steps: raise --warmup",
                  file=sys.stderr)
    profiled = {}
    if kernels and device.type == "cuda":  # more steps, outside the graph
        profiled = kernel_profile(lambda t: model.decode(t, caches), tokens, PROFILED_STEPS)
    return {
        "config": os.path.relpath(config_path, ROOT), "layer_pattern": cfg.layer_pattern,
        "context": context, "batch": batch, "mode": mode, "steps": steps,
        "ms_per_step": 1e3 * seconds / steps, "tokens_per_sec": batch * steps / seconds,
        "cache_bytes": sum(c.bytes_allocated() for c in caches),
        "step_weight_bytes": step_weight_bytes(model),
        "kernel_backend": cfg.kernel_backend, "warmup_s": warmup_s, **graphed, **profiled,
        **({"compile_options": compile_options} if mode == "compiled" and compile_options else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=40,
                        help="untimed steps first (>= 2 with graphs; each step plan runs eagerly "
                             "once, then is captured: the 340M plans repeat every 16 steps)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated graph,eager,compiled (default: graph,eager on CUDA, eager "
                             "elsewhere; graph needs CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="default: bf16 on CUDA, fp32 elsewhere")
    parser.add_argument("--kernels", action="store_true",
                        help="also profile 16 steps' GPU kernels (per step: count, time, top "
                             "names; CUDA)")
    parser.add_argument("--decode_config", type=json.loads, default=None,
                        help='launch overrides of the Triton decode kernels for every run, JSON '
                             '(kernels.decode.triton_kernel.CONFIG_OVERRIDE), e.g. '
                             '\'{"MIN_KEYS_PER_SPLIT": 512}\' or \'{"SPLITS": 1}\'')
    parser.add_argument("--compile_options", type=json.loads, default=None,
                        help='more Inductor options of the compiled mode, as JSON '
                             '(e.g. \'{"combo_kernels": true}\')')
    parser.add_argument("--merged_min_batch", type=int, default=None,
                        help="latent layers multiply by merged W_uk / W_uv weights from this "
                             "batch size on, per head below it (default: "
                             "nsa_lit.attention.layer.MERGED_UP_PROJECTIONS_MIN_BATCH)")
    parser.add_argument("--out", help="results name (benchmarks/results/NAME.json) or path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    modes = (args.modes or ("graph,eager" if device.type == "cuda" else "eager")).split(",")
    if not set(modes) <= {"graph", "eager", "compiled"} or (device.type != "cuda" and "graph" in modes):
        raise SystemExit(f"--modes must be among graph,eager,compiled (graph needs CUDA), got {args.modes}")
    if device.type == "cuda" and {"graph", "compiled"} & set(modes) and args.warmup < 2:
        raise SystemExit("--warmup must be >= 2 with graphs (a graph is captured on the second step)")

    if args.decode_config:  # the kernels read it at every launch (eager, compiled or captured)
        from kernels.decode import triton_kernel as decode_kernels
        decode_kernels.CONFIG_OVERRIDE.update(args.decode_config)
    if args.merged_min_batch is not None:
        if args.merged_min_batch < 1:
            raise SystemExit(f"--merged_min_batch must be >= 1, got {args.merged_min_batch}")
        layer_module.MERGED_UP_PROJECTIONS_MIN_BATCH = args.merged_min_batch
    record = run_record(
        "decode.py", argv,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype), decode_config=args.decode_config or {},
        merged_min_batch=layer_module.MERGED_UP_PROJECTIONS_MIN_BATCH)
    log = ResultsLog(record, f"{'config':24} {'context':>8} {'batch':>5} {'mode':>8} "
                             f"{'ms/step':>9} {'tokens/s':>10} {'cache MiB':>10}", args.out)
    runs = [(c, n, b, m) for c in args.configs for n in args.contexts for b in args.batches
            for m in modes]
    failed = False  # a run raised something other than running out of memory
    for config, context, batch, mode in runs:
        try:
            row = measure(config, context, batch, args.steps, args.warmup, device, dtype,
                          mode, args.kernels, args.compile_options)
            line = (f"{row['config']:24} {context:>8} {batch:>5} {mode:>8} "
                    f"{row['ms_per_step']:>9.2f} {row['tokens_per_sec']:>10.1f} "
                    f"{row['cache_bytes'] / 2**20:>10.1f}")
            if "kernels_per_step" in row:
                line += (f"  {row['kernels_per_step']:.0f} kernels, "
                         f"{row['kernel_ms_per_step']:.2f} ms of GPU time")
        except torch.OutOfMemoryError as err:
            row = {"config": config, "context": context, "batch": batch, "mode": mode,
                   "error": f"out of memory: {err}"[:300]}
            line = f"{config:24} {context:>8} {batch:>5} {mode:>8} out of memory"
        except Exception as err:  # noqa: BLE001 (e.g. a compile option Inductor rejects): next run
            row = {"config": config, "context": context, "batch": batch, "mode": mode,
                   "error": f"{type(err).__name__}: {err}"[:300]}
            line = f"{config:24} {context:>8} {batch:>5} {mode:>8} {row['error'][:60]}"
            failed = True
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log.add(row, line)
    log.summary()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
