"""FSDP2 (nsa_lit.parallel) on CPU: 2 processes over gloo train like 1 process on the same global
batch; a meta build is sharded, then initialised; activation checkpointing changes no number;
configure_model is idempotent; the strategy and the settings are selectable from the CLI.

The 2-process runs are this file run as a script (``python tests/test_parallel.py ...``):
Lightning's launcher starts the second process by running the same command again, so it cannot
be started from inside pytest's own process.
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
GLOBAL_BATCH, STEPS = 8, 4


def tokens() -> torch.Tensor:
    """A fixed token set: STEPS global batches of GLOBAL_BATCH sequences of seq_len + 1."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, ARCH["vocab_size"], (STEPS * GLOBAL_BATCH, ARCH["seq_len"] + 1),
                         generator=g)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def train(devices: int, meta: bool = False, activation_checkpointing: bool = False) -> dict:
    """``STEPS`` optimiser steps of the global batch over ``devices`` processes (FSDP2 when
    more than one, else the plain single-device strategy): per step, the loss of the global
    batch (the processes' mean) and the gradient norm before clipping; with FSDP2, facts about
    the sharded model."""
    import lightning as L
    from torch.utils.data import DataLoader

    from nsa_lit.config import ModelConfig
    from nsa_lit.lit_module import LanguageModel, OptimConfig, build_on_meta
    from nsa_lit.model import Transformer
    from nsa_lit.parallel import FSDP2Strategy, FSDPConfig

    class Record(L.Callback):
        def __init__(self):
            self.loss, self.grad_norm, self.init_norms_one = [], [], None

        def on_fit_start(self, trainer, module):  # right after configure_model
            norms = [p for n, p in module.model.named_parameters()
                     if n.endswith(("norm.weight", "latent_norm"))]
            self.init_norms_one = len(norms) > 0 and all(
                bool(_full(p).eq(1).all()) for p in norms)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs["loss"].detach().clone()
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(loss)
                loss /= torch.distributed.get_world_size()
            self.loss.append(loss.item())
            self.grad_norm.append(float(trainer.callback_metrics["train/grad_norm"]))

    class Shards(L.LightningDataModule):
        """Process r of W: the r-th of W equal slices of every global batch."""

        def train_dataloader(self):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            per = GLOBAL_BATCH // world
            rows = tokens().view(STEPS, GLOBAL_BATCH, -1)[:, rank * per:(rank + 1) * per]
            return DataLoader(rows.reshape(STEPS * per, -1), batch_size=per)

    L.seed_everything(0)
    with build_on_meta(meta):
        model = LanguageModel(ModelConfig(**ARCH), OptimConfig(lr=1e-2, warmup_steps=1),
                              activation_checkpointing=activation_checkpointing,
                              fsdp=FSDPConfig(param_dtype="float32"))
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, max_steps=STEPS, gradient_clip_val=0.25,
        strategy=FSDP2Strategy() if devices > 1 else "auto", callbacks=[record],
        use_distributed_sampler=False, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=Shards())
    out = {"loss": record.loss, "grad_norm": record.grad_norm, "rank": trainer.global_rank,
           "world_size": trainer.world_size, "init_norms_one": record.init_norms_one}
    if devices > 1:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        out["sharded"] = isinstance(model.model, FSDPModule) and all(
            isinstance(b, FSDPModule) for b in model.model.blocks)
        w = model.model.embed.weight
        out["local_rows"] = w.to_local().shape[0] if isinstance(w, DTensor) else w.shape[0]
        out["finite"] = all(bool(torch.isfinite(_full(p)).all()) for p in model.parameters())
        cpu = Transformer(model.arch)
        out["rope_equal"] = all(
            torch.equal(b.attn.rope.cos, c.attn.rope.cos)
            and torch.equal(b.attn.rope.sin, c.attn.rope.sin)
            for b, c in zip(model.model.blocks, cpu.blocks))
    return out


def run_script(tmp_path, *args, timeout=180) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__)), "--out", str(out), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_two_fsdp2_processes_train_like_one_process(tmp_path):
    """Loss and gradient norm (before clipping at 0.25, so clipping runs on the sharded
    gradients every step; Adam is nearly blind to its scale, so this shows it runs, not that it
    scales right) of 4 AdamW steps at lr 1e-2, same initial weights. FSDP2's reduce-scatter
    averages the 2 processes' gradients of their half-batch mean losses: the gradient of the
    global mean loss. So the runs differ only in fp32 summation order (per-process partial
    sums, gloo's reduction): measured <= 1.2e-7 relative (1 ulp) over the 4 steps. Tolerance
    1e-5: ~100 ulp, room for a different reduction order elsewhere, and still 1000x below what
    a wrong batch split, a gradient summed instead of averaged or a shard left out gives
    (>= 1e-2 here)."""
    fsdp = run_script(tmp_path, "--devices", "2")
    single = train(devices=1)
    assert fsdp["world_size"] == 2 and fsdp["sharded"]
    assert fsdp["local_rows"] == ARCH["vocab_size"] // 2  # the embedding is split in two
    assert fsdp["finite"] and fsdp["rope_equal"] and fsdp["init_norms_one"]
    assert len(fsdp["loss"]) == len(single["loss"]) == STEPS
    assert fsdp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert fsdp["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert min(single["grad_norm"]) > 0.25  # clipping was active
    assert len(set(single["loss"])) == STEPS  # the steps did move the weights


def test_meta_build_is_sharded_then_initialised_with_activation_checkpointing(tmp_path):
    """The CLI's path under FSDP2: built on meta, sharded, each process's shards allocated and
    initialised by init_weights; here with activation checkpointing too. (On a CPU mesh DTensor
    has no distributed RNG, so both processes draw the same values for their shards: only a
    test-time matter, GPUs have one.)"""
    out = run_script(tmp_path, "--devices", "2", "--meta", "--activation_checkpointing")
    assert out["sharded"] and out["local_rows"] == ARCH["vocab_size"] // 2
    assert out["init_norms_one"] and out["rope_equal"] and out["finite"]
    assert len(out["loss"]) == STEPS and all(abs(x - 4.16) < 0.5 for x in out["loss"])


def test_activation_checkpointing_changes_no_number():
    """The same losses and gradient norms with and without it (one process)."""
    plain, checkpointed = train(devices=1), train(devices=1, activation_checkpointing=True)
    assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)


def test_parallelize_is_idempotent_and_keeps_the_state_dict():
    """configure_model runs once per stage and again in load_from_checkpoint: a second call
    changes nothing, and the wrapped blocks keep their state-dict keys (checkpoints load into a
    model with or without activation checkpointing)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from nsa_lit.config import ModelConfig
    from nsa_lit.lit_module import LanguageModel

    torch.manual_seed(0)
    module = LanguageModel(ModelConfig(**ARCH), activation_checkpointing=True)
    keys = list(module.state_dict())
    module.configure_model()
    blocks = list(module.model.blocks)
    module.configure_model()
    assert all(isinstance(b, CheckpointWrapper) for b in module.model.blocks)
    assert all(a is b for a, b in zip(blocks, module.model.blocks))  # not wrapped twice
    assert list(module.state_dict()) == keys
    plain = LanguageModel(ModelConfig(**ARCH))
    plain.load_state_dict(module.state_dict())
    x = torch.randint(0, 64, (2, 32))
    torch.testing.assert_close(plain(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("kw, message", [
    (dict(fsdp=dict(param_dtype="float16")), "model.fsdp.param_dtype"),
    (dict(fsdp=dict(reduce_dtype="fp32")), "model.fsdp.reduce_dtype"),
    (dict(fsdp=dict(reshard_after_forward="yes")), "model.fsdp.reshard_after_forward"),
    (dict(activation_checkpointing="full"), "model.activation_checkpointing"),
])
def test_bad_parallel_settings_name_the_field(kw, message):
    from nsa_lit.config import ModelConfig
    from nsa_lit.lit_module import LanguageModel

    with pytest.raises(ValueError, match=message):
        LanguageModel(ModelConfig(**ARCH), **kw)


def test_tensor_parallelism_is_refused():
    from nsa_lit.parallel import data_parallel_mesh

    class Mesh:  # the two named dimensions of Lightning's ModelParallelStrategy mesh
        ndim, mesh_dim_names = 2, ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return type("Sub", (), {"size": lambda self: 2})()

    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        data_parallel_mesh(Mesh())


@pytest.mark.parametrize("strategy, sharded", [
    (["--trainer.strategy", "fsdp2"], True),
    (["--trainer.strategy.class_path", "lightning.pytorch.strategies.ModelParallelStrategy",
      "--trainer.strategy.init_args.data_parallel_size", "1",
      "--trainer.strategy.init_args.tensor_parallel_size", "1"], True),
    ([], False),
])
def test_cli_selects_fsdp2_and_builds_on_meta(strategy, sharded, tmp_path):
    """``--trainer.strategy fsdp2`` (or Lightning's ModelParallelStrategy by class path) from
    the CLI: the model is built on the meta device for configure_model to shard; with the
    default strategy it is built as before."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from nsa_lit.cli import cli_main
    from nsa_lit.parallel import FSDP2Strategy

    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.logger", "false",
                    "--trainer.callbacks", "[]", "--trainer.accelerator", "cpu",
                    "--model.fsdp.param_dtype", "float32",
                    "--model.activation_checkpointing", "true", *strategy], run=False)
    assert isinstance(cli.trainer.strategy, ModelParallelStrategy) == sharded
    if strategy[:2] == ["--trainer.strategy", "fsdp2"]:
        assert isinstance(cli.trainer.strategy, FSDP2Strategy)
    assert all(p.is_meta for p in cli.model.model.parameters()) == sharded
    assert cli.model.fsdp.param_dtype == "float32" and cli.model.activation_checkpointing
    assert cli.model.hparams.fsdp["param_dtype"] == "float32"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--meta", action="store_true")
    parser.add_argument("--activation_checkpointing", action="store_true")
    args = parser.parse_args(argv)
    result = train(args.devices, args.meta, args.activation_checkpointing)
    if result["rank"] == 0:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()


def test_a_plain_single_file_checkpoint_resumes_under_fsdp2(tmp_path, one_process_group):
    """Going from one GPU to FSDP2 (README): the plain strategy's checkpoint keys AdamW's state
    by integer ids in param-group order (weight-decayed matrices first); FSDP2 loads each
    parameter's own state (one process here)."""
    import lightning as L

    from nsa_lit.config import ModelConfig
    from nsa_lit.lit_module import LanguageModel, OptimConfig
    from nsa_lit.parallel import FSDP2Strategy, optimizer_parameter_names
    from test_training import ARCH, RandomTokens, trainer

    optim = OptimConfig(lr=1e-2, warmup_steps=2)
    t = trainer(tmp_path, limit_val_batches=0, max_steps=3)
    first = LanguageModel(ModelConfig(**ARCH), optim)
    t.fit(first, datamodule=RandomTokens())
    t.save_checkpoint(tmp_path / "3.ckpt")
    saved = torch.load(tmp_path / "3.ckpt", weights_only=False)["optimizer_states"][0]
    names = optimizer_parameter_names(first, t.optimizers[0])
    expected = {names[i]: s["exp_avg_sq"] for i, s in saved["state"].items()}

    class Loaded(L.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            self.state = {n: opt.state[p]["exp_avg_sq"].full_tensor().clone()
                          for n, p in zip(optimizer_parameter_names(pl_module, opt),
                                          (p for g in opt.param_groups for p in g["params"]))}

    loaded = Loaded()
    t2 = trainer(tmp_path / "r", limit_val_batches=0, max_steps=4, strategy=FSDP2Strategy(),
                 callbacks=[loaded])
    t2.fit(LanguageModel(ModelConfig(**ARCH), optim), datamodule=RandomTokens(),
           ckpt_path=tmp_path / "3.ckpt")
    assert t2.global_step == 4 and loaded.state.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(loaded.state[name].float(), value.float(), rtol=0, atol=0,
                                   msg=name)
