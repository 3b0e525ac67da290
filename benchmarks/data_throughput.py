"""Data throughput on the CPU: tokenization tokens/s per core, and the datamodule's delivery rate.

    python3 benchmarks/data_throughput.py --out cpu-2core-data
    python3 benchmarks/data_throughput.py --tokenizers mistral-v1 --workers 1 --loaders 8x8192:4 --seconds 5

1. Tokenization, as ``python -m nsa_lit.data.prepare`` does it: the embedded corpus' documents
   (read once, beforehand, not timed) in batches of 64, through
   :func:`nsa_lit.data.tokenize_pool.encode_ordered` (ids + eos, in input order) with 1, 2, ...
   worker processes, for each ``--tokenizers`` spec (``bpe:<n>`` is trained on the corpus first;
   its training time is reported apart). Reported: tokens/s and tokens/s per worker (= per core
   when each worker has a core).
2. Delivery: ``TokenDataModule.train_dataloader()`` iterated by a consumer loop that only counts
   tokens, for each ``--loaders`` case ``BxT:W`` (batch, sequence length, ``num_workers``), over a
   synthetic prepared dataset of ``--synthetic-tokens`` random tokens (uint16, 64 MB LitData chunks as
   ``prepare`` writes them at scale; shuffled windows read across chunks). Each case runs for
   ``--seconds``, over as many epochs as that takes. Reported: ``B x T`` tokens per second,
   steady (from each epoch's first batch to its last) and overall (worker start-up included).
3. The need: ``--gpus`` x the training tokens/s of one GPU, for each ``--need NAME=TOKENS_PER_SEC``
   (default: 144,002, the 340M ASA config at 8k on an H200, benchmarks/README.md), and for each
   delivery case the margin, delivery / need, three ways: ``per_gpu``, the case's rate / one GPU's
   need (each rank runs its own loader, as in DDP / FSDP2); ``one_rank_for_node``, the case's rate /
   the node's need (as if one rank's loader fed all ``--gpus``); ``per_process_x_workers``, the rate
   of one loader process (the same shape with ``num_workers`` 0) x the case's workers / the node's need.

Files are in the page cache during the measurement (the synthetic dataset is just written): this
measures the loader's CPU cost, not a disk. ``--out NAME`` writes ``benchmarks/results/NAME.json``,
rewritten after every measurement.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_lit.data import TokenDataModule  # noqa: E402
from nsa_lit.data.corpus import python_docs_documents  # noqa: E402
from nsa_lit.data.manifest import FORMAT_VERSION, token_dtype, write_meta  # noqa: E402
from nsa_lit.data.prepare import _write_shards, parse_count  # noqa: E402
from nsa_lit.data.tokenize_pool import encode_ordered  # noqa: E402
from nsa_lit.data.tokenizer import load_tokenizer, parse_bpe_spec, train_bpe  # noqa: E402
from results_log import ResultsLog  # noqa: E402

BATCH_DOCS = 64  # documents per tokenization task, as prepare
# 340M ASA, T = 8192, compiled, chunked loss, one H200 (results/h200-train-loss-chunk.json)
DEFAULT_NEED = ("340M-ASA-8k-H200", 144_002.0)


def parse_loader(value: str) -> tuple[int, int, int]:
    """``"8x8192:4"`` -> (batch 8, seq_len 8192, num_workers 4)."""
    try:
        shape, _, workers = value.partition(":")
        batch, seq_len = (int(x) for x in shape.lower().split("x"))
        return batch, seq_len, int(workers)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--loaders: expected BxT:W such as 8x8192:4, got {value!r}") from None


def parse_need(value: str) -> tuple[str, float]:
    """``"340M=144002"`` -> ("340M", 144002.0): a name and one GPU's training tokens/s."""
    name, sep, rate = value.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--need: expected NAME=TOKENS_PER_SEC, got {value!r}") from None


# ---------------------------------------------------------------------------------------------- tokenization
def time_tokenization(texts: list[str], spec: str, workers: int, data_dir: Path, progress: bool) -> dict:
    """Tokens (eos included) and seconds of ``encode_ordered`` over ``texts`` with ``workers`` processes.

    ``tokens_per_sec`` counts from the call (the worker pool's start included); ``steady_tokens_per_sec``
    from the first batch's result to the last (what a long preparation runs at)."""
    from tqdm.auto import tqdm

    tok = load_tokenizer(spec, data_dir)
    batches = (((), texts[i:i + BATCH_DOCS]) for i in range(0, len(texts), BATCH_DOCS))
    tokens = first_tokens = 0
    first = None
    with tqdm(desc=f"tokenize {spec} x{workers}", unit="tok", unit_scale=True, disable=not progress) as bar:
        t0 = time.perf_counter()
        for _, encoded in encode_ordered(batches, tok, workers, data_dir):
            n = sum(int(a.size) for a in encoded)
            tokens += n
            if first is None:
                first, first_tokens = time.perf_counter(), tokens
            bar.update(n)
        end = time.perf_counter()
    steady = (tokens - first_tokens) / (end - first) if first is not None and end > first else None
    return {"tokens": tokens, "seconds": round(end - t0, 3), "tokens_per_sec": round(tokens / (end - t0)),
            "tokens_per_sec_per_worker": round(tokens / (end - t0) / max(1, workers)),
            "steady_tokens_per_sec": None if steady is None else round(steady),
            "steady_tokens_per_sec_per_worker": None if steady is None else round(steady / max(1, workers))}


# ---------------------------------------------------------------------------------------------- delivery
def synthetic_dataset(root: Path, tokens: int, tokenizer: str = "mistral-v1", seed: int = 0) -> Path:
    """A prepared dataset of ``tokens`` random ids of ``tokenizer``'s vocabulary: ``train/`` as
    ``prepare`` writes it (64 MB LitData chunks), no val/test, a manifest naming the tokenizer
    (a ``bpe:<n>`` spec: its vocabulary size alone, no tokenizer file)."""
    bpe_vocab = parse_bpe_spec(tokenizer)
    if bpe_vocab is not None:
        spec, sha, vocab, bos, eos = tokenizer, None, bpe_vocab, None, None
    else:
        tok = load_tokenizer(tokenizer)
        spec, sha, vocab, bos, eos = tok.spec, tok.sha256(), tok.vocab_size, tok.bos_id, tok.eos_id
    dtype = token_dtype(vocab)
    root.mkdir(parents=True, exist_ok=True)
    flat = root / "tokens.bin"
    rng = np.random.default_rng(seed)
    with open(flat, "wb") as f:
        for start in range(0, tokens, 1 << 24):
            rng.integers(0, vocab, size=min(1 << 24, tokens - start), dtype=dtype).tofile(f)
    _write_shards([(flat, tokens)], root / "train", dtype, 64 * 2**20)
    flat.unlink()
    write_meta(root, {
        "format_version": FORMAT_VERSION, "tokenizer": spec, "tokenizer_sha256": sha,
        "vocab_size": vocab, "bos_id": bos, "eos_id": eos, "dtype": dtype.name,
        "sources": [{"source": "synthetic", "tokens": tokens, "seed": seed}], "source": "synthetic",
        "splits": {"train": {"documents": 0, "tokens": tokens, "chunks": len(list((root / "train").glob("*.bin")))},
                   "val": {"documents": 0, "tokens": 0, "chunks": 0},
                   "test": {"documents": 0, "tokens": 0, "chunks": 0}},
    })
    return root


def time_delivery(data_dir: Path, batch: int, seq_len: int, workers: int, seconds: float, progress: bool) -> dict:
    """Iterate the datamodule's train loader for ``seconds`` (whole batches, epoch after epoch)."""
    from tqdm.auto import tqdm

    dm = TokenDataModule(data_dir=str(data_dir), seq_len=seq_len, batch_size=batch, num_workers=workers,
                         source=None, tokenizer="mistral-v1")
    dm.setup("fit")
    per_batch = batch * seq_len  # trained tokens (targets) per batch
    total = steady_tokens = batches = epochs = 0
    steady_seconds = 0.0
    with tqdm(desc=f"deliver {batch}x{seq_len} w{workers}", unit="tok", unit_scale=True, disable=not progress) as bar:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            loader = dm.train_dataloader()
            loader.window_sampler.set_epoch(epochs)
            first = last = None
            n = 0
            for x in loader:
                now = time.perf_counter()
                assert x.shape == (batch, seq_len + 1) and x.dtype == torch.long
                first = now if first is None else first
                last, n = now, n + 1
                bar.update(per_batch)
                if now - t0 >= seconds:
                    break
            epochs += 1
            batches += n
            total += n * per_batch
            if n > 1:
                steady_tokens += (n - 1) * per_batch
                steady_seconds += last - first
        elapsed = time.perf_counter() - t0
    return {"batch": batch, "seq_len": seq_len, "num_workers": workers, "batches": batches, "epochs": epochs,
            "seconds": round(elapsed, 3), "tokens_per_sec": round(total / elapsed),
            "steady_tokens_per_sec": round(steady_tokens / steady_seconds) if steady_seconds else None}


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 benchmarks/data_throughput.py",
                                description="Tokenization tokens/s per core and the datamodule's delivery rate "
                                            "(CPU), with the margin over what a node of GPUs trains.")
    p.add_argument("--tokenizers", default="mistral-v1,bpe:4096", help="comma-separated tokenizer specs")
    p.add_argument("--workers", default="1,2", help="comma-separated tokenization process counts (default 1,2)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="cap on the embedded corpus' text (default: the corpus' own cap, 4 MB)")
    p.add_argument("--loaders", type=parse_loader, nargs="*",
                   default=[parse_loader(v) for v in ("8x8192:0", "8x8192:4", "8x256:0", "8x256:1")],
                   help="delivery cases BxT:W (batch x seq_len : num_workers); default: 8x8192 with 0 and 4 "
                        "workers (the paper configs use 4), 8x256 with 0 and 1 (configs/tiny.yaml uses 1)")
    p.add_argument("--synthetic-tokens", default="64M", help="tokens of the synthetic dataset (default 64M)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per delivery case (default 10)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--need", type=parse_need, action="append", default=None,
                   help="NAME=TOKENS_PER_SEC: one GPU's training tokens/s to compute the margin for (repeatable; "
                        f"default {DEFAULT_NEED[0]}={DEFAULT_NEED[1]:.0f})")
    p.add_argument("--machine", default=None, help="a description of this machine for the JSON (default: cores)")
    p.add_argument("--skip-tokenization", action="store_true", help="only the delivery part")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default=None, help="results name (benchmarks/results/NAME.json) or path")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    workers = [int(w) for w in args.workers.split(",") if w]
    needs = dict(args.need or [DEFAULT_NEED])
    record = {
        "benchmark": "data_throughput",
        "date": datetime.date.today().isoformat(),
        "machine": args.machine or f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "gpus": args.gpus, "gpu_tokens_per_sec": needs,
    }
    header = f"{'part':<12} {'case':<24} {'tokens/s':>14} {'per worker':>10} / steady (per worker)"
    log = ResultsLog(record, header, args.out)
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as tmp:
        tmp_path = Path(tmp)
        if not args.skip_tokenization:
            t0 = time.perf_counter()
            capped = {} if args.max_bytes is None else {"max_bytes": args.max_bytes}
            texts = [text for _, text in python_docs_documents(**capped)]
            record["corpus"] = {"documents": len(texts), "bytes": sum(len(t.encode()) for t in texts),
                                "read_seconds": round(time.perf_counter() - t0, 2)}
            for spec in [s for s in args.tokenizers.split(",") if s]:
                data_dir = tmp_path / spec.replace(":", "-")
                data_dir.mkdir()
                if parse_bpe_spec(spec) is not None:
                    t0 = time.perf_counter()
                    train_bpe(spec, iter(texts), data_dir)
                    record.setdefault("bpe_training_seconds", {})[spec] = round(time.perf_counter() - t0, 2)
                for w in workers:
                    row = {"part": "tokenize", "tokenizer": spec, "workers": w,
                           **time_tokenization(texts, spec, w, data_dir, progress)}
                    log.add(row, f"{'tokenize':<12} {f'{spec} x{w}':<24} {row['tokens_per_sec']:>14,} "
                                 f"{row['tokens_per_sec_per_worker']:>10,} / {row['steady_tokens_per_sec_per_worker']:,}")
        if args.loaders:
            data_dir = synthetic_dataset(tmp_path / "synthetic", parse_count(args.synthetic_tokens, "synthetic_tokens"))
            per_process: dict[tuple[int, int], float] = {}
            for batch, seq_len, w in args.loaders:
                row = {"part": "deliver", **time_delivery(data_dir, batch, seq_len, w, args.seconds, progress)}
                rate = row["steady_tokens_per_sec"] or row["tokens_per_sec"]
                if w == 0:
                    per_process[(batch, seq_len)] = rate
                one = per_process.get((batch, seq_len))
                node = {name: args.gpus * gpu_rate for name, gpu_rate in needs.items()}
                row["margin"] = {
                    name: {"per_gpu": round(rate / gpu_rate, 1),
                           "one_rank_for_node": round(rate / node[name], 1),
                           "per_process_x_workers": None if one is None else round(one * max(1, w) / node[name], 1)}
                    for name, gpu_rate in needs.items()}
                log.add(row, f"{'deliver':<12} {f'{batch}x{seq_len} workers {w}':<24} {row['tokens_per_sec']:>14,} "
                             f"{'':>10} / {row['steady_tokens_per_sec'] or 0:,}")
    log.summary()
    return record


if __name__ == "__main__":
    main()
