#!/usr/bin/env bash
# Same-lease A/B of decode switches: the 30B benchmark at one context, each configuration run
# REPS times interleaved (leases differ by several per cent, runs on one lease by ~1 %), printing
# the decode tok/s of every row. On the GPU machine, from the repo root, with scripts/gpu/bundle.sh's
# binaries:
#   bash scripts/gpu/ab.sh "base:INDEXCACHE_FUSE=0" "new:"      (label:ENV=V ENV=V ...[|bench args])
#   bash scripts/gpu/ab.sh "host:|--host-argmax" "device:"
# CONTEXT (4096), PATTERNS (full,<paper 1/4>), DECODE (48), REPS (3); JSON per run in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=${BUNDLE:-gpu-bundle}
O=${OUT:-gpu-out}
mkdir -p "$O"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
P14=FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS
for rep in $(seq 1 "${REPS:-3}"); do
    for cfg in "$@"; do
        label=${cfg%%:*}
        spec=${cfg#*:}
        extra=""
        [[ $spec == *"|"* ]] && extra=${spec#*|} && spec=${spec%%|*}
        read -r -a envs <<< "$spec"
        read -r -a args <<< "$extra"
        env "${envs[@]}" "$B"/indexcache bench --device cuda --dtype bf16 --random-weights configs/glm-30b-dsa.json \
            --contexts "${CONTEXT:-4096}" --patterns "${PATTERNS:-full,$P14}" --decode "${DECODE:-48}" \
            --json "$O/ab-$label-$rep.json" "${args[@]}" > "$O/ab-$label-$rep.log" 2>&1
        rc=$?
        # Decode tok/s of every row, and the last row's over the first's (the pattern speedup).
        echo "$label#$rep rc=$rc decode tok/s: $(grep '^| [0-9]' "$O/ab-$label-$rep.log" |
            awk -F'|' '{v[NR] = $8 + 0; printf "%s", $8} END {if (NR > 1 && v[1] > 0) printf " (%.3fx)", v[NR] / v[1]}')"
    done
done
