"""Perplexity by context length on a held-out split of a prepared dataset.

For each length ``L`` the split's token stream (documents joined by EOS, in stored order, as
:func:`nsa_lit.data.prepare.read_split_tokens` reads it) is cut into non-overlapping windows:
window ``i`` reads tokens ``[i*L, i*L + L)`` and predicts ``[i*L + 1, i*L + L + 1)`` (neighbours
share one boundary token, as training sequences do). Every length reads the same leading
``max_tokens`` tokens of the split (or all of it), so lengths compare on the same text; nothing
is random. The result per length: the mean negative log-likelihood (natural log) over all
predicted tokens and over position buckets ``[0, b), [b, 2b), [2b, 4b), ...`` (the position of
the predicted token inside its window, ``b = first_bucket``), their perplexities ``exp(nll)``,
and the second half of the window alone (``tail``: positions ``[L/2, L)``, every token with at
least ``L/2`` tokens of context).

Lengths beyond the checkpoint's training ``seq_len`` run on a copy of the model built for the
longest length (same weights; RoPE tables and the block geometry extend, nothing is trained) and
are flagged ``extrapolated``. The logits are computed a chunk of positions at a time, so a long
window never holds ``(L, vocab)`` logits at once.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nsa_lit.model import Transformer

LOGIT_CHUNK = 2048  # positions whose logits are materialised at once


def buckets(length: int, first: int) -> list[tuple[int, int]]:
    """Position buckets ``[0, first), [first, 2 first), ...`` doubling, the last ending at
    ``length`` (one bucket ``[0, length)`` when ``length <= first``)."""
    if first < 1:
        raise ValueError(f"first_bucket must be >= 1, got {first}")
    edges = [0]
    b = first
    while b < length:
        edges.append(b)
        b *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


def windows_for(n_tokens: int, length: int, max_tokens: int | None) -> int:
    """Windows of ``length`` that the first ``max_tokens`` (or all ``n_tokens``) tokens hold
    (at least one when the split holds ``length + 1`` tokens)."""
    budget = n_tokens if max_tokens is None else min(n_tokens, max(max_tokens, length + 1))
    return (budget - 1) // length


def model_for_length(model: Transformer, length: int) -> Transformer:
    """``model`` itself when ``length <= seq_len``; else a copy with the same weights whose
    config reads ``length`` tokens (``seq_len`` rounded up to a multiple of ``select_block``
    when the model selects blocks). ``ValueError`` names the length when no config fits."""
    cfg = model.cfg
    if length <= cfg.seq_len:
        return model
    seq_len = length
    if cfg.uses_branch("selection") and seq_len % cfg.select_block:
        seq_len += cfg.select_block - seq_len % cfg.select_block
    try:
        longer = replace(cfg, seq_len=seq_len)
    except ValueError as err:
        raise ValueError(f"length {length}: the model cannot be run at this length "
                         f"({err})") from None
    weight = model.lm_head.weight
    extended = Transformer(longer).to(device=weight.device, dtype=weight.dtype)
    extended.load_state_dict(model.state_dict())
    return extended.eval()


@torch.no_grad()
def window_nll(model: Transformer, tokens: torch.Tensor, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Per-token negative log-likelihood ``(B, T)`` (float32, or float64 for a float64 model) of
    windows ``tokens (B, T + 1)``: position ``t`` scores ``tokens[:, t + 1]`` given
    ``tokens[:, : t + 1]``."""
    hidden = model.hidden(tokens[:, :-1])
    targets = tokens[:, 1:]
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.empty(targets.shape, dtype=dtype, device=hidden.device)
    for s in range(0, targets.shape[1], chunk):
        logits = model.lm_head(hidden[:, s: s + chunk]).to(dtype)
        out[:, s: s + chunk] = F.cross_entropy(logits.transpose(1, 2), targets[:, s: s + chunk],
                                               reduction="none")
    return out


def evaluate_length(model: Transformer, stream: np.ndarray, length: int, n_windows: int,
                    batch_size: int, bar=None) -> np.ndarray:
    """Mean NLL at each position ``(length,)`` (float64) over the first ``n_windows`` windows
    of ``stream``; ``bar`` (tqdm) advances by one per batch."""
    device = model.lm_head.weight.device
    total = torch.zeros(length, dtype=torch.float64, device=device)
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        batch = np.stack([stream[i * length: i * length + length + 1] for i in rows])
        tokens = torch.from_numpy(batch.astype(np.int64)).to(device)
        total += window_nll(model, tokens).double().sum(dim=0)
        if bar is not None:
            bar.update(1)
    return (total / n_windows).cpu().numpy()


def summarize_length(position_nll: np.ndarray, length: int, n_windows: int, train_len: int,
                     first_bucket: int) -> dict[str, Any]:
    """One length's record from its per-position mean NLL."""
    def entry(a: int, b: int) -> dict[str, Any]:
        nll = float(position_nll[a:b].mean())
        return {"start": a, "end": b, "nll": nll, "ppl": math.exp(nll)}

    nll = float(position_nll.mean())
    return {"length": length, "windows": n_windows, "tokens": n_windows * length,
            "extrapolated": length > train_len, "nll": nll, "ppl": math.exp(nll),
            "tail": entry(length // 2, length),
            "buckets": [entry(a, b) for a, b in buckets(length, first_bucket)]}


def evaluate(model: Transformer, stream: np.ndarray, lengths: Sequence[int], batch_size: int = 4,
             max_tokens: int | None = None, first_bucket: int = 128, progress: bool = False,
             where: str = "the split") -> list[dict[str, Any]]:
    """Perplexity records for each of ``lengths`` (in the order given) on the token ``stream``.
    The model's training ``seq_len`` decides what is flagged ``extrapolated``. Errors (before
    any work) name a length the stream cannot fill (``where`` says which split) or the model
    cannot run."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lengths:
        raise ValueError("no lengths given")
    for n in lengths:
        if n < 1:
            raise ValueError(f"length {n}: must be >= 1")
        if len(stream) < n + 1:
            raise ValueError(f"length {n} needs {n + 1} tokens (one window), {where} holds "
                             f"{len(stream)}: use a shorter length or a larger held-out split "
                             "(python -m nsa_lit.data.prepare --val-tokens)")
    train_len = model.cfg.seq_len
    runner = model_for_length(model, max(lengths))  # one copy for every longer length
    plan = [(n, windows_for(len(stream), n, max_tokens)) for n in lengths]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(math.ceil(w / batch_size) for _, w in plan), desc="perplexity",
                   unit="batch")
    records = []
    try:
        for n, w in plan:
            if bar is not None:
                bar.set_postfix(length=n)
            net = model if n <= train_len else runner
            try:
                position_nll = evaluate_length(net, stream, n, w, batch_size, bar)
            except (ValueError, RuntimeError) as err:
                if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err):
                    raise RuntimeError(f"length {n}: out of memory with --batch_size "
                                       f"{batch_size}; lower it (1 is the least)") from err
                raise ValueError(f"length {n}: the model cannot run it ({err})") from err
            records.append(summarize_length(position_nll, n, w, train_len, first_bucket))
    finally:
        if bar is not None:
            bar.close()
    return records


# -- data ----------------------------------------------------------------------------------------
def read_split(data_dir: str | Path, split: str, max_tokens: int | None = None) -> np.ndarray:
    """The first ``max_tokens`` (default all) tokens of ``<data_dir>/<split>``, after checking
    the split's chunk files against its index."""
    from nsa_lit.data.datamodule import validate_split
    from nsa_lit.data.prepare import read_meta
    from nsa_lit.data.windows import TokenStream

    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir}: no meta.json, not a prepared dataset (make one with "
                                "python -m nsa_lit.data.prepare, see docs/data.md)")
    meta = read_meta(data_dir)
    if split not in meta.get("splits", {}):
        raise ValueError(f"{data_dir} has no split {split!r} (it has "
                         f"{', '.join(meta.get('splits', {})) or 'none'})")
    validate_split(data_dir / split, np.dtype(meta["dtype"]).itemsize)
    stream = TokenStream(data_dir / split)
    try:
        n = stream.num_tokens if max_tokens is None else min(stream.num_tokens, max_tokens)
        return stream.read(0, n)
    finally:
        stream.close()


def check_data_tokenizer(vocab_size: int, data_hparams: dict[str, Any],
                         data_dir: str | Path) -> None:
    """Refuse a dataset whose tokens the checkpoint's model was not trained on: a vocabulary
    larger than the model's, or a tokenizer other than the checkpoint's ``data.tokenizer``
    (for ``bpe:<n>``, a different ``tokenizer.json`` than the training data's)."""
    from nsa_lit.data.prepare import read_meta

    meta = read_meta(data_dir)
    if meta["vocab_size"] > vocab_size:
        raise ValueError(f"{data_dir} was tokenized with {meta['tokenizer']!r} "
                         f"({meta['vocab_size']} tokens), more than the checkpoint's vocab_size "
                         f"({vocab_size})")
    trained = data_hparams.get("tokenizer")
    if trained is not None and trained != meta["tokenizer"]:
        raise ValueError(f"{data_dir} was tokenized with {meta['tokenizer']!r}, the checkpoint was "
                         f"trained with {trained!r}: prepare the data with --tokenizer {trained}")
    train_dir = data_hparams.get("data_dir")
    if trained is not None and trained.startswith("bpe:") and train_dir:
        ours, theirs = Path(data_dir) / "tokenizer.json", Path(train_dir) / "tokenizer.json"
        if (ours.is_file() and theirs.is_file() and ours.resolve() != theirs.resolve()
                and ours.read_bytes() != theirs.read_bytes()):
            raise ValueError(f"{ours} differs from the checkpoint's tokenizer {theirs}: both are "
                             f"{trained!r} but trained on different text, so token ids differ")


def text_table(records: Iterable[dict[str, Any]]) -> str:
    """Perplexity per length (all positions, the second half, each bucket)."""
    records = list(records)
    lines = ["length  windows       ppl  ppl[L/2:]  buckets (positions: ppl)"]
    for r in records:
        cells = "  ".join(f"{b['start']}-{b['end']}: {b['ppl']:.2f}" for b in r["buckets"])
        flag = "  (extrapolated)" if r["extrapolated"] else ""
        lines.append(f"{r['length']:>6} {r['windows']:>8} {r['ppl']:9.3f} {r['tail']['ppl']:10.3f}"
                     f"  {cells}{flag}")
    return "\n".join(lines)
