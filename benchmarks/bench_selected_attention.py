"""Selected-block attention kernel alone: sweeps of its tile configurations and a per-stage
breakdown (index lists, forward, dq, CSR, dk/dv) on one GPU.

    python3 benchmarks/bench_selected_attention.py --sweep --out results/selected_attention.json
    python3 benchmarks/bench_selected_attention.py --sweep --importance smooth   # correlated picks

``--importance smooth`` makes neighbouring queries select mostly the same blocks (as trained
models do); that is where union chunks (the GLA default: 64-row programs over the union of two
q_share groups' blocks; ``one_group`` is the 32-row alternative) pay off, which uniform random
picks (the default) understate.
"""
import os
import sys
from dataclasses import replace

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_configs import (ASA_1_3B, ASA_340M, ASA_340M_EXPANDED, NSA_340M,  # noqa: E402
                           branch_shape)
from kernels.blocks import num_selection_blocks  # noqa: E402
from nsa_lit.config import Branch  # noqa: E402
from kernels.selected_attention.triton_kernel import (  # noqa: E402
    Config,
    DEFAULT_CONFIG,
    _backward,
    _bwd_dkdv,
    _bwd_dq,
    _dkdv_lists,
    _dkdv_plan,
    _forward,
    _lists,
    _plan,
    _row_major,
    _segments,
    selected_attention,
)

# ---------------------------------------------------------------------------------------------
# Benchmark: python3 benchmarks/bench_selected_attention.py --out FILE.json
# ---------------------------------------------------------------------------------------------
def _selection_layout(cfg, kind: str) -> tuple[int, int, int, int, int, int]:
    """``(H, Hk, G, Dqk, Dv, q_share)`` of the selected attention of ``cfg``'s layer ``kind``."""
    return (*branch_shape(cfg, kind, Branch.SELECTION), cfg.layer(kind).q_share)


BENCH_LAYOUTS = {
    # name: (H, Hk, G, Dqk, Dv, q_share) of a 340M layer's selected attention
    "gla_absorbed": _selection_layout(ASA_340M, "G"),               # (16, 2, 2, 160, 128, 4)
    # as the layer passes it: v=None, value_dim=128, values k[..., :128] (read through the keys)
    "gla_absorbed_vk": _selection_layout(ASA_340M, "G"),
    "gla_upprojected": _selection_layout(ASA_340M_EXPANDED, "G"),   # (16, 16, 2, 96, 64, 4)
    "nsa_gqa": _selection_layout(NSA_340M, "N"),                    # (16, 4, 4, 64, 64, 1)
    # the 1.3B ASA global layer as it passes its values (keys over 256 columns: WIDE tiling)
    "gla_1.3b_absorbed_vk": _selection_layout(ASA_1_3B, "G"),       # (32, 2, 2, 288, 256, 4)
}
# the default run's layouts (--layouts); the 1.3B one on request
DEFAULT_LAYOUTS = ("gla_absorbed", "gla_absorbed_vk", "gla_upprojected", "nsa_gqa")
_GLOBAL = ASA_340M.layer("G")


def _bench_inputs(layout: str, T: int, B: int, select_block=_GLOBAL.select_block,
                  top_n=_GLOBAL.top_n, num_local=_GLOBAL.num_local_blocks, seed=0,
                  importance: str = "uniform"):
    """Random q, k, v (``v`` None for a ``*_vk`` layout: values ``k[..., :Dv]``, see
    :func:`_value_dim`) and the blocks ``top_n_blocks`` picks from an importance that is
    ``uniform`` (independent per query: neighbouring query groups share little beyond the forced
    blocks) or ``smooth`` (a per-sequence preference over key blocks plus 25% per-query noise:
    neighbouring groups pick mostly the same blocks, as trained models do)."""
    from kernels.selection.reference import top_n_blocks

    H, HK, G, D, DV, qs = BENCH_LAYOUTS[layout]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, T, HK, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, T, HK, DV, device="cuda", dtype=torch.bfloat16, generator=gen)
    if _value_dim(layout) is not None:
        v = None
    nb = num_selection_blocks(T, select_block)
    imp = torch.rand(B, T, G, nb, device="cuda", generator=gen)
    if importance == "smooth":
        imp = 0.25 * imp + torch.rand(B, 1, G, nb, device="cuda", generator=gen)
    elif importance != "uniform":
        raise ValueError(f"importance must be 'uniform' or 'smooth', got {importance!r}")
    bi = top_n_blocks(imp, select_block=select_block, top_n=top_n, num_local=num_local, q_share=qs)
    del imp
    return q, k, v, bi, qs


def _value_dim(layout: str) -> int | None:
    """``value_dim`` of a ``*_vk`` layout (values ``k[..., :Dv]``, passed as ``v=None``), else
    None (values a tensor of their own)."""
    return BENCH_LAYOUTS[layout][4] if layout.endswith("_vk") else None


def _requires_grad(*xs):
    """Detached leaves that require grad (None stays None)."""
    return tuple(None if x is None else x.detach().requires_grad_() for x in xs)


def _visible_keys(bi: torch.Tensor, select_block: int, heads_per_group: int) -> int:
    T = bi.shape[1]
    t = torch.arange(T, device=bi.device).view(1, T, 1, 1)
    vis = (t - bi * select_block + 1).clamp(0, select_block)
    return int(torch.where(bi >= 0, vis, torch.zeros_like(vis)).sum().item()) * heads_per_group


def _bench_variants(layout: str):
    """(name, Config, what) tuples measured in a benchmark run: what in {'fwd', 'fwdbwd'}."""
    H, HK, G, D, DV, qs = BENCH_LAYOUTS[layout]
    d = DEFAULT_CONFIG
    v = [("default", d, "fwd"), ("default", d, "fwdbwd")]
    absorbed = layout.startswith("gla_absorbed")
    v.append(("fwd_keys", replace(d, fwd_order="keys"), "fwd"))
    v.append(("fwd_s2", replace(d, fwd_stages=2), "fwd"))
    v.append(("fwd_s4", replace(d, fwd_stages=4), "fwd"))
    v.append(("dq_s3", replace(d, dq_stages=3), "fwdbwd"))
    v.append(("dkdv_s2", replace(d, dkdv_stages=2), "fwdbwd"))
    v.append(("dq_s3_dkdv_s2", replace(d, dq_stages=3, dkdv_stages=2), "fwdbwd"))
    v.append(("dq_keys" if absorbed else "dq_rows",
              replace(d, dq_order="keys" if absorbed else "rows"), "fwdbwd"))
    v.append(("seg128", replace(d, seg=128), "fwdbwd"))
    v.append(("atomic_q", replace(d, bwd="atomic_q"), "fwdbwd"))
    if absorbed:  # the default chunks span 2 q_share groups (64 rows); dk/dv takes 1 group
        v.append(("one_group", replace(d, union_groups=1), "fwd"))
        v.append(("one_group", replace(d, union_groups=1), "fwdbwd"))
        # one group, keys-major products: 64 key rows on the tile's M side, the 32 query rows
        # on N, so no union padding and no half-empty M tile
        one_keys = replace(d, union_groups=1, fwd_order="keys", dq_order="keys")
        v.append(("one_group_keys", one_keys, "fwd"))
        v.append(("one_group_keys", one_keys, "fwdbwd"))
        v.append(("union_dkdv", replace(d, dkdv_tok=8), "fwdbwd"))
        v.append(("no_tma", replace(d, tma=False), "fwd"))  # gathered key tiles
        v.append(("no_tma", replace(d, tma=False), "fwdbwd"))
    if D > 256:  # WIDE defaults (no spills on sm_90a) against tilings that spill
        v.append(("two_accs", replace(d, one_acc=False), "fwdbwd"))
        v.append(("rows32", replace(d, max_rows=32), "fwdbwd"))
        v.append(("bk64", replace(d, bk=64), "fwdbwd"))
        v.append(("narrow_tiles", replace(d, bk=64, max_rows=64, one_acc=False), "fwdbwd"))
        v.append(("warps8", replace(d, fwd_warps=8, dq_warps=8, dkdv_warps=8), "fwdbwd"))
    return v


def _breakdown(q, k, v, bi, qs, cfg: Config = DEFAULT_CONFIG, select_block: int = 64,
               value_dim: int | None = None):
    """Median ms of each stage of one fwd+bwd call, and the bytes the two gathers move
    (``v=None, value_dim``: values ``k[..., :value_dim]``, as :func:`selected_attention`)."""
    from triton.testing import do_bench

    D = q.shape[-1]
    scale = D ** -0.5
    if value_dim is not None and not _plan(q, k, v, bi, select_block, qs, cfg, value_dim).VK:
        v, value_dim = k[..., :value_dim], None  # what selected_attention does
    p = _plan(q, k, v, bi, select_block, qs, cfg, value_dim)
    p_kv = _dkdv_plan(q, k, v, bi, select_block, qs, cfg, p)
    q, k, v = _row_major(q, k, v, p)
    bi32, clist = _lists(bi, p)
    bi_kv, clist_kv = _dkdv_lists(bi, p, p_kv, bi32, clist)
    o, lse = _forward(q, k, v, bi32, clist, p, scale, cfg)
    do = torch.randn_like(o)
    dk32 = torch.zeros(p.B, p.T, p.HK, p.D, device=q.device, dtype=torch.float32)
    dv32 = dk32 if p.VK else torch.zeros(p.B, p.T, p.HK, p.DV, device=q.device,
                                          dtype=torch.float32)
    dq, delta = _bwd_dq(q, k, v, o, lse, do, bi32, clist, p, scale, cfg, dk32, dv32)
    segs = _segments(clist_kv, p_kv, cfg.seg)

    def casts():  # what _backward adds around the kernels (no dv buffer with values in keys)
        dk = torch.zeros_like(dk32).to(k.dtype)
        return dk if p.VK else (dk, torch.zeros_like(dv32).to(v.dtype))

    def index_lists():
        lists = _lists(bi, p)
        return lists, _dkdv_lists(bi, p, p_kv, *lists)

    stages = {
        "index_lists": index_lists,
        "fwd_kernel": lambda: _forward(q, k, v, bi32, clist, p, scale, cfg),
        "dq_kernel": lambda: _bwd_dq(q, k, v, o, lse, do, bi32, clist, p, scale, cfg, dk32, dv32),
        "csr_segments": lambda: _segments(clist_kv, p_kv, cfg.seg),
        "dkdv_kernel": lambda: _bwd_dkdv(q, k, v, do, lse, delta, bi_kv, segs, p_kv, scale, cfg,
                                         dk32, dv32, dq),
        "zeros_casts": casts,
        # the whole backward as autograd runs it: against the sum of its stages above, what the
        # GPU hides of the CSR's host-bound launches behind the dq kernel
        "backward": lambda: _backward(q, k, v, o, lse, do, bi32, clist, p, scale, cfg,
                                      kv_lists=(bi_kv, clist_kv, p_kv)),
    }
    out = {name: do_bench(fn, warmup=10, rep=50, return_mode="median")
           for name, fn in stages.items()}
    esz = q.element_size()
    kv_dims = p.D if p.VK else p.D + p.DV  # values read through the keys cost nothing extra
    out["entries"] = int((clist >= 0).sum().item())
    out["kv_gather_GB"] = out["entries"] * p.NSUB * p.HSG * p.BK * kv_dims * esz / 1e9
    out["dkdv_entries"] = int((clist_kv >= 0).sum().item())
    out["qdo_gather_GB"] = out["dkdv_entries"] * p_kv.NSUB * p_kv.HSG \
        * min(p_kv.TOK * p_kv.HP, p_kv.ROWS) * (p.D + p.DV) * esz / 1e9
    out["plan"] = {k_: getattr(p, k_) for k_ in ("HP", "TOK", "ROWS", "UNION", "L", "BK", "VK",
                                                   "KV_TOK", "FWD_ORDER", "DQ_ORDER")}
    return out


def _run_once(layout: str, name: str, T: int = 8192):
    """Compile-and-run one variant once (used to warm the Triton cache in parallel)."""
    q, k, v, bi, qs = _bench_inputs(layout, T, 1)
    H, HK, G, D, DV, _ = BENCH_LAYOUTS[layout]
    for vname, cfg, what in _bench_variants(layout):
        if vname != name:
            continue
        if what == "fwdbwd":
            q, k, v = _requires_grad(q, k, v)
        o = selected_attention(q, k, v, bi, 64, D ** -0.5, qs, value_dim=_value_dim(layout),
                               config=cfg)
        if what == "fwdbwd":
            o.backward(torch.randn_like(o))
    torch.cuda.synchronize()


def _bench_main(argv=None):
    import argparse
    import datetime
    import json
    import subprocess
    import sys
    import time

    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--warm", nargs=2, metavar=("LAYOUT", "VARIANT"))
    ap.add_argument("--parallel-warmup", type=int, default=0)
    ap.add_argument("--warm-only", action="store_true")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--sweep", action="store_true",
                    help="time every variant at every --seqlens, not only the defaults")
    ap.add_argument("--variants", default=None,
                    help="with --sweep: comma-separated variant names to time (besides default)")
    ap.add_argument("--seqlens", default="8192,65536")
    ap.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                    help=f"comma-separated subset of {', '.join(BENCH_LAYOUTS)}")
    ap.add_argument("--importance", choices=["uniform", "smooth"], default="uniform",
                    help="how the benchmark's block selections correlate across queries")
    args = ap.parse_args(argv)
    keep = set(args.variants.split(",")) | {"default"} if args.variants else None
    if keep and not args.sweep:
        ap.error("--variants needs --sweep")

    def timed(name: str) -> bool:  # the variants this run measures
        return (args.sweep or name == "default") and (not keep or name in keep)
    if args.warm:
        _run_once(*args.warm)
        return
    t_start = time.time()
    layouts = args.layouts.split(",")
    unknown = set(layouts) - set(BENCH_LAYOUTS)
    if unknown:
        ap.error(f"--layouts: unknown {sorted(unknown)}; choose from {list(BENCH_LAYOUTS)}")
    names = {n for lay in layouts for n, _, _ in _bench_variants(lay)}
    if keep and keep - names:
        ap.error(f"--variants: unknown {sorted(keep - names)}; choose from {sorted(names)}")
    if args.parallel_warmup:
        jobs = sorted({(lay, n) for lay in layouts for n, _, _ in _bench_variants(lay)
                       if timed(n)})
        procs, logs = [], []
        for lay, n in jobs:
            while sum(p.poll() is None for p in procs) >= args.parallel_warmup:
                time.sleep(0.2)
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--warm", lay, n],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            logs.append((lay, n))
        for p, (lay, n) in zip(procs, logs):
            out = p.communicate()[0].decode(errors="replace")
            if p.returncode:
                print(f"warm-up {lay}/{n} FAILED rc={p.returncode}\n{out[-3000:]}", flush=True)
        print(f"parallel warm-up of {len(jobs)} variants: {time.time() - t_start:.1f}s", flush=True)
    if args.warm_only:
        return

    results = []
    breakdowns = {}
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join(["python3 benchmarks/bench_selected_attention.py"]
                            + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.date.today().isoformat(),
        "tokens_per_call": 65536, "select_block": _GLOBAL.select_block, "top_n": _GLOBAL.top_n,
        "num_local": _GLOBAL.num_local_blocks,
        "block_idx": f"top_n_blocks on {args.importance} random importance (forced block 0 + "
                     "2 local blocks)",
        "flops": "fwd = 2*(Dqk+Dv)*visible keys per query row; fwd+bwd = 3.5x fwd",
        "timing": "triton.testing.do_bench median ms (includes index building)",
    }

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": results, "breakdown_T65536": breakdowns}, f,
                          indent=1)

    for T in [int(x) for x in args.seqlens.split(",")]:
        B = 65536 // T
        for lay in layouts:
            H, HK, G, D, DV, qs = BENCH_LAYOUTS[lay]
            q, k, v, bi, qs = _bench_inputs(lay, T, B, importance=args.importance)
            vdim = _value_dim(lay)
            vis = _visible_keys(bi, 64, H // G)
            flops = 2.0 * (D + DV) * vis
            do = torch.randn(B, T, H, DV, device="cuda", dtype=torch.bfloat16)
            for name, cfg, what in _bench_variants(lay):
                if not timed(name):
                    continue
                if time.time() - t_start > args.budget_s:
                    print("budget exhausted; skipping", lay, T, name, what, flush=True)
                    continue
                rec = {"layout": lay, "T": T, "B": B, "H": H, "Hk": HK, "G": G, "Dqk": D, "Dv": DV,
                       "q_share": qs, "variant": name, "what": what, "config": cfg.__dict__,
                       "visible_keys_per_row": vis / (B * T * H)}
                try:
                    if what == "fwd":
                        with torch.no_grad():
                            fn = lambda: selected_attention(q, k, v, bi, 64, D ** -0.5, qs,
                                                            value_dim=vdim, config=cfg)
                            ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
                        rec.update(ms=ms, tflops=flops / ms * 1e-9)
                    else:
                        qg, kg, vg = _requires_grad(q, k, v)

                        def fn():
                            o = selected_attention(qg, kg, vg, bi, 64, D ** -0.5, qs,
                                                   value_dim=vdim, config=cfg)
                            o.backward(do)
                        ms = do_bench(fn, warmup=10, rep=100, return_mode="median",
                                      grad_to_none=[qg, kg] + ([vg] if vg is not None else []))
                        rec.update(ms=ms, tflops=3.5 * flops / ms * 1e-9)
                except Exception as err:  # keep measuring the rest
                    rec.update(error=f"{type(err).__name__}: {err}"[:500])
                results.append(rec)
                print(f"{lay:16s} T={T:6d} {name:18s} {what:7s} "
                      + (f"{rec['ms']:8.3f} ms {rec['tflops']:6.1f} TFLOP/s" if "ms" in rec
                         else rec["error"]), flush=True)
                dump()
            if T == 65536 and time.time() - t_start < args.budget_s:
                try:
                    bd = _breakdown(q, k, v, bi, qs, value_dim=vdim)
                    fwd_ms = bd["fwd_kernel"]
                    bd["fwd_kv_GBps"] = bd["kv_gather_GB"] / fwd_ms * 1e3
                    bd["dq_kv_GBps"] = bd["kv_gather_GB"] / bd["dq_kernel"] * 1e3
                    bd["dkdv_qdo_GBps"] = bd["qdo_gather_GB"] / bd["dkdv_kernel"] * 1e3
                    breakdowns[lay] = bd
                    print(f"breakdown {lay}: " + ", ".join(
                        f"{k_}={v_:.3f}" if isinstance(v_, float) else f"{k_}={v_}"
                        for k_, v_ in bd.items()), flush=True)
                except Exception as err:
                    print(f"breakdown {lay} failed: {type(err).__name__}: {err}", flush=True)
                dump()
            q = k = v = bi = do = None  # free before the next layout
            torch.cuda.empty_cache()
    meta["wall_s"] = time.time() - t_start
    dump()
    print("\nsummary (median ms)")
    print(f"{'layout':16s} {'T':>6s} {'fwd':>8s} {'fwd+bwd':>8s} {'fwd TF/s':>9s} {'f+b TF/s':>9s}")
    for T in [int(x) for x in args.seqlens.split(",")]:
        for lay in layouts:
            rs = {r["what"]: r for r in results if r["layout"] == lay and r["T"] == T
                  and r["variant"] == "default" and "ms" in r}
            if rs:
                f, fb = rs.get("fwd", {}), rs.get("fwdbwd", {})
                print(f"{lay:16s} {T:6d} {f.get('ms', float('nan')):8.3f} "
                      f"{fb.get('ms', float('nan')):8.3f} {f.get('tflops', float('nan')):9.1f} "
                      f"{fb.get('tflops', float('nan')):9.1f}")


if __name__ == "__main__":
    _bench_main()
