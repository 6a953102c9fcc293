#!/usr/bin/env bash
# Reproduces the CPU numbers in docs/PERF.md: indexcache vs HF transformers on the "small" model
# (configs/small-glm5.json), DSA (all Full) vs IndexCache 1/4, at 1K / 4K / 16K tokens.
# Usage: bash scripts/bench/run_perf.sh [PYTHON]   (PYTHON: a venv with scripts/fixtures/requirements.txt)
# Run on an otherwise idle machine; results go to bench-out/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-../pyenv/bin/python}
mkdir -p bench-out
cargo build --release -p indexcache-cli
./target/release/indexcache bench --random-weights configs/small-glm5.json \
  --contexts 1k,4k,16k --patterns full,1/4 --decode 32 --json | tee bench-out/indexcache-small.json
if [ -x "$PY" ] || command -v "$PY" >/dev/null; then
  "$PY" scripts/bench/hf_cpu_bench.py --config configs/small-glm5.json --contexts 1k,4k,16k \
    --patterns full,1/4 --decode 16 --threads "$(nproc)" --json bench-out/hf-small.json
else
  echo "no Python at $PY: skipping the transformers peer" >&2
fi
