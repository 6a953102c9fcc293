#!/usr/bin/env bash
# CPU scaling: `indexcache bench` on configs/small-glm5.json (random weights) pinned to the first
# N cores with N rayon threads, for each N given, and for f32 and bf16-rounded weights (bf16
# weights are kept as bf16 by the CPU backend). JSON per run under $OUT (default bench-out/),
# then one summary table.
#   bash scripts/bench/cpu_threads.sh [BIN] [THREADS...]      # default: target/release/indexcache 2 16
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${1:-target/release/indexcache}
shift || true
THREADS=${*:-2 16}
OUT=${OUT:-bench-out}
DTYPES=${DTYPES:-f32 bf16}
mkdir -p "$OUT"
for t in $THREADS; do
    for dt in $DTYPES; do
        extra=(); [ "$dt" = f32 ] || extra=(--random-dtype "$dt")
        f="$OUT/cpu-$(basename "$B")-$dt-t$t.json"
        RAYON_NUM_THREADS=$t taskset -c "0-$((t - 1))" "$B" bench --device cpu --random-weights configs/small-glm5.json \
            "${extra[@]}" --contexts "${CONTEXTS:-1k,4k}" --patterns full,1/4 --decode 32 --repeats "${REPEATS:-1}" \
            --json "$f" > /dev/null 2>&1 || { echo "cpu_threads: $B t=$t $dt failed" >&2; continue; }
    done
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
print(f"{'run':<40} {'ctx':>6} {'pattern':<9} {'prefill s':>9} {'decode tok/s':>12}  prefill stages s (indexer/attention/FFN)")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "cpu-*.json"))):
    r = json.load(open(f))
    for row in r["rows"]:
        st = "/".join(f"{x:.2f}" for x in row["prefill_stages_s"])
        print(f"{os.path.basename(f)[4:-5]:<40} {row['context']:>6} {row['pattern']:<9} {row['prefill_s']:>9.2f} {row['decode_tok_s']:>12.1f}  {st}")
PY
