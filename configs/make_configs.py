"""Write the paper's experiment configs: ``python configs/make_configs.py``.

One YAML per (size, variant) under ``configs/<size>/``; every file is complete (no includes), so
each experiment is one ``--config`` away. Edit the tables here, not the generated files:
``tests/test_configs.py`` fails when they drift apart. Sizes: the paper's 340M and 1.3B models,
and ``study``, a ~40M model at 2,048 tokens for the one-GPU study (``python -m nsa_lit.study``,
docs/study.md).
"""
from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# micro_batch: sequences of 8,192 tokens per micro-batch on one 80 GB GPU (bf16-mixed, no
# activation checkpointing), the rest of the paper's global batch accumulated. Measured peaks on an
# H100 (benchmarks/README.md): ASA-340M 42 GiB at 4 sequences, 73.5 GiB at 8 (out of memory on
# another H100 of 79 GiB usable). 1.3B: 2 is an estimate from those (about twice the activations
# a sequence, 21 GB of weights and Adam states), to be confirmed by
# tests/test_configs_run.py::test_paper_config_fits_on_one_gpu.
GLOBAL_BATCH = 64  # sequences of 8,192 tokens per optimiser step: 0.5M tokens
SIZES = {
    "340m": dict(arch=dict(n_layers=24, d_model=1024, n_heads=16, head_dim=64, mlp_hidden=2816,
                           n_kv_heads=4, latent_dim=256, rope_dim=32),
                 lr=3.0e-4, token_budget=15_000_000_000, micro_batch=4),
    "1.3b": dict(arch=dict(n_layers=24, d_model=2048, n_heads=32, head_dim=64, mlp_hidden=5632,
                           n_kv_heads=8, latent_dim=512, rope_dim=32),
                 lr=2.0e-4, token_budget=100_000_000_000, micro_batch=2),
}
VAL_EVERY_STEPS = 1000  # optimiser steps between validations

# The one-GPU study (docs/study.md): 6 layers of 512 (8 heads x 64; 6 layers so that both LG and
# LLG divide them), the 340M model's grouping (4 query heads per key/value head, latent
# 4 x head_dim) and the NSA branches scaled to 2,048 tokens: blocks as in the NSA paper
# (32 / 16 / 64), top-8 selection blocks (block 0, the 2 local ones and 5 chosen: 512 of 2,048
# tokens) and a 256-token window, so that a needle more than 256 tokens back is reached only
# through compression and selection.
STUDY_ARCH = dict(n_layers=6, d_model=512, n_heads=8, head_dim=64, mlp_hidden=1408, n_kv_heads=2,
                  latent_dim=256, rope_dim=32, seq_len=2048, window=256, compress_block=32,
                  compress_stride=16, select_block=64, top_n=8, num_local_blocks=2)
STUDY_BATCH = 16  # sequences of 2,048 tokens per step: 32,768 tokens
STUDY_STEPS = 300  # token_budget = 300 steps (9.8M tokens); python -m nsa_lit.study --tokens changes it
STUDY = dict(arch=STUDY_ARCH, lr=1.0e-3, token_budget=STUDY_STEPS * STUDY_BATCH * 2048,
             warmup_steps=30, compile=False,
             trainer=dict(precision="bf16-mixed", accumulate_grad_batches=1, log_every_n_steps=5,
                          val_check_interval=50, check_val_every_n_epoch=None,
                          limit_val_batches=8, every_n_train_steps=100),
             data=dict(data_dir="data/study-python-docs", source="python-docs",
                       tokenizer="mistral-v1", batch_size=STUDY_BATCH, num_workers=4))

ASA = dict(layer_pattern="LG", local_kv="latent", global_kv="latent", global_latent_groups=2,
           q_share=4)

# The NSA paper's grouping: 16 query heads per key/value group (its 27B model: 64 heads, 4 GQA
# groups). 340M (16 heads): 1 key/value head; 1.3B (32 heads): 2.
NSA_PAPER_HEADS_PER_GROUP = 16


def nsa_paper_groups(arch: dict) -> dict:
    return dict(layer_pattern="N", n_kv_heads=arch["n_heads"] // NSA_PAPER_HEADS_PER_GROUP)


# fla's NSA 340M shape (the anchor of the fla speed comparison, benchmarks/bench_configs.py's
# FLA_NSA_340M): 32 query heads x 64, 2 key/value heads, blocks of 64 (compression block =
# stride = selection block), top-16 with one forced local block, window 512, mean-pooled
# compression, one key/value projection for all branches (as fla's NSA layer).
FLA_NSA_340M = dict(layer_pattern="N", n_heads=32, n_kv_heads=2, head_dim=64, compress_block=64,
                    compress_stride=64, select_block=64, top_n=16, num_local_blocks=1,
                    compress_method="mean")

# variant -> (model.arch overrides, or a function of the size's arch giving them; sizes it is
# written for; one-line description)
VARIANTS = {
    "full": (dict(layer_pattern="F"), ("340m", "1.3b", "study"), "full causal attention (GQA) baseline"),
    "nsa": (dict(layer_pattern="N"), ("340m", "1.3b", "study"), "NSA: compression + selection + window, GQA"),
    "asa": (ASA, ("340m", "1.3b", "study"), "ASA: MLA local / GLA global layers, 1:1, q_share 4"),
    "nsa_no_compression": (dict(layer_pattern="N", nsa_branches=["selection", "window"],
                                compress_method="mean"), ("340m",),
                           "NSA without the compression branch (mean-pooled keys still rank blocks)"),
    "nsa_no_selection": (dict(layer_pattern="N", nsa_branches=["compression", "window"]), ("340m",),
                         "NSA without the selection branch"),
    "nsa_no_window": (dict(layer_pattern="N", nsa_branches=["compression", "selection"]), ("340m",),
                      "NSA without the sliding-window branch"),
    "nsa_mean_pool": (dict(layer_pattern="N", compress_method="mean"), ("340m",),
                      "NSA with mean-pooled instead of MLP compression"),
    "alternating_gqa": (dict(ASA, local_kv="grouped", global_kv="grouped"), ("340m",),
                        "local/global alternation with plain GQA key/values"),
    "mla_local_only": (dict(ASA, global_kv="grouped"), ("340m",),
                       "alternation with MLA on local layers only (GQA global layers)"),
    "asa_global_mla": (dict(ASA, global_latent_groups=1), ("340m",),
                       "ASA with plain MLA (one latent head) instead of GLA on global layers"),
    "asa_no_q_share": (dict(ASA, q_share=1), ("340m",), "ASA without query sharing of selected blocks"),
    "asa_gl": (dict(ASA, layer_pattern="GL"), ("340m",), "ASA with global-first order"),
    "asa_llg": (dict(ASA, layer_pattern="LLG"), ("340m", "study"), "ASA with 2 local : 1 global layers"),
    "asa_lllg": (dict(ASA, layer_pattern="LLLG"), ("340m",), "ASA with 3 local : 1 global layers"),
    # KV-cache baselines: the ASA / NSA ratio depends on NSA's key/value heads
    "nsa_paper_groups": (nsa_paper_groups, ("340m", "1.3b"),
                         "NSA at the NSA paper's grouping, 16 query heads per key/value head"),
    "nsa_fla_340m": (FLA_NSA_340M, ("340m",),
                     "NSA at fla's 340M shape: 32 query heads, 2 key/value heads, blocks of 64"),
    "nsa_per_branch": (dict(layer_pattern="N", nsa_kv="per_branch"), ("340m", "1.3b"),
                       "NSA with its own key/value projection per branch (the NSA paper's)"),
}


def make_config(size: str, variant: str) -> dict:
    if size == "study":
        return make_study_config(variant)
    spec = SIZES[size]
    assert GLOBAL_BATCH % spec["micro_batch"] == 0, f"{size}: micro_batch must divide {GLOBAL_BATCH}"
    accumulate = GLOBAL_BATCH // spec["micro_batch"]
    arch_overrides, _, _ = VARIANTS[variant]
    if callable(arch_overrides):
        arch_overrides = arch_overrides(spec["arch"])
    return {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "auto",
            # one GPU: micro_batch x accumulate = 64 sequences a step; other GPU counts set
            # devices, accumulation and the validation interval together (README,
            # scripts/slurm_fsdp2.sh)
            "devices": 1,
            "precision": "bf16-mixed",
            "gradient_clip_val": 1.0,
            "accumulate_grad_batches": accumulate,
            "log_every_n_steps": 10,
            # counted by Lightning in micro-batches: 1000 optimiser steps x accumulate
            "val_check_interval": VAL_EVERY_STEPS * accumulate,
            "limit_val_batches": 50,
            # run identity: logs/<size>/<variant>/seed<k> and checkpoints/<size>/<variant>/seed<k>
            # (version null: main.py sets it to seed<seed_everything>, nsa_lit/cli.py)
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "logs", "name": f"{size}/{variant}",
                                     "version": None}},
            "callbacks": [{"class_path": "nsa_lit.checkpoint.RunCheckpoint",
                           "init_args": {"every_n_train_steps": 1000, "save_last": True}}],
        },
        "model": {
            "arch": {**spec["arch"], "seq_len": 8192, **arch_overrides},
            "optim": {"lr": spec["lr"], "warmup_steps": 1024, "token_budget": spec["token_budget"]},
            "compile": True,  # per-block torch.compile around the kernels: 1.2-1.3x on an H200
        },
        "data": {"data_dir": "data/fineweb-edu", "source": None, "tokenizer": "mistral-v1",
                 "batch_size": spec["micro_batch"], "num_workers": 4},
    }


def make_study_config(variant: str) -> dict:
    """The study's run of ``variant``: bf16 on one GPU, no gradient accumulation, validation every
    50 steps (counted across epochs: the embedded corpus is a few dozen steps long at 2,048 tokens)."""
    arch_overrides = VARIANTS[variant][0]
    trainer = STUDY["trainer"]
    return {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "precision": trainer["precision"],
            "gradient_clip_val": 1.0,
            "accumulate_grad_batches": trainer["accumulate_grad_batches"],
            "log_every_n_steps": trainer["log_every_n_steps"],
            "val_check_interval": trainer["val_check_interval"],
            "check_val_every_n_epoch": trainer["check_val_every_n_epoch"],
            "limit_val_batches": trainer["limit_val_batches"],
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "logs", "name": f"study/{variant}", "version": None}},
            "callbacks": [{"class_path": "nsa_lit.checkpoint.RunCheckpoint",
                           "init_args": {"every_n_train_steps": trainer["every_n_train_steps"],
                                         "save_last": True}}],
        },
        "model": {
            "arch": {**STUDY["arch"], **arch_overrides},
            "optim": {"lr": STUDY["lr"], "warmup_steps": STUDY["warmup_steps"],
                      "token_budget": STUDY["token_budget"]},
            "compile": STUDY["compile"],
        },
        "data": dict(STUDY["data"]),
    }


def render(size: str, variant: str) -> str:
    description = VARIANTS[variant][2]
    if size == "study":
        return (f"# study {variant}: {description}.\n"
                f"# Generated by configs/make_configs.py; edit the tables there. The one-GPU study\n"
                f"# (docs/study.md): python -m nsa_lit.study runs every variant and seed.\n"
                f"# 16 x 2048 tokens a step, {STUDY_STEPS} steps; the embedded corpus, prepared on first use.\n"
                f"# Alone: python main.py fit --config configs/study/{variant}.yaml\n"
                f"# (logs/study/{variant}/seed<k>, checkpoints/study/{variant}/seed<k>).\n"
                + yaml.safe_dump(make_config(size, variant), sort_keys=False))
    config = make_config(size, variant)
    micro, accumulate = config["data"]["batch_size"], config["trainer"]["accumulate_grad_batches"]
    header = (f"# {size} {variant}: {description}.\n"
              f"# Generated by configs/make_configs.py; edit the tables there.\n"
              f"# {micro} x 8192 tokens x accumulate {accumulate} = 0.5M tokens per step on one 80 GB GPU\n"
              f"# (devices: 1): on N GPUs set trainer.devices N, trainer.accumulate_grad_batches\n"
              f"# {accumulate} / N and trainer.val_check_interval {VAL_EVERY_STEPS} x that (Lightning counts it in\n"
              f"# micro-batches: every {VAL_EVERY_STEPS} optimiser steps), or use scripts/slurm_fsdp2.sh.\n"
              f"# Prepare data/fineweb-edu first.\n"
              f"# Logs to logs/{size}/{variant}/seed<k>, checkpoints to checkpoints/{size}/{variant}/seed<k>\n"
              f"# (k = seed_everything; docs/compare.md).\n")
    return header + yaml.safe_dump(config, sort_keys=False)


def expected_files() -> dict[Path, str]:
    return {HERE / size / f"{variant}.yaml": render(size, variant)
            for variant, (_, sizes, _) in VARIANTS.items() for size in sizes}


if __name__ == "__main__":
    for path, text in expected_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(HERE.parent))
