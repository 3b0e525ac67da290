"""Checkpoints that cannot be lost or mixed up.

* :class:`AtomicCheckpointIO` writes a checkpoint file to ``<path>.tmp`` in the same directory,
  flushes it to disk and renames it over ``<path>`` (``os.replace``, atomic on one filesystem):
  a full disk, an error or a kill mid-save leaves the previous ``last.ckpt`` as it was, and a
  failed save raises :class:`CheckpointSaveError` saying so. ``main.py`` (:mod:`nsa_lit.cli`)
  installs it in place of Lightning's default ``TorchCheckpointIO``, which serialises the whole
  checkpoint in memory and writes it through a temporary file in the system temp directory
  (another filesystem on most clusters: a copy, not a rename, and a full ``/tmp`` fails the save).
  Sharded FSDP2 checkpoints (``save_distributed_checkpoint: true``, a directory written by every
  process) do not go through ``CheckpointIO``: :class:`~nsa_lit.parallel.FSDP2Strategy` makes
  them atomic the same way (``<dir>.tmp`` by all processes, then renamed into place).
* :class:`RunCheckpoint` is a ``ModelCheckpoint`` whose directory follows the run:
  ``<trainer.default_root_dir>/<root>/<logger name>/<logger version>``
  (``checkpoints/340m/asa/seed1234``),
  so two runs with different logger names / versions never share a directory and
  ``--ckpt_path last`` only finds its own run's ``last.ckpt``.
* :func:`arch_differences` lists the ``model.arch`` fields in which a checkpoint and a config
  differ; ``LanguageModel.on_load_checkpoint`` refuses to resume (or validate) with any.
* :func:`load_checkpoint` reads a training checkpoint's model alone (generation, evaluation),
  from a single file or a sharded directory; one that does not load raises
  :class:`CheckpointLoadError`, one line naming the path and what was expected.
* :func:`consolidate` reads a sharded (DCP) checkpoint directory on one process, without a
  process group, into the dict of a single-file checkpoint of this project (``state_dict`` with
  the ``model.`` prefix, ``optimizer_states`` keyed by parameter name, ``hyper_parameters``,
  ``datamodule_hyper_parameters``, loops, ...); ``python -m nsa_lit.checkpoint consolidate DIR
  OUT.ckpt`` writes it, atomically, to a file that ``main.py validate``, ``nsa_lit.generate``,
  evaluation and ``fit --ckpt_path`` load.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
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
    previous checkpoint is intact. Remote paths (``s3://`` ...) use Lightning's save.
    Loading also accepts a sharded checkpoint directory (:func:`consolidate`)."""

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

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        """Lightning's load, and a sharded checkpoint directory consolidated in memory (so
        ``main.py validate`` / ``fit --ckpt_path DIR`` work without FSDP2 too)."""
        if _is_local_file_protocol(path) and is_sharded_checkpoint(path):
            return consolidate(path)
        if map_location is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location, weights_only)


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
    number ``n`` as ``version_n``), e.g. ``checkpoints/340m/asa/seed1234``. Without a logger, or
    with an explicit ``dirpath``, it is Lightning's ``ModelCheckpoint``. ``--ckpt_path last`` looks for
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
        found = super()._find_last_checkpoints(trainer)
        # a sharded save killed between its two renames (FSDP2Strategy.save_checkpoint) leaves
        # the complete previous checkpoint as last.ckpt.old and no last.ckpt: resume from it
        if self.dirpath is not None and os.path.isdir(self.dirpath):
            for name in os.listdir(self.dirpath):
                base = name.removesuffix(".old")
                if (name.endswith(".ckpt.old") and base.startswith(self.CHECKPOINT_NAME_LAST)
                        and not os.path.lexists(os.path.join(self.dirpath, base))):
                    found.add(os.path.normpath(os.path.join(self.dirpath, name)))
        return found


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


# what Lightning writes into a sharded checkpoint directory besides the DCP shards
META_FILENAME = "meta.pt"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A directory written by a distributed (DCP) save: DCP's ``.metadata`` and Lightning's
    ``meta.pt``."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))
            and os.path.isfile(os.path.join(path, META_FILENAME)))


def consolidate(path: str | os.PathLike) -> dict[str, Any]:
    """The sharded checkpoint directory ``path`` as one checkpoint dict, read on this process
    alone (no process group needed; the whole model and optimiser state in CPU memory): the
    layout of a single-file Lightning checkpoint of this project. Raises ``FileNotFoundError``
    / ``ValueError`` naming ``path`` if it is not a sharded checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not is_sharded_checkpoint(path):
        raise ValueError(f"checkpoint {path} is not a sharded checkpoint directory (a directory "
                         f"with DCP's .metadata and Lightning's {META_FILENAME})")
    shards: dict[str, Any] = {}
    try:
        _load_state_dict(shards, storage_reader=FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except Exception as err:  # noqa: BLE001  (DCP raises its own CheckpointException)
        raise ValueError(f"checkpoint {path}: cannot read its shards "
                         f"({type(err).__name__}: {err})") from err
    ckpt = torch.load(os.path.join(path, META_FILENAME), map_location="cpu", weights_only=False)
    if "state_dict" not in shards:
        raise ValueError(f"checkpoint {path}: its shards hold no state_dict")
    ckpt["state_dict"] = shards.pop("state_dict")
    optimizers = sorted((k for k in shards if k.startswith("optimizer_")),
                        key=lambda k: int(k.removeprefix("optimizer_")))
    # kept keyed by parameter name (torch.distributed.checkpoint.state_dict's full optimizer
    # state): a plain optimizer's load_state_dict pairs the saved keys with its parameters in
    # param_groups order, whatever they are, and FSDP2 loads name keys as they are. Integer
    # keys would be read in model.parameters() order by Lightning's FSDP2 load and in
    # param_groups order by a plain optimizer, which differ with this model's two groups.
    ckpt["optimizer_states"] = [shards.pop(k) for k in optimizers]
    ckpt.update(shards)  # anything else a save put in the shards
    return ckpt


def consolidate_to_file(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """:func:`consolidate` ``path`` and write it atomically to the file ``out``; returns it."""
    if os.path.isdir(out):
        raise IsADirectoryError(f"output {os.fspath(out)} is a directory; give a file name "
                                "(e.g. consolidated.ckpt)")
    ckpt = consolidate(path)
    AtomicCheckpointIO().save_checkpoint(ckpt, out)
    return ckpt


EXPECTED_CHECKPOINT = ("an nsa-lit training checkpoint (main.py fit): a .ckpt file or a sharded "
                       "checkpoint directory, with state_dict and hyper_parameters.arch")


class CheckpointLoadError(ValueError):
    """A checkpoint that :func:`load_checkpoint` cannot load. The message is one line naming the
    path, what is wrong and what was expected (:data:`EXPECTED_CHECKPOINT`)."""

    exit_code = 2  # what a command-line tool exits with after printing it


def _one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit] + '...' if len(text) > limit else text}"


def _read_checkpoint(path: str) -> Any:
    """The object stored at ``path`` (a sharded directory consolidated), on the CPU; every
    failure as a :class:`CheckpointLoadError`."""
    if not os.path.exists(path):
        raise CheckpointLoadError(f"checkpoint {path} does not exist; expected "
                                  f"{EXPECTED_CHECKPOINT}")
    if os.path.isdir(path):
        try:
            return consolidate(path)
        except (OSError, ValueError) as err:
            inside = sorted(n for n in os.listdir(path) if n.endswith(".ckpt"))
            hint = f" (it holds {', '.join(inside[:5])}: pass one of them)" if inside else ""
            raise CheckpointLoadError(f"{' '.join(str(err).split())}{hint}; expected "
                                      f"{EXPECTED_CHECKPOINT}") from None
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointLoadError(f"checkpoint {path} cannot be read ({_one_line(err)})") from None
    if not head:
        raise CheckpointLoadError(f"checkpoint {path} is empty (0 bytes); expected "
                                  f"{EXPECTED_CHECKPOINT}")
    try:  # on the CPU: a bad map_location must not read as a bad file
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (RuntimeError, UnpicklingError, EOFError, ...)
        what = ("is truncated or corrupt (a torch.save archive that cannot be read: a save or copy "
                "that did not finish?)" if head == b"PK\x03\x04" else
                "is not a PyTorch checkpoint file")
        raise CheckpointLoadError(f"checkpoint {path} {what}: {_one_line(err)}; expected "
                                  f"{EXPECTED_CHECKPOINT}") from None


def _model_parts(ckpt: Any, path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(arch, model weights without the "model." prefix)`` of a loaded checkpoint."""
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a "
                                  f"checkpoint dict; expected {EXPECTED_CHECKPOINT}")
    hparams = ckpt.get("hyper_parameters")
    arch = hparams.get("arch") if isinstance(hparams, dict) else None
    state = ckpt.get("state_dict")
    if not isinstance(arch, dict) or not isinstance(state, dict):
        absent = [name for name, ok in (("hyper_parameters.arch", isinstance(arch, dict)),
                                         ("state_dict", isinstance(state, dict))) if not ok]
        if not ckpt:
            found = "an empty dict"
        elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            found = ("a bare state_dict (torch.save(model.state_dict())), which does not record "
                     "model.arch")
        else:
            found = f"top-level keys {_some(sorted(map(str, ckpt)), 8)}"
        raise CheckpointLoadError(f"checkpoint {path} is of an unknown format: no "
                                  f"{' and no '.join(absent)}; it holds {found}; "
                                  f"expected {EXPECTED_CHECKPOINT}")
    weights = {k.removeprefix("model."): v for k, v in state.items()
               if isinstance(k, str) and k.startswith("model.")}
    return arch, weights


def _some(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, comma-separated, with ``...`` when there are more."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _weight_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str | None:
    """What differs between a model's state_dict and a checkpoint's weights, on one line."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found)
                    if tuple(getattr(found[k], "shape", ())) != tuple(expected[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: checkpoint "
                     f"{tuple(found[k].shape)}, model {tuple(expected[k].shape)})")
    return "; ".join(parts) or None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[Transformer, dict[str, Any]]:
    """The model of a training checkpoint (``LanguageModel``), a single file or a sharded
    directory (consolidated in memory), on ``map_location``, and the datamodule's recorded
    hyperparameters (``{}`` if none). A path that does not load (missing, not a checkpoint,
    truncated, another format, weights that do not fit the recorded ``model.arch``) raises
    :class:`CheckpointLoadError` (a ``ValueError``) with a one-line message naming it."""
    path = os.fspath(path)
    ckpt = _read_checkpoint(path)
    arch, weights = _model_parts(ckpt, path)
    try:
        cfg = ModelConfig(**arch)
    except (TypeError, ValueError) as err:
        raise CheckpointLoadError(f"checkpoint {path}: invalid model.arch "
                                  f"({' '.join(str(err).split())})") from None
    model = Transformer(cfg)
    mismatch = _weight_mismatch(model.state_dict(), weights)
    if mismatch:
        raise CheckpointLoadError(f"checkpoint {path}: its weights do not fit its model.arch: "
                                  f"{mismatch}")
    model.load_state_dict(weights)
    return model.to(map_location).eval(), ckpt.get("datamodule_hyper_parameters") or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nsa_lit.checkpoint",
        description="Checkpoint tools of nsa-lit.")
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser(
        "consolidate",
        help="sharded checkpoint directory -> one checkpoint file",
        description="Read a sharded checkpoint directory (FSDP2, save_distributed_checkpoint: "
                    "true; e.g. checkpoints/340m/asa/seed1234/last.ckpt) on this process alone and write "
                    "it as one checkpoint file, atomically, in the layout of a single-file "
                    "checkpoint: main.py validate --ckpt_path, python -m nsa_lit.generate "
                    "--ckpt_path, evaluation and fit --ckpt_path load it. Needs the whole model "
                    "and optimizer state in CPU memory.")
    cons.add_argument("checkpoint_dir", help="the sharded checkpoint directory")
    cons.add_argument("output", help="the checkpoint file to write (e.g. consolidated.ckpt)")
    args = parser.parse_args(argv)
    try:
        ckpt = consolidate_to_file(args.checkpoint_dir, args.output)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {len(ckpt['state_dict'])} tensors, "
          f"{len(ckpt['optimizer_states'])} optimizer state(s), "
          f"global_step {ckpt.get('global_step')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
