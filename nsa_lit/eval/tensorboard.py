"""Evaluation results as TensorBoard scalars, beside (or inside) a training run's logs.

Every evaluation command takes ``--tb_dir DIR``: its numbers are written there as scalars at the
checkpoint's ``global_step``, so pointing it at a run's log directory
(``logs/tiny/asa/seed1234``) puts them next to the training curves, and ``tensorboard --logdir logs`` compares variants tag by tag.
Tags: ``eval/niah/<task>/len_<L>/depth_<d>``, ``eval/niah/<task>/len_<L>``,
``eval/niah/<task>/mean``; ``eval/ppl/len_<L>`` (and ``eval/ppl/len_<L>/pos_<a>_<b>``);
``eval/lm_eval/<task>/<metric>``; ``eval/longbench/<task>`` and ``eval/longbench/average``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch


def checkpoint_step(path: str | os.PathLike) -> int:
    """The ``global_step`` recorded in a checkpoint file, or in a sharded checkpoint directory's
    ``meta.pt`` (0 when absent); reads a file memory-mapped, without loading the tensors."""
    from nsa_lit.checkpoint import META_FILENAME

    if os.path.isdir(path):
        meta = os.path.join(path, META_FILENAME)
        if not os.path.isfile(meta):
            return 0
        path = meta
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip checkpoint: mmap unsupported
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return int(ckpt.get("global_step", 0) or 0)


def write_scalars(tb_dir: str | os.PathLike, scalars: Mapping[str, float], step: int) -> Path:
    """One event file in ``tb_dir`` (created if needed) with every ``tag -> value`` at ``step``;
    ``None`` values are skipped. Returns the directory."""
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = Path(tb_dir)
    tb_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for tag, value in scalars.items():
            if value is not None:
                writer.add_scalar(tag, float(value), global_step=step)
    finally:
        writer.close()
    return tb_dir


def niah_scalars(summary: Mapping[str, Mapping]) -> dict[str, float]:
    """Tags of a retrieval summary (:func:`nsa_lit.eval.retrieval.summarize`): each cell, each
    length's mean and each task's mean, accuracy in [0, 1]."""
    out = {}
    for task, s in summary.items():
        out[f"eval/niah/{task}/mean"] = s["accuracy"]
        for n, acc in s["by_length"].items():
            out[f"eval/niah/{task}/len_{n}"] = acc
        for d, row in s["grid"].items():
            for n, acc in row.items():
                out[f"eval/niah/{task}/len_{n}/depth_{float(d):g}"] = acc
    return out
