"""Evaluate a checkpoint: ``python -m nsa_lit.eval COMMAND --ckpt_path P [options]`` (docs/eval.md).

Commands:
  niah       long-context retrieval generated locally: S-NIAH-1/2/3, multi-key NIAH, MQAR
  lm-eval    lm-evaluation-harness tasks (default: the zero-shot commonsense list)
  ppl        perplexity by context length on a held-out split of a prepared dataset
  longbench  LongBench's English tasks from its local data files, each with its own metric

A checkpoint that does not load stops the command with a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import json
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
                        help="lengths in tokens, prompt + answer, comma-separated (default "
                             "1024,2048,4096,8192); at most the model's seq_len")
    parser.add_argument("--depths", type=_floats, default=[0, 25, 50, 75, 100],
                        help="needle depths in percent of the haystack (default 0,25,50,75,100)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated, from {','.join(TASKS)} (default all)")
    parser.add_argument("--samples", type=int, default=5, help="prompts per (task, length, depth) cell")
    parser.add_argument("--seed", type=int, default=0, help="fixes every prompt (same for every model)")
    parser.add_argument("--out", default=None,
                        help="output folder (default eval_results/niah/<checkpoint name>)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
    _shared_options(parser)
    return parser


def _shared_options(parser: argparse.ArgumentParser, tokenizer_dir: str | None = "--data_dir") -> None:
    """The options every command ends with: the checkpoint's tokenizer (``--tokenizer`` and,
    unless ``tokenizer_dir`` is None, the flag naming where a bpe:<n> tokenizer lives), the
    device, progress bars and TensorBoard scalars."""
    if tokenizer_dir is not None:
        parser.add_argument("--tokenizer", default=None,
                            help="tokenizer spec (default: the checkpoint's data.tokenizer)")
        parser.add_argument(tokenizer_dir, default=None,
                            help="where a bpe:<n> tokenizer lives (default: the checkpoint's data.data_dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--tb_dir", default=None,
                        help="also write the results as TensorBoard scalars here, at the "
                             "checkpoint's global_step (the run's log dir, e.g. logs/tiny/asa/seed1234)")


def _write_tb(args: argparse.Namespace, scalars: dict) -> None:
    if args.tb_dir:
        from nsa_lit.eval.tensorboard import checkpoint_step, write_scalars

        step = checkpoint_step(args.ckpt_path)
        write_scalars(args.tb_dir, scalars, step)
        print(f"wrote {len(scalars)} TensorBoard scalars to {args.tb_dir} (step {step})")


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
            f"past seq_len, so pass --lengths up to {seq_len}")
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
    from nsa_lit.eval.tensorboard import niah_scalars

    _write_tb(args, niah_scalars(written["summary"]))
    return {"out": out, **written}


# -- lm-eval --------------------------------------------------------------------------------
def lm_eval_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from nsa_lit.eval.lm_eval_tasks import DEFAULT_TASKS

    parser.add_argument("--ckpt_path", default=None,
                        help="training checkpoint (.ckpt file or sharded dir); required unless "
                             "--download_only")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated lm-eval task (or group) names (default "
                             f"{','.join(DEFAULT_TASKS)})")
    parser.add_argument("--limit", type=float, default=None,
                        help="at most this many documents per task (a fraction if < 1); for "
                             "quick checks only, the scores are not comparable")
    parser.add_argument("--num_fewshot", type=int, default=None,
                        help="few-shot examples (default: each task's own, 0 for these tasks)")
    parser.add_argument("--batch_size", type=int, default=8, help="requests per forward")
    parser.add_argument("--max_gen_toks", type=int, default=256,
                        help="generation budget of generate_until tasks (default 256)")
    parser.add_argument("--output_path", default=None,
                        help="results JSON (default eval_results/lm_eval/<checkpoint name>.json)")
    parser.add_argument("--log_samples", action="store_true",
                        help="also store every document's requests and responses in the JSON")
    parser.add_argument("--include_path", default=None,
                        help="folder of extra task YAML files (your own or local copies of tasks)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the harness (few-shot sampling)")
    parser.add_argument("--bootstrap_iters", type=int, default=1000,
                        help="bootstrap resamples for standard errors (0: none; default 1000)")
    parser.add_argument("--download_only", action="store_true",
                        help="only load the tasks' datasets into the Hugging Face cache "
                             "(HF_DATASETS_CACHE; needs network) and exit")
    _shared_options(parser)
    return parser


def run_lm_eval(args: argparse.Namespace) -> dict:
    from lm_eval.utils import handle_non_serializable

    from nsa_lit.eval import lm_eval_adapter as adapter

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    manager = adapter.task_manager(tasks, args.include_path)
    if args.download_only:
        adapter.load_tasks(tasks, manager)
        print(f"datasets of {', '.join(tasks)} are in the Hugging Face cache")
        return {}
    if args.ckpt_path is None:
        raise ValueError("--ckpt_path is required (unless --download_only)")
    t0 = time.perf_counter()
    built = adapter.load_tasks(tasks, manager)  # datasets first: a missing one fails at once
    lm = adapter.NsaLitLM(ckpt_path=args.ckpt_path, tokenizer_spec=args.tokenizer,
                          data_dir=args.data_dir, batch_size=args.batch_size, device=args.device,
                          max_gen_toks=args.max_gen_toks, progress=not args.no_progress)
    results = adapter.evaluate(lm, built, manager, limit=limit, num_fewshot=args.num_fewshot,
                               seed=args.seed, log_samples=args.log_samples,
                               bootstrap_iters=args.bootstrap_iters)
    name = Path(args.ckpt_path).stem
    results["meta"] = {"model": name, "ckpt_path": str(args.ckpt_path), "tasks": tasks,
                       "limit": limit, "num_fewshot": args.num_fewshot, "seed": args.seed,
                       "tokenizer": lm.tokenizer.spec, "seq_len": lm.max_length,
                       "layer_pattern": lm.model.cfg.layer_pattern, "device": str(args.device),
                       "seconds": round(time.perf_counter() - t0, 2)}
    out = Path(args.output_path) if args.output_path else \
        Path("eval_results") / "lm_eval" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=handle_non_serializable) + "\n")
    print(adapter.text_table(results))
    print(f"wrote {out}")
    _write_tb(args, {f"eval/lm_eval/{task}/{metric}": value
                     for task, metric, value, _ in adapter.summary_rows(results)})
    return results


# -- perplexity by length -------------------------------------------------------------------
def ppl_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--ckpt_path", required=True,
                        help="training checkpoint (.ckpt or sharded dir)")
    parser.add_argument("--data_dir", default=None,
                        help="prepared dataset (default: the checkpoint's data.data_dir)")
    parser.add_argument("--split", default="val", help="held-out split to read (default val)")
    parser.add_argument("--lengths", type=_ints, default=None,
                        help="window lengths in tokens, comma-separated (default: 1024 doubling "
                             "up to twice the training seq_len, or seq_len/4 .. 2 seq_len for a "
                             "model trained on fewer than 2048 tokens); lengths beyond seq_len "
                             "are extrapolation and flagged")
    parser.add_argument("--max_tokens", type=int, default=1 << 20,
                        help="read at most this many leading tokens of the split for every "
                             "length (default 1048576)")
    parser.add_argument("--first_bucket", type=int, default=128,
                        help="position buckets [0,b), [b,2b), [2b,4b), ... (default b=128)")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per forward")
    parser.add_argument("--output_path", default=None,
                        help="results JSON (default eval_results/ppl/<checkpoint name>.json)")
    _shared_options(parser, tokenizer_dir=None)
    return parser


def default_lengths(seq_len: int) -> list[int]:
    """1024, 2048, ... up to 2 seq_len; for seq_len < 2048: seq_len/4, seq_len/2, seq_len,
    2 seq_len."""
    if seq_len < 2048:
        return [max(1, seq_len // 4), max(1, seq_len // 2), seq_len, 2 * seq_len]
    out, n = [], 1024
    while n <= 2 * seq_len:
        out.append(n)
        n *= 2
    return out


def run_ppl(args: argparse.Namespace) -> dict:
    from nsa_lit.checkpoint import load_checkpoint
    from nsa_lit.eval import perplexity

    model, data_hparams = load_checkpoint(args.ckpt_path, args.device)
    data_dir = args.data_dir or data_hparams.get("data_dir")
    if data_dir is None:
        raise ValueError("the checkpoint records no data.data_dir: pass --data_dir")
    lengths = args.lengths or default_lengths(model.cfg.seq_len)
    if args.max_tokens < 2:
        raise ValueError(f"--max_tokens must be >= 2, got {args.max_tokens}")
    stream = perplexity.read_split(data_dir, args.split, max(args.max_tokens, max(lengths) + 1))
    perplexity.check_data_tokenizer(model.cfg.vocab_size, data_hparams, data_dir)
    t0 = time.perf_counter()
    records = perplexity.evaluate(model, stream, lengths, args.batch_size, args.max_tokens,
                                  args.first_bucket, progress=not args.no_progress,
                                  where=f"split {args.split!r} of {data_dir}")
    name = Path(args.ckpt_path).stem
    meta = {"model": name, "ckpt_path": str(args.ckpt_path), "data_dir": str(data_dir),
            "split": args.split, "tokens_read": int(len(stream)), "max_tokens": args.max_tokens,
            "train_seq_len": model.cfg.seq_len, "layer_pattern": model.cfg.layer_pattern,
            "device": str(args.device), "seconds": round(time.perf_counter() - t0, 2)}
    result = {"meta": meta, "lengths": records}
    out = Path(args.output_path) if args.output_path else \
        Path("eval_results") / "ppl" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(perplexity.text_table(records))
    print(f"wrote {out}")
    scalars = {}
    for r in records:
        scalars[f"eval/ppl/len_{r['length']}"] = r["ppl"]
        for b in r["buckets"]:
            scalars[f"eval/ppl/len_{r['length']}/pos_{b['start']}_{b['end']}"] = b["ppl"]
    _write_tb(args, scalars)
    return result


# -- LongBench ------------------------------------------------------------------------------
def longbench_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from nsa_lit.eval.longbench import TASKS

    parser.add_argument("--ckpt_path", required=True,
                        help="training checkpoint (.ckpt file or sharded dir)")
    parser.add_argument("--data_dir", required=True,
                        help="folder of LongBench's <task>.jsonl files (data.zip of the Hugging "
                             "Face dataset THUDM/LongBench, unzipped)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated, from {','.join(TASKS)} (default all)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens the model reads, prompt plus answer (default and maximum: "
                             "the model's seq_len); longer prompts are cut in the middle")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most the first N examples of each task (quick checks only)")
    parser.add_argument("--batch_size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--output_path", default=None,
                        help="results JSON (default eval_results/longbench/<checkpoint name>.json)")
    _shared_options(parser, tokenizer_dir="--tokenizer_dir")
    return parser


def run_longbench(args: argparse.Namespace) -> dict:
    from nsa_lit.checkpoint import load_checkpoint
    from nsa_lit.eval import longbench
    from nsa_lit.generate import checkpoint_tokenizer

    tasks = longbench.parse_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max_length must be >= 1, got {args.max_length}")
    longbench.check_files(args.data_dir, tasks)  # before the model: a missing file fails at once
    examples = [ex for t in tasks for ex in longbench.read_task(args.data_dir, t, args.limit)]
    model, data_hparams = load_checkpoint(args.ckpt_path, args.device)
    tokenizer = checkpoint_tokenizer(model.cfg, data_hparams, args.tokenizer, args.tokenizer_dir)
    seq_len = model.cfg.seq_len
    max_length = seq_len if args.max_length is None else args.max_length
    if max_length > seq_len:
        raise ValueError(f"--max_length {max_length} exceeds the model's seq_len ({seq_len}): "
                         "the model cannot read past it")
    for t in tasks:
        longbench.prompt_budget(t, max_length)
    t0 = time.perf_counter()
    records = longbench.evaluate(model, tokenizer, examples, max_length, args.batch_size,
                                 progress=not args.no_progress)
    summary = longbench.summarize(records)
    name = Path(args.ckpt_path).stem
    meta = {"model": name, "ckpt_path": str(args.ckpt_path), "data_dir": str(args.data_dir),
            "tasks": tasks, "limit": args.limit, "max_length": max_length, "seq_len": seq_len,
            "tokenizer": tokenizer.spec, "layer_pattern": model.cfg.layer_pattern,
            "device": str(args.device), "seconds": round(time.perf_counter() - t0, 2)}
    result = {"meta": meta, "average": longbench.average(summary), "summary": summary,
              "records": records}
    out = Path(args.output_path) if args.output_path else \
        Path("eval_results") / "longbench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(longbench.text_table(summary))
    print(f"wrote {out}")
    _write_tb(args, longbench.scalars(summary))
    return result


COMMANDS = {
    "niah": (niah_parser, run_niah, "long-context retrieval (S-NIAH-1/2/3, MK-NIAH, MQAR)"),
    "lm-eval": (lm_eval_parser, run_lm_eval,
                "lm-evaluation-harness tasks (zero-shot commonsense list by default)"),
    "ppl": (ppl_parser, run_ppl, "perplexity by context length on a held-out split"),
    "longbench": (longbench_parser, run_longbench,
                  "LongBench's English tasks from local data files, each with its own metric"),
}


def main(argv: list[str] | None = None):
    epilog = "\n".join(
        f"{name} options:\n" + build(argparse.ArgumentParser(
            prog=f"python -m nsa_lit.eval {name}", add_help=False)).format_help()
        for name, (build, _, _) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m nsa_lit.eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (build, _, text) in COMMANDS.items():
        build(sub.add_parser(name, help=text, description=f"{text}; see docs/eval.md"))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # one line, no traceback; exit code 2 for a checkpoint that does not load
        # (nsa_lit.checkpoint.CheckpointLoadError.exit_code), 1 otherwise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))
