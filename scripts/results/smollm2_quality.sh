#!/usr/bin/env bash
# Quality of SmolLM2-135M-DSA on held-out text (data/corpus/brown-heldout.txt, never used for
# distillation or search): mean NLL of dense attention, DSA all-Full, and IndexCache patterns, at
# each context, as JSON lines in $OUT (default runs/quality.jsonl), plus a summary table.
#   bash scripts/results/smollm2_quality.sh MODEL_DIR [CTXS] [WINDOWS] [PATTERN...]
# CTXS default "2048 4096", WINDOWS default 4; every PATTERN (a file or F/S string) is added to
# the uniform 1/2, 1/4, 1/8 rows. Needs scripts/fetch_smollm2.sh and scripts/data/fetch_corpus.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
M=${1:?model directory}
CTXS=${2:-2048 4096}
W=${3:-4}
shift $(( $# < 3 ? $# : 3 ))
B=${B:-target/release/indexcache}
H=data/corpus/brown-heldout.txt
OUT=${OUT:-runs/quality.jsonl}
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
row() { # label args...
    local label=$1 ctx=$2; shift 2
    local json
    json=$("$B" ppl -m "$M" --device cpu --data "$H" --ctx "$ctx" --max-windows "$W" --json "$@" 2>/dev/null)
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["label"]=sys.argv[2]; r["ctx"]=int(sys.argv[3]); print(json.dumps(r))' \
        "$json" "$label" "$ctx" | tee -a "$OUT"
}
for ctx in $CTXS; do
    row dense "$ctx" --attention dense
    row "DSA all-Full" "$ctx" --index-cache off
    for k in 1/2 1/4 1/8; do row "uniform $k" "$ctx" --keep "$k"; done
    for p in "$@"; do row "pattern $(basename "$p")" "$ctx" --pattern "$p"; done
done
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = {r["ctx"]: r["mean_nll"] for r in rows if r["label"] == "dense"}
full = {r["ctx"]: r["mean_nll"] for r in rows if r["label"] == "DSA all-Full"}
print(f"{'ctx':>6} {'schedule':<28} {'mean NLL':>9} {'vs dense':>9} {'vs all-Full':>11}")
for r in rows:
    c = r["ctx"]
    print(f"{c:>6} {r['label']:<28} {r['mean_nll']:>9.4f} {100*(r['mean_nll']/base[c]-1):>+8.2f}% {100*(r['mean_nll']/full[c]-1):>+10.2f}%")
PY
