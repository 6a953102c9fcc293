#!/usr/bin/env bash
# The whole GPU check, on the GPU machine, from the repo root, with the binaries that
# scripts/gpu/bundle.sh built elsewhere:
#   1. the CUDA kernel tests and the model conformance suite (f32 and bf16 modes) on the GPU;
#   2. the kernel benchmarks (achieved TFLOP/s or GB/s against the H200's measured ceilings);
#   3. the 30B DSA benchmark (configs/glm-30b-dsa.json, random bf16 weights) at 10K/60K/120K/200K,
#      all-Full vs the paper's searched 1/2 and 1/4 patterns.
# Results land in $OUT (default gpu-out/) as JSON and logs; a summary is printed last.
# Usage: bash scripts/gpu/check.sh [all|tests|kernels|bench|peer]  (default all)
set -uo pipefail
cd "$(dirname "$0")/../.."
what=${1:-all}
B=${BUNDLE:-gpu-bundle}
O=${OUT:-gpu-out}
mkdir -p "$O"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export INDEXCACHE_FIXTURES="$PWD/tests/fixtures"
# The paper's searched 30B patterns (indexcache-paper.md §2.3, Appendix B).
P12=FSFSFSSSSFSFFFFSFFSSFFSFFFSSFFSSFSSSSFSFFFSFSSF
P14=FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS
CONTEXTS=${CONTEXTS:-10000,60000,120000,200000}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$O/device.txt"

if [[ $what == all || $what == tests ]]; then
    : > "$O/tests.log"
    for t in "$B"/tests/*; do
        n=$(basename "$t")
        timeout "${TEST_TIMEOUT:-300}" "$t" --test-threads=1 --nocapture >> "$O/tests.log" 2>&1
        echo "test $n: rc=$?" | tee -a "$O/tests.log"
    done
fi
if [[ $what == all || $what == kernels ]]; then
    timeout "${BENCH_TIMEOUT:-300}" "$B"/kernel_bench --json "$O/kernels.json" 2>&1 | tee "$O/kernels.log"
fi
if [[ $what == all || $what == bench ]]; then
    "$B"/indexcache bench --device cuda --dtype bf16 --random-weights configs/glm-30b-dsa.json \
        --contexts "$CONTEXTS" --patterns "${PATTERNS:-full,$P12,$P14}" --decode "${DECODE:-32}" \
        --json "$O/bench-30b.json" 2>&1 | tee "$O/bench.log"
fi
if [[ $what == peer ]]; then
    python3 scripts/bench/hf_gpu_bench.py --config configs/glm-30b-dsa.json --tokens 2048,4096,8192 \
        --pattern "$P14" --json "$O/hf-peer.json" 2>&1 | tee "$O/peer.log"
fi
echo "== summary"
grep -E "^test .*rc=" "$O/tests.log" 2>/dev/null
grep -E "FAIL|panicked" "$O/tests.log" 2>/dev/null | head -20
ls -la "$O"
