"""Decode caches: what each attention layer keeps of the tokens already seen, one type per kind.

| layer | cache | raw tokens kept | compressed |
|---|---|---|---|
| full attention ``F`` | :class:`GroupedKVCache` | all | - |
| NSA ``N`` (with selection), grouped global ``G`` | :class:`GroupedKVCache` | all | yes |
| NSA without selection, grouped local ``L`` | :class:`GroupedKVCache` | ring: ``max(window, compress_block)`` | if compressing |
| ASA local ``L`` (MLA) | :class:`LatentWindowCache` | ring: ``window`` | - |
| ASA global ``G`` (GLA) | :class:`LatentKVCache` | all | yes |
| NSA ``N``, ``nsa_kv: per_branch`` | :class:`BranchKVCache`: one :class:`GroupedKVCache` per branch | compression: ring of ``compress_block``; selection: all; window: ring of ``window`` | compression's |

Grouped caches hold rotated keys and values ``(n_kv_heads, head_dim)`` per token; latent caches hold
the latent ``c (groups, latent_dim / groups)`` and the rotated RoPE key ``k_r (1, rope_dim)``.
Compressed tokens are the layer's own compressors applied to the cached raw tokens, appended as
blocks complete. Every sequence of the batch has its own length, hence its own positions, block
boundaries and ring offset. What a layer keeps is its ``LayerSpec``'s (``cache_slots``,
``compressed_tokens``, ``cache_width``); ``LayerSpec.kv_elements`` counts the same elements.

When every sequence is at the same position (one prompt, or prompts of one length), the host knows
what the next step does (:class:`StepPlan`): whether a compression block ends, whether a
query-sharing group opens. The step then skips the compressor and the block scoring when they would
be thrown away, instead of computing them and masking the result per sequence.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from kernels.blocks import compressed_visible, num_compressed
from nsa_lit.config import Branch, ModelConfig

Pair = tuple[torch.Tensor, torch.Tensor]


class StepPlan(NamedTuple):
    """What a layer's next decode step does, as far as the host knows it (``None``: it depends on
    the sequence, and the step computes it for all and keeps it where it applies).

    * ``compress``: a compression block ends at the new token, so it is compressed and appended
      (``False`` also for a cache that does not compress);
    * ``select``: the new token opens a query-sharing group, so blocks are chosen afresh rather
      than kept (``False`` also for a cache without selection).

    Known whenever all sequences share one position. A plan is a few booleans, so a compiled step
    specialises on it (one compilation per plan) and :class:`~nsa_lit.decode_graph.GraphedDecode`
    captures one graph per plan."""

    compress: bool | None = None
    select: bool | None = None


class TokenCache:
    """Two per-token tensors of ``batch`` sequences, each sequence with its own length.

    * ``raw``: two tensors ``(B, slots, *shape)``; token ``p`` of a sequence lives in slot
      ``p % slots``: every token when ``slots == max_len``, else a ring of the last ``slots``.
    * ``compressed`` (``compress=(block_len, stride)``): two tensors
      ``(B, num_compressed(max_len), *shape)``, compressed token ``i`` in slot ``i``.
    * ``block_idx`` (``select=(groups, top_n, q_share)``): ``(B, groups, top_n)`` int64, the blocks
      chosen by the first query of each sequence's current query-sharing group.
    * ``lengths``: ``(B,)`` int64, tokens written per sequence (= position of the next one).

    Decoding updates ``lengths`` and ``block_idx`` in place (their storage never changes), so a
    decode step can be captured as a CUDA graph (:mod:`nsa_lit.decode_graph`); the host-side
    ``longest`` and ``shortest`` (the largest and smallest of ``lengths``) are advanced by
    :meth:`reserve`, which a graph replay must call itself.
    """

    latent = False  # latent layout: raw = (c, k_r), the latent is key and value

    def __init__(self, batch: int, max_len: int, shapes: tuple[tuple[int, ...], ...], *,
                 slots: int, compress: tuple[int, int] | None = None,
                 select: tuple[int, int, int] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if not 1 <= slots <= max_len:
            raise ValueError(f"cache slots must be in [1, max_len={max_len}], got {slots}")
        self.max_len, self.slots = max_len, slots

        def zeros(n, shape):
            return torch.zeros(batch, n, *shape, dtype=dtype, device=device)

        self.raw: Pair = tuple(zeros(slots, s) for s in shapes)
        self.compress = compress
        self.compressed: Pair | None = None
        if compress is not None:
            block_len, stride = compress
            n = num_compressed(max_len, block_len, stride)
            if n and slots < block_len:
                raise ValueError(f"a compressing cache needs >= compress_block ({block_len}) "
                                 f"slots, got {slots}")
            self.compressed = tuple(zeros(n, s) for s in shapes)
        self.q_share = select[2] if select is not None else None
        self.block_idx = (None if select is None else
                          torch.full((batch, select[0], select[1]), -1, dtype=torch.long,
                                     device=device))
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        # max(lengths) and min(lengths), kept on the host: no device sync per step
        self.longest = self.shortest = 0

    # -- what attention reads ----------------------------------------------------------------
    def for_branch(self, branch: Branch) -> TokenCache:
        """The cache ``branch`` reads: this one (all branches of a layer share it; compare
        :meth:`BranchKVCache.for_branch`)."""
        return self

    def attention_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(k, v, k_rope)`` of the raw tokens, as :mod:`kernels.decode.reference` takes them."""
        a, b = self.raw
        return (a, a, b) if self.latent else (a, b, None)

    def compressed_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(k_cmp, v_cmp, k_rope_cmp)`` of the compressed tokens."""
        a, b = self.compressed
        return (a, a, b) if self.latent else (a, b, None)

    def bytes_allocated(self) -> int:
        """Bytes of the cached token tensors (raw and compressed), from the tensors themselves;
        the bookkeeping (``lengths``, ``block_idx``: a few int64 per sequence) is not counted."""
        tensors = list(self.raw) + list(self.compressed or ())
        return sum(t.nbytes for t in tensors)

    # -- writing -------------------------------------------------------------------------------
    def write_prompt(self, raw: Pair, compressed: Pair | None, lengths: torch.Tensor) -> None:
        """Prefill: from a forward over right-padded prompts (``raw`` tensors ``(B, T, *shape)``,
        ``compressed`` ``(B, N, *shape)``), keep sequence ``b``'s first ``lengths[b]`` tokens."""
        T = raw[0].shape[1]
        longest = int(lengths.max())
        if int(lengths.min()) < 1 or longest > T:
            raise ValueError(f"prompt lengths must be in [1, {T}] (the padded length), "
                             f"got {lengths.tolist()}")
        self._check_room(longest)
        p = torch.arange(T, device=lengths.device)
        keep = (p < lengths[:, None]) & (p >= lengths[:, None] - self.slots)
        b, t = keep.nonzero(as_tuple=True)
        for buf, new in zip(self.raw, raw):
            buf[b, t % self.slots] = new[b, t].to(buf.dtype)
        if self.compressed is not None:
            block_len, stride = self.compress
            done = compressed_visible(lengths - 1, compressed[0].shape[1], block_len, stride)
            b, i = done.nonzero(as_tuple=True)
            for buf, new in zip(self.compressed, compressed):
                buf[b, i] = new[b, i].to(buf.dtype)
        self.lengths.copy_(lengths)
        self.longest, self.shortest = longest, int(lengths.min())

    def keep_selection(self, block_idx: torch.Tensor) -> None:
        """Prefill: keep the blocks of each sequence's last prompt token from ``block_idx
        (B, T, G, top_n)``, which query sharing gave the first query of its group."""
        self.block_idx.copy_(block_idx[torch.arange(len(block_idx)), self.lengths - 1])

    @property
    def compresses(self) -> bool:
        """Whether a decode step may append a compressed token (the cache keeps at least one)."""
        return self.compressed is not None and self.compressed[0].shape[1] > 0

    def plan(self) -> StepPlan:
        """The next step's :class:`StepPlan`, from the host-side lengths: known when every
        sequence is at one position, else ``None`` where it depends on the sequence."""
        known = self.shortest == self.longest
        compress: bool | None = False
        if self.compresses:
            block_len, stride = self.compress
            start = self.longest - block_len + 1  # first token of the block ending here
            compress = (start >= 0 and start % stride == 0) if known else None
        select = (self.longest % self.q_share == 0 if known else None) if self.q_share else False
        return StepPlan(compress, select)

    def append(self, a: torch.Tensor, b: torch.Tensor,
               compress: Callable[[torch.Tensor, torch.Tensor], Pair] | None = None,
               plan: StepPlan = StepPlan()) -> None:
        """Write one token per sequence (``a``, ``b``: ``(B, *shape)``) at position ``lengths``.
        A compressing cache then calls ``compress`` on the last ``block_len`` raw tokens
        (``(B, block_len, *shape)`` each, returning ``(B, 1, *shape)`` each) and keeps the result
        for the sequences whose block has just ended: for all of them when ``plan.compress``
        (the :meth:`plan` of this step), for none (without compressing) when it is ``False``.
        The caller runs the host side of the step, :meth:`reserve`, first and advances
        ``lengths`` after (``Transformer.decode`` does both, the latter for every layer's cache
        in one launch: :func:`advance`)."""
        positions = self.lengths
        rows = torch.arange(len(positions), device=positions.device)
        for buf, new in zip(self.raw, (a, b)):
            buf[rows, positions % self.slots] = new.to(buf.dtype)
        if self.compresses and plan.compress is not False:
            block_len, stride = self.compress
            start = positions - block_len + 1  # first token of the block ending here
            slots = (start[:, None] + torch.arange(block_len, device=start.device)) % self.slots
            new = compress(*(buf[rows[:, None], slots] for buf in self.raw))
            i = (start // stride).clamp(0, self.compressed[0].shape[1] - 1)
            done = None if plan.compress else (start >= 0) & (start % stride == 0)
            for buf, c in zip(self.compressed, new):
                c = c[:, 0].to(buf.dtype)
                if done is not None:
                    c = torch.where(done.view(-1, *[1] * (c.dim() - 1)), c, buf[rows, i])
                buf[rows, i] = c

    def share_selection(self, fresh: torch.Tensor, positions: torch.Tensor,
                        opens: bool | None = None) -> torch.Tensor:
        """Query sharing: the blocks ``(B, G, top_n)`` the query at ``positions`` uses, ``fresh``
        (its own choice) when it opens a group of ``q_share`` queries, else the kept ones.
        ``opens=True`` (the step's ``plan.select``): every sequence opens one."""
        if opens:
            self.block_idx.copy_(fresh)
        else:
            opens = (positions % self.q_share == 0)[:, None, None]
            self.block_idx.copy_(torch.where(opens, fresh, self.block_idx))
        return self.block_idx

    @torch.compiler.disable
    def reserve(self) -> StepPlan:
        """Host side of a decode step, run before it (outside any compiled code, which would
        specialise on the lengths and recompile every step): check that one more token fits,
        advance ``longest`` and ``shortest``, and return the step's :meth:`plan`."""
        plan = self.plan()
        self._check_room(self.longest + 1)
        self.longest += 1
        self.shortest += 1
        return plan

    def _check_room(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"decode cache full: a sequence would reach {length} tokens, more "
                             f"than the cache's max_len={self.max_len}")


class GroupedKVCache(TokenCache):
    """GQA layers (full attention, NSA, grouped local/global layers): rotated keys ``k`` and values
    ``v``, ``(B, slots, n_kv_heads, head_dim)`` each, plus compressed ``k_cmp``, ``v_cmp``
    ``(B, num_compressed(max_len), n_kv_heads, head_dim)`` when the layer compresses.
    ``slots = max_len`` (every token) unless the layer only needs recent ones (window-only or
    window + compression layers: a ring buffer)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 slots: int | None = None, compress=None, select=None,
                 dtype=torch.float32, device=None):
        shape = (n_kv_heads, head_dim)
        super().__init__(batch, max_len, (shape, shape), slots=slots or max_len,
                         compress=compress, select=select, dtype=dtype, device=device)


class LatentWindowCache(TokenCache):
    """ASA local layers (MLA, sliding window): latent ``c (B, slots, groups, group_dim)`` and
    rotated RoPE key ``k_r (B, slots, 1, rope_dim)`` in a ring buffer of
    ``slots = min(window, max_len)``: never more than the window."""

    latent = True

    def __init__(self, batch: int, max_len: int, window: int, groups: int, group_dim: int,
                 rope_dim: int, *, dtype=torch.float32, device=None):
        super().__init__(batch, max_len, ((groups, group_dim), (1, rope_dim)),
                         slots=min(window, max_len), dtype=dtype, device=device)


class LatentKVCache(TokenCache):
    """ASA global layers (GLA): latent ``c (B, max_len, groups, group_dim)`` and rotated RoPE key
    ``k_r (B, max_len, 1, rope_dim)`` of every token, plus compressed ``c_cmp``, ``kr_cmp``
    ``(B, num_compressed(max_len), ...)`` and the kept selection for query sharing."""

    latent = True

    def __init__(self, batch: int, max_len: int, groups: int, group_dim: int, rope_dim: int, *,
                 compress: tuple[int, int], select=None, dtype=torch.float32, device=None):
        super().__init__(batch, max_len, ((groups, group_dim), (1, rope_dim)), slots=max_len,
                         compress=compress, select=select, dtype=dtype, device=device)


def _shared_by_branches(name: str) -> property:
    """A host-side attribute of :class:`BranchKVCache` that every branch's cache keeps alike:
    read from one, written to all."""
    def get(self) -> int:
        return getattr(next(iter(self.caches.values())), name)

    def put(self, value: int) -> None:
        for cache in self.caches.values():
            setattr(cache, name, value)
    return property(get, put)


class BranchKVCache:
    """NSA layers with per-branch key/values (``nsa_kv: per_branch``): one
    :class:`GroupedKVCache` per branch of ``LayerSpec.kv_branches``, each holding that branch's
    own rotated keys and values ``(n_kv_heads, head_dim)`` per token for ``slots[branch]``
    tokens (``LayerSpec.branch_slots``):

    * compression: a ring of the last ``compress_block`` raw tokens, from which each completed
      block is compressed, plus the compressed tokens ``(B, num_compressed(max_len), ...)``;
    * selection: every token, plus the kept selection for query sharing;
    * window: a ring of the last ``window`` tokens.

    All share one ``lengths`` tensor (:func:`advance` advances it once). The layer reads
    a branch's cache through :meth:`for_branch`.
    """

    latent = False

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 slots: dict[Branch, int], *, compress: tuple[int, int] | None = None,
                 select: tuple[int, int, int] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if not slots:
            raise ValueError("a BranchKVCache needs at least one branch in `slots`")
        self.max_len = max_len
        self.caches: dict[Branch, GroupedKVCache] = {
            branch: GroupedKVCache(
                batch, max_len, n_kv_heads, head_dim, slots=n,
                compress=compress if branch is Branch.COMPRESSION else None,
                select=select if branch is Branch.SELECTION else None, dtype=dtype, device=device)
            for branch, n in slots.items()}
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        for cache in self.caches.values():
            cache.lengths = self.lengths

    def for_branch(self, branch: Branch) -> GroupedKVCache:
        """The cache of ``branch``'s own keys/values (block scoring reads compression's)."""
        if branch not in self.caches:
            raise KeyError(f"no per-branch cache for {branch}: this layer caches "
                           f"{[str(b) for b in self.caches]}")
        return self.caches[branch]

    longest = _shared_by_branches("longest")
    shortest = _shared_by_branches("shortest")

    def plan(self) -> StepPlan:
        """The compression branch's ``compress`` and the selection branch's ``select`` (see
        :meth:`TokenCache.plan`)."""
        compression = self.caches.get(Branch.COMPRESSION)
        selection = self.caches.get(Branch.SELECTION)
        return StepPlan(compression.plan().compress if compression else False,
                        selection.plan().select if selection else False)

    def bytes_allocated(self) -> int:
        """Bytes of every branch's cached token tensors (raw and compressed)."""
        return sum(cache.bytes_allocated() for cache in self.caches.values())

    def write_prompt(self, raw: dict[Branch, Pair], compressed: Pair | None,
                     lengths: torch.Tensor) -> None:
        """Prefill: each branch keeps its own keys/values ``raw[branch]`` (``(B, T, ...)`` each);
        the compression branch also the compressed tokens."""
        for branch, cache in self.caches.items():
            cache.write_prompt(raw[branch], compressed if branch is Branch.COMPRESSION else None,
                               lengths)

    def keep_selection(self, block_idx: torch.Tensor) -> None:
        self.caches[Branch.SELECTION].keep_selection(block_idx)

    def append_branches(self, raw: dict[Branch, Pair],
                        compress: Callable[[torch.Tensor, torch.Tensor], Pair] | None = None,
                        plan: StepPlan = StepPlan()) -> None:
        """Write one token per sequence into every branch's cache (``raw[branch] = (k, v)``,
        ``(B, n_kv_heads, head_dim)`` each), compress the compression branch's completed blocks
        with ``compress`` (as ``plan`` says, see :meth:`TokenCache.append`)."""
        for branch, cache in self.caches.items():
            cache.append(*raw[branch], compress if branch is Branch.COMPRESSION else None,
                         plan=plan)

    def reserve(self) -> StepPlan:
        """Host side of :meth:`append_branches` (see :meth:`TokenCache.reserve`)."""
        plan = self.plan()
        for cache in self.caches.values():
            cache.reserve()
        return plan


def advance(caches: list[TokenCache | BranchKVCache]) -> None:
    """Advance the ``lengths`` of every cache by one token (the end of a decode step, after
    every layer has appended), in one launch on CUDA."""
    torch._foreach_add_([cache.lengths for cache in caches], 1)


def layer_cache(cfg: ModelConfig, which: int | str, batch: int, max_len: int,
                dtype: torch.dtype = torch.float32, device=None) -> TokenCache | BranchKVCache:
    """The cache that layer ``which`` (an index or a kind, see ``ModelConfig.layer``) needs to
    decode ``batch`` sequences of up to ``max_len`` tokens: what its :class:`LayerSpec` says it
    keeps (``cache_slots`` or, per branch, ``branch_slots``; compressed tokens; the selection for
    query sharing)."""
    if max_len > cfg.seq_len:
        raise ValueError(f"cache max_len ({max_len}) exceeds the model's seq_len ({cfg.seq_len})")
    spec = cfg.layer(which)
    compress = (spec.compress_block, spec.compress_stride) if spec.compresses else None
    select = (spec.kv_heads, spec.top_n, spec.q_share) if spec.selects else None
    slots = spec.cache_slots(max_len)
    kw = dict(dtype=dtype, device=device)
    if spec.kv_per_branch:
        return BranchKVCache(batch, max_len, spec.kv_heads, spec.head_dim,
                             spec.branch_slots(max_len), compress=compress, select=select, **kw)
    if not spec.latent:
        return GroupedKVCache(batch, max_len, spec.kv_heads, spec.head_dim, slots=slots,
                              compress=compress, select=select, **kw)
    if not spec.compresses:
        return LatentWindowCache(batch, max_len, slots, spec.kv_heads, spec.group_dim,
                                 spec.rope_dim, **kw)
    return LatentKVCache(batch, max_len, spec.kv_heads, spec.group_dim, spec.rope_dim,
                         compress=compress, select=select, **kw)


def new_caches(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
               device=None) -> list[TokenCache | BranchKVCache]:
    """One cache per layer of the model; ``max_len <= cfg.seq_len``."""
    return [layer_cache(cfg, kind, batch, max_len, dtype, device) for kind in cfg.layer_kinds]
