"""Registers, spills and shared memory of every Triton kernel a training step (or a few decode
steps) launches, compiled for a GPU on this machine: no GPU needed (Triton compiles to a cubin
on CPU; ``ptxas -v`` reports).

    python benchmarks/kernel_resources.py --config configs/340m/asa.yaml --seq_len 8192
    python benchmarks/kernel_resources.py --config configs/340m/nsa.yaml --out cpu-sm90-nsa
    python benchmarks/kernel_resources.py --config configs/1.3b/asa.yaml --decode 32768

Two steps. **Capture** (a subprocess under ``TRITON_INTERPRET=1`` and ``NSA_LIT_GPU_TILES=1``):
the config's model, cut to one layer of each kind of its ``layer_pattern``, runs one forward and
backward of the chunked loss on CPU with ``kernel_backend="triton"``, and every kernel launch is
recorded instead of run. Its launchers choose tiles, stages and SM counts as on an H100
(:func:`kernels.triton_utils.gpu_tiles_requested`), and never read a tensor back to the host,
so nothing has to be computed. An autotuned kernel is recorded once per configuration its
pruning keeps (each is a candidate on the GPU). **Compile**: each distinct launch (same kernel,
argument types, alignment and constexprs) is compiled with Triton's own JIT for ``--arch``
(default sm_90a: H100 / H200), with the same argument specialisation a GPU launch would get.

Columns: registers per thread, spill stores / loads (bytes per thread), stack frame, shared
memory (KB per program), warps, pipeline stages, the programs one SM holds at once (by
registers, shared memory, warps and blocks: :func:`programs_per_sm`), and the launches it
stands for. A kernel at 255 registers with spills is register-bound; ``--sass DIR`` writes each
kernel's SASS there (``nvdisasm``), e.g. to check that a refactor leaves the machine code as it
was. The numbers belong to the Triton this machine has (``triton.__version__`` is recorded); the
GPU image may run another.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
# one Hopper SM (sm_90): register file, shared memory for blocks (1 KB of it reserved per block),
# resident blocks and warps
SM_REGISTERS, SM_SHARED, SM_BLOCKS, SM_WARPS = 65536, 233472, 32, 64
SUMMARY_KEYS = ("BLOCK_M", "BLOCK_N", "GP", "SPLIT", "ROWS", "TOK", "BK", "M", "BLOCK", "LPAD")


# ------------------------------------------------------------------------------------ capture
def _spec(x):
    """A picklable description of a launch argument (tensors by dtype, shape, strides and the
    alignment of their first element; TMA descriptors by their base and tiles)."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype).removeprefix("torch."), tuple(x.shape), tuple(x.stride()),
                x.storage_offset())
    if isinstance(x, TensorDescriptor):
        return ("descriptor", _spec(x.base), list(x.shape), list(x.strides), list(x.block_shape),
                x.padding)
    return ("value", x)


@contextlib.contextmanager
def recording_launches():
    """Within: every Triton launch (under ``TRITON_INTERPRET=1``) is appended to the yielded list
    as ``(module, kernel name, argument specs, keyword specs, autotune candidate)`` instead of
    run; an autotuned kernel once per configuration its pruning keeps."""
    from triton.runtime import autotuner
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[tuple] = []

    def record(fn, args, kwargs, tuned: bool) -> None:
        launches.append((fn.__module__, fn.__name__, [_spec(a) for a in args],
                         {k: _spec(v) for k, v in kwargs.items()}, tuned))

    def run(self, *args, grid, warmup, **kwargs):
        record(self.fn, args, kwargs, tuned=False)

    def tuned_run(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for cfg in self.prune_configs(kwargs):
            if cfg.pre_hook is not None:  # e.g. descriptor tiles that follow the config
                cfg.pre_hook({**self.nargs, **kwargs, **cfg.all_kwargs()})
            record(self.base_fn, args, {**kwargs, **cfg.all_kwargs()}, tuned=True)
        self.nargs = None

    saved = InterpretedFunction.run, autotuner.Autotuner.run
    InterpretedFunction.run, autotuner.Autotuner.run = run, tuned_run
    try:
        yield launches
    finally:
        InterpretedFunction.run, autotuner.Autotuner.run = saved


def _capture(config: str, seq_len: int | None, batch: int, out: str,
             decode_context: int | None = None) -> None:
    """Run the step (``decode_context``: ``DECODE_STEPS`` decode steps at that context instead)
    under the interpreter with launches recorded, not run; pickle them to ``out``."""
    import dataclasses

    import torch

    import kernels
    from kernels import dispatch
    from nsa_lit.loss import DEFAULT_CHUNK, next_token_loss
    from nsa_lit.model import Transformer
    from nsa_lit.model_stats import load_model_config

    cfg = load_model_config(config)
    # one layer of each kind; the loss kernel's tiles are the same for every vocabulary >= 4096
    cfg = dataclasses.replace(cfg, n_layers=len(cfg.layer_pattern), kernel_backend="triton",
                              vocab_size=min(cfg.vocab_size, 4096), seq_len=seq_len or cfg.seq_len)
    if decode_context is not None:  # positions up to the cache's end
        cfg = dataclasses.replace(cfg, seq_len=max(cfg.seq_len, _decode_len(cfg, decode_context)))
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16)
    loss_kernel = kernels.xent_grad  # the loss asks for "auto", which is the reference on CPU
    kernels.xent_grad = functools.partial(dispatch.xent_grad, backend="triton")
    try:
        with recording_launches() as launches:
            if decode_context is None:
                tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1))
                next_token_loss(model, tokens, DEFAULT_CHUNK).backward()
            else:
                _decode_steps(model, cfg, batch, decode_context)
    finally:
        kernels.xent_grad = loss_kernel
    with open(out, "wb") as f:
        pickle.dump(launches, f)


DECODE_STEPS = 16  # a compression stride and more: every step plan of the configs comes up


def _decode_len(cfg, context: int) -> int:
    """Cache length for ``DECODE_STEPS`` steps after ``context`` tokens (whole selection blocks)."""
    return -(-(context + DECODE_STEPS) // cfg.select_block) * cfg.select_block


def _decode_steps(model, cfg, batch: int, context: int) -> None:
    """``DECODE_STEPS`` one-token steps of ``batch`` sequences against caches filled to
    ``context`` tokens, as ``benchmarks/decode.py`` times them (eager steps)."""
    import torch
    from decode import fill_randomly

    from nsa_lit.cache import new_caches

    caches = new_caches(cfg, batch, _decode_len(cfg, context), dtype=torch.bfloat16,
                        device=torch.device("cpu"))
    fill_randomly(caches, context)
    tokens = torch.randint(0, cfg.vocab_size, (batch,))
    with torch.no_grad():
        model.eval()
        for _ in range(DECODE_STEPS):
            model.decode(tokens, caches)


# ------------------------------------------------------------------------------------ compile

class _Target:
    """A stand-in for Triton's CUDA driver: the target to compile for, and nothing to run on."""

    def __init__(self, arch: str):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", int(arch.removeprefix("sm_").rstrip("a")), 32)
        self.utils = self

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _build(spec):
    """The argument a spec describes: CPU tensors with the recorded strides and alignment."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    kind = spec[0]
    if kind == "tensor":
        _, dtype, shape, stride, offset = spec
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        base = torch.empty(offset + extent, dtype=getattr(torch, dtype))
        return base.as_strided(shape, stride, offset)
    if kind == "descriptor":
        _, base, shape, strides, block, padding = spec
        return TensorDescriptor(_build(base), shape, strides, block, padding=padding)
    return spec[1]


def selected(launches: list[tuple], kernels: str | None) -> list[tuple]:
    """The launches of the kernels whose name the regular expression ``kernels`` matches (all
    for None); a ``ValueError`` naming the step's kernels when it matches none."""
    if not kernels:
        return launches
    kept = [launch for launch in launches if re.search(kernels, launch[1])]
    if not kept:
        names = sorted({launch[1] for launch in launches})
        raise ValueError(f"--kernels {kernels!r} matches none of the step's kernels: {names}")
    return kept


def _compile(launches: list[tuple], arch: str, sass_dir: Path | None, progress: bool) -> list[dict]:
    """Compile each distinct launch for ``arch``; one row per kernel variant."""
    import triton
    from triton import knobs
    from triton.runtime.driver import driver

    driver.set_active(_Target(arch))
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers, stack, spills
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    groups: dict[str, list] = collections.OrderedDict()
    for launch in launches:
        groups.setdefault(repr(launch), []).append(launch)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache  # a cold cache: ptxas runs (and reports) for every kernel
        for i, (key, same) in enumerate(groups.items()):
            module, name, args, kwargs, tuned = same[0]
            kernel = getattr(importlib.import_module(module), name)
            log = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(log):
                compiled = kernel.warmup(*map(_build, args), grid=(1,),
                                         **{k: _build(v) for k, v in kwargs.items()})
            frame, regs = PTXAS_FRAME.search(log.getvalue()), PTXAS_REGS.search(log.getvalue())
            if frame is None or regs is None:
                raise RuntimeError(f"{name}: no ptxas report in {log.getvalue()!r}")
            consts = {k: v[1] for k, v in kwargs.items()
                      if v[0] == "value" and k not in ("num_warps", "num_stages")}
            row = dict(kernel=name, module=module, regs=int(regs[1]), stack=int(frame[1]),
                       spill_stores=int(frame[2]), spill_loads=int(frame[3]),
                       shared_kb=round(compiled.metadata.shared / 1024, 1),
                       warps=compiled.metadata.num_warps, stages=compiled.metadata.num_stages,
                       programs_per_sm=programs_per_sm(int(regs[1]), compiled.metadata.num_warps,
                                                       compiled.metadata.shared),
                       launches=len(same), autotune_candidate=tuned,
                       tiles={k: consts[k] for k in SUMMARY_KEYS if k in consts},
                       constexprs={k: v for k, v in consts.items()
                                   if isinstance(v, (int, str, bool))},
                       compile_s=round(time.perf_counter() - start, 2))
            if sass_dir is not None:
                sass_dir.mkdir(parents=True, exist_ok=True)
                cubin = sass_dir / f"{i:02d}_{name}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", str(cubin)], check=True,
                                      capture_output=True, text=True).stdout
                cubin.with_suffix(".sass").write_text(sass)
                cubin.unlink()
                row["sass"] = cubin.with_suffix(".sass").name
            rows.append(row)
            if progress:
                print(f"[{i + 1}/{len(groups)}] {name} {row['regs']} registers", file=sys.stderr)
    return rows


def programs_per_sm(regs: int, warps: int, shared_bytes: int) -> int:
    """Programs (thread blocks) of a kernel one Hopper SM holds at once: registers are allocated
    per warp in units of 256 (8 a thread), shared memory per block plus 1 KB the runtime
    reserves; the least of those, the warp and the block limits."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGISTERS // (per_warp * warps)
    by_shared = SM_SHARED // (shared_bytes + 1024)
    return min(by_regs, by_shared, SM_WARPS // warps, SM_BLOCKS)


def table(rows: list[dict]) -> str:
    head = (f"{'kernel':28s} {'tiles':44s} {'regs':>4s} {'spill st/ld':>11s} {'stack':>5s} "
            f"{'smem KB':>7s} {'warps':>5s} {'stages':>6s} {'per SM':>6s} {'launches':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tiles = " ".join(f"{k}={v}" for k, v in r["tiles"].items())
        tiles += " (tune)" if r["autotune_candidate"] else ""
        lines.append(f"{r['kernel']:28s} {tiles:44s} {r['regs']:>4d} "
                     f"{r['spill_stores']:>5d}/{r['spill_loads']:<5d} {r['stack']:>5d} "
                     f"{r['shared_kb']:>7.1f} {r['warps']:>5d} {r['stages']:>6d} "
                     f"{r['programs_per_sm']:>6d} {r['launches']:>8d}")
    return "\n".join(lines)


def measure(config: str, seq_len: int | None = None, batch: int = 1, arch: str = "sm_90a",
            sass_dir: Path | None = None, progress: bool = True,
            kernels: str | None = None, decode: int | None = None) -> list[dict]:
    """Capture the step's launches in a subprocess (the interpreter must not touch this process's
    Triton), then compile them here."""
    import triton.language.standard
    from triton.runtime.jit import JITFunction

    if not isinstance(triton.language.standard.cdiv, JITFunction):
        raise RuntimeError("kernel_resources compiles for a GPU: run it in a process that imported "
                           "Triton without TRITON_INTERPRET=1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launches.pkl"
        env = {**os.environ, "TRITON_INTERPRET": "1", "NSA_LIT_GPU_TILES": "1"}
        cmd = [sys.executable, __file__, "--config", config, "--batch", str(batch),
               "--capture_to", str(out)] + (["--seq_len", str(seq_len)] if seq_len else []) + (
                   ["--decode", str(decode)] if decode is not None else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"capturing the launches of {config} failed:\n{done.stderr[-4000:]}")
        launches = pickle.loads(out.read_bytes())
    return _compile(selected(launches, kernels), arch, sass_dir, progress)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/340m/asa.yaml",
                    help="a LightningCLI config; its model.arch is used")
    ap.add_argument("--seq_len", type=int, default=None, help="default: the config's seq_len")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decode", type=int, default=None, metavar="CONTEXT",
                    help=f"the kernels of {DECODE_STEPS} decode steps at this context (eager, "
                         "--batch sequences) instead of a training step")
    ap.add_argument("--arch", default="sm_90a",
                    help="GPU architecture to compile for (sm_90a: H100/H200)")
    ap.add_argument("--kernels", default=None,
                    help="only the kernels whose name this regular expression matches (e.g. _sel_)")
    ap.add_argument("--sass", type=Path, default=None,
                    help="write each kernel's SASS to this folder")
    ap.add_argument("--out", default=None,
                    help="results name: benchmarks/results/NAME.json (or a path ending in .json)")
    ap.add_argument("--capture_to", default=None, help=argparse.SUPPRESS)  # the capture subprocess
    args = ap.parse_args(argv)
    if args.capture_to:
        _capture(args.config, args.seq_len, args.batch, args.capture_to, args.decode)
        return
    try:
        rows = measure(args.config, args.seq_len, args.batch, args.arch, args.sass,
                       kernels=args.kernels, decode=args.decode)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"kernel_resources: {e}")
    print(table(rows))
    if args.out:
        from results_log import results_path, run_record

        record = run_record("kernel_resources.py", argv,
                            device=f"none: compiled for {args.arch} on CPU",
                            config=args.config, seq_len=args.seq_len, batch=args.batch,
                            decode_context=args.decode,
                            arch=args.arch, kernels_filter=args.kernels, kernels=rows)
        path = results_path(args.out)
        Path(path).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
