#!/usr/bin/env bash
# One GPU round that fits the device tool (a command of at most 10 minutes; only 8 files come back
# from $OUT): the CUDA test binaries into one log, then a same-lease A/B of decode switches.
# On the GPU machine, from the repo root, with scripts/gpu/bundle.sh's binaries:
#   bash scripts/gpu/round.sh "base:" "pipe:INDEXCACHE_NVRTC_DEFINES=GEMV_PIPE=1"
# TESTS: the test binaries (default: every one in gpu-bundle/tests); TEST_ENV: extra environments
# ("A=1 B=0;C=1") under which the `core` binary (the op conformance suite) runs again; CONTEXT, PATTERNS,
# DECODE, REPS as in ab.sh (no configs: tests only). Writes $OUT/tests.log and $OUT/ab.txt; ab.sh's
# per-run JSON and logs stay in /tmp/ab-runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=${BUNDLE:-gpu-bundle}
O=${OUT:-gpu-out}
mkdir -p "$O"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export INDEXCACHE_FIXTURES="$PWD/tests/fixtures"
: > "$O/tests.log"
run_test() {  # name, then env assignments
    local t=$1
    shift
    env "$@" timeout "${TEST_TIMEOUT:-300}" "$B/tests/$t" --test-threads=1 > "/tmp/round-$t.log" 2>&1
    local rc=$?
    echo "== $t $* rc=$rc" | tee -a "$O/tests.log"
    grep -E "test result|FAILED|panicked|failed checks" -A3 "/tmp/round-$t.log" | head -40 >> "$O/tests.log"
}
for t in ${TESTS:-$(ls "$B/tests")}; do
    run_test "$t"
done
IFS=';' read -r -a envs <<< "${TEST_ENV:-}"
for e in "${envs[@]}"; do
    read -r -a kv <<< "$e"
    [[ ${#kv[@]} -gt 0 ]] && run_test core "${kv[@]}"
done
if [[ $# -gt 0 ]]; then
    OUT=/tmp/ab-runs bash scripts/gpu/ab.sh "$@" 2>&1 | tee "$O/ab.txt"
fi
