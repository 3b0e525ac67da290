"""Mixtures of prepared datasets: exact per-epoch quotas, proportions in every prefix (a bound from
Hoeffding's inequality), determinism by seed, resume, and the datamodule's ``data.mixture``."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import numpy as np
import pytest
import torch

from nsa_lit.data import TokenDataModule
from nsa_lit.data.mixture import MixtureSampler, MixtureWindows, quotas
from nsa_lit.data.prepare import prepare


class _Sized:
    """Stands in for TokenWindows where only sizes matter (the sampler never reads windows)."""

    def __init__(self, n: int, seq_len: int = 8) -> None:
        self.n, self.seq_len = n, seq_len

    def __len__(self) -> int:
        return self.n


def _labels(mix: MixtureWindows, order: np.ndarray) -> np.ndarray:
    return np.searchsorted(mix.offsets, order, side="right") - 1


def test_quotas_sum_and_round_within_one():
    for total, weights in ((1450, [0.5, 0.3, 0.2]), (7, [1, 1, 1]), (10, [3, 1]), (1, [0.1, 0.9])):
        q = quotas(total, weights)
        exact = total * np.asarray(weights, dtype=float) / sum(weights)
        assert q.sum() == total and np.all(np.abs(q - exact) < 1)
    for bad in ([], [1, 0], [1, -2], [float("nan")]):
        with pytest.raises(ValueError, match="positive"):
            quotas(10, bad)


def test_epoch_draws_the_configured_proportions():
    """Each epoch: dataset k gets N * w_k (within 1) of the N = 1450 draws; a small dataset with a big
    weight cycles through whole permutations, a big one with a small weight is subsampled without
    repeats. Any prefix of m draws: the count of dataset k is hypergeometric (labels are a shuffled
    multiset), and Hoeffding's bound, which holds for sampling without replacement, gives
    P(|count/m - w_k| >= t) <= 2 exp(-2 m t^2) = 1e-6 at t = sqrt(ln(2e6) / (2m)) (0.11 for m = 600):
    with 3 datasets x 8 (seed, epoch) pairs, a correct sampler fails with probability < 3e-5, while
    unshuffled labels (all of dataset 0 first) miss by 0.5."""
    weights = [0.5, 0.3, 0.2]
    mix = MixtureWindows([_Sized(50), _Sized(400), _Sized(1000)], weights)
    m = 600
    t = math.sqrt(math.log(2e6) / (2 * m))
    for seed in range(4):
        sampler = MixtureSampler(mix, shuffle=True, seed=seed)
        for epoch in range(2):
            order = sampler.order(epoch)
            labels = _labels(mix, order)
            counts = np.bincount(labels, minlength=3)
            assert np.all(np.abs(counts - 1450 * np.asarray(weights)) < 1)
            prefix = np.bincount(labels[:m], minlength=3) / m
            assert np.all(np.abs(prefix - weights) < t), (seed, epoch, prefix)
            local = order - mix.offsets[labels]
            small = np.bincount(local[labels == 0], minlength=50)  # 725 draws of 50 windows: 14 or 15 each
            assert small.min() == 725 // 50 and small.max() == 725 // 50 + 1
            big = local[labels == 2]
            assert len(set(big.tolist())) == big.size == 290  # subsampled, no repeats
    a, b = MixtureSampler(mix, shuffle=True, seed=1), MixtureSampler(mix, shuffle=True, seed=1)
    assert np.array_equal(a.order(0), b.order(0)) and not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), MixtureSampler(mix, shuffle=True, seed=2).order(0))


def test_mixture_sampler_resumes_and_shards_like_a_single_dataset():
    mix = MixtureWindows([_Sized(30), _Sized(70)], [1, 3])
    order = MixtureSampler(mix, shuffle=True, seed=3).order(0).tolist()
    ranks = [list(MixtureSampler(mix, shuffle=True, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert ranks[0] == order[0::2] and ranks[1] == order[1::2]
    resumed = MixtureSampler(mix, shuffle=True, seed=3)
    resumed.resume(0, 37)
    assert list(resumed) == order[37:]


# ------------------------------------------------------------------------------------------ datamodule
def _prepare(root: Path, name: str, word: str, n_docs: int) -> Path:
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": f"{word} {i} " * 40}) + "\n" for i in range(n_docs)))
    prepare([src], root / name, val_fraction=0.0, val_tokens=200, chunk_bytes=4096, progress=False)
    return root / name


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    return _prepare(root, "alpha", "alpha", 40), _prepare(root, "omega", "omega", 15)


def _source_of(batch: torch.Tensor, windows: dict[bytes, int]) -> list[int]:
    return [windows[row.numpy().astype(np.int64).tobytes()] for row in batch]


def test_datamodule_mixture_batches_resume_and_validate_on_the_first(two_datasets):
    a, b = two_datasets
    mixture = [{"path": str(a), "weight": 0.75}, {"path": str(b), "weight": 0.25}]

    def make():
        dm = TokenDataModule(seq_len=16, batch_size=4, num_workers=0, source="python-docs", mixture=mixture)
        dm.setup("fit")
        return dm

    dm = make()
    assert dm.data_dir == str(a) and dm.source is None
    mix = dm._train_dataset
    assert isinstance(mix, MixtureWindows)
    windows = {}
    for k, d in enumerate(mix.datasets):
        windows.update({d[j].astype(np.int64).tobytes(): k for j in range(len(d))})
    batches = list(dm.train_dataloader())
    drawn = np.bincount([k for batch in batches for k in _source_of(batch, windows)], minlength=2)
    n = len(batches) * 4
    expect = quotas(len(mix), [0.75, 0.25])
    assert n > len(mix) - 4 and np.all(np.abs(drawn - expect) <= 4)  # the epoch's quotas, last partial batch dropped
    val = next(iter(dm.val_dataloader()))
    first_val = TokenDataModule(data_dir=str(a), seq_len=16, batch_size=4, num_workers=0, source=None)
    first_val.setup("fit")
    assert torch.equal(val, next(iter(first_val.val_dataloader())))

    it = iter(dm.train_dataloader())
    [next(it) for _ in range(3)]
    state = dm.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert all(torch.equal(x, y) for x, y in zip(rest, batches[3:])) and len(rest) == len(batches) - 3

    other = TokenDataModule(seq_len=16, batch_size=4, num_workers=0, mixture=[{**mixture[0], "weight": 0.5}, mixture[1]])
    other.setup("fit")
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match="mixture"):
        other.train_dataloader()


def test_mixture_config_errors_name_the_entry(two_datasets, tmp_path):
    a, _ = two_datasets
    for bad, match in (([], "non-empty"), ([{"path": str(a)}], r"mixture\[0\] must have exactly"),
                       ([{"path": str(a), "weight": 1}, {"path": "x", "weight": 0}], r"mixture\[1\].weight"),
                       ([{"path": str(a), "weight": "1"}], r"mixture\[0\].weight")):
        with pytest.raises(ValueError, match=match):
            TokenDataModule(mixture=bad)
    dm = TokenDataModule(seq_len=16, batch_size=4, mixture=[{"path": str(a), "weight": 1},
                                                             {"path": str(tmp_path / "nope"), "weight": 1}])
    with pytest.raises(FileNotFoundError, match="data.mixture: .*nope"):
        dm.setup("fit")


def test_a_mixture_entrys_data_errors_name_its_field(two_datasets, tmp_path):
    import shutil

    a, b = two_datasets
    other = tmp_path / "other"
    shutil.copytree(b, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer": "bpe:999"}))
    dm = TokenDataModule(seq_len=16, batch_size=4, num_workers=0, mixture=[
        {"path": str(a), "weight": 1}, {"path": str(other), "weight": 1}])
    with pytest.raises(ValueError, match=r"but data.mixture\[1\].path='.*other' was prepared with "
                                         r"tokenizer 'bpe:999'"):
        dm.setup("fit")
