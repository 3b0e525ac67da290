"""Time the compression-attention and block-selection Triton kernels against their references.

    python benchmarks/bench_compression_selection.py --out results.json [--sweep] [--budget-s 200]
        [--shapes asa_global_upprojected] [--lengths 8192,65536]

``--sweep`` times tile variants of every listed shape at the longest length (``--variants``: a
JSON list of ``[kind, config]`` pairs instead of the built-in list).

65,536 tokens per call (batch = 65536 / T), bf16, CUDA. Median ms from
``triton.testing.do_bench``. FLOPs are counted for what each kernel computes (visible
query/compressed-token pairs only): compression forward ``2 * pairs * (Dqk + Dv)``, forward +
backward ``3.5 x`` that (the usual 2 + 5 matrix products); selection ``2 * pairs * Dqk`` over the
first queries of each sharing group.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_configs import ASA_340M, ASA_340M_ABSORBED, NSA_340M, branch_shape  # noqa: E402
from kernels.blocks import num_compressed  # noqa: E402
from kernels.compression import reference as cref  # noqa: E402
from kernels.compression import triton_kernel as ctk  # noqa: E402
from kernels.selection import reference as sref  # noqa: E402
from kernels.selection import triton_kernel as stk  # noqa: E402
from nsa_lit.config import Branch  # noqa: E402

SHAPES = {
    # name: H, Hk, G (selection groups), Dqk, Dv of the compression attention (the form blocks
    # are scored in) of a 340M layer: ASA global absorbed (16, 2, 2, 160, 128), NSA (16, 4, 4,
    # 64, 64), ASA global as latent_form=auto trains it, expanded (16, 16, 2, 96, 64)
    "asa_global_absorbed_gla": branch_shape(ASA_340M_ABSORBED, "G", Branch.COMPRESSION),
    "nsa_gqa": branch_shape(NSA_340M, "N", Branch.COMPRESSION),
    "asa_global_upprojected": branch_shape(ASA_340M, "G", Branch.COMPRESSION),
}
_GLOBAL = ASA_340M.layer("G")
BLOCK_LEN, STRIDE, SELECT_BLOCK, TOP_N, NUM_LOCAL = (
    _GLOBAL.compress_block, _GLOBAL.compress_stride, _GLOBAL.select_block, _GLOBAL.top_n,
    _GLOBAL.num_local_blocks)


def visible_pairs(T: int, first_only_every: int = 1) -> int:
    t = torch.arange(0, T, first_only_every, dtype=torch.int64)
    n = torch.clamp((t - BLOCK_LEN + 1 + STRIDE).clamp_min(0) // STRIDE, max=num_compressed(T, BLOCK_LEN, STRIDE))
    return int(n.sum())


DRY = False  # --dry: CPU + Triton interpreter, tiny sizes, one call each (checks the script)
TOKENS = 65536


def bench(fn, rep=200, grad_to_none=None):
    if DRY:
        t = time.time()
        fn()
        return (time.time() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none,
                                   return_mode="median")


class Budget:
    def __init__(self, seconds):
        self.end = time.time() + seconds

    def left(self):
        return self.end - time.time()


def run_case(name, T, *, with_ref, q_share, budget, rows, sweep, variants=None):
    H, Hk, G, D, Dv = SHAPES[name]
    B = TOKENS // T
    N = num_compressed(T, BLOCK_LEN, STRIDE)
    scale = D ** -0.5
    dev = "cpu" if DRY else "cuda"
    dt = torch.float32 if DRY else torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, N, Hk, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, N, Hk, Dv, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(B, T, H, Dv, device=dev, dtype=dt)
    pairs = B * H * visible_pairs(T)
    fl_fwd = 2 * pairs * (D + Dv)
    sel_pairs = B * H * visible_pairs(T, q_share)
    fl_sel = 2 * sel_pairs * D
    row = {"shape": name, "T": T, "B": B, "H": H, "Hk": Hk, "G": G, "Dqk": D, "Dv": Dv, "N": N,
           "q_share": q_share, "flop_cmp_fwd": fl_fwd, "flop_sel": fl_sel}

    def cmp_fwd():
        with torch.no_grad():
            ctk.compression_attention(q, k, v, BLOCK_LEN, STRIDE, scale)

    def cmp_fwdbwd():
        o, _ = ctk.compression_attention(q, k, v, BLOCK_LEN, STRIDE, scale)
        o.backward(do)

    with torch.no_grad():
        _, lse = ctk.compression_attention(q, k, v, BLOCK_LEN, STRIDE, scale)
    skw = dict(num_groups=G, block_len=BLOCK_LEN, stride=STRIDE, select_block=SELECT_BLOCK,
               top_n=TOP_N, num_local=NUM_LOCAL, q_share=q_share, scale=scale)

    def sel():
        stk.select_blocks(q, k, lse, **skw)

    def sel_imp_only():
        stk.block_importance_first(q, k, lse, num_groups=G, block_len=BLOCK_LEN, stride=STRIDE,
                                   select_block=SELECT_BLOCK, q_share=q_share, scale=scale)

    row["cmp_fwd_ms"] = bench(cmp_fwd)
    row["cmp_fwdbwd_ms"] = bench(cmp_fwdbwd, grad_to_none=[q, k, v])
    row["sel_ms"] = bench(sel)
    row["sel_importance_only_ms"] = bench(sel_imp_only)
    # importance (zero-filled scratch) + torch top-k, the alternative the brief mentions
    imp = stk.block_importance_first(q, k, lse, num_groups=G, block_len=BLOCK_LEN, stride=STRIDE,
                                     select_block=SELECT_BLOCK, q_share=q_share, scale=scale)
    row["sel_torch_topk_part_ms"] = bench(lambda: imp.topk(min(TOP_N, imp.shape[-1]), dim=-1))
    row["cmp_fwd_tflops"] = fl_fwd / row["cmp_fwd_ms"] * 1e-9
    row["cmp_fwdbwd_tflops"] = 3.5 * fl_fwd / row["cmp_fwdbwd_ms"] * 1e-9
    row["sel_tflops"] = fl_sel / row["sel_ms"] * 1e-9
    print(json.dumps(row), flush=True)

    if sweep and budget.left() > 60:
        row["sweep"] = sweep_configs(cmp_fwd, cmp_fwdbwd, sel, budget, narrow=D + Dv <= 160,
                                     grads=[q, k, v], variants=variants)

    if with_ref and budget.left() > 30:
        try:
            qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))

            def ref_fwd():
                with torch.no_grad():
                    cref.compression_attention(qf, kf, vf, BLOCK_LEN, STRIDE, scale)

            def ref_fwdbwd():
                o, _ = cref.compression_attention(qf, kf, vf, BLOCK_LEN, STRIDE, scale)
                o.backward(do.float())

            row["ref_cmp_fwd_ms"] = bench(ref_fwd, rep=50)
            row["ref_cmp_fwdbwd_ms"] = bench(ref_fwdbwd, rep=50, grad_to_none=[qf, kf, vf])
            row["ref_sel_ms"] = bench(lambda: sref.select_blocks(qf, kf, lse, **skw), rep=50)
            del qf, kf, vf
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            row["ref_error"] = f"{type(err).__name__}: {str(err)[:120]}"
        if not DRY:
            torch.cuda.empty_cache()
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)


def sweep_configs(cmp_fwd, cmp_fwdbwd, sel, budget, narrow: bool, grads, variants=None):
    """Tile variants around the defaults (fwd 128/64/8w/3s, dq 128/64/8w/2s, dkdv 64/128/8w/2s
    for widths <= 320). ``narrow``: head dims small enough (96/64) for larger key tiles.
    ``grads``: the leaves whose gradients every fwd+bwd timing resets."""
    if variants is not None:
        return _time_variants(cmp_fwd, cmp_fwdbwd, sel, budget, variants, grads)
    variants = [
        ("fwd", {"TMA": False}), ("dq", {"TMA": False}), ("dkdv", {"TMA": False}),  # row loads
        ("fwd", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}),
        ("fwd", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}),
        ("dkdv", {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}),
        ("dkdv", {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}),
        ("dkdv", {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}),
        ("dq", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}),
        ("dq", {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}),
    ]
    if narrow:
        variants += [
            ("fwd", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}),
            ("fwd", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}),
            ("fwd", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}),
            ("fwd", {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}),
            ("dq", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}),
            ("dq", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}),
            ("dq", {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}),
            ("dq", {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}),
            ("dkdv", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}),
            ("dkdv", {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}),
            ("dkdv", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}),
            ("dkdv", {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}),
            ("dkdv", {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}),
        ]
    variants += [
        ("sel", {"TOPN": "fused"}),
        ("sel", {"num_warps": 8}),
        ("sel", {"TOPN_ELEMS": 4096}),
        ("sel", {"BLOCK_N": 128}),
    ]
    return _time_variants(cmp_fwd, cmp_fwdbwd, sel, budget, variants, grads)


def _time_variants(cmp_fwd, cmp_fwdbwd, sel, budget, variants, grads):
    """Each ``(kind, config)`` (kind ``fwd``, ``dq`` or ``dkdv`` of the compression kernels, or
    ``sel``), after the defaults timed the same way (first rows, config ``{}``: forward, fwd+bwd
    as ``fwdbwd``, selection; same repetitions, gradients reset): compare a variant with those
    rows, not with the case's own timings, which use other settings."""
    out = []
    defaults = [("fwd", {}), ("fwdbwd", {}), ("sel", {})]
    for kind, cfg in defaults + list(variants):
        if budget.left() < 40:
            out.append({"kind": kind, "cfg": cfg, "skipped": "time budget"})
            continue
        try:
            if kind == "sel":
                stk.CONFIG_OVERRIDE.update(cfg)
                ms = bench(sel, rep=100)
            else:
                if kind != "fwdbwd":
                    ctk.CONFIG_OVERRIDE[kind] = cfg
                ms = bench(cmp_fwd if kind == "fwd" else cmp_fwdbwd, rep=100,
                           grad_to_none=None if kind == "fwd" else grads)
            res = {"kind": kind, "cfg": cfg, "ms": ms}
        except Exception as err:  # noqa: BLE001 (record and go on: out of resources, etc.)
            res = {"kind": kind, "cfg": cfg, "error": f"{type(err).__name__}: {str(err)[:160]}"}
        finally:
            ctk.CONFIG_OVERRIDE.clear()
            stk.CONFIG_OVERRIDE.clear()
        print(json.dumps(res), flush=True)
        out.append(res)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--lengths", default="8192,65536")
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--variants", default=None,
                    help='with --sweep: JSON list of [kind, config] pairs instead of the built-in '
                         'list, e.g. \'[["dq", {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, '
                         '"num_stages": 4}]]\' (kinds fwd, dq, dkdv, sel)')
    args = ap.parse_args()
    global DRY, TOKENS
    if args.dry:
        DRY, TOKENS = True, 512
    budget = Budget(args.budget_s)
    torch.manual_seed(0)
    meta = {
        "device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python"] + sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "tokens_per_call": TOKENS, "dtype": "bfloat16",
        "config": {"block_len": BLOCK_LEN, "stride": STRIDE, "select_block": SELECT_BLOCK,
                   "top_n": TOP_N, "num_local": NUM_LOCAL},
        "timing": "triton.testing.do_bench median, ms",
        "flop_convention": "visible pairs only; fwd+bwd = 3.5 x fwd",
    }
    rows: list[dict] = []
    out = Path(args.out)
    lengths = [int(x) for x in args.lengths.split(",")]
    for T in lengths:
        for name in args.shapes.split(","):
            if budget.left() < 20:
                rows.append({"shape": name, "T": T, "skipped": "time budget"})
                continue
            try:
                run_case(name, T, with_ref=(T <= 8192), q_share=1 if name == "nsa_gqa" else 4,
                         budget=budget, rows=rows,
                         sweep=args.sweep and T == max(lengths),
                         variants=None if args.variants is None else json.loads(args.variants))
            except Exception as err:  # noqa: BLE001
                rows.append({"shape": name, "T": T, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                print(rows[-1], flush=True)
            if not DRY:
                torch.cuda.empty_cache()
            out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"\n{'shape':26s} {'T':>6s} {'cmp fwd':>8s} {'fwd+bwd':>8s} {'TF/s f':>7s} {'TF/s fb':>7s} "
          f"{'sel':>7s} {'ref f':>8s} {'ref fb':>8s} {'ref sel':>8s}")
    for r in rows:
        if "cmp_fwd_ms" not in r:
            print(r)
            continue
        print(f"{r['shape']:26s} {r['T']:6d} {r['cmp_fwd_ms']:8.3f} {r['cmp_fwdbwd_ms']:8.3f} "
              f"{r['cmp_fwd_tflops']:7.1f} {r['cmp_fwdbwd_tflops']:7.1f} {r['sel_ms']:7.3f} "
              f"{r.get('ref_cmp_fwd_ms', float('nan')):8.2f} "
              f"{r.get('ref_cmp_fwdbwd_ms', float('nan')):8.2f} {r.get('ref_sel_ms', float('nan')):8.2f}")


if __name__ == "__main__":
    main()
