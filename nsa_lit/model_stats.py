"""Parameter counts and KV-cache size per variant, from the model config alone.

``python -m nsa_lit.model_stats configs/340m/*.yaml`` prints, for each config, the parameter
count and the KV-cache elements per token (all layers, one sequence) at the given contexts.
The cache formula counts what a decoder must keep per layer:
  * raw keys/values: ``2 * n_kv_heads * head_dim`` per token (GQA) or ``latent_dim + rope_dim``
    (latent); all tokens for full attention and selection, the last ``window`` for a
    window-only layer (or the last ``compress_block`` for a compression-only layer);
  * compressed tokens: the same width per completed compression block.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from kernels.compression.reference import num_compressed
from nsa_lit.config import ModelConfig
from nsa_lit.model import Transformer


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """``{"total": ..., "non_embedding": ...}`` (embedding and LM head excluded from the latter)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def layer_kv_elements(cfg: ModelConfig, kind: str, context: int) -> int:
    """Elements one layer of ``kind`` caches for one sequence of ``context`` tokens."""
    branches = cfg.branches(kind)
    if cfg.kv_source(kind) == "grouped":
        width = 2 * cfg.n_kv_heads * cfg.head_dim
    else:
        width = cfg.latent_dim + cfg.rope_dim
    compressed = "compression" in branches or "selection" in branches
    if "full" in branches or "selection" in branches:
        raw = context
    else:
        keep = max(cfg.window if "window" in branches else 0,
                   cfg.compress_block if compressed else 0)
        raw = min(context, keep)
    blocks = num_compressed(context, cfg.compress_block, cfg.compress_stride) if compressed else 0
    return (raw + blocks) * width


def kv_elements_per_token(cfg: ModelConfig, context: int) -> float:
    """Cache elements of all layers divided by the context length."""
    return sum(layer_kv_elements(cfg, kind, context) for kind in cfg.layer_kinds) / context


def load_model_config(path: str | Path) -> ModelConfig:
    """The ``model.arch`` section of a LightningCLI YAML file (defaults for missing fields)."""
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    arch = ((doc.get("model") or {}).get("arch")) or {}
    return ModelConfig(**arch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="LightningCLI YAML files")
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 32768])
    args = parser.parse_args(argv)
    width = max(len(str(p)) for p in args.configs)
    header = f"{'config':{width}} {'pattern':8} {'params':>12} {'non-emb':>12}" + "".join(
        f" {'kv/tok@' + str(c):>12}" for c in args.context)
    print(header)
    for path in args.configs:
        cfg = load_model_config(path)
        params = count_parameters(cfg)
        row = f"{str(path):{width}} {cfg.layer_pattern:8} {params['total']:>12,} {params['non_embedding']:>12,}"
        row += "".join(f" {kv_elements_per_token(cfg, c):>12,.0f}" for c in args.context)
        print(row)


if __name__ == "__main__":
    main()
