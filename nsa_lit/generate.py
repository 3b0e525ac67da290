"""Text generation with decode caches: prefill, then one token per step (greedy or sampled).

``python -m nsa_lit.generate --ckpt_path P --prompt_file F [--max_new_tokens 64]
[--temperature 0.8 --top_k 50 --top_p 0.95 --seed 0] [--per_line] [--tokenizer SPEC]`` loads a
training checkpoint (a file, or a sharded FSDP2 directory consolidated in memory) and prints
the continuation of each prompt (see ``docs/decoding.md``).
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from nsa_lit.cache import new_caches
from nsa_lit.checkpoint import CheckpointLoadError, load_checkpoint
from nsa_lit.config import ModelConfig
from nsa_lit.model import Transformer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``(B,)`` from ``logits (B, V)``: the argmax when ``temperature == 0``, else a
    draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and
    to the smallest most-likely set whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _check_request(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        if len(prompt) + max_new_tokens > cfg.seq_len:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} the "
                f"sequence would reach {len(prompt) + max_new_tokens} tokens, more than the "
                f"model's seq_len ({cfg.seq_len})")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size})")


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None,
             cache_dtype: torch.dtype | None = None,
             cuda_graph: bool | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids; lengths may differ) by up to ``max_new_tokens``
    tokens, stopping a sequence after ``eos_id``. Returns the new tokens of each prompt (``eos_id``
    included when produced). Greedy when ``temperature == 0``; ``seed`` fixes the sampling.
    The caches are in ``cache_dtype`` (default: the model's); prompt + new tokens must fit in
    ``seq_len``. ``cuda_graph`` (default: on for a CUDA model) replays each decode step as one
    CUDA graph (:class:`nsa_lit.decode_graph.GraphedDecode`); the tokens are the same."""
    cfg = model.cfg
    prompts = [[int(t) for t in p] for p in prompts]
    _check_request(cfg, prompts, max_new_tokens, temperature, top_k, top_p)
    weight = model.lm_head.weight
    lengths = torch.tensor([len(p) for p in prompts], device=weight.device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=weight.device)
    for i, p in enumerate(prompts):  # right padding: every sequence keeps positions 0..len-1
        tokens[i, : len(p)] = torch.tensor(p)
    caches = new_caches(cfg, len(prompts), int(lengths.max()) + max_new_tokens,
                        cache_dtype or weight.dtype, weight.device)
    rows = torch.arange(len(prompts), device=weight.device)
    logits = model(tokens, caches, lengths)[rows, lengths - 1]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=weight.device).manual_seed(seed)
    if cuda_graph is None:
        cuda_graph = weight.device.type == "cuda"
    step = partial(model.decode, caches=caches)
    if cuda_graph:
        from nsa_lit.decode_graph import GraphedDecode

        step = GraphedDecode(model, caches)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=weight.device)
    new = []
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        new.append(token)
        if eos_id is not None:
            finished |= token == eos_id
        if i == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = step(token)
    out = torch.stack(new, dim=1).tolist()
    if eos_id is not None:
        out = [seq[: seq.index(eos_id) + 1] if eos_id in seq else seq for seq in out]
    return out


# -- checkpoints ---------------------------------------------------------------------------------
def checkpoint_tokenizer(cfg: ModelConfig, data_hparams: dict[str, Any], spec: str | None = None,
                         data_dir: str | None = None):
    """The tokenizer recorded with the data (``data.tokenizer``, ``data.data_dir``) unless
    ``spec`` / ``data_dir`` override it; refused if its vocabulary exceeds the model's."""
    from nsa_lit.data import load_tokenizer

    spec = spec or data_hparams.get("tokenizer")
    data_dir = data_dir or data_hparams.get("data_dir")
    if spec is None:
        raise ValueError("the checkpoint records no data.tokenizer: pass --tokenizer")
    tokenizer = load_tokenizer(spec, data_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer {spec!r} has {tokenizer.vocab_size} tokens, more than the checkpoint's "
            f"model.arch.vocab_size ({cfg.vocab_size}): the model was not trained with it")
    return tokenizer


def read_prompts(path: str | os.PathLike, per_line: bool) -> list[str]:
    """The whole file as one prompt (one trailing newline dropped), or each non-empty line."""
    text = Path(path).read_text()
    if per_line:
        return [line for line in text.splitlines() if line.strip()]
    return [text.removesuffix("\n")]


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True,
                        help="training checkpoint: a .ckpt file or a sharded (FSDP2) directory")
    parser.add_argument("--prompt_file", required=True, help="text file with the prompt(s)")
    parser.add_argument("--per_line", action="store_true",
                        help="each non-empty line is a prompt (decoded as one batch)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer spec (default: the checkpoint's data.tokenizer)")
    parser.add_argument("--data_dir", default=None,
                        help="where a bpe:<n> tokenizer lives (default: the checkpoint's data.data_dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eager", action="store_true",
                        help="on CUDA, run each decode step eagerly instead of as a CUDA graph")
    parser.add_argument("--compile", action="store_true",
                        help="compile each block's decode step first (Transformer.compile_decode: "
                             "fewer, fused kernels a step; costs a compilation)")
    args = parser.parse_args(argv)

    try:
        model, data_hparams = load_checkpoint(args.ckpt_path, args.device)
    except CheckpointLoadError as err:  # one line naming the path, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    tokenizer = checkpoint_tokenizer(model.cfg, data_hparams, args.tokenizer, args.data_dir)
    texts = read_prompts(args.prompt_file, args.per_line)
    if args.compile:
        model.compile_decode()
    outputs = generate(model, [tokenizer.encode(t) for t in texts], args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_id=tokenizer.eos_id, seed=args.seed,
                       cuda_graph=False if args.eager else None)
    completions = [tokenizer.decode([t for t in out if t != tokenizer.eos_id]) for out in outputs]
    for i, (text, completion) in enumerate(zip(texts, completions)):
        if len(texts) > 1:
            print(f"=== prompt {i} ===")
        print(text + completion)
    return completions


if __name__ == "__main__":
    main()
