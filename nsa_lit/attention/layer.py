"""One attention layer: a key/value source, a set of branches, a gate, an output projection.

Every variant of the paper is a composition of these parts (see ``ModelConfig``):
full attention, NSA (compression + selection + window over GQA heads), ASA local layers
(window over an MLA latent) and ASA global layers (compression + selection over GLA latents).
Every fact about the layer comes from its :class:`~nsa_lit.config.LayerSpec`; the branches run
through :func:`~nsa_lit.attention.branches.run_branches` and :mod:`kernels.dispatch`, so the
layer never learns which kernel ran.

Latent layers train each branch in one of two equal forms (``latent_form``; ``"auto"`` picks per
branch, see ``ModelConfig.branch_form`` and ``LayerSpec.forms``):
  * ``absorbed``: attend to the latent itself, MQA-style: query ``[W_uk[h]^T q_h ; q_R]``
    against key ``[c_g ; k_R]`` and value ``c_g``; the output is up-projected by ``W_uv[h]``.
  * ``expanded``: rebuild per-head keys ``[W_uk[h] c_g ; k_R]`` and values ``W_uv[h] c_g``.
Both use the softmax scale ``1 / sqrt(head_dim + rope_dim)``. Branch outputs are gated in head
space. The projections of the layer input (query, keys/values or latent and RoPE key, gate) run
as one GEMM by their stacked weights (:meth:`Attention._input_pieces`).

NSA layers under ``nsa_kv="per_branch"`` (``LayerSpec.kv_per_branch``) give each branch its own
grouped key/value projection (:class:`~nsa_lit.attention.kv.BranchKV`): the compressors compress
the compression branch's keys/values, selection scores blocks with those compressed keys and
attends to its own raw keys/values, the window to its own. Decoding keeps one cache per branch
(:class:`~nsa_lit.cache.BranchKVCache`).

Selection always computes the compression attention, since block importance comes from its
probabilities; a layer without the compression *branch* (NSA ablation) just drops its output,
so its compressors get no gradient (use ``compress_method="mean"`` there).

Decoding (:meth:`Attention.decode`, one token per sequence against an :mod:`nsa_lit.cache` cache)
always runs latent layers in the absorbed form, reading the latent cache directly. At a batch of
at least :data:`MERGED_UP_PROJECTIONS_MIN_BATCH` sequences ``W_uk`` and ``W_uv`` are absorbed
into merged query and output projections (:mod:`nsa_lit.step_weights`); below it the step
multiplies by the smaller per-head ``wq`` and ``wo`` and applies ``W_uk`` / ``W_uv`` per head
(fewer weight bytes, two more products; off by default: slower at 340M). ``forward``
with a cache (prefill) also writes the prompt's keys/values, compressed tokens and kept
selection into it.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.blocks import num_selection_blocks
from nsa_lit.attention.branches import BranchInputs, run_branches
from nsa_lit.attention.compressor import BlockCompressor
from nsa_lit.attention.kv import BranchKV, GroupedKV, LatentKV
from nsa_lit.cache import BranchKVCache, StepPlan, TokenCache
from nsa_lit.config import Branch, Form, ModelConfig
from nsa_lit.rope import Rotary
from nsa_lit.step_weights import MergedWeights, stack

# Latent layers' decode steps multiply by W_uk / W_uv merged into the query and output
# projections (the "merged" weights; at the 340M shapes 2.7x / 4x the bytes of wq / wo in the
# MLA local layers, 1.7x / 2x in the GLA global ones) from this batch size on, and by the
# per-head up-projections below it (benchmarks/decode.py --merged_min_batch measures both: on an
# H100 at batch 1 the per-head form was 5% slower, its extra launches costing more than the
# bytes it saves, hence 1). Set it before decoding: CUDA graphs (nsa_lit.decode_graph) keep the
# form they captured.
MERGED_UP_PROJECTIONS_MIN_BATCH = 1


def per_head_steps_possible() -> bool:
    """Whether some batch size decodes latent layers through the per-head up-projections (their
    step weights then keep the stack without ``W_uk`` too)."""
    return MERGED_UP_PROJECTIONS_MIN_BATCH > 1


class Attention(nn.Module):
    """Attention layer of ``kind`` (a letter of ``ModelConfig.layer_pattern``), built from its
    :class:`~nsa_lit.config.LayerSpec` ``cfg.layer(kind)``.

    ``forward(x (B, T, d_model)) -> (B, T, d_model)``; causal.
    """

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.spec = spec = cfg.layer(kind)
        self.branches = spec.branches
        H, dh = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, H * spec.query_dim, bias=False)
        if spec.latent:
            self.kv = LatentKV(cfg, spec.kv_heads)
            self.rope = Rotary(cfg.rope_dim, cfg.seq_len, cfg.rope_theta)
            # cached tensors and their widths: the latent (one group) and the RoPE key
            cached = {"latent": spec.group_dim, "rope": cfg.rope_dim}
        else:
            self.kv = BranchKV(cfg, spec.kv_branches) if spec.kv_per_branch else GroupedKV(cfg)
            self.rope = Rotary(dh, cfg.seq_len, cfg.rope_theta)
            cached = {"k": dh, "v": dh}  # keys and values (the compression branch's if per-branch)
        # one compressor per cached tensor (k_compressor, v_compressor or latent_/rope_compressor)
        self.compressor_names = ([f"{name}_compressor" for name in cached] if spec.compresses
                                 else [])
        for name, dim in zip(self.compressor_names, cached.values()):
            setattr(self, name, BlockCompressor(dim, cfg.compress_block, cfg.compress_stride,
                                                cfg.compress_method))
        self.gate = nn.Linear(cfg.d_model, H * len(self.branches)) if len(self.branches) > 1 else None
        self.wo = nn.Linear(H * dh, cfg.d_model, bias=False)
        self._step_weights: MergedWeights | None = None  # built by refresh_step_weights

    # -- projections -------------------------------------------------------------------------
    def _input_pieces(self, absorbed: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(weight (out, d_model), bias)`` of every projection of the layer input, in the
        order :meth:`_projections` splits them: the query, :meth:`kv.projections
        <nsa_lit.attention.kv.LatentKV.projections>` (keys and values, or latent and RoPE key),
        the gate. ``absorbed`` (latent layers): the query's ``q_nope`` part is ``W_uk[h]^T
        W_q[h]`` per head, computed in at least float32 (a decode step's query)."""
        cfg = self.cfg
        wq = self.wq.weight
        if absorbed and self.spec.latent:
            H, dh, d = cfg.n_heads, cfg.head_dim, cfg.d_model
            exact = torch.promote_types(wq.dtype, torch.float32)
            w = wq.view(H, dh + cfg.rope_dim, d)
            q_nope = torch.einsum("hdc,hdm->hcm", self.kv.w_uk.to(exact), w[:, :dh].to(exact))
            wq = torch.cat([q_nope.to(wq.dtype), w[:, dh:]], dim=1).reshape(-1, d)
        pieces = [(wq, None)] + [(lin.weight, lin.bias) for lin in self.kv.projections()]
        if self.gate is not None:
            pieces.append((self.gate.weight, self.gate.bias))
        return pieces

    def _input_widths(self, absorbed: bool) -> list[int]:
        """Output widths of :meth:`_input_pieces`."""
        cfg, spec = self.cfg, self.spec
        head = cfg.head_dim
        if spec.latent:
            head = (spec.group_dim if absorbed else cfg.head_dim) + cfg.rope_dim
        widths = [head * cfg.n_heads] + [lin.out_features for lin in self.kv.projections()]
        return widths + ([self.gate.out_features] if self.gate is not None else [])

    def _projections(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     absorbed: bool, positions: torch.Tensor | None = None):
        """Every projection of ``x (B, T, d_model)`` in one GEMM by the stacked
        :meth:`_input_pieces` ``(weight, bias)``, rotated at ``positions`` (``(B, T)``; default
        ``0..T-1``): ``(q, kv, gate_logits)``. Grouped: ``q (B,T,H,dh)``, ``kv = (k, v)`` each
        ``(B,T,Hk,dh)``; per-branch: ``kv = {branch: (k, v)}``; latent: ``q (B,T,H,dh+dR)`` (or
        ``(B,T,H,dc+dR)`` ``absorbed``; RoPE part rotated), ``kv = (c (B,T,g,dc), k_r
        (B,T,1,dR))``; ``gate_logits (B,T,H*branches)`` or None."""
        rope = self.rope if positions is None else partial(self.rope, positions=positions)
        raw = F.linear(x, weight, bias).split(self._input_widths(absorbed), dim=-1)
        n_kv = len(self.kv.projections())
        return (self._query(raw[0], rope), self.kv.finish(*raw[1:1 + n_kv], rope=rope),
                raw[1 + n_kv] if self.gate is not None else None)

    def _query(self, q: torch.Tensor, rope) -> torch.Tensor:
        """Projected queries ``(B, T, H * width)`` -> ``(B, T, H, width)``, rotated: whole heads
        in grouped layers, the last ``rope_dim`` columns of each head in latent ones (whatever
        comes before: ``q_nope``, or its absorbed ``W_uk[h]^T q_nope`` in a decode step)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.cfg.n_heads, -1)
        if not self.spec.latent:
            return rope(q)
        split = q.shape[-1] - self.cfg.rope_dim
        return torch.cat([q[..., :split], rope(q[..., split:])], dim=-1)

    def _compress(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress the two cached tensors (``k, v`` or ``c, k_r``) ``(B, T, G, D)`` -> ``(B, N, G, D)``."""
        first, second = (getattr(self, name) for name in self.compressor_names)
        return first(a), second(b)

    def _absorbed_query(self, q: torch.Tensor) -> torch.Tensor:
        """Latent query ``[q_nope ; q_R]`` -> ``[W_uk[h]^T q_nope ; q_R]`` ``(B, T, H, dc + dR)``."""
        dh = self.cfg.head_dim
        return torch.cat([self.kv.absorb_query(q[..., :dh]), q[..., dh:]], dim=-1)

    def _latent_inputs(self, form: Form, q, c, k_r, cmp, tokens: bool) -> BranchInputs:
        """Branch inputs of a latent layer in ``form``; the per-token keys/values only when
        ``tokens`` (a branch reads them in this form), the compressed ones only when ``cmp``."""
        H, groups = self.cfg.n_heads, self.spec.kv_heads
        if form is Form.ABSORBED:
            def keys_values(lat, rot):
                # the values are the keys' first columns: the latent itself
                k = torch.cat([lat, rot.expand(-1, -1, groups, -1)], dim=-1)
                return k, k[..., :lat.shape[-1]]

            q = self._absorbed_query(q)
        else:
            def keys_values(lat, rot):
                k = torch.cat([self.kv.up_keys(lat), rot.expand(-1, -1, H, -1)], dim=-1)
                return k, self.kv.up_values(lat)
        k, v = keys_values(c, k_r) if tokens else (None, None)
        k_cmp, v_cmp = keys_values(*cmp) if cmp is not None else (None, None)
        return BranchInputs(q, k, v, k_cmp, v_cmp, values_in_keys=form is Form.ABSORBED)

    def _to_heads(self, out: torch.Tensor, branch: Branch) -> torch.Tensor:
        """Branch output ``(B, T, H, D)`` in head space: absorbed outputs are up-projected."""
        return self.kv.expand_output(out) if self.spec.form(branch) is Form.ABSORBED else out

    # -- branches ----------------------------------------------------------------------------
    def _decode_branches(self, q: torch.Tensor, cache: TokenCache | BranchKVCache,
                         positions: torch.Tensor, plan: StepPlan,
                         gate_logits: torch.Tensor | None) -> torch.Tensor:
        """The branches for one query per sequence, ``q (B, H, Dq)``, against ``cache``
        (absorbed form for latent caches), summed with their gates, ``sigmoid(gate_logits)``
        (``(B, H, branches)`` in ``spec.branches`` order; None with one branch) -> ``(B, H, Dv)``.
        Each kernel adds its gated output to the sum so far in its epilogue (``gate_logit``,
        ``add_to``), from a view of the projection's output: no gating kernel. Blocks are
        scored only when a query-sharing group may open (``plan.select``)."""
        spec, backend, scale = self.spec, self.cfg.kernel_backend, self.spec.scale
        score = spec.selects and plan.select is not False
        total: torch.Tensor | None = None

        def gated(branch: Branch) -> dict:
            """The call's gate and running sum; none for a branch run only to score blocks."""
            if branch not in spec.branches:
                return {"backend": backend}
            logit = (None if gate_logits is None else
                     gate_logits[:, :, spec.branches.index(branch)])
            return {"backend": backend, "gate_logit": logit, "add_to": total}

        if Branch.FULL in spec.branches:
            k, v, k_rope = cache.for_branch(Branch.FULL).attention_inputs()
            total = kernels.causal_decode(q, k, v, positions, scale, k_rope,
                                          **gated(Branch.FULL))
        if Branch.WINDOW in spec.branches:
            k, v, k_rope = cache.for_branch(Branch.WINDOW).attention_inputs()
            total = kernels.window_decode(q, k, v, positions, spec.window, scale, k_rope,
                                          **gated(Branch.WINDOW))
        if Branch.COMPRESSION in spec.branches or score:
            k_cmp, v_cmp, kr_cmp = cache.for_branch(Branch.COMPRESSION).compressed_inputs()
            o_cmp, lse = kernels.compression_decode(
                q, k_cmp, v_cmp, positions, spec.compress_block, spec.compress_stride, scale,
                kr_cmp, **gated(Branch.COMPRESSION))
            if Branch.COMPRESSION in spec.branches:
                total = o_cmp
        if spec.selects:
            selection = cache.for_branch(Branch.SELECTION)
            block_idx = selection.block_idx  # kept: no sequence opens a group
            if score:
                fresh = kernels.select_blocks_decode(
                    q, k_cmp, lse, positions, num_groups=spec.kv_heads,
                    block_len=spec.compress_block, stride=spec.compress_stride,
                    select_block=spec.select_block,
                    num_blocks=num_selection_blocks(selection.slots, spec.select_block),
                    top_n=spec.top_n,
                    num_local=spec.num_local_blocks, scale=scale, k_rope_cmp=kr_cmp,
                    backend=backend)
                block_idx = selection.share_selection(fresh, positions, plan.select)
            k, v, k_rope = selection.attention_inputs()
            total = kernels.selected_decode(q, k, v, block_idx, positions, spec.select_block,
                                            scale, k_rope, **gated(Branch.SELECTION))
        return total

    def _output(self, outs: list[torch.Tensor], gate_logits: torch.Tensor | None,
                w_out: torch.Tensor | None = None) -> torch.Tensor:
        """Gate the branch outputs ``(B, T, H, D)`` by ``sigmoid(gate_logits)`` (``(B, T, H *
        branches)``; None with one branch) and project them to ``(B, T, d_model)`` by ``wo``, or
        by ``w_out`` (``wo`` with ``W_uv`` absorbed, for outputs still in latent space)."""
        B, T = outs[0].shape[:2]
        if gate_logits is None:
            o = outs[0]
        else:
            gates = torch.sigmoid(gate_logits).view(B, T, self.cfg.n_heads, len(outs), 1)
            o = sum(gates[:, :, :, i] * out for i, out in enumerate(outs))
        o = o.reshape(B, T, -1)
        return self.wo(o) if w_out is None else F.linear(o, w_out)

    # -- entry points ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: TokenCache | BranchKVCache | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, T, d_model)`` -> ``(B, T, d_model)``. With ``cache`` (prefill), also write
        sequence ``b``'s first ``lengths[b]`` tokens (default ``T``; ``x`` right-padded) to it."""
        spec = self.spec
        q, kv, gate_logits = self._projections(x, *stack(self._input_pieces(absorbed=False)),
                                               absorbed=False)
        if spec.kv_per_branch:
            cmp = self._compress(*kv[Branch.COMPRESSION]) if spec.compresses else None
            inputs = {br: BranchInputs(q, *pair) for br, pair in kv.items()}
            if cmp is not None:
                inputs[Branch.COMPRESSION] = BranchInputs(q, None, None, *cmp)
        elif not spec.latent:
            cmp = self._compress(*kv) if spec.compresses else None
            k_cmp, v_cmp = cmp if cmp is not None else (None, None)
            inputs = {Form.GROUPED: BranchInputs(q, *kv, k_cmp, v_cmp)}
        else:
            a, b = kv
            cmp = self._compress(a, b) if spec.compresses else None
            forms = spec.token_forms | ({spec.compressed_form} if spec.compresses else set())
            inputs = {f: self._latent_inputs(f, q, a, b,
                                             cmp if f is spec.compressed_form else None,
                                             tokens=f in spec.token_forms)
                      for f in forms}
        outputs, block_idx = run_branches(spec, inputs, self.cfg.kernel_backend)
        outs = [self._to_heads(outputs[br], br) for br in spec.branches]
        if cache is not None:
            if lengths is None:
                lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
            cache.write_prompt(kv, cmp, lengths)
            if block_idx is not None:
                cache.keep_selection(block_idx)
        return self._output(outs, gate_logits)

    def decode(self, x: torch.Tensor, cache: TokenCache | BranchKVCache,
               plan: StepPlan = StepPlan()) -> torch.Tensor:
        """One new token per sequence: ``x (B, 1, d_model)`` at position ``cache.lengths (B,)``
        -> ``(B, 1, d_model)``; appends the token (and any completed compression block) to
        ``cache``. Latent layers attend in the absorbed form, to the latent cache itself.
        ``plan`` (``cache.reserve()``, the host side of the step, which the caller runs first)
        lets the step skip the compressor and the block scoring where no sequence needs them;
        the default computes them for every sequence and keeps each sequence's own. The caller
        advances ``cache.lengths`` after the step (:func:`nsa_lit.cache.advance`) and refreshes
        the merged weights it multiplies by (:attr:`step_weights`) before it."""
        positions = cache.lengths
        weights = self.step_weights.tensors
        if weights is None:
            raise RuntimeError("call refresh_step_weights() before a decode step "
                               "(Transformer.decode does)")
        # latent layers attend in the absorbed form, [W_uk^T q_nope ; q_R]: merged into the
        # projection, or applied per head after it (small batches, see the module docstring)
        per_head = self.spec.latent and x.shape[0] < MERGED_UP_PROJECTIONS_MIN_BATCH
        w_in, b_in = ((weights["w_in_heads"], weights["b_in_heads"]) if per_head else
                      (weights["w_in"], weights["b_in"]))
        q, kv, gate_logits = self._projections(x, w_in, b_in, absorbed=not per_head,
                                               positions=positions[:, None])
        if per_head:
            q = self._absorbed_query(q)
        if self.spec.kv_per_branch:
            cache.append_branches({br: (k[:, 0], v[:, 0]) for br, (k, v) in kv.items()},
                                  self._compress if self.spec.compresses else None, plan)
        else:
            cache.append(kv[0][:, 0], kv[1][:, 0],
                         self._compress if cache.compressed is not None else None, plan=plan)
        if gate_logits is not None:
            gate_logits = gate_logits.view(x.shape[0], self.cfg.n_heads, -1)
        o = self._decode_branches(q[:, 0], cache, positions, plan, gate_logits)[:, None]
        if per_head:
            return self._output([self.kv.expand_output(o)], None)
        return self._output([o], None, weights["w_out"])

    # -- merged weights of a decode step (nsa_lit.step_weights) ------------------------------
    @property
    def step_weights(self) -> MergedWeights:
        """The decode step's weights, built on the first :meth:`refresh_step_weights`: ``w_in,
        b_in`` stack the projections of the layer input (:meth:`_input_pieces`), with ``W_uk``
        absorbed into the query of latent layers; ``w_out`` is ``wo`` with ``W_uv``
        absorbed ``(d_model, H * group_dim)`` in latent layers (None: ``wo`` itself). Latent
        layers also keep ``w_in_heads, b_in_heads``, the stack without ``W_uk``, while
        :data:`MERGED_UP_PROJECTIONS_MIN_BATCH` > 1 (steps of fewer sequences use it)."""
        if self._step_weights is None:
            self._step_weights = MergedWeights(self._build_step_weights, self._step_sources)
        return self._step_weights

    def refresh_step_weights(self, force: bool = False) -> None:
        """Build or update :attr:`step_weights` if a parameter changed, or ``force`` (or if
        :data:`MERGED_UP_PROJECTIONS_MIN_BATCH` now asks for the per-head stack they lack)."""
        built = self.step_weights.tensors
        force = force or (built is not None and self._per_head_weights() != ("w_in_heads" in built))
        self.step_weights.refresh(force)

    def _per_head_weights(self) -> bool:
        """Whether the step weights keep the stack without ``W_uk`` (latent layers, when some
        batch sizes step through the per-head up-projections)."""
        return self.spec.latent and per_head_steps_possible()

    def _step_sources(self) -> list[torch.Tensor]:
        modules = [self.wq, self.kv, self.wo] + ([self.gate] if self.gate is not None else [])
        return [p for m in modules for p in m.parameters()]

    def _build_step_weights(self) -> dict[str, torch.Tensor | None]:
        w_out = None
        if self.spec.latent:  # absorb W_uv into wo, in at least float32
            cfg = self.cfg
            wo = self.wo.weight.view(cfg.d_model, cfg.n_heads, cfg.head_dim)
            exact = torch.promote_types(wo.dtype, torch.float32)
            w_out = torch.einsum("mhd,hdc->mhc", wo.to(exact), self.kv.w_uv.to(exact))
            w_out = w_out.reshape(cfg.d_model, -1).to(wo.dtype)
        w_in, b_in = stack(self._input_pieces(absorbed=True))
        weights = {"w_in": w_in, "b_in": b_in, "w_out": w_out}
        if self._per_head_weights():
            weights["w_in_heads"], weights["b_in_heads"] = stack(self._input_pieces(absorbed=False))
        return weights
