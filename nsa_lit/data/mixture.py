"""Several prepared datasets mixed by weight: one index space, one seeded order per epoch.

:class:`MixtureWindows` puts the training windows of datasets ``0..K-1`` one after another (dataset
``k``'s window ``j`` is index ``offsets[k] + j``). :class:`MixtureSampler` is a
:class:`~nsa_lit.data.windows.WindowSampler` whose epoch order has ``N = sum of all windows`` entries:

- dataset ``k`` gets a quota of ``N * w_k / sum(w)`` entries (largest remainder, so the quotas sum to
  ``N`` and each is within 1 of its exact share), and the quota labels are shuffled (seed, epoch);
- the entries labelled ``k`` are dataset ``k``'s windows in a seeded permutation, cycling through
  new permutations when the quota exceeds its windows (a small dataset with a large weight repeats;
  a large dataset with a small weight is subsampled, a new subsample each epoch).

So every epoch draws exactly the configured proportions (within one window), any prefix of it
draws them up to sampling-without-replacement noise, the order depends only on ``(seed, epoch,
weights, sizes)``, and the position resumes like a single dataset's (the datamodule saves it).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from nsa_lit.data.windows import TokenWindows, WindowSampler


def quotas(total: int, weights: Sequence[float]) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainder; they sum to ``total``)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"mixture weights must be positive numbers, got {list(weights)}")
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    base[np.argsort(-(exact - base), kind="stable")[:rest]] += 1
    return base


class MixtureWindows(Dataset):
    """The windows of several :class:`TokenWindows` (same ``seq_len``) as one map-style dataset."""

    def __init__(self, datasets: Sequence[TokenWindows], weights: Sequence[float]) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"mixture: {len(datasets)} datasets but {len(weights)} weights")
        seq_lens = {d.seq_len for d in datasets}
        if len(seq_lens) != 1:
            raise ValueError(f"mixture: datasets with different seq_len {sorted(seq_lens)}")
        quotas(1, weights)  # validates the weights
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.seq_len = seq_lens.pop()
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Index ``i`` -> (dataset, window in it)."""
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, int(i - self.offsets[k])

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows in the mixture)")
        k, j = self.locate(i)
        return self.datasets[k][j]


class MixtureSampler(WindowSampler):
    """Per epoch: ``len(dataset)`` draws, dataset ``k`` exactly its weight's quota of them (module docstring)."""

    def __init__(self, dataset: MixtureWindows, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.mixture = dataset
        self.fingerprint = {"weights": dataset.weights, "sizes": dataset.sizes.tolist()}

    def order(self, epoch: int) -> np.ndarray:
        mix = self.mixture
        n = self.num_windows
        q = quotas(n, mix.weights)
        dtype = np.int32 if n < 2**31 else np.int64
        labels = np.repeat(np.arange(len(q), dtype=np.int32), q)
        np.random.default_rng([self.seed, epoch, 0]).shuffle(labels)
        order = np.empty(n, dtype=dtype)
        for k, (count, size) in enumerate(zip(q.tolist(), mix.sizes.tolist())):
            if count == 0:
                continue
            cycles = []
            for c in range(-(-count // size)):
                perm = np.arange(size, dtype=dtype)
                if self.shuffle:
                    np.random.default_rng([self.seed, epoch, k + 1, c]).shuffle(perm)
                cycles.append(perm)
            order[labels == k] = np.concatenate(cycles)[:count] + mix.offsets[k]
        return order
