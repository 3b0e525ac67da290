"""benchmarks/kernel_resources.py: the training step's Triton kernels compiled for sm_90a on CPU,
with the tiles a GPU launch would take; and the switch that makes launchers choose those tiles."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.triton_utils import GPU_TILES_ENV, interpreter_tiles, num_sms

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_tiles_switch_gives_cpu_tensors_an_h100s_launch_choices(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(GPU_TILES_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreter_tiles(cpu) and num_sms(cpu) == 4
    monkeypatch.setenv(GPU_TILES_ENV, "1")
    assert not interpreter_tiles(cpu) and num_sms(cpu) == 132


def test_programs_per_sm_takes_the_tightest_hopper_limit():
    from benchmarks.kernel_resources import programs_per_sm

    assert programs_per_sm(255, 4, 80 * 1024) == 2   # registers (8,192 a warp) and shared memory
    assert programs_per_sm(128, 4, 0) == 4            # registers: 65,536 / (4,096 x 4)
    assert programs_per_sm(64, 4, 100 * 1024) == 2    # shared memory: 228 KB / 101 KB
    assert programs_per_sm(32, 8, 0) == 8             # warps: 64 / 8
    assert programs_per_sm(16, 1, 0) == 32            # blocks


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it: a process whose Triton was imported for a GPU (the tests'
    own process runs under the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/kernel_resources.py"),
                           "--config", str(ROOT / "configs/340m/asa.yaml"), "--seq_len", "2048",
                           *args], env=env, capture_output=True, text=True, timeout=600)


needs_ptxas = pytest.mark.skipif(not _ptxas_available(),
                                 reason="Triton's NVIDIA backend (ptxas) is not installed")


@needs_ptxas
def test_asa_step_kernels_compile_for_sm90_with_the_gpu_tiles(tmp_path):
    out, sass = tmp_path / "resources.json", tmp_path / "sass"
    done = _run_tool("--kernels", "_sel_|_xent|_sw_fwd", "--sass", str(sass), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "_sel_bwd_dkdv_kernel" in done.stdout and "spill st/ld" in done.stdout  # the table
    record = json.loads(out.read_text())
    assert record["arch"] == "sm_90a" and record["kernels_filter"] == "_sel_|_xent|_sw_fwd"
    rows = record["kernels"]
    names = {r["kernel"] for r in rows}
    assert {"_sel_fwd_kernel", "_sel_bwd_dq_kernel", "_sel_bwd_dkdv_kernel", "_xent_grad_kernel",
            "_sw_fwd_kernel"} == names
    for r in rows:
        assert 0 < r["regs"] <= 255 and 0 <= r["shared_kb"] <= 227, r
        assert 1 <= r["programs_per_sm"] <= 32, r
        assert r["spill_stores"] >= 0 and r["stack"] >= 0
        assert (sass / r["sass"]).read_text().count("HMMA") + (sass / r["sass"]).read_text().count(
            "HGMMA") > 0 or r["kernel"] == "_xent_grad_kernel"  # tensor-core code for sm_90
    by_name = {r["kernel"]: r for r in rows if not r["autotune_candidate"]}
    # the GPU's tiles, not the interpreter's: ASA's global layer (8 heads per latent group,
    # q_share 4) reads 64-row union chunks of 8 tokens; the loss kernel sweeps 4096 columns
    assert by_name["_sel_fwd_kernel"]["tiles"] == {"ROWS": 64, "TOK": 8, "BK": 64, "LPAD": 32}
    assert by_name["_sel_fwd_kernel"]["stages"] == 3 and by_name["_xent_grad_kernel"]["warps"] == 8
    assert by_name["_xent_grad_kernel"]["tiles"] == {"BLOCK": 4096}
    # the sliding window is autotuned on a GPU: each configuration its pruning keeps compiles
    window = [r for r in rows if r["kernel"] == "_sw_fwd_kernel"]
    assert len(window) > 1 and all(r["autotune_candidate"] for r in window)
    assert all(r["tiles"]["BLOCK_M"] >= 64 for r in window)  # the interpreter's are 16 x 16


@needs_ptxas
def test_decode_steps_kernels_compile_for_sm90(tmp_path):
    """``--decode CONTEXT``: the kernels of 16 eager decode steps against caches filled to the
    context: the window, compressed and selected decode kernels with their split-K combine, and
    the block pick, each launched once a step or once a selection."""
    out = tmp_path / "decode.json"
    done = _run_tool("--decode", "4096", "--kernels", "_decode|_combine|_pick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["decode_context"] == 4096
    rows = record["kernels"]
    assert {r["kernel"] for r in rows} == {"_decode_kernel", "_combine_kernel", "_pick_kernel"}
    assert all(0 < r["regs"] <= 255 for r in rows)
    assert {r["launches"] for r in rows if r["kernel"] == "_decode_kernel"} == {16}  # one a step
    assert [r["launches"] for r in rows if r["kernel"] == "_pick_kernel"] == [16 // 4]  # q_share 4


def test_the_kernel_filter_keeps_matching_launches_and_names_the_kernels_when_none_match():
    from benchmarks.kernel_resources import selected

    launches = [("m", "_sel_fwd_kernel", [], {}, False), ("m", "_xent_grad_kernel", [], {}, False)]
    assert selected(launches, None) == launches
    assert selected(launches, "_sel_|_xent") == launches
    assert selected(launches, "^_xent") == launches[1:]
    with pytest.raises(ValueError, match=r"'no_such' matches none of the step's kernels: "
                                         r"\['_sel_fwd_kernel', '_xent_grad_kernel'\]"):
        selected(launches, "no_such")


def test_compiling_in_an_interpreting_process_is_refused():
    """This test process imported Triton under TRITON_INTERPRET=1 (tests/conftest.py)."""
    from benchmarks.kernel_resources import measure

    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        measure(str(ROOT / "configs/340m/asa.yaml"))


def _paper_attention_layers() -> list[tuple[str, str]]:
    """(config, layer kind) of each distinct attention layer (``LayerSpec``) of the 340M and 1.3B
    configs."""
    from nsa_lit.model_stats import load_model_config

    layers = {}
    for path in sorted((ROOT / "configs").glob("[0-9]*/*.yaml")):
        cfg = load_model_config(path)
        for kind in sorted(set(cfg.layer_pattern)):
            key = (repr(cfg.layer(kind)), cfg.compress_method)
            layers.setdefault(key, (str(path.relative_to(ROOT / "configs")), kind))
    return list(layers.values())


@pytest.mark.parametrize("config,kind", _paper_attention_layers(),
                         ids=lambda x: x.removesuffix(".yaml"))
def test_paper_attention_layers_launch_with_the_gpu_tiles(config, kind, monkeypatch):
    """Each distinct attention layer of the paper configs, at its real widths and 2,048 tokens,
    forward and backward in bf16 with the Triton kernels and the tiles a GPU would take: every
    launcher accepts the shapes (launches are recorded, not run). The 1.3B ASA global layer's
    selected attention used to refuse its 288-column keys."""
    import dataclasses

    from benchmarks.kernel_resources import recording_launches
    from nsa_lit.attention.layer import Attention
    from nsa_lit.model_stats import load_model_config

    monkeypatch.setenv(GPU_TILES_ENV, "1")
    cfg = dataclasses.replace(load_model_config(ROOT / "configs" / config), seq_len=2048,
                              kernel_backend="triton")
    torch.manual_seed(0)
    layer = Attention(cfg, kind).to(torch.bfloat16)
    x = torch.randn(1, 2048, cfg.d_model, dtype=torch.bfloat16, requires_grad=True)
    with recording_launches() as launches:
        layer(x).float().square().mean().backward()
    names = {launch[1] for launch in launches}
    spec = cfg.layer(kind)
    assert ("_sel_fwd_kernel" in names or "_sel_fwd_t_kernel" in names) == spec.selects, names
    assert bool(names) == (kind != "F"), names  # full attention runs SDPA
