"""Training sequences over a split's whole token stream, across LitData chunk boundaries.

A prepared split (``<data_dir>/train`` or ``val``) is a list of LitData chunk files that, in index
order, hold one token stream (documents separated by ``eos``). :class:`TokenStream` reads any range
of that stream, whichever chunks it spans. :class:`TokenWindows` cuts it into sequences of
``seq_len + 1`` tokens that start every ``seq_len`` tokens:

    window i = stream[i * seq_len : i * seq_len + seq_len + 1]

Consecutive windows share one token (the last target of window i is the first input of window
i + 1), so every token of the stream but the first is a target exactly once, and a stream of ``N``
tokens gives ``(N - 1) // seq_len`` windows: at most ``seq_len - 1`` tokens at the end of a split
go unused, whatever the chunk size. ``seq_len`` is the model's: the same prepared data serves every
sequence length.

:class:`WindowSampler` orders the windows: a permutation per epoch (``seed``, ``epoch``) or the
stream order, dealt out round-robin to the ranks, and able to start an epoch at any position (mid-epoch
resume, see ``TokenDataModule``).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

_OPEN_FILES = 16  # chunk files kept open per process (a 15B-token split has ~500 chunks of 64 MB)
# LitData's ``no_header_numpy:<code>`` dtype codes (the order of litdata.constants._NUMPY_SCTYPES; part
# of the shard format, and checked against LitData in tests/test_data.py). Kept here so that reading
# shards does not import LitData (and boto3 with it).
NUMPY_DTYPE_CODES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
                     "float64")


def index_dtype(index: dict[str, Any]) -> np.dtype:
    """The token dtype of a LitData ``index.json`` written with ``TokensLoader`` from numpy arrays."""
    fmt = index["config"]["data_format"][0]
    kind, _, code = fmt.partition(":")
    if kind != "no_header_numpy" or not code.isdigit() or int(code) >= len(NUMPY_DTYPE_CODES):
        raise ValueError(f"not a token shard written from numpy arrays: data_format {fmt!r}")
    return np.dtype(NUMPY_DTYPE_CODES[int(code)])


class TokenStream:
    """The tokens of one prepared split, in stored order, as one random-access stream.

    ``read(start, stop)`` copies tokens ``[start, stop)`` out of the chunk files they lie in. Files
    are opened lazily, per process (a forked DataLoader worker opens its own), at most
    ``_OPEN_FILES`` at a time.
    """

    def __init__(self, split_dir: str | os.PathLike) -> None:
        self.split_dir = Path(split_dir)
        index = json.loads((self.split_dir / "index.json").read_text())
        self.dtype = index_dtype(index)
        chunks = index["chunks"]
        self.paths = [str(self.split_dir / c["filename"]) for c in chunks]
        # chunk layout (litdata writer): [num items][num items + 1 offsets] as uint32, then the tokens
        self.headers = [(1 + int(c["chunk_size"]) + 1) * 4 for c in chunks]
        self.offsets = np.zeros(len(chunks) + 1, dtype=np.int64)  # stream position of each chunk's first token
        np.cumsum([int(c["dim"]) for c in chunks], out=self.offsets[1:])
        self.num_tokens = int(self.offsets[-1])
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.num_tokens

    def _file(self, i: int) -> Any:
        if self._pid != os.getpid():  # forked: the parent's handles share its file offsets
            self._files = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(i)
        if f is None:
            f = open(self.paths[i], "rb", buffering=0)
            self._files[i] = f
            while len(self._files) > _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(i)
        return f

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (a new array of the stored dtype)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) out of range: {self.split_dir} holds {self.num_tokens}")
        out = np.empty(stop - start, dtype=self.dtype)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            end = min(stop, int(self.offsets[i + 1]))
            if end > pos:
                f = self._file(i)
                f.seek(self.headers[i] + (pos - int(self.offsets[i])) * self.dtype.itemsize)
                buf = out[pos - start : end - start].view(np.uint8)
                got = 0
                while got < buf.size:
                    n = f.readinto(buf[got:])
                    if not n:
                        raise ValueError(
                            f"corrupt shard: {self.paths[i]} ends before token {end - int(self.offsets[i])} "
                            "that index.json lists (re-run the preparation with --overwrite)"
                        )
                    got += n
                pos = end
            i += 1
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:  # spawned DataLoader workers: no open files in the pickle
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = OrderedDict(), None
        return state


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` tokens, starting every ``seq_len`` tokens, in ``num_tokens`` tokens."""
    return max(0, (num_tokens - 1) // seq_len)


def tokens_for(windows: int, seq_len: int) -> int:
    """Tokens needed for ``windows`` consecutive windows (they share one token each): ``windows * seq_len + 1``."""
    return windows * seq_len + 1


class TokenWindows(Dataset):
    """Map-style dataset: item ``i`` is ``stream[i * seq_len : i * seq_len + seq_len + 1]`` (stored dtype)."""

    def __init__(self, split_dir: str | os.PathLike, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.stream = TokenStream(split_dir)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return num_windows(self.stream.num_tokens, self.seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows of {self.seq_len} + 1 tokens)")
        start = i * self.seq_len
        return self.stream.read(start, start + self.seq_len + 1)


def collate_long(items: list[Any]) -> torch.Tensor:
    """Stack uint16/uint32 token windows into one ``torch.long`` tensor (embeddings need int64/int32)."""
    return torch.from_numpy(np.stack([np.asarray(x) for x in items]).astype(np.int64))


class WindowSampler(DistributedSampler):
    """Window indices for one rank: each epoch a permutation of all windows (``shuffle``; seeded by
    ``(seed, epoch)``) or the stream order, dealt round-robin to ``num_replicas`` ranks.

    Every rank gets ``len(self)`` = ``num_windows // num_replicas`` indices an epoch (or ``limit``,
    if smaller): ``order[rank::num_replicas]`` of the first ``len(self) * num_replicas``. After ``k``
    batches of ``b`` on each of ``w`` ranks, the first ``k * b * w`` entries of the epoch's order
    have been used, whatever ``w`` and ``b`` are: :meth:`resume` starts an epoch there.

    A ``DistributedSampler`` so that Lightning neither replaces it nor wraps it (it shards already);
    ``set_epoch`` is called by Lightning at each epoch start.
    """

    fingerprint: Any = None  # what else shapes the order (a mixture's weights); saved with the position

    def __init__(
        self,
        dataset: Dataset,
        *,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.num_windows = len(dataset)  # type: ignore[arg-type]
        per_rank = self.num_windows // num_replicas
        self.num_samples = per_rank if limit is None else min(per_rank, limit)
        self.total_size = self.num_samples * num_replicas
        self.start = 0  # global position where the epoch being iterated started (0, or the resume point)
        self._resume: tuple[int, int] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of all windows (int32 below 2**31 windows: 4 bytes a window)."""
        order = np.arange(self.num_windows, dtype=np.int32 if self.num_windows < 2**31 else np.int64)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    def resume(self, epoch: int, position: int) -> None:
        """Start epoch ``epoch`` at global position ``position`` (windows already used by all ranks)
        the next time it is iterated; the position is forgotten once used, or if another epoch starts."""
        self._resume = (int(epoch), int(position))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None:
            epoch, position = self._resume
            self._resume = None
            if epoch == self.epoch:
                start = min(position, self.total_size)
        self.start = start
        # every rank the same count, also from a position saved at another world size (one
        # rank ending its epoch a batch early would leave the others waiting in a collective)
        stop = start + (self.total_size - start) // self.num_replicas * self.num_replicas
        indices = self.order(self.epoch)[start + self.rank : stop : self.num_replicas]
        return (int(i) for i in indices)

    def __len__(self) -> int:
        """Indices of a whole epoch (also while a resumed epoch yields only the rest: Lightning counts
        the batches of an epoch from its start)."""
        return self.num_samples
