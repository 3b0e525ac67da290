"""KV-cache memory of each variant, measured on the real decode caches, next to the formula.

``python -m nsa_lit.kv_report --config configs/340m/asa.yaml configs/340m/nsa.yaml
configs/340m/full.yaml [--context 2048 8192 32768 131072] [--dtype bf16] [--batch 1]
[--device cpu|meta] [--baseline NSA.yaml ...]`` allocates, for every config and context, the
caches that :func:`nsa_lit.cache.new_caches` gives a decoder (no model weights), sums their
``bytes_allocated()`` and prints it beside ``LayerSpec.kv_elements`` (the formula) times the
element size, the bytes per token, and the ratio to each baseline (every NSA-only config among
``--config`` unless ``--baseline``). The ASA / NSA ratio depends on the NSA baseline's key/value
heads, so compare against several: ``configs/340m/nsa.yaml`` (4 KV heads),
``nsa_paper_groups.yaml`` (16 query heads per KV head), ``nsa_fla_340m.yaml`` (fla's 2 KV heads),
``nsa_per_branch.yaml`` (a K/V projection per branch). A context beyond a config's ``seq_len``
raises ``seq_len`` for the measurement only. ``--device meta`` sizes the same tensors without
allocating memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from nsa_lit.cache import new_caches
from nsa_lit.config import Branch, ModelConfig
from nsa_lit.model_stats import load_model_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(cfg: ModelConfig, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
            device: str = "cpu") -> tuple[int, int]:
    """``(allocated, formula)`` bytes of all layers' caches for ``batch`` sequences of
    ``context`` tokens."""
    if context > cfg.seq_len:
        step = cfg.select_block if cfg.uses_branch(Branch.SELECTION) else 1
        cfg = dataclasses.replace(cfg, seq_len=math.ceil(context / step) * step)
    caches = new_caches(cfg, batch, context, dtype, device)
    allocated = sum(cache.bytes_allocated() for cache in caches)
    elements = sum(spec.kv_elements(context) for spec in cfg.layers)
    return allocated, elements * batch * dtype.itemsize


def label(path: str, paths: list[str]) -> str:
    """Short name of ``path`` for a column: its stem, or ``parent/stem`` where stems repeat."""
    stem = Path(path).stem
    if sum(Path(p).stem == stem for p in paths) > 1:
        return f"{Path(path).parent.name}/{stem}"
    return stem


def report(paths: list[str], contexts: list[int], batch: int = 1, dtype: str = "bf16",
           device: str = "cpu", baseline: str | list[str] | None = None
           ) -> tuple[list[dict], list[str]]:
    """One row per config and context: ``config, pattern, context, allocated, formula,
    bytes_per_token, ratios, ratio``. ``ratios`` maps each baseline to allocated / the
    baseline's at that context; ``ratio`` is the first baseline's (None without one). Returns the
    rows and the baselines used: ``baseline`` (one path or several), else every config among
    ``paths`` made of NSA layers only."""
    cfgs = {p: load_model_config(p) for p in paths}
    if baseline is None:
        baselines = [p for p, c in cfgs.items() if set(c.layer_pattern) == {"N"}]
    else:
        baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    for path in baselines:
        if path not in cfgs:
            cfgs[path] = load_model_config(path)
    rows = []
    for context in contexts:
        measured = {p: measure(c, context, batch, DTYPES[dtype], device) for p, c in cfgs.items()}
        for path in paths:
            allocated, formula = measured[path]
            ratios = {b: allocated / measured[b][0] for b in baselines}
            rows.append(dict(config=path, pattern=cfgs[path].layer_pattern, context=context,
                             allocated=allocated, formula=formula,
                             bytes_per_token=allocated / (batch * context), ratios=ratios,
                             ratio=ratios[baselines[0]] if baselines else None))
    return rows, baselines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", required=True, help="LightningCLI YAML files")
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="'meta': sizes only, nothing allocated")
    parser.add_argument("--baseline", nargs="+", default=None,
                        help="configs the ratio columns divide by, one column each (default: "
                             "every NSA-only config among --config)")
    args = parser.parse_args(argv)
    rows, bases = report(args.config, args.context, args.batch, args.dtype, args.device,
                         args.baseline)
    width = max(len(p) for p in args.config)
    names = {b: label(b, list(dict.fromkeys(args.config + bases))) for b in bases}
    print(f"KV cache, batch {args.batch}, {args.dtype}: bytes allocated by the decode caches "
          f"(device {args.device}) vs the formula (LayerSpec.kv_elements); ratio columns: "
          f"allocated / the baseline's")
    header = (f"{'config':{width}} {'pattern':7} {'context':>7} {'allocated MiB':>14} "
              f"{'formula MiB':>12} {'equal':>5} {'bytes/token':>12}")
    header += "".join(f" {'vs ' + names[b]:>{max(10, len(names[b]) + 3)}}" for b in bases)
    print(header)
    for r in rows:
        line = (f"{r['config']:{width}} {r['pattern']:7} {r['context']:>7} "
                f"{r['allocated'] / 2**20:>14,.2f} {r['formula'] / 2**20:>12,.2f} "
                f"{'yes' if r['allocated'] == r['formula'] else 'NO':>5} "
                f"{r['bytes_per_token']:>12,.0f}")
        line += "".join(f" {r['ratios'][b]:>{max(10, len(names[b]) + 3)}.3f}" for b in bases)
        print(line)
    return rows


if __name__ == "__main__":
    main()
