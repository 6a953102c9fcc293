#!/usr/bin/env bash
# Runs the README's "Worked example" block exactly as written, top to bottom (each command echoed,
# the first failure stops it), after removing the outputs of an earlier run so `search` starts
# fresh. Takes ~15 min on a 2-core CPU with the default model.
#   bash scripts/results/worked_example.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
block=$(awk '/^## Worked example/{w=1} w&&/^```sh$/{f=1;next} f&&/^```$/{exit} f' README.md)
[ -n "$block" ] || { echo "worked_example: no sh block under '## Worked example' in README.md" >&2; exit 1; }
rm -rf runs/overlap runs/pattern.json runs/pattern.loss.png runs/pattern.loss.svg runs/model-ic
bash -euxo pipefail -c "$block"
