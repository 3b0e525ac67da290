"""Evaluate a checkpoint: ``python -m nsa_lit.eval niah --ckpt_path P [options]`` (docs/eval.md).

Commands:
  niah   long-context retrieval generated locally: S-NIAH-1/2/3, multi-key NIAH, MQAR
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def niah_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from nsa_lit.eval.retrieval import TASKS

    parser.add_argument("--ckpt_path", required=True, help="training checkpoint (.ckpt)")
    parser.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096, 8192],
                        help="prompt lengths in tokens, comma-separated (default 1024,2048,4096,8192); "
                             "each plus the answer must fit the model's seq_len")
    parser.add_argument("--depths", type=_floats, default=[0, 25, 50, 75, 100],
                        help="needle depths in percent of the haystack (default 0,25,50,75,100)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated, from {','.join(TASKS)} (default all)")
    parser.add_argument("--samples", type=int, default=5, help="prompts per (task, length, depth) cell")
    parser.add_argument("--seed", type=int, default=0, help="fixes every prompt (same for every model)")
    parser.add_argument("--out", default=None,
                        help="output folder (default eval_results/niah/<checkpoint name>)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer spec (default: the checkpoint's data.tokenizer)")
    parser.add_argument("--data_dir", default=None,
                        help="where a bpe:<n> tokenizer lives (default: the checkpoint's data.data_dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run_niah(args: argparse.Namespace) -> dict:
    from nsa_lit.checkpoint import load_checkpoint
    from nsa_lit.eval import retrieval
    from nsa_lit.generate import checkpoint_tokenizer

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if not args.lengths or not args.depths or not tasks:
        raise ValueError("--lengths, --depths and --tasks must each name at least one value")
    model, data_hparams = load_checkpoint(args.ckpt_path, args.device)
    tokenizer = checkpoint_tokenizer(model.cfg, data_hparams, args.tokenizer, args.data_dir)
    seq_len = model.cfg.seq_len
    t0 = time.perf_counter()
    samples = retrieval.build_samples(tokenizer, tasks, args.lengths, args.depths, args.samples,
                                      args.seed)
    longest = max(len(s.prompt) + retrieval.answer_tokens(tokenizer, s) for s in samples)
    if longest > seq_len:
        too_long = sorted({s.length for s in samples
                           if len(s.prompt) + retrieval.answer_tokens(tokenizer, s) > seq_len})
        raise ValueError(
            f"length(s) {', '.join(map(str, too_long))} do not fit the model: prompt plus answer "
            f"reach {longest} tokens, more than its seq_len ({seq_len}); the model cannot read "
            f"past seq_len, so pass --lengths up to about {seq_len - 48}")
    records = retrieval.evaluate(model, tokenizer, samples, args.batch_size,
                                 progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    name = Path(args.ckpt_path).stem
    out = Path(args.out) if args.out else Path("eval_results") / "niah" / name
    meta = {"model": name, "ckpt_path": str(args.ckpt_path), "tokenizer": tokenizer.spec,
            "seq_len": seq_len, "layer_pattern": model.cfg.layer_pattern, "tasks": tasks,
            "lengths": args.lengths, "depths": args.depths, "samples": args.samples,
            "seed": args.seed, "device": str(args.device), "seconds": round(seconds, 2)}
    written = retrieval.write_outputs(out, meta, records)
    for task, s in written["summary"].items():
        print(retrieval.text_table(task, s))
    print(f"wrote {out / 'results.json'}" + ("" if all(written["png"].values()) else
          " (no heatmap PNG: matplotlib is not installed; see heatmap_<task>.txt)"))
    return {"out": out, **written}


def main(argv: list[str] | None = None):
    niah_help = niah_parser(argparse.ArgumentParser(
        prog="python -m nsa_lit.eval niah", add_help=False)).format_help()
    parser = argparse.ArgumentParser(
        prog="python -m nsa_lit.eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="niah options:\n" + niah_help)
    sub = parser.add_subparsers(dest="command", required=True)
    niah_parser(sub.add_parser("niah", help="long-context retrieval (S-NIAH-1/2/3, MK-NIAH, MQAR)",
                               description="Long-context retrieval generated locally; see docs/eval.md"))
    args = parser.parse_args(argv)
    if args.command == "niah":
        return run_niah(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
