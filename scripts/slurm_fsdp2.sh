#!/bin/bash
# FSDP2 training on N nodes x 8 GPUs under SLURM, keeping the paper's global batch.
#
#   sbatch --nodes=4 scripts/slurm_fsdp2.sh configs/1.3b/asa.yaml [more main.py fit options]
#
# Global batch: GLOBAL_BATCH sequences (default 64 of 8,192 tokens, the configs'). With
# G = nodes x GPUS_PER_NODE processes, each GPU takes a micro-batch of MICRO_BATCH sequences
# (at most MAX_MICRO_BATCH, default the config's data.batch_size: what fits one 80 GB GPU at 8k
# with bf16-mixed, 4 for 340M and 2 for 1.3B; FSDP2's sharded states leave more room) and
# accumulates ACCUM of them, MICRO_BATCH x ACCUM x G = GLOBAL_BATCH. G must divide GLOBAL_BATCH.
# Validation every VAL_EVERY_STEPS optimiser steps (default 1000, the configs'): Lightning counts
# val_check_interval in micro-batches, so it is passed as VAL_EVERY_STEPS x ACCUM.
#
# A rank that dies ends the whole job step (srun --kill-on-bad-exit). Every submission passes
# --ckpt_path last: the first starts fresh (Lightning warns that there is no last checkpoint),
# a resubmission of the same command resumes the run from its last checkpoint.
#SBATCH --job-name=nsa-lit
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch --nodes=N scripts/slurm_fsdp2.sh CONFIG [main.py fit options]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
VAL_EVERY_STEPS=${VAL_EVERY_STEPS:-1000}
MAX_MICRO_BATCH=${MAX_MICRO_BATCH:-$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["batch_size"])' "$CONFIG")}
NODES=${SLURM_NNODES:-1}

read -r MICRO_BATCH ACCUM < <(python3 - "$NODES" "$GPUS_PER_NODE" "$GLOBAL_BATCH" "$MAX_MICRO_BATCH" <<'PY'
import sys
nodes, gpus, global_batch, max_micro = map(int, sys.argv[1:])
world = nodes * gpus
if global_batch % world:
    sys.exit(f"GLOBAL_BATCH={global_batch} is not a multiple of {world} GPUs ({nodes} nodes x {gpus})")
per_gpu = global_batch // world
micro = max(m for m in range(1, min(per_gpu, max_micro) + 1) if per_gpu % m == 0)
print(micro, per_gpu // micro)
PY
)
echo "nodes=$NODES gpus/node=$GPUS_PER_NODE micro-batch=$MICRO_BATCH accumulation=$ACCUM global=$GLOBAL_BATCH"

srun --kill-on-bad-exit=1 python3 main.py fit --config "$CONFIG" \
  --trainer.strategy fsdp2 --trainer.num_nodes "$NODES" --trainer.devices "$GPUS_PER_NODE" \
  --data.batch_size "$MICRO_BATCH" --trainer.accumulate_grad_batches "$ACCUM" \
  --trainer.val_check_interval "$((VAL_EVERY_STEPS * ACCUM))" \
  --ckpt_path last "$@"
