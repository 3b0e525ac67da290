"""Weights merged for a one-token decode step.

At small batch a decode step is bound by its kernel launches, not by arithmetic. A layer runs
the projections of one input as one GEMM by their stacked weights (the query, the keys/values or
latent, and the gate; the MLP's gate and up projections), in training too, where the stack is
concatenated in every forward. A decode step keeps it between steps instead, and in latent
layers absorbs the per-head latent up-projections into the query and output projections
(``W_uk[h]^T W_q[h]`` and ``W_o[:, h] W_uv[h]``, MLA's inference form), which removes the step's
two per-head matmuls.

:class:`MergedWeights` builds them from the parameters on first use, under ``no_grad`` (decoding
is inference only), and rebuilds them whenever a parameter changed (its version counter, data
pointer, dtype or device): in place when the shapes and device are unchanged, so that tensors a
CUDA graph captured keep their addresses. ``Transformer.refresh_step_weights`` runs on the host
before each step (``Transformer.decode`` and ``GraphedDecode`` call it), outside compiled code,
and first asks a :class:`ParameterWatch` of the whole model whether anything changed at all (a
few tens of microseconds a step for 340M). Changes made through ``.data`` bypass the version
counters: ``refresh_step_weights(force=True)`` after them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _fingerprint(params: list[torch.Tensor]) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


class ParameterWatch:
    """The state of every parameter of ``module``, to compare between calls: each parameter's
    data pointer (a new dtype, device or storage) and version counter (an in-place update),
    read through its module, so that a parameter replaced by a new object counts too. The
    (module, name) slots are listed once: cheaper than ``module.parameters()``."""

    def __init__(self, module: nn.Module):
        self.slots = [(m, name) for m in module.modules()
                      for name, p in m._parameters.items() if p is not None]
        self.seen: tuple | None = None  # the state the caller last acted on

    def state(self) -> tuple:
        return tuple((p.data_ptr(), p._version)
                     for p in (m._parameters[name] for m, name in self.slots))


class MergedWeights:
    """``build() -> dict[str, Tensor]`` over the parameters ``sources()``, cached: ``refresh()``
    rebuilds it when any of them changed; ``tensors`` holds the last build."""

    def __init__(self, build: Callable[[], dict[str, torch.Tensor | None]],
                 sources: Callable[[], list[torch.Tensor]]):
        self.build, self.sources = build, sources
        self.tensors: dict[str, torch.Tensor | None] | None = None
        self.fingerprint: tuple | None = None

    @torch.no_grad()
    def refresh(self, force: bool = False) -> dict[str, torch.Tensor | None]:
        """The tensors, rebuilt first if a source changed (or ``force``)."""
        params = self.sources()
        fingerprint = _fingerprint(params)
        if force or fingerprint != self.fingerprint:
            fresh = self.build()
            old = self.tensors
            if old is not None and old.keys() == fresh.keys() and all(
                    (a is None and b is None) or (a is not None and b is not None
                                                  and a.shape == b.shape and a.dtype == b.dtype
                                                  and a.device == b.device)
                    for a, b in ((old[k], fresh[k]) for k in fresh)):
                for name, tensor in fresh.items():
                    if tensor is not None:
                        old[name].copy_(tensor)
            else:
                self.tensors = fresh
            self.fingerprint = fingerprint
        return self.tensors


def stack(pieces: list[tuple[torch.Tensor, torch.Tensor | None]]
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row-stack ``(weight (out_i, in), bias (out_i,) or None)`` pieces into one ``(weight,
    bias)``; the bias is None when no piece has one, zeros where a piece has none."""
    weight = torch.cat([w for w, _ in pieces])
    if all(b is None for _, b in pieces):
        return weight, None
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in pieces])
    return weight, bias
