"""``TokenDataModule``: prepared token shards -> ``(batch_size, seq_len + 1)`` ``torch.long`` batches.

A split is read as one token stream across its LitData chunks (:mod:`nsa_lit.data.windows`): sequence
``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]``, for any ``seq_len``.

The train loader's position is part of the checkpoint (``state_dict``/``load_state_dict``), so a run
stopped mid-epoch and resumed with ``ckpt_path=`` trains on exactly the batches the uninterrupted run
would have seen (with the same ``batch_size`` and world size; ``num_workers`` may differ).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # offline: no PyPI version check

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from nsa_lit.data.manifest import check_compatible, split_tokens
from nsa_lit.data.mixture import MixtureSampler, MixtureWindows
from nsa_lit.data.prepare import META_FILENAME, PYTHON_DOCS, SOURCES, prepare, read_meta
from nsa_lit.data.tokenizer import Tokenizer, load_tokenizer, parse_bpe_spec
from nsa_lit.data.windows import TokenWindows, WindowSampler, collate_long, num_windows, tokens_for

__all__ = ["TokenDataModule", "TokenLoader", "collate_long", "validate_split"]

# Chunk size for the embedded corpus: a few chunks per split, so that reading across chunk
# boundaries is exercised by every run on it (chunks lose no tokens).
EMBEDDED_CHUNK_BYTES = 512 * 1024
STATE_VERSION = 2
# Lightning warns on a mid-epoch resume of a loader without ``state_dict``; ours is restored through
# the datamodule (TokenDataModule.load_state_dict), so the warning does not apply.
_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


def validate_split(split_dir: str | os.PathLike, itemsize: int | None = None,
                   tokens: int | None = None) -> list[dict[str, Any]]:
    """Check that every chunk listed in ``index.json`` exists with the byte size the index implies,
    and (``tokens``: ``meta.json``'s count for the split) that the chunks hold that many tokens.

    Raises ``ValueError`` ("corrupt shard ...") naming the missing or truncated file, or the split
    whose index disagrees with ``meta.json``. Returns the chunk list.
    """
    split_dir = Path(split_dir)
    index_path = split_dir / "index.json"
    if not index_path.is_file():
        raise ValueError(f"corrupt shard: {index_path} is missing (re-run the preparation with --overwrite)")
    try:
        index = json.loads(index_path.read_text())
        chunks = index["chunks"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt shard: {index_path} is not a LitData index ({e})") from None
    for chunk in chunks:
        path = split_dir / chunk["filename"]
        if not path.is_file():
            raise ValueError(f"corrupt shard: {path} is listed in {index_path} but does not exist")
        size = path.stat().st_size
        expected = chunk.get("chunk_bytes")
        if itemsize is not None and chunk.get("dim") is not None:
            # header: [num items] + [num items + 1 offsets], uint32 each; then the tokens
            implied = (1 + chunk["chunk_size"] + 1) * 4 + chunk["dim"] * itemsize
            if expected is not None and implied != expected:
                raise ValueError(f"corrupt shard: {index_path} is inconsistent for {chunk['filename']}")
            expected = implied
        if expected is not None and size != expected:
            raise ValueError(
                f"corrupt shard: {path} has {size} bytes, {index_path} implies {expected} "
                "(truncated or modified; re-run the preparation with --overwrite)"
            )
    dims = [chunk.get("dim") for chunk in chunks]
    if tokens is not None and None not in dims and sum(dims) != tokens:
        raise ValueError(
            f"corrupt shard: {index_path} lists {sum(dims):,} tokens, the dataset's meta.json "
            f"{tokens:,} for this split (the directory was replaced or mixed with another "
            "preparation; re-run the preparation with --overwrite)")
    return chunks


def _check_mixture(mixture: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """``data.mixture`` entries as ``{"path": str, "weight": float}``; errors name the entry and field."""
    if mixture is None:
        return None
    if not isinstance(mixture, (list, tuple)) or not mixture:
        raise ValueError(f"data.mixture must be a non-empty list of {{path, weight}} entries or null, got {mixture!r}")
    entries = []
    for i, entry in enumerate(mixture):
        if not isinstance(entry, dict) or set(entry) != {"path", "weight"}:
            raise ValueError(f"data.mixture[{i}] must have exactly the keys path and weight, got {entry!r}")
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
            raise ValueError(f"data.mixture[{i}].weight must be a positive number, got {weight!r}")
        entries.append({"path": str(entry["path"]), "weight": float(weight)})
    return entries


class TokenLoader(DataLoader):
    """A ``DataLoader`` over :class:`TokenWindows` with a :class:`WindowSampler`, whose position
    :class:`TokenDataModule` saves and restores.

    It has no ``state_dict``/``load_state_dict``: Lightning's own handling of loader state has had
    bugs across versions, so the position takes one explicit path, the datamodule's
    (:meth:`position_state` / :meth:`load_position_state`), tested in ``tests/test_data.py``.

    The saved position counts the batches the trainer has actually trained on (``consumed_batches``,
    set by the datamodule), not the batches the loader has handed out: a fetcher that reads ahead
    (Lightning does) would otherwise skip a batch on resume. Without it (outside a Trainer), the
    batches this loader has yielded in the current epoch count.
    """

    consumed_batches: Callable[[], int | None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        # (epoch, position, batches): the resumed epoch's position and the trainer's batch count
        # there; later batches add batch_size x world_size windows each, whatever the saved ones held
        self._anchor: tuple[int, int, int] | None = None

    @property
    def window_sampler(self) -> WindowSampler:
        assert isinstance(self.sampler, WindowSampler)
        return self.sampler

    def __iter__(self) -> Iterator[Any]:
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def position_state(self) -> dict[str, Any]:
        """Where the current epoch stands: ``epoch`` and ``position``, the windows used in it by all ranks."""
        sampler = self.window_sampler
        consumed = self.consumed_batches() if self.consumed_batches is not None else None
        assert self.batch_size
        per_batch = self.batch_size * sampler.num_replicas
        if consumed is None:  # outside a Trainer: from the start of this iteration
            consumed = self._yielded
            position = sampler.start + self._yielded * per_batch
        elif self._anchor is not None and self._anchor[0] == sampler.epoch:
            # resumed in this epoch: the trainer's count includes the batches before the resume
            _, at, batches = self._anchor
            position = at + (consumed - batches) * per_batch
        else:  # the trainer's count runs from the epoch's start
            position = consumed * per_batch
        return {
            "epoch": sampler.epoch,
            "position": position,
            "batches": consumed,
            "batch_size": self.batch_size,
            "world_size": sampler.num_replicas,
            "num_windows": sampler.num_windows,
            "seq_len": self.dataset.seq_len,  # type: ignore[attr-defined]
            "shuffle": sampler.shuffle,
            "seed": sampler.seed,
            "mixture": sampler.fingerprint,
        }

    def load_position_state(self, state: dict[str, Any], epoch: int | None = None,
                            batches: int | None = None) -> None:
        """Start epoch ``state["epoch"]`` at ``state["position"]`` the next time this loader is iterated.

        ``epoch``: the epoch the trainer is about to run (default: the saved one); the position
        applies only if it is the saved one. ``batches``: the trainer's batch count of the epoch at
        the resume (default: the saved one); later positions add ``batch_size x world_size``
        windows a batch to ``state["position"]``, so a run resumed with another batch size or
        world size goes on counting windows exactly. A position saved with another dataset,
        ``seq_len``, shuffle, seed or mixture applies as a count of windows already used, with a
        warning: the order differs.
        """
        sampler = self.window_sampler
        current = {"num_windows": sampler.num_windows, "seq_len": self.dataset.seq_len,  # type: ignore[attr-defined]
                   "shuffle": sampler.shuffle, "seed": sampler.seed, "mixture": sampler.fingerprint}
        changed = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in current.items() if state.get(k) != v]
        if changed:
            warnings.warn(
                f"resuming the training data from a position saved with other data settings ({', '.join(changed)}): "
                f"{state['position']} windows of epoch {state['epoch']} count as used, but the order is not the "
                "interrupted run's",
                stacklevel=2,
            )
        sampler.set_epoch(state["epoch"] if epoch is None else epoch)
        sampler.resume(state["epoch"], state["position"])
        if batches is None:
            batches = state.get("batches", state["position"] // max(
                1, state.get("batch_size", 1) * state.get("world_size", 1)))
        self._anchor = (int(state["epoch"]), int(state["position"]), int(batches))


class TokenDataModule(L.LightningDataModule):
    """Token batches from shards prepared by ``python -m nsa_lit.data.prepare``.

    Batches are ``torch.long`` tensors of shape ``(batch_size, seq_len + 1)``: inputs are
    ``batch[:, :-1]``, targets ``batch[:, 1:]``. A split is one token stream (documents separated by
    ``eos``) read across its chunk files; sequence ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]``,
    so consecutive sequences share one token and every token but the first is a target once an epoch.

    ``test_dataloader`` reads the held-out ``test`` split (``main.py test``) like ``val``: in order, whole.

    Args:
        data_dir: directory with ``train/``, ``val/``, ``test/`` and ``meta.json`` (written by the
            preparation; ``test/`` is needed by ``main.py test`` only).
        seq_len: tokens per training sequence; each sample holds ``seq_len + 1`` tokens.
        batch_size: sequences per batch, per device.
        num_workers: DataLoader worker processes (any value resumes exactly).
        seed: shuffle seed of the training split (>= 0).
        shuffle: shuffle the training sequences (a new permutation of all of them each epoch).
        source: ``"python-docs"``: if ``data_dir`` has no ``meta.json``, prepare the embedded corpus there
            (once; later runs reuse it). ``None``: ``data_dir`` must already be prepared.
        tokenizer: tokenizer spec (``mistral-v1``, a ``*.model``/``tokenizer.json`` path, ``bpe:<n>``, a
            Hugging Face name). Must match the one ``data_dir`` was prepared with.
        val_fraction: fraction of documents held out for validation when preparing ``source``.
        test_fraction: fraction of documents held out for ``main.py test`` when preparing ``source``
            (hashed apart from val's: no document is in two splits), topped up like val to
            ``min_val_sequences`` sequences. 0: no test split.
        min_val_sequences: the validation split must hold at least this many sequences of
            ``seq_len + 1`` tokens (``n * seq_len + 1`` tokens); ``None``: one batch on every device,
            ``batch_size * world_size`` (also the least it may be). When preparing ``source``, documents
            are held out until the split holds them, beyond ``val_fraction``.
        val_batches: validate on at most this many batches per device (the first ones; ``None``: the whole split).
        mixture: train on several prepared datasets by weight, ``[{"path": ..., "weight": 0.7}, ...]``
            (:mod:`nsa_lit.data.mixture`); validation uses the first entry's val split, ``data_dir``
            is set to that entry and nothing is prepared automatically. ``None``: ``data_dir`` alone.
    """

    def __init__(
        self,
        data_dir: str = "data/python-docs",
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int = 1,
        seed: int = 42,
        shuffle: bool = True,
        source: str | None = PYTHON_DOCS,
        tokenizer: str = "mistral-v1",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        min_val_sequences: int | None = None,
        val_batches: int | None = None,
        mixture: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("val_batches", val_batches), ("min_val_sequences", min_val_sequences)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"data.{name} must be None or an integer >= 1, got {value!r}")
        if source is not None and source not in SOURCES:
            raise ValueError(f"data.source must be one of {list(SOURCES)} or null, got {source!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
        if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(f"data.test_fraction must be in [0, 1) with data.val_fraction + data.test_fraction < 1, "
                             f"got {test_fraction!r} (val_fraction {val_fraction!r})")
        self.mixture = _check_mixture(mixture)
        if self.mixture:
            data_dir, source = self.mixture[0]["path"], None
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.source = source
        self.tokenizer = tokenizer
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.min_val_sequences = min_val_sequences
        self.val_batches = val_batches
        self._meta: dict[str, Any] | None = None
        self._train_dataset: TokenWindows | None = None
        self._val_dataset: TokenWindows | None = None
        self._test_dataset: TokenWindows | None = None
        self._train_loader: TokenLoader | None = None
        self._pending_train_state: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------- metadata
    @property
    def meta_path(self) -> Path:
        return Path(self.data_dir) / META_FILENAME

    @property
    def meta(self) -> dict[str, Any]:
        """``meta.json`` of ``data_dir`` (see docs/data.md)."""
        if self._meta is None:
            if not self.meta_path.is_file():
                raise self._missing_error()
            self._meta = read_meta(self.data_dir)
        return self._meta

    @property
    def vocab_size(self) -> int:
        """Vocabulary size: from ``meta.json`` once prepared; before that, from the tokenizer spec
        (for ``bpe:<n>``: ``n``, an upper bound of the trained vocabulary)."""
        if self.meta_path.is_file():
            return int(self.meta["vocab_size"])
        n = parse_bpe_spec(self.tokenizer)
        return n if n is not None else load_tokenizer(self.tokenizer, self.data_dir).vocab_size

    def get_tokenizer(self) -> Tokenizer:
        """The tokenizer the data was prepared with."""
        return load_tokenizer(self.tokenizer, self.data_dir)

    def _world(self) -> tuple[int, int]:
        """(world size, global rank): the trainer's, else torch.distributed's, else (1, 0)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def val_sequences_needed(self) -> int:
        """Sequences the validation split must hold: ``min_val_sequences``, at least one batch per device."""
        one_batch = self.batch_size * self._world()[0]
        return max(one_batch, self.min_val_sequences or 0)

    def _missing_error(self) -> FileNotFoundError:
        return FileNotFoundError(
            f"data.data_dir={self.data_dir!r}: no prepared dataset ({self.meta_path} is missing). Prepare it with "
            f"`python -m nsa_lit.data.prepare <files or dirs> --output {self.data_dir} --tokenizer {self.tokenizer}`, "
            f"or set data.source={PYTHON_DOCS} to use the embedded corpus"
        )

    def _check_tokenizer(self, meta: dict[str, Any] | None = None, data_dir: str | None = None,
                         field: str = "data.data_dir") -> None:
        """``data.tokenizer`` is the one the data was prepared with: same spec, and (manifests of format 2)
        the same model/vocabulary file hash, when the tokenizer can be loaded here. ``field``: the
        config field naming ``data_dir`` (a mixture entry's ``data.mixture[i].path``)."""
        meta = self.meta if meta is None else meta
        data_dir = self.data_dir if data_dir is None else data_dir
        prepared = meta.get("tokenizer")
        if prepared != self.tokenizer:
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r}, but {field}={data_dir!r} was prepared with "
                f"tokenizer {prepared!r}: set data.tokenizer={prepared!r}, or use other data in {field} "
                "(or re-prepare it with --overwrite)"
            )
        recorded = meta.get("tokenizer_sha256")
        if recorded is None:
            return
        try:
            current = load_tokenizer(self.tokenizer, data_dir).sha256()
        except (ImportError, ValueError, FileNotFoundError):  # e.g. a Hugging Face name offline: spec check only
            return
        if current != recorded:
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r}: its file here (sha256 {current[:12]}...) is not the one "
                f"{field}={data_dir!r} was prepared with (sha256 {recorded[:12]}..., meta.json): the token ids "
                "would mean other text; prepare the data again with this tokenizer, or use the original file"
            )

    def _check_model(self, meta: dict[str, Any], data_dir: str, field: str = "data.data_dir") -> None:
        """The manifest against the model being trained (when there is one): vocabulary and seq_len."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        arch = getattr(module, "arch", None)
        model_seq = getattr(arch, "seq_len", None)
        if isinstance(model_seq, int) and model_seq != self.seq_len:
            raise ValueError(f"data.seq_len={self.seq_len} but model.arch.seq_len={model_seq}: they must be equal "
                             "(the CLI links them; set both)")
        vocab = getattr(arch, "vocab_size", None)
        check_compatible(meta, data_dir, vocab_size=vocab if isinstance(vocab, int) else None, seq_len=self.seq_len,
                         field=field)

    # -------------------------------------------------------------------------------- hooks
    def prepare_data(self) -> None:
        """Prepare the embedded corpus into ``data_dir`` if it is not there yet (runs on one process).

        Its validation split holds ``val_fraction`` of the documents, and more if needed for
        :meth:`val_sequences_needed` sequences of this run's ``seq_len``; its test split likewise
        ``test_fraction`` of them, and as many sequences.
        """
        if self.meta_path.is_file():
            self._meta = None
            self._check_tokenizer()
            return
        if self.source is None:
            raise self._missing_error()
        # No meta.json: nothing was prepared, or a preparation was interrupted; (re)do it.
        sequences = self.val_sequences_needed()
        held_out = tokens_for(sequences, self.seq_len)
        try:
            prepare(
                output_dir=self.data_dir,
                source=self.source,
                tokenizer=self.tokenizer,
                val_fraction=self.val_fraction,
                val_tokens=held_out if self.val_fraction > 0 else 0,
                test_fraction=self.test_fraction,
                test_tokens=held_out if self.test_fraction > 0 else 0,
                chunk_bytes=EMBEDDED_CHUNK_BYTES,
                overwrite=True,
            )
        except ValueError as err:  # phrased in prepare()'s arguments: say it in this run's fields
            if not str(err).startswith(("val_tokens=", "test_tokens=")):
                raise
            raise ValueError(
                f"data.seq_len={self.seq_len}, data.batch_size={self.batch_size}: the {self.source} "
                f"corpus cannot hold validation{' and test' if self.test_fraction > 0 else ''} "
                f"splits of {sequences:,} sequences ({held_out:,} tokens each) beside a training "
                f"split ({err}). Fix: lower data.batch_size, model.arch.seq_len or "
                f"data.min_val_sequences, or set data.test_fraction 0 (no test split), or train "
                "on a larger prepared dataset (data.data_dir)") from None
        self._meta = None

    def _too_little_data(self, split: str, tokens: int, sequences: int, why: str) -> ValueError:
        needed = tokens_for(sequences, self.seq_len)
        if split in ("val", "test"):
            fix = (
                f"delete {self.data_dir} to have it prepared again with a {split} split of {needed:,} tokens"
                if self._embedded()
                else f"prepare it again with `--{split}-tokens {needed}` (python -m nsa_lit.data.prepare)"
            )
            fix += f", or lower {'data.min_val_sequences / ' if split == 'val' else ''}data.batch_size / data.seq_len"
        else:
            fix = "use a smaller data.batch_size or data.seq_len (model.arch.seq_len), or more data"
        return ValueError(
            f"data.seq_len={self.seq_len}, data.batch_size={self.batch_size}: the {split} split of {self.data_dir} "
            f"holds {tokens:,} tokens; {why} needs {sequences:,} sequence{'s' if sequences != 1 else ''} of "
            "seq_len + 1 tokens, consecutive "
            f"ones sharing one token: {sequences:,} x {self.seq_len} + 1 = {needed:,} tokens. Fix: {fix}"
        )

    def _embedded(self) -> bool:
        """Whether ``data_dir`` holds this datamodule's ``source``, which it prepares again if deleted."""
        return self.source is not None and self.meta.get("source") == self.source

    def _no_test_split(self) -> ValueError:
        sequences = self.batch_size * self._world()[0]
        if self._embedded():
            fix = f"delete {self.data_dir} to have the embedded corpus prepared again with a test split" + (
                "" if self.test_fraction > 0 else " (after setting data.test_fraction > 0, e.g. 0.05)")
        else:
            fix = (f"prepare it again with a test split: `python -m nsa_lit.data.prepare <your inputs> --output "
                   f"{self.data_dir} --overwrite --test-fraction 0.01 --test-sequences {sequences} --seq-len "
                   f"{self.seq_len}` (plus your other options; test documents then leave the train split)")
        return ValueError(
            f"data.data_dir={self.data_dir!r} has no test split ({self.meta_path} lists no test tokens: prepared "
            f"before test splits existed, or with a test fraction of 0), so `main.py test` has nothing to run on. "
            f"Fix: {fix}; or score the validation split with `main.py validate`. A checkpoint trained on this "
            "preparation must not be scored on the new test split: its documents are in this train split"
        )

    def setup(self, stage: str | None = None) -> None:
        if not self.meta_path.is_file():
            raise self._missing_error()
        self._meta = None
        self._check_tokenizer()
        meta = self.meta
        self._check_model(meta, self.data_dir)
        itemsize = np.dtype(meta["dtype"]).itemsize
        world, _ = self._world()
        devices = f" on each of {world} devices" if world > 1 else ""
        testing = stage == "test"
        if testing and split_tokens(meta, "test") == 0:
            raise self._no_test_split()
        for split in ("train", "val", "test") if testing else ("train", "val"):
            tokens = split_tokens(meta, split)
            if split == "val" and tokens == 0:
                continue  # prepared with val_fraction=0: no validation
            validate_split(Path(self.data_dir) / split, itemsize, tokens)
            if split in ("train", "test"):
                need, why = self.batch_size * world, f"one batch{devices}"
            else:
                need = self.val_sequences_needed()
                why = f"data.min_val_sequences={self.min_val_sequences}" if need > self.batch_size * world \
                    else f"one batch{devices}"
            if num_windows(tokens, self.seq_len) < need:
                raise self._too_little_data(split, tokens, need, why)
        self._train_dataset = TokenWindows(Path(self.data_dir, "train").resolve(), self.seq_len)
        if self.mixture:
            self._train_dataset = self._mixture_dataset(self._train_dataset)
        self._val_dataset = self._held_out("val")
        self._test_dataset = self._held_out("test") if testing else None

    def _held_out(self, split: str) -> TokenWindows | None:
        """The ``val`` or ``test`` split's windows, ``None`` if it holds no tokens."""
        if split_tokens(self.meta, split) == 0:
            return None
        return TokenWindows(Path(self.data_dir, split).resolve(), self.seq_len)

    def _mixture_dataset(self, first: TokenWindows) -> MixtureWindows:
        """The mixture's train splits (the first is ``data_dir``'s, checked already), each checked like it."""
        datasets = [first]
        for i, entry in enumerate(self.mixture[1:], 1):  # type: ignore[index]
            path = entry["path"]
            field = f"data.mixture[{i}].path"
            if not (Path(path) / META_FILENAME).is_file():
                raise FileNotFoundError(f"data.mixture: {path} is not a prepared dataset ({META_FILENAME} is missing); "
                                        "prepare it with python -m nsa_lit.data.prepare")
            meta = read_meta(path)
            self._check_tokenizer(meta, path, field)
            if meta.get("tokenizer_sha256") != self.meta.get("tokenizer_sha256") or meta["vocab_size"] != self.meta["vocab_size"]:
                raise ValueError(f"data.mixture: {path} and {self.data_dir} were prepared with different tokenizer files "
                                 "(tokenizer_sha256 / vocab_size in meta.json differ)")
            self._check_model(meta, path, field)
            validate_split(Path(path) / "train", np.dtype(meta["dtype"]).itemsize, split_tokens(meta, "train"))
            datasets.append(TokenWindows(Path(path, "train").resolve(), self.seq_len))
        return MixtureWindows(datasets, [e["weight"] for e in self.mixture])  # type: ignore[union-attr]

    def _loader(self, dataset: TokenWindows | MixtureWindows, shuffle: bool, limit: int | None = None) -> TokenLoader:
        world, rank = self._world()
        sampler_cls = MixtureSampler if isinstance(dataset, MixtureWindows) else WindowSampler
        sampler = sampler_cls(dataset, shuffle=shuffle, seed=self.seed, num_replicas=world, rank=rank, limit=limit)
        return TokenLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_long,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=False,
        )

    def train_dataloader(self) -> TokenLoader:
        if self._train_dataset is None:
            self.setup("fit")
        assert self._train_dataset is not None
        loader = self._loader(self._train_dataset, shuffle=self.shuffle)
        if len(loader) == 0:  # setup() checked one batch per device
            raise ValueError(
                f"data.batch_size={self.batch_size}, data.seq_len={self.seq_len}: "
                f"the train split of {self.data_dir} yields no full batch"
            )
        loader.consumed_batches = self._consumed_train_batches
        trainer = getattr(self, "trainer", None)
        # The epoch the trainer is about to run: Lightning creates the first iterator of a run
        # before it calls set_epoch, so the sampler must know it now (resume at epoch > 0).
        epoch = int(trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else None
        if epoch is not None:
            loader.window_sampler.set_epoch(epoch)
        if self._pending_train_state is not None:
            state, self._pending_train_state = self._pending_train_state, None
            batches = None
            if trainer is not None and epoch == state["epoch"]:
                batches = self._recount_resumed_batches(trainer, state, loader)
            loader.load_position_state(state, epoch=epoch, batches=batches)
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> TokenLoader | list:
        if self._train_dataset is None:
            self.setup("validate")
        if self._val_dataset is None:
            return []
        limit = None if self.val_batches is None else self.val_batches * self.batch_size
        return self._loader(self._val_dataset, shuffle=False, limit=limit)

    def test_dataloader(self) -> TokenLoader:
        """The held-out test split, in order, every full batch (``main.py test``)."""
        if self._test_dataset is None:
            self.setup("test")
        assert self._test_dataset is not None
        return self._loader(self._test_dataset, shuffle=False)

    def _recount_resumed_batches(self, trainer, state: dict[str, Any], loader: TokenLoader) -> int:
        """The restored trainer's batch count of the resumed epoch, in batches of this run.

        Lightning restores the count of batches the interrupted run trained in the epoch and
        ends the epoch when it reaches ``len(loader)``. With another ``batch_size x world_size``
        those batches held another number of windows: the count is set to the batches of this
        run that the used windows fill (``position // (batch_size x world_size)``), so the epoch
        ends when its windows run out, neither early nor late. (With gradient accumulation the
        first optimiser step after such a resume may accumulate fewer batches.)"""
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        per_batch = self.batch_size * loader.window_sampler.num_replicas
        if state.get("batch_size", self.batch_size) * state.get("world_size", 1) == per_batch:
            return int(progress.processed)
        batches = int(state["position"]) // per_batch
        rank_zero_info(f"resuming epoch {state['epoch']} with {per_batch} sequences a batch over "
                       f"all ranks (the checkpoint's run had {state.get('batch_size')} x "
                       f"{state.get('world_size')}): {state['position']} windows used, the epoch "
                       f"goes on from batch {batches}")
        # shift every counter alike: Lightning reads where the save happened from their offsets
        shift = batches - int(progress.processed)
        for name in ("ready", "started", "processed", "completed"):
            setattr(progress, name, getattr(progress, name) + shift)
        return batches

    def _consumed_train_batches(self) -> int | None:
        """Batches of the current epoch the trainer has trained on (``None`` outside ``Trainer.fit``)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    # -------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (saved in every checkpoint)."""
        if self._train_loader is None:
            return {}
        return {"version": STATE_VERSION, "train_loader": self._train_loader.position_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the train loader's position; applied to the loader ``train_dataloader()`` builds next."""
        loader_state = state_dict.get("train_loader")
        if not loader_state:
            return
        if state_dict.get("version") != STATE_VERSION:
            warnings.warn(
                f"the checkpoint's data position has format version {state_dict.get('version')}, not {STATE_VERSION} "
                "(an older data loader): the current epoch's training data starts from its beginning",
                stacklevel=2,
            )
            return
        warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING)
        self._pending_train_state = loader_state
        if self._train_loader is not None and getattr(self, "trainer", None) is None:
            self._train_loader.load_position_state(loader_state)  # used outside a Trainer
