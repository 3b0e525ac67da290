"""KV-cache memory of each variant, measured on the real decode caches, next to the formula.

``python -m nsa_lit.kv_report --config configs/340m/asa.yaml configs/340m/nsa.yaml
configs/340m/full.yaml [--context 2048 8192 32768 131072] [--dtype bf16] [--batch 1]
[--device cpu|meta]`` allocates, for every config and context, the caches that
:func:`nsa_lit.cache.new_caches` gives a decoder (no model weights), sums their
``bytes_allocated()`` and prints it beside ``LayerSpec.kv_elements`` (the formula) times
the element size, and the ratio to the baseline (the first NSA config unless ``--baseline``).
A context beyond a config's ``seq_len`` raises ``seq_len`` for the measurement only.
``--device meta`` sizes the same tensors without allocating memory.
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


def report(paths: list[str], contexts: list[int], batch: int = 1, dtype: str = "bf16",
           device: str = "cpu", baseline: str | None = None) -> tuple[list[dict], str | None]:
    """One row per config and context: ``config, pattern, context, allocated, formula, ratio``
    (``ratio``: allocated / the baseline's at that context, None without a baseline), and the
    baseline used."""
    cfgs = {p: load_model_config(p) for p in paths}
    if baseline is None:
        baseline = next((p for p, c in cfgs.items() if set(c.layer_pattern) == {"N"}), None)
    elif baseline not in cfgs:
        cfgs[baseline] = load_model_config(baseline)
    rows = []
    for context in contexts:
        measured = {p: measure(c, context, batch, DTYPES[dtype], device) for p, c in cfgs.items()}
        for path in paths:
            allocated, formula = measured[path]
            ratio = allocated / measured[baseline][0] if baseline else None
            rows.append(dict(config=path, pattern=cfgs[path].layer_pattern, context=context,
                             allocated=allocated, formula=formula, ratio=ratio))
    return rows, baseline


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", required=True, help="LightningCLI YAML files")
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="'meta': sizes only, nothing allocated")
    parser.add_argument("--baseline", default=None,
                        help="config the ratio column divides by (default: the first NSA one)")
    args = parser.parse_args(argv)
    rows, base = report(args.config, args.context, args.batch, args.dtype, args.device,
                        args.baseline)
    width = max(len(p) for p in args.config)
    print(f"KV cache, batch {args.batch}, {args.dtype}: bytes allocated by the decode caches "
          f"(device {args.device}) vs the formula (LayerSpec.kv_elements)")
    header = (f"{'config':{width}} {'pattern':7} {'context':>7} {'allocated MiB':>14} "
              f"{'formula MiB':>12} {'equal':>5}")
    if base:
        header += f" {'vs ' + Path(base).stem:>10}"
    print(header)
    for r in rows:
        line = (f"{r['config']:{width}} {r['pattern']:7} {r['context']:>7} "
                f"{r['allocated'] / 2**20:>14,.2f} {r['formula'] / 2**20:>12,.2f} "
                f"{'yes' if r['allocated'] == r['formula'] else 'NO':>5}")
        if base:
            line += f" {r['ratio']:>10.3f}"
        print(line)
    return rows


if __name__ == "__main__":
    main()
