"""A decode step captured as one CUDA graph: one launch per token instead of hundreds.

Eager decoding of a 24-layer model launches a few thousand small kernels per step, and at batch
sizes that fit on one GPU the step is bound by Python and launch overhead, not by the GPU.
:class:`GraphedDecode` records ``model.decode(tokens, caches)`` once and replays it. Replays are
exact: the graph runs the same kernels on the same tensors. This works because a decode step has
no host synchronisation and only updates the caches in place (``TokenCache`` keeps the storage of
``lengths`` and ``block_idx``); the host-side bookkeeping a replay skips (``TokenCache.reserve``:
the room check and ``longest``) is done here before each replay.
"""
from __future__ import annotations

import torch

from nsa_lit.cache import TokenCache
from nsa_lit.model import Transformer


class GraphedDecode:
    """``step(tokens (B,)) -> logits (B, vocab_size)``, like ``model.decode(tokens, caches)``.

    The first call runs eagerly (it compiles the kernels); the second captures the step into a
    CUDA graph, and every later call replays it. The returned logits are a tensor the next call
    overwrites: use (or copy) them before stepping again. The graph is bound to ``caches`` and the
    batch size; make a new ``GraphedDecode`` for new caches.
    """

    def __init__(self, model: Transformer, caches: list[TokenCache]):
        device = model.lm_head.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {device}")
        self.model, self.caches = model, caches
        self.batch = len(caches[0].lengths)
        self.tokens = torch.zeros(self.batch, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = False  # the first (eager) step has run

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape != (self.batch,):
            raise ValueError(f"tokens must be ({self.batch},) (the captured batch), got "
                             f"{tuple(tokens.shape)}")
        if not self.warm:  # eager: compiles every kernel the step launches
            logits = self.model.decode(tokens, self.caches)
            self.warm = True
            return logits
        self.tokens.copy_(tokens)
        if self.graph is None:
            self._capture()
        for cache in self.caches:
            cache.reserve()
        self.graph.replay()
        return self.logits

    __call__ = step

    def _capture(self) -> None:
        """Record one step. Capturing runs no kernel, but its Python runs once: undo the host
        bookkeeping it did (the replay that follows does its own)."""
        longest = [cache.longest for cache in self.caches]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.tokens.device):
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    logits = self.model.decode(self.tokens, self.caches)
        finally:
            for cache, n in zip(self.caches, longest):
                cache.longest = n
        self.graph, self.logits = graph, logits
