"""``TokenDataModule``: LitData token shards -> ``(batch_size, seq_len + 1)`` ``torch.long`` batches.

The train loader's position is part of the checkpoint (``state_dict``/``load_state_dict``), so a run
stopped mid-epoch and resumed with ``ckpt_path=`` trains on exactly the batches the uninterrupted run
would have seen (needs ``num_workers >= 1`` and the same ``batch_size``, ``num_workers`` and world size).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # offline: no PyPI version check

import lightning as L
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

from nsa_lit.data.prepare import META_FILENAME, PYTHON_DOCS, SOURCES, prepare, read_meta
from nsa_lit.data.tokenizer import Tokenizer, load_tokenizer, parse_bpe_spec

# Chunk size for the embedded corpus: a few chunks, so chunk-level shuffling and worker/rank splits
# have something to work with; TokensLoader drops < seq_len + 1 tokens at the end of each chunk.
EMBEDDED_CHUNK_BYTES = 512 * 1024
STATE_VERSION = 1


def collate_long(items: list[Any]) -> torch.Tensor:
    """Stack uint16/uint32 token blocks into one ``torch.long`` tensor (embeddings need int64/int32)."""
    return torch.from_numpy(np.stack([np.asarray(x) for x in items]).astype(np.int64))


def validate_split(split_dir: str | os.PathLike, itemsize: int | None = None) -> list[dict[str, Any]]:
    """Check that every chunk listed in ``index.json`` exists with the byte size the index implies.

    Raises ``ValueError`` ("corrupt shard ...") naming the missing or truncated file. Returns the chunk list.
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
    return chunks


class ResumableStreamingDataLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose position is saved and restored only by :class:`TokenDataModule`.

    Lightning saves and restores, on its own, the state of every train loader that has
    ``state_dict``/``load_state_dict``; that automatic path has had bugs across versions. This loader
    hides those two methods from it (``None`` blocks a method of a ``typing.Protocol``), and offers
    :meth:`position_state` / :meth:`load_position_state` instead, which ``TokenDataModule.state_dict``
    / ``load_state_dict`` call: one explicit path, tested in ``tests/test_data.py``.

    The saved position counts the batches the trainer has actually trained on (``consumed_batches``,
    set by the datamodule), not the batches the loader has handed out: a fetcher that reads ahead
    (Lightning does for loaders without a length) would otherwise skip a batch on resume.
    """

    state_dict = None  # type: ignore[assignment]
    load_state_dict = None  # type: ignore[assignment]
    consumed_batches: Callable[[], int | None] | None = None
    max_batches: int | None = None  # stop each epoch after this many batches (validation cap)

    def __iter__(self) -> Any:
        if self.max_batches is None:
            yield from super().__iter__()
            return
        for i, batch in enumerate(super().__iter__()):
            if i >= self.max_batches:
                break
            yield batch

    def __len__(self) -> int:
        n = super().__len__()
        return n if self.max_batches is None else min(n, self.max_batches)

    def position_state(self) -> dict[str, Any]:
        """``StreamingDataLoader.state_dict()``, with the position set to the consumed batches."""
        consumed = self.consumed_batches() if self.consumed_batches is not None else None
        if consumed is None or not isinstance(self.dataset, StreamingDataset):
            return copy.deepcopy(StreamingDataLoader.state_dict(self))
        assert self.batch_size
        num_samples = consumed * self.batch_size
        workers = self.num_workers if self.num_workers > 0 else 1
        return copy.deepcopy(
            {
                "dataset": self.dataset.state_dict(num_samples, self.num_workers, self.batch_size),
                "current_epoch": self.current_epoch,
                "num_samples_yielded": num_samples,
                # batches come round-robin from the workers, starting with worker 0
                "latest_worker_idx": (consumed - 1) % workers if consumed > 0 else 0,
            }
        )

    def load_position_state(self, obj: dict[str, Any]) -> None:
        """``StreamingDataLoader.load_state_dict()``; idempotent (a fresh worker cycle each time)."""
        self._worker_idx = None
        StreamingDataLoader.load_state_dict(self, copy.deepcopy(obj))


class TokenDataModule(L.LightningDataModule):
    """Token batches from LitData shards prepared by ``python -m nsa_lit.data.prepare``.

    Batches are ``torch.long`` tensors of shape ``(batch_size, seq_len + 1)``: inputs are
    ``batch[:, :-1]``, targets ``batch[:, 1:]``. Blocks are consecutive, non-overlapping windows of
    the token stream (documents separated by ``eos``).

    Args:
        data_dir: directory with ``train/``, ``val/`` and ``meta.json`` (written by the preparation).
        seq_len: tokens per training sequence; each sample holds ``seq_len + 1`` tokens.
        batch_size: sequences per batch, per device.
        num_workers: DataLoader worker processes. Mid-epoch resume needs ``>= 1``; resume with the
            same value (and the same ``batch_size`` and world size) to see exactly the same batches.
        seed: shuffle seed of the training split.
        shuffle: shuffle the training split (chunks and blocks; reshuffled every epoch).
        source: ``"python-docs"``: if ``data_dir`` has no ``meta.json``, prepare the embedded corpus there
            (once; later runs reuse it). ``None``: ``data_dir`` must already be prepared.
        tokenizer: tokenizer spec (``mistral-v1``, a ``*.model``/``tokenizer.json`` path, ``bpe:<n>``, a
            Hugging Face name). Must match the one ``data_dir`` was prepared with.
        val_fraction: fraction of documents held out for validation when preparing ``source``.
        val_batches: validate on at most this many batches (the first ones; ``None``: the whole split).
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
        val_batches: int | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if val_batches is not None and (not isinstance(val_batches, int) or val_batches < 1):
            raise ValueError(f"data.val_batches must be None or an integer >= 1, got {val_batches!r}")
        if source is not None and source not in SOURCES:
            raise ValueError(f"data.source must be one of {list(SOURCES)} or null, got {source!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
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
        self.val_batches = val_batches
        self._meta: dict[str, Any] | None = None
        self._train_dataset: StreamingDataset | None = None
        self._val_dataset: StreamingDataset | None = None
        self._train_loader: ResumableStreamingDataLoader | None = None
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

    def _missing_error(self) -> FileNotFoundError:
        return FileNotFoundError(
            f"data.data_dir={self.data_dir!r}: no prepared dataset ({self.meta_path} is missing). Prepare it with "
            f"`python -m nsa_lit.data.prepare <files or dirs> --output {self.data_dir} --tokenizer {self.tokenizer}`, "
            f"or set data.source={PYTHON_DOCS} to use the embedded corpus"
        )

    def _check_tokenizer(self) -> None:
        prepared = self.meta.get("tokenizer")
        if prepared != self.tokenizer:
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r}, but data.data_dir={self.data_dir!r} was prepared with "
                f"tokenizer {prepared!r}: set data.tokenizer={prepared!r}, or use another data_dir "
                "(or re-prepare it with --overwrite)"
            )

    # -------------------------------------------------------------------------------- hooks
    def prepare_data(self) -> None:
        """Prepare the embedded corpus into ``data_dir`` if it is not there yet (runs on one process)."""
        if self.meta_path.is_file():
            self._meta = None
            self._check_tokenizer()
            return
        if self.source is None:
            raise self._missing_error()
        # No meta.json: nothing was prepared, or a preparation was interrupted; (re)do it.
        prepare(
            output_dir=self.data_dir,
            source=self.source,
            tokenizer=self.tokenizer,
            val_fraction=self.val_fraction,
            chunk_bytes=EMBEDDED_CHUNK_BYTES,
            overwrite=True,
        )
        self._meta = None

    def setup(self, stage: str | None = None) -> None:
        if not self.meta_path.is_file():
            raise self._missing_error()
        self._meta = None
        self._check_tokenizer()
        meta = self.meta
        itemsize = np.dtype(meta["dtype"]).itemsize
        block = self.seq_len + 1
        for split in ("train", "val"):
            tokens = int(meta["splits"][split]["tokens"])
            if split == "val" and tokens == 0:
                continue  # prepared with val_fraction=0: no validation
            chunks = validate_split(Path(self.data_dir) / split, itemsize)
            if tokens < block:
                raise ValueError(
                    f"data.seq_len={self.seq_len}: the {split} split of {self.data_dir} has only {tokens} tokens, "
                    f"fewer than seq_len + 1 = {block}"
                )
            blocks = sum(c["dim"] // block for c in chunks)
            if blocks < self.batch_size:
                raise ValueError(
                    f"data.seq_len={self.seq_len}, data.batch_size={self.batch_size}: the {split} split of "
                    f"{self.data_dir} holds {blocks} blocks of seq_len + 1 tokens, fewer than one batch"
                )
        self._train_dataset = self._dataset("train", shuffle=self.shuffle)
        self._val_dataset = self._dataset("val", shuffle=False) if int(meta["splits"]["val"]["tokens"]) else None

    def _dataset(self, split: str, shuffle: bool) -> StreamingDataset:
        return StreamingDataset(
            str(Path(self.data_dir, split).resolve()),
            item_loader=TokensLoader(block_size=self.seq_len + 1),
            shuffle=shuffle,
            drop_last=True,
            seed=self.seed,
        )

    def _loader(self, dataset: StreamingDataset) -> ResumableStreamingDataLoader:
        return ResumableStreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_long,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
        )

    def train_dataloader(self) -> ResumableStreamingDataLoader:
        if self._train_dataset is None:
            self.setup("fit")
        assert self._train_dataset is not None
        loader = self._loader(self._train_dataset)
        if len(loader) == 0:
            raise ValueError(
                f"data.batch_size={self.batch_size}, data.num_workers={self.num_workers}, data.seq_len={self.seq_len}: "
                f"the train split of {self.data_dir} yields no full batch"
            )
        loader.consumed_batches = self._consumed_train_batches
        if self._pending_train_state is not None:
            loader.load_position_state(self._pending_train_state)
            self._pending_train_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> ResumableStreamingDataLoader | list:
        if self._train_dataset is None:
            self.setup("validate")
        if self._val_dataset is None:
            return []
        loader = self._loader(self._val_dataset)
        loader.max_batches = self.val_batches
        return loader

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
        self._pending_train_state = loader_state
        if self._train_loader is not None and getattr(self, "trainer", None) is None:
            self._train_loader.load_position_state(loader_state)  # used outside a Trainer
