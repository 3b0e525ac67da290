"""Sharded (DCP) checkpoints under FSDP2 on CPU, 2 processes over gloo: consolidation into one
file (``python -m nsa_lit.checkpoint consolidate``) and ``load_checkpoint(DIR)`` give the sharded
model's exact weights; a resume from a sharded checkpoint continues with the same losses as the
uninterrupted run; a save that fails on one process leaves the previous directory as it was.

The 2-process runs are this file run as a script (as in tests/test_parallel.py: Lightning's
launcher starts the second process by running the same command again).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

ARCH = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2,
            mlp_hidden=64, seq_len=32, latent_dim=16, rope_dim=4, window=8, compress_block=8,
            compress_stride=4, select_block=8, top_n=3, num_local_blocks=1, q_share=4,
            kernel_backend="reference", layer_pattern="LG")
GLOBAL_BATCH, STEPS = 4, 4  # one optimiser step per epoch: a checkpoint at every epoch end
FAIL_AT = 4  # with --fail: the save of last.ckpt after this step fails on rank 1


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, ARCH["vocab_size"], (STEPS, GLOBAL_BATCH, ARCH["seq_len"] + 1),
                         generator=g)


def train(ckpt_dir: str, resume: str | None = None, fail: bool = False, devices: int = 2
          ) -> dict:
    """``STEPS`` epochs of one step each over 2 FSDP2 processes (or 1 plain process), a sharded checkpoint at every
    epoch end (``step=N.ckpt`` and ``last.ckpt`` in ``ckpt_dir``); per step the global loss and
    (in ``ckpt_dir/full_N.pt``) the model's full state dict after it."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.utils.data import DataLoader

    from nsa_lit.checkpoint import AtomicCheckpointIO
    from nsa_lit.config import ModelConfig
    from nsa_lit.lit_module import LanguageModel, OptimConfig, build_on_meta
    from nsa_lit.parallel import FSDP2Strategy, FSDPConfig

    class Record(L.Callback):
        def __init__(self):
            self.loss = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs["loss"].detach().clone()
            if trainer.world_size > 1:
                torch.distributed.all_reduce(loss)
            step = trainer.global_step
            self.loss[step] = loss.item() / trainer.world_size
            full = get_model_state_dict(module.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=trainer.world_size > 1))
            if trainer.global_rank == 0:
                torch.save(full, os.path.join(ckpt_dir, f"full_{step}.pt"))

    class Shards(L.LightningDataModule):
        """Epoch e: global batch e; process r of W takes the r-th slice."""

        def train_dataloader(self):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            per = GLOBAL_BATCH // world
            rows = tokens()[self.trainer.current_epoch, rank * per:(rank + 1) * per]
            return DataLoader(rows, batch_size=per)

    if fail:
        import lightning.pytorch.strategies.model_parallel as mp

        save = mp._distributed_checkpoint_save

        def failing_save(state, path):  # rank 1 writes its shard, then fails
            save(state, path)
            if (Path(path).name == "last.ckpt.tmp" and trainer.global_step == FAIL_AT
                    and trainer.global_rank == 1):
                raise OSError(28, "No space left on device (simulated)")

        mp._distributed_checkpoint_save = failing_save

    L.seed_everything(0)
    with build_on_meta(devices > 1):
        model = LanguageModel(ModelConfig(**ARCH), OptimConfig(lr=1e-2, warmup_steps=1),
                              fsdp=FSDPConfig(param_dtype="float32"))
    record = Record()
    saver = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", save_top_k=-1,
                            every_n_epochs=1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, max_epochs=STEPS,
        strategy=FSDP2Strategy() if devices > 1 else "auto",
        plugins=[AtomicCheckpointIO()] if devices == 1 else None,  # main.py's, which loads DIRs
        callbacks=[record, saver], use_distributed_sampler=False, limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False)
    os.makedirs(ckpt_dir, exist_ok=True)
    out = {}
    try:
        trainer.fit(model, datamodule=Shards(), ckpt_path=resume)
        out["error"] = None
    except Exception as err:  # noqa: BLE001  (the test reads it)
        out["error"] = f"{type(err).__name__}: {err}"
    out["rank"] = trainer.global_rank
    out["loss"] = record.loss
    return out


def run_script(tmp_path, *args, timeout=180) -> dict:
    out = tmp_path / f"result{len(list(tmp_path.glob('result*')))}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__)), "--out", str(out), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    result["loss"] = {int(k): v for k, v in result["loss"].items()}
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-process FSDP2 run: sharded checkpoints after steps 1-4 (``step=N.ckpt``), and
    ``last.ckpt`` after steps 1-3; its save after step 4 fails on rank 1."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    result = run_script(tmp, "--ckpt_dir", str(tmp / "ck"), "--fail")
    return tmp, result


def _reference(ck: Path, step: int):
    from nsa_lit.config import ModelConfig
    from nsa_lit.model import Transformer

    model = Transformer(ModelConfig(**ARCH))
    model.load_state_dict(torch.load(ck / f"full_{step}.pt"))
    return model.eval()


def _logits(model) -> torch.Tensor:
    x = torch.randint(0, ARCH["vocab_size"], (2, ARCH["seq_len"]),
                      generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


def test_consolidated_checkpoint_gives_the_sharded_models_logits(run, tmp_path, capsys):
    """``python -m nsa_lit.checkpoint consolidate DIR OUT``: the file holds the sharded model's
    full state exactly (identical logits), in the layout of a single-file checkpoint, and
    ``load_checkpoint`` / ``LanguageModel.load_from_checkpoint`` read it; ``load_checkpoint``
    reads the directory itself the same."""
    from nsa_lit.checkpoint import load_checkpoint, main
    from nsa_lit.lit_module import LanguageModel

    tmp, _ = run
    ck = tmp / "ck"
    out = tmp_path / "consolidated.ckpt"
    assert main(["consolidate", str(ck / "step=4.ckpt"), str(out)]) == 0
    assert "global_step 4" in capsys.readouterr().out
    assert not (tmp_path / "consolidated.ckpt.tmp").exists()

    ckpt = torch.load(out, weights_only=False)
    meta = torch.load(ck / "step=4.ckpt" / "meta.pt", weights_only=False)
    assert set(ckpt) == set(meta) | {"state_dict", "optimizer_states"}
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["arch"] == meta[
        "hyper_parameters"]["arch"]
    full = torch.load(ck / "full_4.pt")
    assert set(ckpt["state_dict"]) == {"model." + k for k in full}
    for k, v in full.items():
        assert torch.equal(ckpt["state_dict"]["model." + k], v), k
    (optim,) = ckpt["optimizer_states"]  # keyed by parameter name, every parameter once
    names = [n for g in optim["param_groups"] for n in g["params"]]
    assert sorted(names) == sorted(ckpt["state_dict"]) and set(optim["state"]) <= set(names)

    expected = _logits(_reference(ck, 4))
    from_file, _ = load_checkpoint(out)
    from_dir, _ = load_checkpoint(ck / "step=4.ckpt")
    torch.testing.assert_close(_logits(from_file), expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits(from_dir), expected, rtol=0, atol=0)
    for source in (out, ck / "step=4.ckpt"):
        module = LanguageModel.load_from_checkpoint(source, map_location="cpu").eval()
        torch.testing.assert_close(_logits(module.model), expected, rtol=0, atol=0)
    # evaluation's --tb_dir writes at the step of either form (the directory's from meta.pt)
    from nsa_lit.eval.tensorboard import checkpoint_step

    assert checkpoint_step(out) == checkpoint_step(ck / "step=4.ckpt") == 4


def test_failed_sharded_save_leaves_the_previous_checkpoint(run):
    """Rank 1 fails after writing its shard of ``last.ckpt`` at step 4: both processes stop with
    ``CheckpointSaveError``; ``last.ckpt`` is still the complete step-3 checkpoint, nothing
    ``.tmp`` / ``.old`` is left, and ``--ckpt_path last`` would find ``last.ckpt`` only."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from nsa_lit.checkpoint import load_checkpoint

    tmp, result = run
    ck = tmp / "ck"
    assert result["error"].startswith("CheckpointSaveError")
    assert str(ck / "last.ckpt") in result["error"] and "unchanged" in result["error"]
    assert sorted(result["loss"]) == [1, 2, 3, 4]  # it failed at the end, not before
    assert torch.load(ck / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 3
    assert not list(ck.glob("*.tmp")) and not list(ck.glob("*.old"))
    model, _ = load_checkpoint(ck / "last.ckpt")
    torch.testing.assert_close(_logits(model), _logits(_reference(ck, 3)), rtol=0, atol=0)
    # a killed save leaves last.ckpt.tmp (newer than last.ckpt): never taken for a checkpoint
    import shutil

    shutil.copytree(ck / "step=4.ckpt", ck / "last.ckpt.tmp")
    try:
        found = ModelCheckpoint(dirpath=str(ck))._find_last_checkpoints(None)
        assert found == {os.path.normpath(str(ck / "last.ckpt"))}
    finally:
        shutil.rmtree(ck / "last.ckpt.tmp")


def test_a_save_killed_between_its_renames_resumes_from_the_old_directory(run, tmp_path):
    """Killed after moving the previous last.ckpt aside and before renaming the new one in:
    RunCheckpoint's ``--ckpt_path last`` takes last.ckpt.old (complete), not the .tmp."""
    import shutil

    from nsa_lit.checkpoint import RunCheckpoint

    tmp, _ = run
    shutil.copytree(tmp / "ck" / "last.ckpt", tmp_path / "last.ckpt.old")
    shutil.copytree(tmp / "ck" / "step=4.ckpt", tmp_path / "last.ckpt.tmp")
    found = RunCheckpoint(dirpath=str(tmp_path))._find_last_checkpoints(None)
    assert found == {str(tmp_path / "last.ckpt.old")}
    shutil.copytree(tmp / "ck" / "last.ckpt", tmp_path / "last.ckpt")
    assert RunCheckpoint(dirpath=str(tmp_path))._find_last_checkpoints(None) == {
        str(tmp_path / "last.ckpt")}


@pytest.mark.parametrize("source", ["directory", "consolidated"])
def test_resume_from_a_sharded_checkpoint_continues_the_run(run, tmp_path, source):
    """2 processes resume from the sharded step-2 checkpoint (weights, AdamW state, schedule,
    loop position), or from its consolidated file: steps 3 and 4 give the same losses and final
    weights as the uninterrupted run (the same fp32 operations in the same order: equal to
    1e-6)."""
    from nsa_lit.checkpoint import consolidate_to_file

    tmp, first = run
    resume = tmp / "ck" / "step=2.ckpt"
    if source == "consolidated":
        resume = tmp_path / "step2.ckpt"
        consolidate_to_file(tmp / "ck" / "step=2.ckpt", resume)
    resumed = run_script(tmp_path, "--ckpt_dir", str(tmp_path / "ck"), "--resume", str(resume))
    assert resumed["error"] is None
    assert sorted(resumed["loss"]) == [3, 4]
    for step in (3, 4):
        assert resumed["loss"][step] == pytest.approx(first["loss"][step], rel=1e-6)
    a, b = torch.load(tmp / "ck" / "full_4.pt"), torch.load(tmp_path / "ck" / "full_4.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    # the resumed run's own saves replaced last.ckpt in place (rename aside, rename in)
    assert torch.load(tmp_path / "ck" / "last.ckpt" / "meta.pt",
                      weights_only=False)["global_step"] == 4
    assert not list((tmp_path / "ck").glob("*.tmp")) + list((tmp_path / "ck").glob("*.old"))


@pytest.mark.parametrize("source", ["consolidated", "directory"])
def test_one_process_resumes_from_a_consolidated_checkpoint(run, tmp_path, source):
    """``fit --ckpt_path consolidated.ckpt`` (or the sharded directory itself, which main.py's
    AtomicCheckpointIO consolidates in memory) without FSDP: a plain optimizer loads the
    consolidated optimizer state (keyed by parameter name), so one process resumes the 2-process run from step 2 with
    its steps 3-4 losses (to 1e-5: 1 vs 2 processes sum in a different order, see
    tests/test_parallel.py)."""
    from nsa_lit.checkpoint import consolidate_to_file

    tmp, first = run
    out = tmp / "ck" / "step=2.ckpt"
    if source == "consolidated":
        out = tmp_path / "step2.ckpt"
        consolidate_to_file(tmp / "ck" / "step=2.ckpt", out)
    resumed = train(str(tmp_path / "ck"), resume=str(out), devices=1)
    assert resumed["error"] is None and sorted(resumed["loss"]) == [3, 4]
    for step in (3, 4):
        assert resumed["loss"][step] == pytest.approx(first["loss"][step], rel=1e-5)
    a, b = torch.load(tmp / "ck" / "full_4.pt"), torch.load(tmp_path / "ck" / "full_4.pt")
    for k in a:  # AdamW's moments were restored: a fresh optimizer gives ~2e-2 apart
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_consolidate_command_errors_name_the_path(tmp_path, run):
    tmp, _ = run
    cmd = [sys.executable, "-m", "nsa_lit.checkpoint", "consolidate"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    help_ = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env)
    assert help_.returncode == 0 and "sharded checkpoint directory" in help_.stdout

    from nsa_lit.checkpoint import consolidate, load_checkpoint, main

    missing = tmp_path / "nope"
    assert main(["consolidate", str(missing), str(tmp_path / "x.ckpt")]) == 1
    with pytest.raises(FileNotFoundError, match=str(missing)):
        consolidate(missing)
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        load_checkpoint(tmp_path)  # a directory, but no checkpoint
    with pytest.raises(IsADirectoryError, match="is a directory"):
        main_out = tmp_path / "outdir"
        main_out.mkdir()
        from nsa_lit.checkpoint import consolidate_to_file

        consolidate_to_file(tmp / "ck" / "step=1.ckpt", main_out)
    assert not (tmp_path / "x.ckpt").exists()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--resume")
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args(argv)
    result = train(args.ckpt_dir, args.resume, args.fail)
    if result["rank"] == 0:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
