#!/usr/bin/env bash
# The real paths' speed on a GPU, in parts that each fit one 10-minute device call:
#   decode    tokens/s of compiled steps in CUDA graphs at 32k: ASA and full attention at batch 1
#             with each step's kernels, ASA and NSA at batch 64; then the decode GPU tests
#   fit       `main.py fit` against the raw loop, 340M ASA and full attention at 8k (the configs'
#             own micro-batch and accumulation); then the test that counts a training step's
#             GPU waits
#   fit_more  the same for 340M NSA and 1.3B ASA at 8k
#   fit_32k   the same for 340M ASA, full attention and NSA at 32k (micro-batch 1, the configs'
#             accumulation: the same tokens per step as at 8k)
#   profile   the raw loop's 8k step, ASA and full attention against transformers' Llama at
#             full attention's shape (`hf-llama`), with GPU time per kernel group
#   loss      the fixed 20-step loss check (two repeats, each in its own process: the
#             run-to-run noise a speed change must stay within; batches of 8 without
#             accumulation, the settings of the recorded references
#             results/h100-loss-check-asa-2026-12-07*.json, pinned since the config's batch is 4)
# Every command runs even if one fails; the exit status is non-zero when any did.
#   bash benchmarks/speed_check.sh OUTDIR [decode,fit,fit_more,fit_32k,profile,loss]
set -u
status=0
out=${1:-/tmp/speed_check}; parts=${2:-decode,fit,fit_more,fit_32k,profile,loss}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$repo"
asked() { [[ ",$parts," == *",$1,"* ]]; }
# run LOG LINES COMMAND...: the command's output into $out/LOG (appended), its last LINES lines
# shown without progress-bar updates; a failure sets the exit status
run() {
  local log=$1 lines=$2
  shift 2
  "$@" 2>&1 | tee -a "$out/$log" | tr '\r' '\n' | grep -v 'it/s\]' | tail -"$lines"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
# fit_check NAME "EXTRA" CONFIG...: fit_throughput.py --raw on CONFIGs into $out/NAME.json
fit_check() {
  local name=$1 extra=$2
  shift 2
  local configs=()
  for c in "$@"; do configs+=("configs/$c.yaml"); done
  run fit.log 8 python3 benchmarks/fit_throughput.py --configs "${configs[@]}" --steps 3 \
    --warmup 2 --raw --extra="$extra" --out "$out/$name.json"
}
if asked decode; then
  # the goal's pairs (batch 1: ASA vs full; batch 64: ASA vs NSA), benchmarks before the GPU
  # tests (six minutes on an H200)
  run decode.log 6 python3 benchmarks/decode.py --configs configs/340m/asa.yaml \
    configs/340m/full.yaml --contexts 32768 --batches 1 --modes compiled --kernels \
    --out "$out/decode-32k-b1.json"
  run decode.log 6 python3 benchmarks/decode.py --configs configs/340m/asa.yaml \
    configs/340m/nsa.yaml --contexts 32768 --batches 64 --modes compiled \
    --out "$out/decode-32k-b64.json"
  run decode_tests.log 5 python3 -m pytest -q -m gpu tests/test_decode_graph.py \
    tests/kernels/test_decode_triton.py
fi
if asked fit; then
  fit_check fit-8k "" 340m/asa 340m/full
  # no wait for the GPU between micro-batches (CUDA's synchronisation warnings counted)
  run fit_tests.log 3 python3 -m pytest -q -m gpu tests/test_progress.py
fi
if asked fit_more; then
  fit_check fit-8k-more "" 340m/nsa 1.3b/asa
fi
if asked fit_32k; then
  fit_check fit-32k "--model.arch.seq_len 32768 --data.batch_size 1" 340m/asa 340m/full 340m/nsa
fi
if asked profile; then
  run profile.log 60 python3 benchmarks/train_throughput.py --configs configs/340m/asa.yaml \
    configs/340m/full.yaml hf-llama --T 8192 --tokens 32768 --modes compiled --steps 4 \
    --warmup 2 --profile 15 --out "$out/train-8k-profile.json"
fi
if asked loss; then
  run loss.log 8 python3 benchmarks/loss_check.py --config configs/340m/asa.yaml --steps 20 \
    --repeat 2 --extra "--data.batch_size 8 --trainer.accumulate_grad_batches 1" \
    --out "$out/loss-check-asa.json"
fi
exit "$status"
