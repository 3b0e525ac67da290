"""The one place that decides which implementation computes each attention branch.

``backend="auto"`` runs the Triton kernel for CUDA tensors and the PyTorch reference elsewhere;
``"triton"`` and ``"reference"`` force one. Layers call these functions and never learn which
implementation ran. A branch whose Triton kernel does not exist yet falls back to the reference
under ``"auto"`` and raises under ``"triton"``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from kernels.compression import reference as compression_ref
from kernels.cross_entropy import reference as xent_ref
from kernels.decode import reference as decode_ref
from kernels.selected_attention import reference as selected_ref
from kernels.selection import reference as selection_ref
from kernels.sliding_window import reference as window_ref
from kernels.triton_utils import interpreting
from kernels import ops  # noqa: F401 (defines torch.ops.nsa_lit.*)

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")

# Branch -> (module, function) of its Triton implementation, which has the reference's signature.
# Modules are imported on first use; a module that does not exist yet means "no kernel yet".
TRITON_KERNELS: dict[str, tuple[str, str]] = {
    "sliding_window": ("kernels.sliding_window.triton_kernel", "sliding_window_attention"),
    "compression": ("kernels.compression.triton_kernel", "compression_attention"),
    "selection": ("kernels.selection.triton_kernel", "select_blocks"),
    "selected_attention": ("kernels.selected_attention.triton_kernel", "selected_attention"),
    # decoding: one query per sequence against a cache (kernels.decode.reference)
    "causal_decode": ("kernels.decode.triton_kernel", "causal_decode"),
    "window_decode": ("kernels.decode.triton_kernel", "window_decode"),
    "compression_decode": ("kernels.decode.triton_kernel", "compression_decode"),
    "select_blocks_decode": ("kernels.decode.triton_kernel", "select_blocks_decode"),
    "selected_decode": ("kernels.decode.triton_kernel", "selected_decode"),
    # the loss: cross-entropy of a chunk of logits and its gradient (nsa_lit.loss)
    "cross_entropy": ("kernels.cross_entropy.triton_kernel", "xent_grad"),
}
# Kernels torch.compile must not trace into: it graph-breaks around their calls. The attention
# kernels' functions call custom operators (kernels.ops) it traces through instead, and the
# decode functions are the decode operators' implementations.
OPAQUE = frozenset({"cross_entropy"})
_loaded: dict[str, Callable | None] = {}


def triton_kernel(branch: str) -> Callable | None:
    """The Triton implementation of ``branch``, or None when it does not exist yet."""
    if branch not in _loaded:
        module_name, function = TRITON_KERNELS[branch]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            _loaded[branch] = None
        else:
            kernel = getattr(module, function)
            _loaded[branch] = torch.compiler.disable(kernel) if branch in OPAQUE else kernel
    return _loaded[branch]


@torch.compiler.assume_constant_result
def _kernel_exists(branch: str) -> bool:
    """Whether ``branch`` has a Triton kernel; a constant to ``torch.compile``, which would
    otherwise break its graph at the kernel module's first import. Loads every kernel module:
    a compiled function reads ``_loaded`` once, and must find the kernels it calls after this
    one already there."""
    for name in TRITON_KERNELS:
        triton_kernel(name)
    return _loaded[branch] is not None


def _use_triton(branch: str, backend: str, x: torch.Tensor) -> bool:
    """Whether ``branch`` runs its Triton kernel on ``x`` under ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    exists = _kernel_exists(branch)
    if backend == "auto":
        return exists and x.is_cuda
    if not exists:
        raise NotImplementedError(f"no Triton kernel for the {branch} branch yet (backend='triton')")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(
            f"backend='triton' for the {branch} branch needs CUDA tensors (or TRITON_INTERPRET=1)"
        )
    return True


def _pick(branch: str, backend: str, x: torch.Tensor) -> Callable | None:
    """Return the Triton callable to use, or None for the reference."""
    return triton_kernel(branch) if _use_triton(branch, backend, x) else None


def causal_attention(q, k, v, scale: float, backend: Backend = "auto") -> torch.Tensor:
    """Full causal attention. ``q (B, T, H, D)``, ``k, v (B, T, Hk, D)`` -> ``(B, T, H, D)``.

    Always PyTorch's scaled_dot_product_attention (FlashAttention on CUDA).
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    H, Hk = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hk, dim=2) if H != Hk else k
    v = v.repeat_interleave(H // Hk, dim=2) if H != Hk else v
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    )
    return out.transpose(1, 2)


def sliding_window_attention(q, k, v, window: int, scale: float, backend: Backend = "auto"):
    """See :mod:`kernels.sliding_window.reference`."""
    kernel = _pick("sliding_window", backend, q) or window_ref.sliding_window_attention
    return kernel(q, k, v, window, scale)


def compression_attention(q, k_cmp, v_cmp, block_len: int, stride: int, scale: float,
                          backend: Backend = "auto"):
    """See :mod:`kernels.compression.reference`; returns ``(o, lse)``."""
    kernel = _pick("compression", backend, q) or compression_ref.compression_attention
    return kernel(q, k_cmp, v_cmp, block_len, stride, scale)


def select_blocks(q, k_cmp, lse, *, num_groups: int, block_len: int, stride: int,
                  select_block: int, top_n: int, num_local: int, q_share: int, scale: float,
                  backend: Backend = "auto"):
    """See :mod:`kernels.selection.reference`; returns ``block_idx (B, T, G, top_n)``."""
    kernel = _pick("selection", backend, q) or selection_ref.select_blocks
    return kernel(q, k_cmp, lse, num_groups=num_groups, block_len=block_len, stride=stride,
                  select_block=select_block, top_n=top_n, num_local=num_local, q_share=q_share,
                  scale=scale)


def selected_attention(q, k, v, block_idx, select_block: int, scale: float, q_share: int = 1,
                       backend: Backend = "auto", *, value_dim: int | None = None):
    """See :mod:`kernels.selected_attention.reference`. ``v=None, value_dim=Dv``: the values are
    ``k[..., :Dv]`` (absorbed latent form; the Triton kernel reads each key tile once for both
    and adds the value gradient into the key gradient); give exactly one of ``v`` and
    ``value_dim``."""
    kernel = _pick("selected_attention", backend, q) or selected_ref.selected_attention
    return kernel(q, k, v, block_idx, select_block, scale, q_share=q_share, value_dim=value_dim)


# -- decoding: one query per sequence, see kernels.decode.reference ---------------------------
# The Triton decode kernels run as the custom operators ``torch.ops.nsa_lit.<name>`` (inference
# only, :mod:`kernels.ops`).
def _decode_kernel(name: str, backend: str, q: torch.Tensor) -> Callable:
    """``torch.ops.nsa_lit.<name>`` (the Triton kernel) or the reference ``name``."""
    return getattr(torch.ops.nsa_lit if _use_triton(name, backend, q) else decode_ref, name)


def causal_decode(q, k, v, positions, scale: float, k_rope=None, backend: Backend = "auto", *,
                  gate_logit=None, add_to=None):
    kernel = _decode_kernel("causal_decode", backend, q)
    return kernel(q, k, v, positions, scale, k_rope=k_rope, gate_logit=gate_logit,
                  add_to=add_to)


def window_decode(q, k, v, positions, window: int, scale: float, k_rope=None,
                  backend: Backend = "auto", *, gate_logit=None, add_to=None):
    kernel = _decode_kernel("window_decode", backend, q)
    return kernel(q, k, v, positions, window, scale, k_rope=k_rope, gate_logit=gate_logit,
                  add_to=add_to)


def compression_decode(q, k_cmp, v_cmp, positions, block_len: int, stride: int, scale: float,
                       k_rope_cmp=None, backend: Backend = "auto", *, gate_logit=None,
                       add_to=None):
    kernel = _decode_kernel("compression_decode", backend, q)
    return kernel(q, k_cmp, v_cmp, positions, block_len, stride, scale, k_rope_cmp=k_rope_cmp,
                  gate_logit=gate_logit, add_to=add_to)


def select_blocks_decode(q, k_cmp, lse, positions, *, num_groups: int, block_len: int,
                         stride: int, select_block: int, num_blocks: int, top_n: int,
                         num_local: int, scale: float, k_rope_cmp=None,
                         backend: Backend = "auto"):
    kernel = _decode_kernel("select_blocks_decode", backend, q)
    return kernel(q, k_cmp, lse, positions, num_groups=num_groups, block_len=block_len,
                  stride=stride, select_block=select_block, num_blocks=num_blocks, top_n=top_n,
                  num_local=num_local, scale=scale, k_rope_cmp=k_rope_cmp)


def selected_decode(q, k, v, block_idx, positions, select_block: int, scale: float, k_rope=None,
                    backend: Backend = "auto", *, gate_logit=None, add_to=None):
    kernel = _decode_kernel("selected_decode", backend, q)
    return kernel(q, k, v, block_idx, positions, select_block, scale, k_rope=k_rope,
                  gate_logit=gate_logit, add_to=add_to)


# -- the loss ---------------------------------------------------------------------------------
def xent_grad(logits, targets, count, ignore_index: int = -100, need_grad: bool = True,
              backend: Backend = "auto"):
    """See :mod:`kernels.cross_entropy.reference`; returns ``(loss_rows, grad or None)``, the
    gradient possibly written over ``logits``."""
    kernel = _pick("cross_entropy", backend, logits) or xent_ref.xent_grad
    return kernel(logits, targets, count, ignore_index, need_grad)
