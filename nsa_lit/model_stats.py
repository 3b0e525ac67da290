"""Parameter counts, training FLOPs and KV-cache size per variant, from the model config alone.

``python -m nsa_lit.model_stats configs/340m/*.yaml`` prints, for each config, the parameter
count, the training FLOPs per token at ``seq_len`` (what MFU divides by) and the KV-cache
elements per token (all layers, one sequence) at the given contexts.
The cache formula counts what a decoder must keep per layer:
  * raw keys/values: ``2 * n_kv_heads * head_dim`` per token (GQA) or ``latent_dim + rope_dim``
    (latent); all tokens for full attention and selection, the last ``window`` for a
    window-only layer (or the last ``compress_block`` for a compression-only layer);
  * compressed tokens: the same width per completed compression block;
  * NSA with per-branch key/values (``nsa_kv: per_branch``): each branch its own raw tokens
    (selection all, window the last ``window``, the compressor the last ``compress_block``) plus
    the compressed tokens (``LayerSpec.branch_slots``).
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
import yaml

from nsa_lit.attention import Attention
from nsa_lit.config import Branch, Form, LayerSpec, ModelConfig
from nsa_lit.model import Transformer


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """``{"total": ..., "non_embedding": ...}`` (embedding and LM head excluded from the latter)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def kv_elements_per_token(cfg: ModelConfig, context: int) -> float:
    """Cache elements of all layers (``LayerSpec.kv_elements``) divided by the context length."""
    return sum(spec.kv_elements(context) for spec in cfg.layers) / context


# -- FLOPs -------------------------------------------------------------------------------------
# Mean number of keys a query reads, over the positions t = 0..T-1 of a sequence.
def visible_causal(T: int) -> float:
    return (T + 1) / 2


def visible_window(T: int, window: int) -> float:
    """Causal sliding window: ``min(t + 1, window)``."""
    w = min(window, T)
    return (w * (w + 1) / 2 + (T - w) * w) / T


def visible_compressed(T: int, block_len: int, stride: int) -> float:
    """Compressed tokens whose block has ended: ``max(0, (t - block_len + 1) // stride + 1)``."""
    return sum(max(0, (t - block_len + 1) // stride + 1) for t in range(T)) / T


def visible_selected(T: int, select_block: int, top_n: int) -> float:
    """Raw tokens of the selected blocks: ``top_n - 1`` whole blocks (fewer early on) plus the
    current block up to ``t``."""
    return sum((min(top_n, t // select_block + 1) - 1) * select_block + t % select_block + 1
               for t in range(T)) / T


def attention_flops(tokens: int, heads: int, dqk: int, dv: int, visible: float) -> float:
    """Forward FLOPs of ``q k^T`` and ``p v``: ``2 * visible * (dqk + dv)`` per query and head."""
    return 2.0 * visible * (dqk + dv) * heads * tokens


def attention_flop_parts(spec: LayerSpec, T: int) -> tuple[float, float]:
    """Forward attention FLOPs per token of one layer, split into what is differentiated (the
    branch outputs) and what runs without gradient (block-importance scores, and the
    compression attention when only selection needs its log-sum-exp)."""
    H, branches = spec.n_heads, spec.branches
    trained = scoring = 0.0
    if Branch.FULL in branches:
        trained += attention_flops(1, H, *spec.dims(Branch.FULL), visible_causal(T))
    if Branch.WINDOW in branches:
        trained += attention_flops(1, H, *spec.dims(Branch.WINDOW), visible_window(T, spec.window))
    if spec.compresses:
        dqk, dv = spec.dims(Branch.COMPRESSION)
        n_cmp = visible_compressed(T, spec.compress_block, spec.compress_stride)
        compression = attention_flops(1, H, dqk, dv, n_cmp)
        if Branch.COMPRESSION in branches:
            trained += compression
        else:
            scoring += compression
        if spec.selects:
            scoring += attention_flops(1, H, dqk, 0, n_cmp) / spec.q_share
            trained += attention_flops(1, H, *spec.dims(Branch.SELECTION),
                                       visible_selected(T, spec.select_block, spec.top_n))
    return trained, scoring


def layer_attention_flops(spec: LayerSpec, T: int, training: bool = False) -> float:
    """Attention FLOPs per token of the layer ``spec`` on sequences of ``T`` tokens: every
    branch in its training form, the block-importance scores (one query in ``q_share``) and the
    compression attention that selection needs even without the compression branch. Forward
    only, or with ``training`` the forward and backward (3x for what gets gradients, 1x for the
    scoring that runs without). Projections are :func:`matmul_flops_per_token`'s."""
    trained, scoring = attention_flop_parts(spec, T)
    return 3.0 * trained + scoring if training else trained + scoring


def _latent_projection_flops(attn: Attention) -> float:
    """Forward FLOPs per token of a latent layer's ``W_uk`` / ``W_uv`` products, as the layer
    applies them in its forms: per-head keys and values per token (expanded branches), the
    absorbed query once and ``W_uv`` once per absorbed branch output, and per-head keys and
    values of the compressed tokens (one in ``compress_stride``) in the expanded form."""
    spec = attn.spec
    uk, uv = attn.kv.w_uk.numel(), attn.kv.w_uv.numel()
    weights = 0.0
    if Form.EXPANDED in spec.token_forms:
        weights += uk + uv
    if Form.ABSORBED in spec.token_forms or spec.compressed_form is Form.ABSORBED:
        weights += uk
    weights += uv * sum(spec.form(b) is Form.ABSORBED for b in spec.branches)
    if spec.compressed_form is Form.EXPANDED:
        weights += (uk + uv) / spec.compress_stride
    return 2.0 * weights


def matmul_flops_per_token(module: torch.nn.Module) -> float:
    """Forward FLOPs per token of the matrix products in ``module`` (a model or a layer): 2 per
    weight of every linear layer (a compressor's MLP only once per compressed token and
    head/group) and the latent up-projections as each layer applies them."""
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    share = {}  # compressor Linear -> applications per token
    for attn in layers:
        spec = attn.spec
        for name in attn.compressor_names:  # latent/keys/values: per group; RoPE key: once
            groups = 1 if name == "rope_compressor" else spec.kv_heads
            for m in getattr(attn, name).modules():
                share[m] = groups / spec.compress_stride
    flops = sum(2.0 * m.weight.numel() * share.get(m, 1.0) for m in module.modules()
                if isinstance(m, torch.nn.Linear))
    return flops + sum(_latent_projection_flops(a) for a in layers if a.spec.latent)


def training_flops_per_token(cfg: ModelConfig, T: int | None = None) -> float:
    """FLOPs of one training step per token on sequences of ``T`` tokens (default ``seq_len``):
    forward + backward = 3x the forward of :func:`matmul_flops_per_token` (LM head included,
    embedding lookup, norms and elementwise work not) plus :func:`layer_attention_flops` of every
    layer in training (scoring without gradient counted once): the usual MFU convention, with
    attention counted for what each variant computes."""
    T = T or cfg.seq_len
    with torch.device("meta"):
        model = Transformer(cfg)
    kinds = Counter(cfg.layer_kinds)
    return (3.0 * matmul_flops_per_token(model)
            + sum(n * layer_attention_flops(cfg.layer(kind), T, training=True)
                  for kind, n in kinds.items()))


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
    header = (f"{'config':{width}} {'pattern':8} {'params':>12} {'non-emb':>12} "
              f"{'train GFLOP/tok':>15}" + "".join(f" {'kv/tok@' + str(c):>12}"
                                                  for c in args.context))
    print(header)
    for path in args.configs:
        cfg = load_model_config(path)
        params = count_parameters(cfg)
        row = (f"{str(path):{width}} {cfg.layer_pattern:8} {params['total']:>12,} "
               f"{params['non_embedding']:>12,} {training_flops_per_token(cfg) / 1e9:>15.2f}")
        row += "".join(f" {kv_elements_per_token(cfg, c):>12,.0f}" for c in args.context)
        print(row)


if __name__ == "__main__":
    main()
