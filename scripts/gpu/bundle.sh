#!/usr/bin/env bash
# Build everything the GPU check needs on THIS machine (the GPU machine has no Rust) and copy it,
# stripped, into gpu-bundle/ (git-ignored): the CLI with `--features cuda`, the CUDA test
# binaries (kernel tests and the model conformance suite) and the kernel benchmark.
# Then on the GPU machine, from the repo root: bash scripts/gpu/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=gpu-bundle
tgt=${CARGO_TARGET_DIR:-target}
rm -rf "$out" && mkdir -p "$out/tests"
cargo build --release --locked -p indexcache-cli --features cuda
cp "$tgt"/release/indexcache "$out/"
cargo build --release --locked -p indexcache-cuda --examples
cp "$tgt"/release/examples/kernel_bench "$out/"
# Test executables of the cuda crate, by target name.
cargo test --release --locked -p indexcache-cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        if m["target"]["kind"] == ["lib"]:
            name = "lib"
        shutil.copy(m["executable"], f"gpu-bundle/tests/{name}")
        print("test binary:", name)
'
strip "$out"/indexcache "$out"/kernel_bench "$out"/tests/*
du -sh "$out"
