#!/usr/bin/env bash
# After a kernel change, one command on a GPU: the kernels' GPU tests, then the kernel-level
# timings (selected attention with its per-stage breakdown, compression + selection at the
# expanded 96/64 shape, each with its TMA-off variants) and the branch-level comparison at 8k and
# 64k (ASA's global branches and the MLA window, with and without TMA, against SDPA at the same
# width). Every step runs even if one fails; the exit status is non-zero when any did.
#   bash benchmarks/kernel_check.sh OUTDIR [T_LIST] [TEST_PATHS]
set -u
status=0
check() { [ "$1" -eq 0 ] || status=1; }
out=${1:-/tmp/kernel_check}; lengths=${2:-8192,65536}; tests=${3:-tests/kernels}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$repo"
python3 -m pytest -q -m gpu $tests 2>&1 | tee "$out/kernel_tests.log" | tail -5
check "${PIPESTATUS[0]}"
python3 benchmarks/bench_selected_attention.py --importance smooth --layouts gla_absorbed_vk \
  --seqlens "$lengths" --out "$out/selected_attention.json" 2>&1 | grep -v '^{' | tail -8
check "${PIPESTATUS[0]}"
python3 benchmarks/bench_compression_selection.py --sweep --shapes asa_global_upprojected \
  --lengths "$lengths" --budget-s 150 --out "$out/compression_selection.json" \
  --variants '[["fwd", {"TMA": false}], ["dq", {"TMA": false}], ["dkdv", {"TMA": false}]]' \
  2>&1 | grep -v '"shape"' | tail -8
check "${PIPESTATUS[0]}"
python3 benchmarks/attention.py \
  --cases window-mla,window-mla-rows,sdpa-causal-340m,asa-global-auto --T "$lengths" \
  --out "$out/attention.json" 2>&1 | tail -10
check "${PIPESTATUS[0]}"
exit "$status"
