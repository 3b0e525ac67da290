"""Training throughput: tokens/s of full training steps of a model config on one GPU.

    python3 benchmarks/train_throughput.py                      # 340M ASA / NSA / full, T=8192
    python3 benchmarks/train_throughput.py --configs configs/340m/asa.yaml --T 8192 32768 \\
        --modes eager,compiled --out h200-train

A step is what ``LanguageModel`` trains with: forward and loss under bf16 autocast (float32
weights; the loss in chunks of ``--loss_chunk`` tokens as ``model.loss_chunk``, 0 for the whole
logits), backward, gradient clipping at 1.0, fused AdamW. ``--tokens`` tokens per step
(default 65,536, the ANCHORS.md setting: batch = tokens / T), random tokens, random weights.
``compiled`` compiles every block as ``LanguageModel(compile=True)`` does. After ``--warmup``
untimed steps (compilation, autotuning), ``--steps`` steps are timed; reports tokens/s, ms per step,
peak memory and MFU: tokens/s x ``nsa_lit.model_stats.training_flops_per_token`` (attention FLOPs
of what each variant computes) / ``--peak_tflops`` (default 989.5, the dense bf16 peak of an
H100/H200 SXM). ``--profile N`` then profiles one more optimiser step (``torch.profiler``) and
records its GPU time per kernel group (``benchmarks/kernel_time.py``: each attention branch's
kernels, SDPA, matrix products, loss, optimizer, Inductor's fused elementwise kernels, ...) and its
N most expensive kernels, so that where one model's step spends its time more than another's
reads line by line. ``--out NAME`` writes ``benchmarks/results/NAME.json``.

A config named ``hf-llama`` (or ``hf-llama:CONFIG``) is the outside baseline: transformers'
``LlamaForCausalLM`` (SDPA attention) at the shape of CONFIG's model (default
``configs/340m/full.yaml``: the width, depth, heads, key/value heads, MLP, vocabulary and RoPE
of our full-attention 340M), trained by the same step, loss and optimizer; ``compiled`` compiles
each of its decoder layers as ours compiles each block. Needs the ``transformers`` package.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_lit.config import ModelConfig  # noqa: E402
from nsa_lit.loss import DEFAULT_CHUNK, next_token_loss  # noqa: E402
from nsa_lit.model import Transformer  # noqa: E402
from nsa_lit.model_stats import load_model_config, training_flops_per_token  # noqa: E402
from kernel_time import by_group, kernel_times, top_kernels, totals  # noqa: E402
from results_log import ResultsLog, run_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = [os.path.join(ROOT, "configs/340m", f"{v}.yaml") for v in ("asa", "nsa", "full")]
LLAMA = "hf-llama"
LLAMA_SHAPE = os.path.join(ROOT, "configs/340m/full.yaml")


def import_llama():
    """transformers' ``(LlamaConfig, LlamaForCausalLM)``, imported beside the Hugging Face
    ``kernels`` package that transformers >= 5 depends on, whose name our ``kernels/`` shadows
    from this repository: ours leaves ``sys.modules`` (and the repository ``sys.path``) while
    transformers imports its modeling code, then comes back; transformers keeps what it
    imported."""
    ours = {name: mod for name, mod in sys.modules.items()
            if name == "kernels" or name.startswith("kernels.")}
    path = sys.path[:]
    for name in ours:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama import modeling_llama  # noqa: F401  (its integrations)
    finally:
        sys.path[:] = path
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]
        sys.modules.update(ours)
    return LlamaConfig, LlamaForCausalLM


class LlamaBaseline(torch.nn.Module):
    """transformers' ``LlamaForCausalLM`` at the shape of ``cfg`` (a full-attention
    :class:`ModelConfig`: width, depth, heads, key/value heads, head and MLP width, vocabulary,
    RoPE base, norm epsilon; untied embeddings, SDPA attention), with the two members
    ``next_token_loss`` reads, ``hidden`` and ``lm_head``, and ``compile_blocks``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        LlamaConfig, LlamaForCausalLM = import_llama()
        hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                         intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                         head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=False, attn_implementation="sdpa")
        self.llama = LlamaForCausalLM(hf)
        self.lm_head = self.llama.lm_head

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llama.model(input_ids=tokens, use_cache=False).last_hidden_state

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llama(input_ids=tokens, use_cache=False).logits

    def compile_blocks(self) -> None:
        for layer in self.llama.model.layers:
            layer.compile()


def resolve(config: str) -> tuple[str, str, bool]:
    """``(name, config path, llama)`` of a ``--configs`` entry: a config path, or ``hf-llama``
    / ``hf-llama:PATH`` (transformers' Llama at PATH's shape)."""
    if config == LLAMA or config.startswith(LLAMA + ":"):
        path = config.partition(":")[2] or LLAMA_SHAPE
        return f"{LLAMA}:{os.path.relpath(path, ROOT)}", path, True
    return os.path.relpath(config, ROOT), config, False


def measure(config_path: str, T: int, tokens: int, mode: str, steps: int, warmup: int,
            peak_tflops: float, loss_chunk: int, accumulate: int = 1,
            arch: ModelConfig | None = None, profile_top: int = 0) -> dict:
    """Time ``steps`` optimiser steps, each of ``accumulate`` micro-batches of ``tokens`` tokens
    (different random tokens each), of ``config_path``'s model (or ``arch``, e.g. a fit run's
    with its overrides) at ``T``. Dynamo starts afresh: an earlier T would make it compile this
    one with dynamic shapes. ``profile_top``: also profile one more step (``"profile"``: GPU ms
    per kernel group and the ``profile_top`` most expensive kernels)."""
    name, config_path, llama = resolve(config_path)
    cfg = dataclasses.replace(arch or load_model_config(config_path), seq_len=T)
    if llama and cfg.layer_pattern.strip("F"):
        raise ValueError(f"{LLAMA} takes the shape of a full-attention config (layer_pattern F), "
                         f"got layer_pattern {cfg.layer_pattern!r} from {config_path}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = (LlamaBaseline(cfg) if llama else Transformer(cfg)).cuda()
    if mode == "compiled":
        model.compile_blocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches = torch.randint(0, cfg.vocab_size, (accumulate, tokens // T, T + 1), device="cuda")

    def step():
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):  # as Lightning's bf16-mixed
                loss = next_token_loss(model, batch, loss_chunk)
            (loss / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    flops = training_flops_per_token(cfg, T)
    rate = tokens * accumulate / seconds
    extra = {}
    if profile_top:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        times = kernel_times(prof)
        gpu_ms, launches = totals(times)
        extra["profile"] = {"gpu_ms": gpu_ms, "launches": int(launches),  # one step
                            "groups": by_group(times), "top": top_kernels(times, profile_top)}
    return {"config": name, "layer_pattern": cfg.layer_pattern,
            "T": T, "batch": tokens // T, "accumulate": accumulate, "mode": mode, "steps": steps,
            "loss_chunk": loss_chunk, "ms_per_step": 1e3 * seconds, "tokens_per_sec": rate,
            "peak_mem_gib": peak_mem,
            "flops_per_token": flops, "mfu": rate * flops / (peak_tflops * 1e12),
            "params": sum(p.numel() for p in model.parameters()), **extra}


def profile_table(row: dict) -> str:
    """The profiled step of ``row`` as text: GPU ms and launches per kernel group, then the
    most expensive kernels."""
    prof = row["profile"]
    lines = [f"## {row['config']} T={row['T']} {row['mode']}: one step, {prof['gpu_ms']:.1f} GPU ms "
             f"in {prof['launches']} kernels ({row['ms_per_step']:.1f} ms timed)"]
    lines += [f"  {g:30} {v['ms']:>9.2f} ms {int(v['launches']):>7} launches"
              for g, v in prof["groups"].items()]
    lines += [f"  {ms:>9.2f} ms {int(n):>6}x  [{group}] {name}"
              for name, group, ms, n in prof["top"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--T", type=int, nargs="+", default=[8192])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per step")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated eager,compiled")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss_chunk", type=int, default=DEFAULT_CHUNK,
                        help="tokens per chunk of the loss (model.loss_chunk; 0: whole logits)")
    parser.add_argument("--peak_tflops", type=float, default=989.5,
                        help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile one step: GPU ms per kernel group and the N "
                             "most expensive kernels")
    parser.add_argument("--out", help="results name (benchmarks/results/NAME.json) or path")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= {"eager", "compiled"}:
        raise SystemExit(f"--modes must be eager and/or compiled, got {args.modes}")
    if any(args.tokens % T for T in args.T):
        raise SystemExit(f"--tokens={args.tokens} must be a multiple of every T ({args.T})")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_throughput.py needs a CUDA device")

    record = run_record("train_throughput.py", argv, tokens_per_step=args.tokens,
                        peak_tflops=args.peak_tflops)
    log = ResultsLog(record, f"{'config':24} {'T':>6} {'mode':>8} {'ms/step':>9} {'tokens/s':>10} "
                             f"{'MFU':>6} {'peak GiB':>9}", args.out)
    for config, T, mode in [(c, T, m) for c in args.configs for T in args.T for m in modes]:
        try:
            row = measure(config, T, args.tokens, mode, args.steps, args.warmup, args.peak_tflops,
                          args.loss_chunk, profile_top=args.profile)
            line = (f"{row['config']:24} {T:>6} {mode:>8} {row['ms_per_step']:>9.1f} "
                    f"{row['tokens_per_sec']:>10.0f} {row['mfu']:>6.1%} {row['peak_mem_gib']:>9.1f}")
        except Exception as err:  # one failing run must not lose the others
            row = {"config": config, "T": T, "mode": mode,
                   "error": f"{type(err).__name__}: {err}"[:300]}
            line = f"{config:24} {T:>6} {mode:>8} error: {row['error'][:60]}"
        finally:
            torch.cuda.empty_cache()
        log.add(row, line)
        if "profile" in row:
            print(profile_table(row), flush=True)
    log.summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
