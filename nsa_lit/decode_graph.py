"""A decode step captured as a CUDA graph: one launch per token instead of hundreds.

Eager decoding of a 24-layer model launches a few thousand small kernels per step, and at batch
sizes that fit on one GPU the step is bound by Python and launch overhead, not by the GPU.
:class:`GraphedDecode` records ``model.decode(tokens, caches)`` and replays it. Replays are
exact: the graph runs the same kernels on the same tensors. This works because a decode step has
no host synchronisation and only updates the caches in place (``TokenCache`` keeps the storage of
``lengths`` and ``block_idx``); the host-side bookkeeping a replay skips (``TokenCache.reserve``:
the room check, ``longest`` and ``shortest``) is done here before each replay, and so is
``Transformer.refresh_step_weights`` (the merged decode weights follow the parameters in place).

A step's work depends on its :class:`~nsa_lit.cache.StepPlan` (whether a compression block ends,
whether a query-sharing group opens; known on the host when every sequence is at one position),
so there is one graph per plan of the whole model: for the 340M ASA config three, which repeat
every 16 tokens (a compression block ends, a query-sharing group opens, neither). Prompts of
different lengths have one plan: the masked step that does everything.
"""
from __future__ import annotations

import torch

from nsa_lit.attention import layer
from nsa_lit.cache import StepPlan, TokenCache
from nsa_lit.model import Transformer


class GraphedDecode:
    """``step(tokens (B,)) -> logits (B, vocab_size)``, like ``model.decode(tokens, caches)``.

    The first step of each plan (``tuple(cache.plan() for cache in caches)``) runs eagerly (it
    compiles the kernels); the second captures it into a CUDA graph, and every later step of
    that plan replays it. The returned logits are a tensor a later call overwrites: use (or
    copy) them before stepping again. The graphs are bound to ``caches``, the batch size and
    the latent layers' decode form (``layer.MERGED_UP_PROJECTIONS_MIN_BATCH``, refused if it
    changes); make a new ``GraphedDecode`` for new caches.
    """

    def __init__(self, model: Transformer, caches: list[TokenCache]):
        device = model.lm_head.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {device}")
        self.model, self.caches = model, caches
        self.batch = len(caches[0].lengths)
        self.tokens = torch.zeros(self.batch, dtype=torch.long, device=device)
        # per plan: the captured graph and the logits tensor it writes
        self.graphs: dict[tuple[StepPlan, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.warm: set[tuple[StepPlan, ...]] = set()  # plans whose eager first step has run
        self.merged_min_batch = layer.MERGED_UP_PROJECTIONS_MIN_BATCH

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape != (self.batch,):
            raise ValueError(f"tokens must be ({self.batch},) (the captured batch), got "
                             f"{tuple(tokens.shape)}")
        if layer.MERGED_UP_PROJECTIONS_MIN_BATCH != self.merged_min_batch:
            raise RuntimeError(
                "MERGED_UP_PROJECTIONS_MIN_BATCH changed from "
                f"{self.merged_min_batch} to {layer.MERGED_UP_PROJECTIONS_MIN_BATCH} after this "
                "GraphedDecode was made: its graphs keep the old decode form; make a new one")
        plan = tuple(cache.plan() for cache in self.caches)
        if plan not in self.warm:  # eager: compiles every kernel this plan's step launches
            logits = self.model.decode(tokens, self.caches)
            self.warm.add(plan)
            return logits
        self.tokens.copy_(tokens)
        # the merged decode weights, updated in place if a parameter changed (a capture then
        # finds them current and records no rebuild)
        self.model.refresh_step_weights()
        if plan not in self.graphs:
            self.graphs[plan] = self._capture()
        for cache in self.caches:
            cache.reserve()
        graph, logits = self.graphs[plan]
        graph.replay()
        return logits

    __call__ = step

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one step. Capturing runs no kernel, but its Python runs once: undo the host
        bookkeeping it did (the replay that follows does its own)."""
        host = [(cache.longest, cache.shortest) for cache in self.caches]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.tokens.device):
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    logits = self.model.decode(self.tokens, self.caches)
        finally:
            for cache, (longest, shortest) in zip(self.caches, host):
                cache.longest, cache.shortest = longest, shortest
        return graph, logits
