"""Per-sequence log-likelihood of a continuation given a context (lm-eval ``loglikelihood``).

:func:`loglikelihood` scores requests ``(context tokens, continuation tokens)``: the sum of the
log-probabilities of the continuation tokens, each conditioned on everything before it, and
whether the continuation is the argmax at every position (``is_greedy``). Requests are sorted by
length (longest first), batched and right-padded; the model is causal, so padding to the right of
a sequence does not change its logits (``tests/test_eval_likelihood.py`` checks it against a
one-sequence-at-a-time computation for the ASA, NSA and full variants).

A context that does not fit is cut from the left: the model sees at most ``seq_len`` tokens, so a
request keeps its whole continuation and the last ``seq_len + 1 - len(continuation)`` context
tokens; :attr:`LoglikelihoodResult.truncated` records how many context tokens were dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from nsa_lit.model import Transformer


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float        # sum of the continuation tokens' log-probabilities (natural log)
    is_greedy: bool       # the continuation is the argmax at each of its positions
    n_tokens: int         # continuation tokens scored
    truncated: int = 0    # context tokens dropped from the left to fit seq_len (0: none)


def _fit(context: list[int], continuation: list[int], seq_len: int) -> tuple[list[int], int]:
    """The tokens the model reads (context + continuation minus the last token), cut from the
    left to ``seq_len``; returns ``(full sequence kept, context tokens dropped)``."""
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    if not context:
        raise ValueError("empty context: the first continuation token needs a token before it "
                         "(lm-eval passes the EOS token as the context of an unconditional request)")
    if len(continuation) > seq_len:
        raise ValueError(f"continuation of {len(continuation)} tokens is longer than the model's "
                         f"seq_len ({seq_len}): it cannot be scored in one window")
    full = context + continuation
    dropped = max(0, len(full) - (seq_len + 1))
    return full[dropped:], dropped


@torch.no_grad()
def loglikelihood(model: Transformer, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                  batch_size: int = 8, progress: bool = False,
                  pad_id: int = 0) -> list[LoglikelihoodResult]:
    """Score each ``(context, continuation)`` token-id pair; results in the order of
    ``requests``. Batches of up to ``batch_size`` requests of similar length run in one forward
    (log-softmax in float32, or float64 for a float64 model); ``progress`` shows a tqdm bar over the batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.cfg
    device = model.lm_head.weight.device
    prepared = []
    for i, (context, continuation) in enumerate(requests):
        context = [int(t) for t in context]
        continuation = [int(t) for t in continuation]
        try:
            full, dropped = _fit(context, continuation, cfg.seq_len)
        except ValueError as err:
            raise ValueError(f"request {i}: {err}") from None
        if min(full) < 0 or max(full) >= cfg.vocab_size:
            raise ValueError(f"request {i} has token ids outside [0, vocab_size={cfg.vocab_size})")
        prepared.append((i, full, len(continuation), dropped))
    order = sorted(prepared, key=lambda r: (-len(r[1]), r[0]))  # longest first: OOM shows at once
    batches: Iterable = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="loglikelihood", unit="batch")
    results: list[LoglikelihoodResult | None] = [None] * len(prepared)
    for batch in batches:
        width = max(len(full) for _, full, _, _ in batch) - 1
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        for row, (_, full, _, _) in enumerate(batch):  # right padding
            tokens[row, : len(full) - 1] = torch.tensor(full[:-1], device=device)
        logits = model(tokens)
        logprobs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)
        for row, (i, full, n, dropped) in enumerate(batch):
            end = len(full) - 1  # logits at positions end-n .. end-1 predict the continuation
            lp = logprobs[row, end - n: end]
            target = torch.tensor(full[-n:], device=device)
            results[i] = LoglikelihoodResult(
                logprob=float(lp.gather(-1, target[:, None]).sum()),
                is_greedy=bool((lp.argmax(dim=-1) == target).all()),
                n_tokens=n, truncated=dropped)
    return results  # type: ignore[return-value]


def loglikelihood_text(model: Transformer, tokenizer, requests: Sequence[tuple[str, str]],
                       **kwargs) -> list[LoglikelihoodResult]:
    """:func:`loglikelihood` of ``(context, continuation)`` strings, encoded as lm-eval encodes a
    causal model's request: the context's trailing whitespace moves to the continuation, the
    whole text is encoded and the context's own tokens are split off (so a word-boundary token
    is the context's, as in the running text); an empty context becomes the tokenizer's EOS
    token and the continuation is encoded alone."""
    pairs = []
    for context, continuation in requests:
        if not context:
            pairs.append(([tokenizer.eos_id], tokenizer.encode(continuation)))
            continue
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = tokenizer.encode(context)
        pairs.append((ctx, tokenizer.encode(context + continuation)[len(ctx):]))
    return loglikelihood(model, pairs, **kwargs)
