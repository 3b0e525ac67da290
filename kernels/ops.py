"""The Triton kernels as PyTorch custom operators, ``torch.ops.nsa_lit.<name>``.

``torch.compile`` traces through a custom operator, whose fake implementation gives its outputs'
shapes, instead of breaking its graph around an opaque call: a compiled block is one graph, and
the compiler fuses the PyTorch code on both sides of every kernel, forward and backward.

* Training: ``sliding_window_attention``, ``compression_attention`` and
  ``selected_attention`` return their output and what their backward reads (the float32
  log-sum-exp; selected attention also its chunk lists), and carry a backward operator
  (``<name>_backward``) through ``register_autograd``; ``select_blocks`` is not differentiable.
  Their last argument is a launch configuration as JSON (``""``: the defaults), which tests and
  sweeps use to cover other tilings (each kernel module encodes and decodes its own).
* Decoding (inference only): ``causal_decode``, ``window_decode``, ``compression_decode``,
  ``select_blocks_decode``, ``selected_decode``; see :mod:`kernels.decode.reference`.

Every operator allocates its outputs (contiguous, like the fakes here) and writes no input. The
kernel modules are imported on the first call, so importing this module needs no Triton.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import Tensor

LIB = "nsa_lit"


def _module(name: str):
    return importlib.import_module(f"kernels.{name}.triton_kernel")


def _empty(x: Tensor, *shape, dtype: torch.dtype | None = None) -> Tensor:
    return x.new_empty(shape, dtype=dtype or x.dtype)


def _attention_outputs(q: Tensor, value_dim: int) -> tuple[Tensor, Tensor]:
    """Fake ``(o (B, T, H, value_dim) in q's dtype, lse (B, T, H) float32)``."""
    B, T, H, _ = q.shape
    return _empty(q, B, T, H, value_dim), _empty(q, B, T, H, dtype=torch.float32)


def _gradients(*inputs: Tensor) -> list[Tensor]:
    """Fake gradients: one contiguous tensor like each input."""
    return [_empty(x, *x.shape) for x in inputs]


# -- sliding window ---------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::sliding_window_attention", mutates_args=())
def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float,
                             config: str) -> tuple[Tensor, Tensor]:
    """``(o (B, T, H, Dv), lse (B, T, H) float32)``; see :mod:`kernels.sliding_window`."""
    return _module("sliding_window").op_forward(q, k, v, window, scale, config)


@sliding_window_attention.register_fake
def _(q, k, v, window, scale, config):
    return _attention_outputs(q, v.shape[3])


@torch.library.custom_op(f"{LIB}::sliding_window_attention_backward", mutates_args=())
def sliding_window_attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                                      lse: Tensor, window: int, scale: float,
                                      config: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``."""
    return _module("sliding_window").op_backward(do, q, k, v, o, lse, window, scale, config)


@sliding_window_attention_backward.register_fake
def _(do, q, k, v, o, lse, window, scale, config):
    return tuple(_gradients(q, k, v))


# -- compression ------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::compression_attention", mutates_args=())
def compression_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, block_len: int, stride: int,
                          scale: float) -> tuple[Tensor, Tensor]:
    """``(o (B, T, H, Dv), lse (B, T, H) float32)``; see :mod:`kernels.compression`."""
    return _module("compression").op_forward(q, k_cmp, v_cmp, block_len, stride, scale)


@compression_attention.register_fake
def _(q, k_cmp, v_cmp, block_len, stride, scale):
    return _attention_outputs(q, v_cmp.shape[3])


@torch.library.custom_op(f"{LIB}::compression_attention_backward", mutates_args=())
def compression_attention_backward(do: Tensor, q: Tensor, k_cmp: Tensor, v_cmp: Tensor,
                                   o: Tensor, lse: Tensor, block_len: int, stride: int,
                                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk_cmp, dv_cmp)``."""
    return _module("compression").op_backward(do, q, k_cmp, v_cmp, o, lse, block_len, stride,
                                              scale)


@compression_attention_backward.register_fake
def _(do, q, k_cmp, v_cmp, o, lse, block_len, stride, scale):
    return tuple(_gradients(q, k_cmp, v_cmp))


# -- block selection (no gradient) ------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::select_blocks", mutates_args=())
def select_blocks(q: Tensor, k_cmp: Tensor, lse: Tensor, num_groups: int, block_len: int,
                  stride: int, select_block: int, top_n: int, num_local: int, q_share: int,
                  scale: float) -> Tensor:
    """``block_idx (B, T, num_groups, top_n)`` int64; see :mod:`kernels.selection`."""
    return _module("selection").op_forward(q, k_cmp, lse, num_groups, block_len, stride,
                                           select_block, top_n, num_local, q_share, scale)


@select_blocks.register_fake
def _(q, k_cmp, lse, num_groups, block_len, stride, select_block, top_n, num_local, q_share,
      scale):
    return _empty(q, q.shape[0], q.shape[1], num_groups, top_n, dtype=torch.int64)


# -- selected attention -----------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::selected_attention", mutates_args=())
def selected_attention(q: Tensor, k: Tensor, v: Tensor | None, block_idx: Tensor,
                       select_block: int, scale: float, q_share: int, value_dim: int | None,
                       config: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(o (B, T, H, Dv), lse (B, T, H) float32, chunk lists)``; ``v`` None: the values are
    ``k[..., :value_dim]``; see :mod:`kernels.selected_attention`."""
    return _module("selected_attention").op_forward(q, k, v, block_idx, select_block, scale,
                                                    q_share, value_dim, config)


@selected_attention.register_fake
def _(q, k, v, block_idx, select_block, scale, q_share, value_dim, config):
    lists = _module("selected_attention").chunk_list_shape(q, k, v, block_idx, select_block,
                                                           q_share, value_dim, config)
    o, lse = _attention_outputs(q, value_dim if v is None else v.shape[3])
    return o, lse, _empty(q, *lists, dtype=torch.int32)


@torch.library.custom_op(f"{LIB}::selected_attention_backward", mutates_args=())
def selected_attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor | None, o: Tensor,
                                lse: Tensor, block_idx: Tensor, lists: Tensor,
                                select_block: int, scale: float, q_share: int,
                                value_dim: int | None, config: str) -> list[Tensor]:
    """``[dq, dk, dv]``, or ``[dq, dk]`` when ``v`` is None (``dk`` then holds the values'
    gradient too)."""
    return _module("selected_attention").op_backward(
        do, q, k, v, o, lse, block_idx, lists, select_block, scale, q_share, value_dim, config)


@selected_attention_backward.register_fake
def _(do, q, k, v, o, lse, block_idx, lists, select_block, scale, q_share, value_dim, config):
    return _gradients(q, k) if v is None else _gradients(q, k, v)


# -- backward formulas ------------------------------------------------------------------------
def _save(*saved: int, args: slice, outputs: int = 2) -> Callable:
    """A ``setup_context`` that saves the inputs at ``saved`` and the first ``outputs`` outputs,
    keeps ``inputs[args]`` (the non-tensor arguments) and marks every output but the first
    non-differentiable."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in saved), *output[:outputs])
        ctx.args = inputs[args]
        ctx.mark_non_differentiable(*output[1:])
    return setup_context


def _window_backward(ctx, do, _lse):
    dq, dk, dv = sliding_window_attention_backward(do, *ctx.saved_tensors, *ctx.args)
    return dq, dk, dv, None, None, None


def _compression_backward(ctx, do, _lse):
    dq, dk, dv = compression_attention_backward(do, *ctx.saved_tensors, *ctx.args)
    return dq, dk, dv, None, None, None


def _selected_setup(ctx, inputs, output):
    q, k, v, block_idx = inputs[:4]
    o, lse, lists = output
    ctx.values_in_keys = v is None
    ctx.save_for_backward(q, k, *(() if v is None else (v,)), o, lse, block_idx, lists)
    ctx.args = inputs[4:]
    ctx.mark_non_differentiable(lse, lists)


def _selected_backward(ctx, do, _lse, _lists):
    saved = list(ctx.saved_tensors)
    if ctx.values_in_keys:
        saved.insert(2, None)
    grads = selected_attention_backward(do, *saved, *ctx.args)
    dv = None if ctx.values_in_keys else grads[2]
    return grads[0], grads[1], dv, None, None, None, None, None, None


sliding_window_attention.register_autograd(_window_backward,
                                           setup_context=_save(0, 1, 2, args=slice(3, None)))
compression_attention.register_autograd(_compression_backward,
                                        setup_context=_save(0, 1, 2, args=slice(3, None)))
selected_attention.register_autograd(_selected_backward, setup_context=_selected_setup)


# -- decoding (inference only) ----------------------------------------------------------------
# A compiled decode step (Transformer.compile_decode) traces through these, so the compiler sees
# and fuses a whole block's step.
_GATED = "*, Tensor? gate_logit=None, Tensor? add_to=None"  # gated branch sum: decode.reference
DECODE_OPS: dict[str, str] = {
    "causal_decode": "(Tensor q, Tensor k, Tensor v, Tensor positions, float scale, "
                     f"Tensor? k_rope, {_GATED}) -> Tensor",
    "window_decode": "(Tensor q, Tensor k, Tensor v, Tensor positions, int window, float scale, "
                     f"Tensor? k_rope, {_GATED}) -> Tensor",
    "compression_decode": "(Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor positions, "
                          f"int block_len, int stride, float scale, Tensor? k_rope_cmp, "
                          f"{_GATED}) -> (Tensor, Tensor)",
    "select_blocks_decode": "(Tensor q, Tensor k_cmp, Tensor lse, Tensor positions, *, "
                            "int num_groups, int block_len, int stride, int select_block, "
                            "int num_blocks, int top_n, int num_local, float scale, "
                            "Tensor? k_rope_cmp) -> Tensor",
    "selected_decode": "(Tensor q, Tensor k, Tensor v, Tensor block_idx, Tensor positions, "
                       f"int select_block, float scale, Tensor? k_rope, {_GATED}) -> Tensor",
}


def _decode_output(q, v):
    """The attention output of a decode kernel: ``(B, H, Dv)`` in the query's dtype."""
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


_DECODE_FAKES: dict[str, Callable] = {
    "causal_decode": lambda q, k, v, *args, **kwargs: _decode_output(q, v),
    "window_decode": lambda q, k, v, *args, **kwargs: _decode_output(q, v),
    "compression_decode": lambda q, k_cmp, v_cmp, *args, **kwargs: (
        _decode_output(q, v_cmp), q.new_empty(q.shape[:2], dtype=torch.float32)),
    "select_blocks_decode": lambda q, *args, num_groups, top_n, **kwargs: q.new_empty(
        (q.shape[0], num_groups, top_n), dtype=torch.int64),
    "selected_decode": lambda q, k, v, *args, **kwargs: _decode_output(q, v),
}
_decode_library = torch.library.Library(LIB, "FRAGMENT")
for _name, _schema in DECODE_OPS.items():
    if not hasattr(torch.ops.nsa_lit, _name):  # defined once per process
        _decode_library.define(_name + _schema)
        _decode_library.impl(_name, lambda *args, _name=_name, **kwargs:
                             getattr(_module("decode"), _name)(*args, **kwargs),
                             "CompositeExplicitAutograd")
        torch.library.register_fake(f"{LIB}::{_name}", _DECODE_FAKES[_name],
                                    lib=_decode_library)
