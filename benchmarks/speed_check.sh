#!/usr/bin/env bash
# The real paths' speed on a GPU, in parts that each fit one 10-minute call: decoding (tokens/s
# of compiled steps in CUDA graphs at 32k: ASA and full attention at batch 1 with each step's
# kernels, ASA and NSA at batch 64; then the decode GPU tests), training through
# `main.py fit` against the raw loop (340M ASA / full / NSA at 8k; then the test that counts the
# GPU waits of a training step), and the fixed 20-step loss
# check (two repeats, each in its own process: the run-to-run noise a speed change must stay
# within; batches of 8 without accumulation, the settings of the recorded references
# results/h100-loss-check-asa-2026-12-07*.json, pinned since the config's batch is now 4).
# Every step runs even if one fails; the exit status is non-zero when any did.
#   bash benchmarks/speed_check.sh OUTDIR [decode,fit,loss]
set -u
status=0
check() { [ "$1" -eq 0 ] || status=1; }
out=${1:-/tmp/speed_check}; parts=${2:-decode,fit,loss}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$repo"
if [[ ",$parts," == *",decode,"* ]]; then
  # the goal's pairs (batch 1: ASA vs full; batch 64: ASA vs NSA), compiled steps in graphs,
  # first: with the GPU tests (six minutes on an H200) they fill one 10-minute call
  python3 benchmarks/decode.py --configs configs/340m/asa.yaml configs/340m/full.yaml \
    --contexts 32768 --batches 1 --modes compiled --kernels \
    --out "$out/decode-32k-b1.json" 2>&1 | tee "$out/decode.log" | tail -6
  check "${PIPESTATUS[0]}"
  python3 benchmarks/decode.py --configs configs/340m/asa.yaml configs/340m/nsa.yaml \
    --contexts 32768 --batches 64 --modes compiled \
    --out "$out/decode-32k-b64.json" 2>&1 | tee -a "$out/decode.log" | tail -6
  check "${PIPESTATUS[0]}"
  python3 -m pytest -q -m gpu tests/test_decode_graph.py tests/kernels/test_decode_triton.py \
    2>&1 | tee "$out/decode_tests.log" | tail -5
  check "${PIPESTATUS[0]}"
fi
if [[ ",$parts," == *",fit,"* ]]; then
  python3 benchmarks/fit_throughput.py --configs configs/340m/asa.yaml configs/340m/full.yaml \
    configs/340m/nsa.yaml --steps 6 --warmup 2 --raw --out "$out/fit-8k.json" 2>&1 \
    | tee "$out/fit.log" | tr '\r' '\n' | grep -v 'it/s\]' | tail -10
  check "${PIPESTATUS[0]}"
  # no wait for the GPU between micro-batches (CUDA's synchronisation warnings counted)
  python3 -m pytest -q -m gpu tests/test_progress.py 2>&1 | tee "$out/fit_tests.log" | tail -3
  check "${PIPESTATUS[0]}"
fi
if [[ ",$parts," == *",loss,"* ]]; then
  python3 benchmarks/loss_check.py --config configs/340m/asa.yaml --steps 20 --repeat 2 \
    --extra "--data.batch_size 8 --trainer.accumulate_grad_batches 1" \
    --out "$out/loss-check-asa.json" 2>&1 \
    | tee "$out/loss.log" | tail -8
  check "${PIPESTATUS[0]}"
fi
exit "$status"
