"""The notebooks in ``notebooks/`` run top to bottom on the CPU, and what they compute is right.

Each notebook is executed with nbclient in a kernel on this Python (``TRITON_INTERPRET=1``,
``NSA_NOTEBOOK_SMOKE=1`` for short training runs); any cell error fails the test. The notebooks
write their results (a JSON file each) under ``$NSA_NOTEBOOK_OUT``, a temporary directory here,
and the tests check those numbers against direct computations from the configs, the event files
and the block geometry, not only that the notebooks ran.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("kv_cache", "selection", "compare")
KERNEL = "nsa-lit-test"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A kernel spec for this Python (``JUPYTER_PATH``), the notebooks' output directory and
    one prepared-data directory shared by the notebooks that train."""
    root = tmp_path_factory.mktemp("notebooks")
    spec_dir = root / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nsa-lit tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root / "jupyter"))
        yield {"out": root / "out", "data": root / "data" / "python-docs"}


def execute(name: str, workspace: dict) -> dict:
    """Run ``notebooks/<name>.ipynb`` top to bottom (cwd ``notebooks/``); returns the JSON it
    wrote to ``$NSA_NOTEBOOK_OUT/<name>/<name>.json``."""
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    env = {**os.environ, "TRITON_INTERPRET": "1", "NSA_NOTEBOOK_SMOKE": "1",
           "NSA_NOTEBOOK_OUT": str(workspace["out"]), "NSA_NOTEBOOK_DATA": str(workspace["data"]),
           "LITDATA_DISABLE_VERSION_CHECK": "1", "MPLBACKEND": "Agg"}
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute(env=env)  # CellExecutionError on the first failing cell
    return json.loads((workspace["out"] / name / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), \
        f"{name}.ipynb: store it without outputs"
    assert "# Parameters" in code[0].source, f"{name}.ipynb: the first code cell holds the parameters"


# -- kv_cache.ipynb --------------------------------------------------------------------------
def expected_bytes_per_token(path: Path, T: int) -> float:
    """Cache bytes per token (bf16) from the config's fields, written out for the layer kinds
    the checked configs use: full attention keeps every token's keys and values; shared-K/V NSA
    also its compressed tokens; ASA's local layers a ring of ``window`` latents, its global
    layers every latent plus the compressed ones."""
    from nsa_lit.model_stats import load_model_config

    cfg = load_model_config(path)
    n_cmp = (T - cfg.compress_block) // cfg.compress_stride + 1 if T >= cfg.compress_block else 0
    kinds = (cfg.layer_pattern * cfg.n_layers)[:cfg.n_layers]
    gqa = 2 * cfg.n_kv_heads * cfg.head_dim
    latent = cfg.latent_dim + cfg.rope_dim
    per_layer = {"F": T * gqa, "N": (T + n_cmp) * gqa,
                 "L": min(T, cfg.window) * latent, "G": (T + n_cmp) * latent}
    return sum(per_layer[k] for k in kinds) * 2 / T


def test_kv_cache_notebook(workspace):
    result = execute("kv_cache", workspace)
    assert result["contexts"] == [1024 * 2**k for k in range(8)]
    assert result["itemsize"] == 2
    for name, check in result["checks"].items():
        assert check["allocated_equals_formula"] and check["meta_equals_sweep"], name
    bpt = result["bytes_per_token"]
    for size in ("340m", "1.3b"):
        for variant in ("full", "nsa", "asa"):
            path = ROOT / "configs" / size / f"{variant}.yaml"
            for T in result["contexts"]:
                assert bpt[f"{size}/{variant}"][str(T)] == pytest.approx(
                    expected_bytes_per_token(path, T), rel=1e-12), (size, variant, T)
        for base, entry in result["ratios"][size].items():
            assert base in entry["baseline"]
            for T in result["contexts"]:
                assert entry["ratio"][str(T)] == pytest.approx(
                    bpt[f"{size}/asa"][str(T)] / bpt[f"{size}/{base}"][str(T)])
    assert set(result["ratios"]["340m"]) == {"nsa", "nsa_per_branch", "nsa_fla_340m",
                                             "nsa_paper_groups"}
    # every 340M config, ablations included, is in the sweep
    assert {f"340m/{p.stem}" for p in (ROOT / "configs/340m").glob("*.yaml")} <= set(bpt)
    assert (workspace["out"] / "kv_cache" / "kv_cache.png").stat().st_size > 10_000


# -- selection.ipynb -------------------------------------------------------------------------
def overlap(i: int, j: int, block_len: int, stride: int, select_block: int) -> float:
    """Raw tokens compressed token ``i`` and selection block ``j`` share, over ``stride``."""
    cmp = range(i * stride, i * stride + block_len)
    sel = range(j * select_block, (j + 1) * select_block)
    return len(set(cmp) & set(sel)) / stride


def expected_blocks(importance: np.ndarray, t: int, *, select_block: int, top_n: int,
                    num_local: int, q_share: int) -> list[int]:
    """The blocks query ``t`` attends to: its group's first query ``t0`` chooses block 0, the
    ``num_local`` blocks ending with its own, then the best-scoring visible ones (ties: the lower
    index); ascending, ``-1`` padding."""
    t0 = t // q_share * q_share
    current = t0 // select_block
    forced = sorted({0} | {current - k for k in range(num_local) if current - k >= 0})
    rest = sorted((j for j in range(current + 1) if j not in forced),
                  key=lambda j: (-importance[t0, j], j))
    chosen = sorted((forced + rest)[:top_n])
    return chosen + [-1] * (top_n - len(chosen))


def test_selection_notebook(workspace):
    r = execute("selection", workspace)
    assert r["recomputed_equal"] and r["layer_kind"] == "G" and r["layer_pattern"] == "LG"
    T, G, H = r["T"], r["groups"], r["heads"]
    bl, st, sb = r["compress_block"], r["compress_stride"], r["select_block"]
    n_cmp, n_sel = (T - bl) // st + 1, math.ceil(T / sb)
    block_idx = np.array(r["block_idx"])
    importance = np.array(r["importance"])
    probs = np.array(r["compression_probs"])
    assert block_idx.shape == (G, T, r["top_n"])
    assert importance.shape == (G, T, n_sel) and probs.shape == (G, T, n_cmp)
    assert math.isfinite(r["sequence_loss"])

    # compression probabilities: nothing on a block that has not ended; each head sums to one
    ends = np.arange(n_cmp) * st + bl - 1
    future = ends[None, :] > np.arange(T)[:, None]
    assert np.all(probs[:, future] == 0)
    sees_any = ~future.all(axis=1)
    np.testing.assert_allclose(probs.sum(-1)[:, sees_any], H // G, rtol=1e-4)
    assert np.all(probs.sum(-1)[:, ~sees_any] == 0)

    # importance: the probabilities re-binned onto selection blocks by raw-token overlap
    weights = np.array([[overlap(i, j, bl, st, sb) for j in range(n_sel)] for i in range(n_cmp)])
    np.testing.assert_allclose(importance, probs @ weights, rtol=1e-4, atol=1e-6)

    # the picks: forced blocks, then top importance of each q_share group's first query
    for g in range(G):
        for t in range(T):
            assert block_idx[g, t].tolist() == expected_blocks(
                importance[g], t, select_block=sb, top_n=r["top_n"], num_local=r["num_local"],
                q_share=r["q_share"]), (g, t)
    for name in ("selection_blocks.png", "selection_scores.png"):
        assert (workspace["out"] / "selection" / name).stat().st_size > 10_000


# -- compare.ipynb ---------------------------------------------------------------------------
def event_scalars(run_dir: str | Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
            for tag in acc.Tags()["scalars"]}


def test_compare_notebook(workspace):
    import dataclasses

    import torch

    from nsa_lit.kv_report import measure
    from nsa_lit.model_stats import count_parameters, load_model_config

    r = execute("compare", workspace)
    tiny = load_model_config(ROOT / "configs" / "tiny.yaml")
    assert set(r["summary"]) == {f"tiny/{v}" for v in r["variants"]} == {
        "tiny/asa", "tiny/nsa", "tiny/full"}
    assert len(r["runs"]) == len(r["variants"]) * len(r["seeds"])
    for variant, overrides in r["variants"].items():
        fields = {k.removeprefix("--model.arch."): v for k, v in zip(overrides[::2], overrides[1::2])}
        cfg = dataclasses.replace(tiny, **fields)
        metrics = r["summary"][f"tiny/{variant}"]["metrics"]
        [label] = r["summary"][f"tiny/{variant}"]["runs"]
        logged = event_scalars(r["runs"][label]["path"])
        assert metrics["final_train_loss"]["values"] == [pytest.approx(logged["train/loss"][-1])]
        assert metrics["final_val_loss"]["values"] == [pytest.approx(logged["val/loss"][-1])]
        assert metrics["best_val_loss"]["values"] == [pytest.approx(min(logged["val/loss"]))]
        tokens = r["steps"] * r["batch_size"] * r["seq_len"]
        assert metrics["tokens_seen"]["values"] == [tokens] == [r["trained"][label]["tokens_seen"]]
        assert metrics["parameters"]["mean"] == count_parameters(cfg)["total"]
        kv = measure(cfg, cfg.seq_len, dtype=torch.bfloat16)[0] / cfg.seq_len
        assert metrics["kv_bytes_per_token"]["mean"] == pytest.approx(kv)
        # trained: validation below the loss of a uniform guess over the vocabulary
        assert metrics["final_val_loss"]["mean"] < math.log(cfg.vocab_size) - 0.2
        row = next(line for line in r["table"].splitlines() if line.startswith(f"| tiny/{variant} |"))
        assert f"{metrics['final_val_loss']['mean']:.3f}" in row
    for path in r["plots"].values():
        assert Path(path).stat().st_size > 10_000
