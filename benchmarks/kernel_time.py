"""GPU kernel time of a profiled region, by kernel and by what the kernels do.

``kernel_times(prof)`` reads a finished ``torch.profiler.profile`` and returns every GPU kernel's
summed time and launch count; ``by_group`` sums them into the groups of :data:`KERNEL_GROUPS`
(our Triton attention kernels per branch, SDPA, matrix products, the loss, the optimizer,
Inductor's fused elementwise kernels, copies, PyTorch's own kernels), so that two models' steps
can be compared line by line.
"""
from __future__ import annotations

# (group, lower-case substrings of kernel names); the first group with a match wins, so the
# more specific names come first (``_sel_fwd_kernel``, ``flash_fwd_kernel`` before
# compression's ``_fwd_kernel``).
KERNEL_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("window attention", ("_sw_fwd", "_sw_bwd")),
    ("selected attention", ("_sel_fwd", "_sel_bwd", "_csr_", "_chunk_list")),
    ("block selection", ("_select_kernel", "_topn_kernel")),
    ("SDPA / flash", ("flash", "fmha", "cudnn", "attention")),  # flash_fwd_kernel, ...
    ("compression attention", ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")),
    ("loss", ("_xent",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "splitkreduce")),
    ("optimizer", ("adam", "multi_tensor_apply")),
    ("decode attention", ("_decode_kernel", "_combine_kernel", "_group_probs", "_pick_kernel")),
    ("fused elementwise (Inductor)", ("triton_",)),
    ("copies", ("memcpy", "memset")),
    ("PyTorch native kernels", ("at::native",)),
)
OTHER = "other"


def group_of(name: str) -> str:
    """The :data:`KERNEL_GROUPS` group of a kernel name (``"other"`` if none matches)."""
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(k in low for k in keys):
            return group
    return OTHER


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """``{kernel name: (GPU microseconds, launches)}`` of the GPU kernels (and copies) a finished
    ``torch.profiler.profile`` recorded."""
    from torch.autograd import DeviceType

    out: dict[str, tuple[float, int]] = {}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        us, n = out.get(event.name, (0.0, 0))
        out[event.name] = (us + event.time_range.elapsed_us(), n + 1)
    return out


def totals(times: dict[str, tuple[float, int]], per: int = 1) -> tuple[float, float]:
    """``(GPU ms, launches)`` of all of ``times`` (see :func:`kernel_times`), divided by ``per``."""
    return (sum(us for us, _ in times.values()) / 1e3 / per,
            sum(n for _, n in times.values()) / per)


def by_group(times: dict[str, tuple[float, int]], per: int = 1) -> dict[str, dict[str, float]]:
    """``times`` (see :func:`kernel_times`) summed per group, divided by ``per`` (e.g. the
    profiled steps): ``{group: {"ms": ..., "launches": ...}}``, largest first."""
    groups: dict[str, list[float]] = {}
    for name, (us, n) in times.items():
        acc = groups.setdefault(group_of(name), [0.0, 0.0])
        acc[0] += us
        acc[1] += n
    return {g: {"ms": us / 1e3 / per, "launches": n / per}
            for g, (us, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])}


def top_kernels(times: dict[str, tuple[float, int]], n: int, per: int = 1
                ) -> list[tuple[str, str, float, float]]:
    """The ``n`` kernels with the most GPU time: ``(name[:90], group, ms, launches)``, each
    divided by ``per``."""
    ranked = sorted(times.items(), key=lambda kv: -kv[1][0])[:n]
    return [(name[:90], group_of(name), us / 1e3 / per, count / per)
            for name, (us, count) in ranked]
