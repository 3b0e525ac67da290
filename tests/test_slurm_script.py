"""scripts/slurm_fsdp2.sh keeps the global batch for any node count: run with a stand-in ``srun``
that records its command line instead of starting processes."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_fsdp2.sh"


def _submit(tmp_path, nodes: int, *extra: str, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "srun_args"}\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return subprocess.run(["bash", str(SCRIPT), "configs/1.3b/asa.yaml", *extra], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                                          "SLURM_NNODES": str(nodes), **env})


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# configs/1.3b/asa.yaml's micro-batch is 2 sequences: the default cap
@pytest.mark.parametrize("nodes, gpus, micro, accum, cap", [
    (1, 8, 2, 4, None), (2, 8, 2, 2, None), (8, 8, 1, 1, None), (1, 2, 2, 16, None), (1, 8, 8, 1, "8"),
    (2, 8, 4, 1, "8"), (1, 2, 8, 4, "8"), (3, 1, None, None, None)])
def test_micro_batch_times_accumulation_times_gpus_is_the_global_batch(tmp_path, nodes, gpus, micro, accum, cap):
    env = {"GPUS_PER_NODE": str(gpus), **({"MAX_MICRO_BATCH": cap} if cap else {})}
    done = _submit(tmp_path, nodes, "--trainer.max_steps", "5", **env)
    if micro is None:  # 64 sequences cannot be split evenly over 3 GPUs
        assert done.returncode != 0 and "not a multiple of 3 GPUs" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun_args").read_text().split()
    assert args[:4] == ["--kill-on-bad-exit=1", "python3", "main.py", "fit"]
    assert _option(args, "--trainer.num_nodes") == str(nodes) and _option(args, "--trainer.devices") == str(gpus)
    assert int(_option(args, "--data.batch_size")) == micro
    assert int(_option(args, "--trainer.accumulate_grad_batches")) == accum
    assert micro * accum * nodes * gpus == 64
    # validation every 1000 optimiser steps, in Lightning's micro-batches
    assert int(_option(args, "--trainer.val_check_interval")) == 1000 * accum
    assert _option(args, "--ckpt_path") == "last" and args[-2:] == ["--trainer.max_steps", "5"]
