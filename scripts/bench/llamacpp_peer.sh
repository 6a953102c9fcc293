#!/usr/bin/env bash
# Peer benchmark against llama.cpp on one checkpoint (issue 8): indexcache vs llama.cpp, CPU.
#
#   bash scripts/bench/llamacpp_peer.sh [--contexts 1024,4096,16384] [--threads 2] [--reps 3]
#        [--decode 32] [--variants full,ic4] [--no-logits] [--no-bench] [--bin PATH]
#
# What it does (every step is cached under $WORK, default bench-out/llamacpp/, git-ignored;
# a re-run skips what is done):
#  1. a venv with the pinned fixture environment (scripts/fixtures/requirements.txt) + cmake;
#  2. the sdist of llama-cpp-python==0.3.36 from PyPI (its JSON API; sha256 checked), whose
#     vendored llama.cpp (commit 0c1e570) runs glm_moe_dsa and honours `indexer_types`;
#  3. llama.cpp built from it: CPU only, Release, AVX2/FMA/F16C fixed at build time (never
#     -march=native), only llama-bench and the small logits tool scripts/bench/llamacpp_logits.cpp;
#  4. indexcache (CPU build, CARGO_TARGET_DIR=target-peer so it never waits on another build's lock),
#     unless --bin is given;
#  5. two random-weight bf16 checkpoints of the configs/small-glm5.json shape
#     (scripts/bench/make_peer_checkpoint.py): all-Full (FFFFFFFF) and IndexCache 1/4 (FSSSFSSS,
#     Shared layers without indexer weights), converted with llama.cpp's own convert_hf_to_gguf.py
#     to a bf16 GGUF (benchmarked) and an f32 GGUF (logits check);
#  6. logits agreement: a fixed 640-token sequence (2.5× index_topk, so the sparse selection is
#     exercised) through `indexcache forward --decode-last 384` (f32) and llamacpp_logits (flash
#     attention off, f32 K/V cache), on the f32 GGUF and on the bf16 GGUF, with the two engines'
#     top-k sets compared row by row (a near-tie at the top-k boundary, decided differently by
#     rounding, makes every later row differ: the table says where and how near the tie was), and
#     llama.cpp's bf16 GGUF against its f32 GGUF (what its bf16 path changes on its own);
#  7. the benchmark: per (context, variant), --reps rounds of llama.cpp then indexcache, alternated
#     so that drift of a shared machine hits both: llama-bench `-p L -n 0` (prefill of L tokens)
#     and `-p 0 -n D -d L` (D decode steps after an L-token context; the context fill is not
#     timed), then `indexcache bench --contexts L --decode D` (one prefill of L tokens + D decode
#     steps), each run under GNU time for its peak RSS; medians over the rounds.
#     Runtime on the 2-core VM, both variants: ~1 min per round at 1K, ~4 min at 4K, ~22 min at
#     16K (llama.cpp's 16K prefill runs twice: measured, then as the decode test's context fill),
#     so the default 3 rounds of 1K/4K/16K take ~1.5 h; `--contexts 1024 --reps 1`: ~4 min.
# Output: $WORK/results/<date>/ (raw.jsonl, logits.jsonl, logs, table.md); the table is printed.
# Both engines use their defaults otherwise (llama-bench: -b 2048 -ub 512, f16 K/V, flash attention
# auto, mmap; indexcache: f32 compute with bf16 weights kept bf16, its default 1024-row prefill
# chunk).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

CONTEXTS=1024,4096,16384
THREADS=2
REPS=3
DECODE=32
VARIANTS=full,ic4
DO_LOGITS=1
DO_BENCH=1
BIN=
while [ $# -gt 0 ]; do
    case "$1" in
        --contexts) CONTEXTS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --decode) DECODE=$2; shift 2 ;;
        --variants) VARIANTS=$2; shift 2 ;;
        --no-logits) DO_LOGITS=0; shift ;;
        --no-bench) DO_BENCH=0; shift ;;
        --bin) BIN=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "llamacpp_peer: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

WORK=${WORK:-$ROOT/bench-out/llamacpp}
LCP_VERSION=0.3.36
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SRC=$WORK/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp
BUILD=$WORK/build
PY=$WORK/venv/bin/python
REPORT=$ROOT/scripts/bench/llamacpp_peer_report.py
SEED=8                 # checkpoint weights
LOGIT_TOKENS=640       # 2.5 x index_topk (256): rows past 256 really select
LOGIT_DECODE=384       # a prefill of 256 tokens, then 384 one-token steps that select too
mkdir -p "$WORK"
trap 'echo "llamacpp_peer: failed at line $LINENO (logs: $WORK, ${RUN:-})" >&2' ERR
log() { printf '[llamacpp_peer %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# 1. Python: the pinned fixture environment (transformers 5.24 has GlmMoeDsa; torch, safetensors,
#    gguf, numpy for the generator, the converter and the comparison) + cmake from PyPI.
if [ ! -e "$WORK/venv/.ok" ]; then
    log "creating $WORK/venv (pinned scripts/fixtures/requirements.txt + cmake)"
    python3 -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q -r scripts/fixtures/requirements.txt cmake
    touch "$WORK/venv/.ok"
fi
CMAKE=$(command -v cmake || echo "$WORK/venv/bin/cmake")

# 2. The sdist, located through PyPI's JSON API (`pip download` would try to build it).
TARBALL=$WORK/llama_cpp_python-$LCP_VERSION.tar.gz
if [ ! -e "$SRC/.ok" ]; then
    if ! echo "$LCP_SHA256  $TARBALL" | sha256sum -c --status 2>/dev/null; then
        log "downloading llama-cpp-python $LCP_VERSION sdist"
        url=$(curl -sfL https://pypi.org/pypi/llama-cpp-python/json | python3 -c '
import json, sys, urllib.parse
base = "https://pypi.org/pypi/llama-cpp-python/json"
for f in json.load(sys.stdin)["releases"][sys.argv[1]]:
    if f["packagetype"] == "sdist":
        print(urllib.parse.urljoin(base, f["url"]))   # the URL may be relative to the API
' "$LCP_VERSION")
        curl -sfL -o "$TARBALL" "$url"
        echo "$LCP_SHA256  $TARBALL" | sha256sum -c --quiet
    fi
    tar -xzf "$TARBALL" -C "$WORK"
    touch "$SRC/.ok"
fi

# 3. llama.cpp: CPU backend only, instruction set fixed at build time, static libraries, no
#    network features (curl/openssl), two jobs (the reference machine has 2 cores).
if [ ! -x "$BUILD/bin/llama-bench" ] || [ ! -x "$BUILD/bin/llamacpp_logits" ] \
    || [ "$ROOT/scripts/bench/llamacpp_logits.cpp" -nt "$BUILD/bin/llamacpp_logits" ]; then
    log "building llama.cpp (llama-bench, llamacpp_logits) in $BUILD"
    "$CMAKE" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_CCACHE=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON > "$WORK/cmake-config.log"
    "$CMAKE" --build "$BUILD" --target llama-bench -j 2 > "$WORK/cmake-build.log"
    # The logits tool links the same static libraries llama-bench was just linked with.
    libs=("$BUILD/src/libllama.a" "$BUILD/ggml/src/libggml.a" "$BUILD/ggml/src/libggml-cpu.a" "$BUILD/ggml/src/libggml-base.a")
    g++ -O2 -std=c++17 -I"$SRC/include" -I"$SRC/ggml/include" "$ROOT/scripts/bench/llamacpp_logits.cpp" \
        "${libs[@]}" -fopenmp -lpthread -ldl -o "$BUILD/bin/llamacpp_logits"
fi

# 4. indexcache, CPU build.
if [ -z "$BIN" ]; then
    log "cargo build --release -p indexcache-cli (target-peer)"
    CARGO_TARGET_DIR=$ROOT/target-peer cargo build --release -q -p indexcache-cli
    BIN=$ROOT/target-peer/release/indexcache
fi

# 5. Checkpoints and GGUFs.
declare -A PATTERN=([full]=FFFFFFFF [ic4]=FSSSFSSS)
declare -A NAME=([full]=all-Full [ic4]="IndexCache 1/4")
IFS=, read -r -a variants <<< "$VARIANTS"
mkdir -p "$WORK/gguf"
for v in "${variants[@]}"; do
    [ -n "${PATTERN[$v]:-}" ] || { echo "llamacpp_peer: unknown variant $v (full, ic4)" >&2; exit 2; }
    ck=$WORK/ckpt-$v
    if [ ! -e "$ck/.ok" ]; then
        log "checkpoint $v (${PATTERN[$v]}) -> $ck"
        "$PY" scripts/bench/make_peer_checkpoint.py --config configs/small-glm5.json --pattern "${PATTERN[$v]}" \
            --vocab-gguf "$SRC/models/ggml-vocab-deepseek-coder.gguf" --seed "$SEED" --out "$ck"
        touch "$ck/.ok"
    fi
    for ty in bf16 f32; do
        g=$WORK/gguf/$v-$ty.gguf
        [ "$ty" = f32 ] && [ "$DO_LOGITS" = 0 ] && continue
        if [ ! -e "$g" ] || [ "$ck/.ok" -nt "$g" ]; then
            log "convert_hf_to_gguf.py $v --outtype $ty"
            "$PY" "$SRC/convert_hf_to_gguf.py" "$ck" --outtype "$ty" --outfile "$g.tmp" > "$WORK/convert-$v-$ty.log" 2>&1 \
                || { tail -n 20 "$WORK/convert-$v-$ty.log" >&2; exit 1; }
            mv "$g.tmp" "$g"
        fi
    done
done

RUN=$WORK/results/$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN/logs"
touch "$RUN/raw.jsonl" "$RUN/logits.jsonl"
export RAYON_NUM_THREADS=$THREADS
# Pin to the first THREADS cores where the machine has more (as scripts/bench/cpu_threads.sh).
PIN=()
if [ "$(nproc)" -gt "$THREADS" ] && command -v taskset > /dev/null; then PIN=(taskset -c "0-$((THREADS - 1))"); fi
{
    echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $THREADS threads"
    echo "indexcache: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo '+dirty'), $BIN"
    echo "llama.cpp: $(cat "$SRC/../../.git/modules/vendor/llama.cpp/HEAD" 2>/dev/null | cut -c1-7) (llama-cpp-python $LCP_VERSION sdist)"
    echo "checkpoints: configs/small-glm5.json shape, bf16, seed $SEED: $(for v in "${variants[@]}"; do printf '%s %s (%s MiB safetensors, %s MiB bf16 GGUF)  ' "$v" "${PATTERN[$v]}" \
        $(( $(stat -c %s "$WORK/ckpt-$v/model.safetensors") >> 20 )) $(( $(stat -c %s "$WORK/gguf/$v-bf16.gguf") >> 20 )); done)"
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ); contexts $CONTEXTS; decode $DECODE; reps $REPS"
} | tee "$RUN/header.txt" >&2

# 6. Logits agreement.
if [ "$DO_LOGITS" = 1 ]; then
    "$PY" "$REPORT" ids "$LOGIT_TOKENS" 1 32768 > "$RUN/ids.txt"
    for v in "${variants[@]}"; do
        log "logits: $v"
        "${PIN[@]}" "$BIN" forward --device cpu --dtype f32 -m "$WORK/ckpt-$v" --input-ids "$(cat "$RUN/ids.txt")" \
            --decode-last "$LOGIT_DECODE" --out "$RUN/logits-ours-$v.safetensors" 2> "$RUN/logs/forward-$v.log" \
            || { tail -n 5 "$RUN/logs/forward-$v.log" >&2; exit 1; }
        for ty in f32 bf16; do
            "${PIN[@]}" "$BUILD/bin/llamacpp_logits" "$WORK/gguf/$v-$ty.gguf" "$RUN/ids.txt" "$RUN/logits-llama-$v-$ty" \
                "$THREADS" "$LOGIT_DECODE" > /dev/null 2> "$RUN/logs/llamacpp_logits-$v-$ty.log" \
                || { tail -n 5 "$RUN/logs/llamacpp_logits-$v-$ty.log" >&2; exit 1; }
            "$PY" "$REPORT" compare "$RUN/logits-ours-$v.safetensors" "$RUN/logits-llama-$v-$ty" "$RUN/ids.txt" \
                "${PATTERN[$v]}" "${NAME[$v]}: indexcache vs $ty GGUF" >> "$RUN/logits.jsonl"
        done
        "$PY" "$REPORT" compare "$RUN/logits-llama-$v-bf16" "$RUN/logits-llama-$v-f32" "$RUN/ids.txt" \
            "${PATTERN[$v]}" "${NAME[$v]}: llama.cpp bf16 GGUF vs f32 GGUF" >> "$RUN/logits.jsonl"
        rm -f "$RUN/logits-llama-$v"-* "$RUN/logits-ours-$v.safetensors"   # ~130 MB each; kept: logits.jsonl
    done
fi

# 7. The benchmark, alternating engines.
if [ "$DO_BENCH" = 1 ]; then
    IFS=, read -r -a contexts <<< "$CONTEXTS"
    for ctx in "${contexts[@]}"; do
        for v in "${variants[@]}"; do
            for rep in $(seq 1 "$REPS"); do
                tag=$v-$ctx-r$rep
                log "llama.cpp $tag"
                for kind in pp tg; do
                    if [ "$kind" = pp ]; then args=(-p "$ctx" -n 0); else args=(-p 0 -n "$DECODE" -d "$ctx"); fi
                    # llama-bench warms up a prefill test with a whole extra prefill: minutes at 16K for
                    # a first-touch effect of well under 1 % there, so only short prefills get one.
                    if [ "$kind" = pp ] && [ "$ctx" -gt 4096 ]; then args+=(--no-warmup); fi
                    /usr/bin/time -v -o "$RUN/logs/llama-$kind-$tag.time" "${PIN[@]}" "$BUILD/bin/llama-bench" \
                        -m "$WORK/gguf/$v-bf16.gguf" -t "$THREADS" "${args[@]}" -r 1 -o json \
                        > "$RUN/logs/llama-$kind-$tag.json" 2> "$RUN/logs/llama-$kind-$tag.log" \
                        || { tail -n 5 "$RUN/logs/llama-$kind-$tag.log" >&2; exit 1; }
                    "$PY" "$REPORT" record llama.cpp "${NAME[$v]}" "$ctx" "$rep" "$kind" \
                        "$RUN/logs/llama-$kind-$tag.json" "$RUN/logs/llama-$kind-$tag.time" >> "$RUN/raw.jsonl"
                done
                log "indexcache $tag"
                /usr/bin/time -v -o "$RUN/logs/ours-$tag.time" "${PIN[@]}" "$BIN" bench --device cpu -m "$WORK/ckpt-$v" \
                    --contexts "$ctx" --patterns config --decode "$DECODE" --repeats 1 --json "$RUN/logs/ours-$tag.json" \
                    > "$RUN/logs/ours-$tag.log" 2>&1 || { tail -n 5 "$RUN/logs/ours-$tag.log" >&2; exit 1; }
                "$PY" "$REPORT" record indexcache "${NAME[$v]}" "$ctx" "$rep" both \
                    "$RUN/logs/ours-$tag.json" "$RUN/logs/ours-$tag.time" >> "$RUN/raw.jsonl"
            done
        done
    done
fi

{
    cat "$RUN/header.txt"
    echo
    "$PY" "$REPORT" table "$RUN/raw.jsonl" "$RUN/logits.jsonl"
} | tee "$RUN/table.md"
log "results in $RUN"
