"""Checkpoints that cannot be lost or mixed up.

* :class:`AtomicCheckpointIO` writes a checkpoint file to ``<path>.tmp`` in the same directory,
  flushes it to disk and renames it over ``<path>`` (``os.replace``, atomic on one filesystem):
  a full disk, an error or a kill mid-save leaves the previous ``last.ckpt`` as it was, and a
  failed save raises :class:`CheckpointSaveError` saying so. ``main.py`` (:mod:`nsa_lit.cli`)
  installs it in place of Lightning's default ``TorchCheckpointIO``, which serialises the whole
  checkpoint in memory and writes it through a temporary file in the system temp directory
  (another filesystem on most clusters: a copy, not a rename, and a full ``/tmp`` fails the save).
  Sharded FSDP2 checkpoints (``save_distributed_checkpoint: true``, a directory written by every
  process) do not go through ``CheckpointIO`` and are not covered.
* :class:`RunCheckpoint` is a ``ModelCheckpoint`` whose directory follows the run:
  ``<trainer.default_root_dir>/<root>/<logger name>/<logger version>`` (``checkpoints/340m/asa``),
  so two runs with different logger names / versions never share a directory and
  ``--ckpt_path last`` only finds its own run's ``last.ckpt``.
* :func:`arch_differences` lists the ``model.arch`` fields in which a checkpoint and a config
  differ; ``LanguageModel.on_load_checkpoint`` refuses to resume (or validate) with any.
* :func:`load_checkpoint` reads a training checkpoint's model alone (generation, evaluation).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, fields
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nsa_lit.config import ModelConfig
from nsa_lit.model import Transformer

# model.arch fields that choose how the same weights are computed, not what they are: they may
# differ between a checkpoint and the run that resumes or evaluates it
EXECUTION_FIELDS = ("kernel_backend", "latent_form")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the file it would have replaced is unchanged."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: ``torch.save`` streams to
    ``<path>.tmp`` next to ``<path>`` (no in-memory copy of the checkpoint), the file is
    fsync'ed and renamed over ``<path>``, then the directory is fsync'ed. On failure the
    temporary file is removed and :class:`CheckpointSaveError` names the path and says the
    previous checkpoint is intact. Remote paths (``s3://`` ...) use Lightning's save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None
                        ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        tmp = path + ".tmp"
        had_previous = os.path.isfile(path)
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: as they are
                raise
            kept = (f"the previous {os.path.basename(path)} is unchanged" if had_previous
                    else "no checkpoint was written there")
            raise CheckpointSaveError(
                f"saving checkpoint {path} failed ({type(err).__name__}: {err}); {kept}") from err
        _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (not available everywhere: best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def use_atomic_checkpoint_io(strategy) -> None:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` unless it has a checkpoint IO of its
    own (anything but Lightning's default ``TorchCheckpointIO``)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``dirpath`` (when not given) is the run's:
    ``<trainer.default_root_dir>/<root>/<name>/<version>`` from the first logger (a version
    number ``n`` as ``version_n``), e.g. ``checkpoints/340m/asa``. Without a logger, or with an
    explicit ``dirpath``, it is Lightning's ``ModelCheckpoint``. ``--ckpt_path last`` looks for
    ``last.ckpt`` in this directory only."""

    def __init__(self, *args, root: str = "checkpoints", **kwargs):
        super().__init__(*args, **kwargs)
        self.root = root

    def _resolve_run_dir(self, trainer) -> None:
        if self.dirpath is not None or not trainer.loggers:
            return
        logger = trainer.loggers[0]
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        path = os.path.join(trainer.default_root_dir, self.root, str(logger.name), version)
        self.dirpath = os.path.realpath(path)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._resolve_run_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # called for ckpt_path="last" before the callbacks' setup
        self._resolve_run_dir(trainer)
        return super()._find_last_checkpoints(trainer)


def arch_differences(saved: dict[str, Any], current: ModelConfig) -> list[str]:
    """``"field: checkpoint X, config Y"`` for every ``model.arch`` field (execution-only
    fields aside) in which a checkpoint's saved ``arch`` and ``current`` differ; fields the
    checkpoint predates compare as their defaults."""
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(saved) - names)
    defaults = asdict(ModelConfig())
    mine = asdict(current)
    out = [f"{name}: checkpoint {saved.get(name, defaults[name])!r}, config {mine[name]!r}"
           for name in sorted(names) if name not in EXECUTION_FIELDS
           and saved.get(name, defaults[name]) != mine[name]]
    out += [f"{name}: checkpoint {saved[name]!r}, not a field of this version" for name in unknown]
    return out


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[Transformer, dict[str, Any]]:
    """The model of a training checkpoint (``LanguageModel``), and the datamodule's recorded
    hyperparameters (``{}`` if none). A checkpoint whose weights do not fit its recorded
    ``model.arch`` raises ``ValueError``."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    arch = (ckpt.get("hyper_parameters") or {}).get("arch")
    if arch is None:
        raise ValueError(f"checkpoint {path}: no hyper_parameters.arch: not an nsa-lit "
                         "LanguageModel checkpoint")
    try:
        cfg = ModelConfig(**arch)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path}: invalid model.arch: {err}") from None
    model = Transformer(cfg)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path}: its weights do not match its model.arch "
                         f"config: {err}") from None
    return model.to(map_location).eval(), ckpt.get("datamodule_hyper_parameters") or {}
