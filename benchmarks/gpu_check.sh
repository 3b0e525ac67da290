#!/usr/bin/env bash
# One GPU session in one command (what benchmarks/README.md's results log records):
# the GPU tests of the training and decoding paths, the attention benchmark of the sparse branches
# and whole layers (eager and compiled) beside SDPA / FlexAttention / fla, and the CPU demo config
# trained on the GPU in bf16.
#   bash benchmarks/gpu_check.sh OUTDIR [T_LIST] [CASES]
set -uo pipefail
out=${1:-/tmp/gpu_check}; lengths=${2:-8192,65536}
cases=${3:-asa-global,asa-global-auto,nsa-gqa,sdpa,fla,window-mla,flex-mla,layer,layer-compiled}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$repo"
python3 -m pytest -q -m gpu tests/test_gpu_training.py tests/test_decode_graph.py 2>&1 | tee "$out/gpu_tests.log" | tail -15
python3 benchmarks/attention.py --cases "$cases" \
  --T "$lengths" --out "$out/h200-asa.json" 2>&1 | tee "$out/bench.log" | tail -40
demo=$(mktemp -d)
(cd "$demo" && timeout 150 python3 "$repo/main.py" fit --config "$repo/configs/tiny.yaml" \
  --trainer.precision bf16-mixed --model.optim.token_budget 204800 \
  --trainer.enable_progress_bar false 2>&1 | tail -6) | tee "$out/demo.log"
ls "$demo/checkpoints/tiny/asa" 2>&1 | tee -a "$out/demo.log"
