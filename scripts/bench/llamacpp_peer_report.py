#!/usr/bin/env python3
"""Helpers of scripts/bench/llamacpp_peer.sh: the fixed token ids, the logits comparison and the table.

  ids N SEED VOCAB                 print N seeded pseudo-random token ids, comma-separated
  compare A B IDS_FILE PATTERN LABEL
                                   one JSON line: run A (indexcache `forward --decode-last` output,
                                   .safetensors, or a llamacpp_logits OUT_PREFIX) against the
                                   llamacpp_logits run B (OUT_PREFIX.prefill.f32, .decode.f32, .topk.*)
  record ENGINE VARIANT CTX REP KIND JSON TIME_LOG
                                   one JSON line of raw.jsonl from a llama-bench `-o json` or an
                                   `indexcache bench --json` file and GNU time's `-v` log
  table RAW.jsonl [LOGITS.jsonl]   the peer table (medians over repetitions) and the logits lines

Needs numpy and safetensors only for `compare` (the pinned venv has them).
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys


def cmd_ids(n: str, seed: str, vocab: str) -> None:
    rng = random.Random(int(seed))
    # Below 32000: plain BPE tokens of the checkpoint's tokenizer (no added/special ids).
    print(",".join(str(rng.randrange(min(int(vocab), 32000))) for _ in range(int(n))))


def log_softmax(x):
    import numpy as np

    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def load_run(source: str, pattern: str, vocab: int | None = None) -> dict:
    """One engine's logits, decode logits and top-k sets (keyed by the Full layer that computed them).

    source: indexcache `forward` output (.safetensors), or a llamacpp_logits OUT_PREFIX. llama.cpp
    names a set after the last layer that used it (a Shared layer renames its source's tensor), so
    its sets are re-keyed by source layer; its indexer scores come along (`scores`).
    """
    import numpy as np
    from safetensors.numpy import load_file

    if source.endswith(".safetensors"):
        f = load_file(source)
        return {"logits": f["logits"], "decode": f["decode_logits"], "scores": None,
                "topk": {int(k[len("topk.layer"):]): v for k, v in f.items() if k.startswith("topk.layer")}}
    out = {"logits": np.fromfile(source + ".prefill.f32", dtype=np.float32).reshape(-1, vocab),
           "decode": np.fromfile(source + ".decode.f32", dtype=np.float32).reshape(-1, vocab),
           "topk": {}, "scores": {}}
    for line in open(source + ".topk.txt"):
        name, rows, cols = line.split()
        dtype = np.int32 if name.endswith(".i32") else np.float32
        data = np.fromfile(f"{source}.topk.{name}", dtype=dtype).reshape(int(rows), int(cols))
        kind, layer = name[:-4].rsplit("-", 1)
        if kind == "top_k":
            src = max(i for i in range(int(layer) + 1) if pattern[i] == "F")
            out["topk"][src] = data
        else:
            out["scores"][int(layer)] = data
    return out


def first_topk_difference(a: dict, b: dict, t: int):
    """The first (row, layer) — rows in order, then layers — where two runs' top-k sets differ.

    Every earlier row agrees in every layer, and this row agrees in the earlier layers, so this is
    where the selections start to diverge. Returns (row, layer, gap), gap = the spread of run b's
    indexer scores over the keys the runs disagree on, over the row's max |score| (at the level of
    the engines' rounding differences: a near-tie), or None.
    """
    import numpy as np

    assert sorted(a["topk"]) == sorted(b["topk"]), (sorted(a["topk"]), sorted(b["topk"]))
    for r in range(t):
        for layer in sorted(a["topk"]):
            sets = []
            for run in (a, b):
                row = run["topk"][layer][r]
                sets.append(set(row[(row >= 0) & (row <= r)].tolist()))  # llama.cpp also picks masked keys
            if sets[0] != sets[1]:
                scores = b["scores"][layer][r, : r + 1].astype(np.float64)
                d = sorted(sets[0] ^ sets[1])
                return r, layer, float((scores[d].max() - scores[d].min()) / np.abs(scores).max())
    return None


def cmd_compare(a_src: str, b_src: str, ids_path: str, pattern: str, label: str) -> None:
    """Run a against the reference run b (b: a llamacpp_logits prefix)."""
    import numpy as np

    ids = np.array([int(t) for t in open(ids_path).read().replace(",", " ").split()])
    vocab = None if a_src.endswith(".safetensors") else 32768
    a = load_run(a_src, pattern, vocab)
    b = load_run(b_src, pattern, a["logits"].shape[1])
    a_pre, a_dec = a["logits"].astype(np.float64), a["decode"].astype(np.float64)
    b_pre, b_dec = b["logits"].astype(np.float64), b["decode"].astype(np.float64)
    assert a_pre.shape == b_pre.shape and a_dec.shape == b_dec.shape, (a_pre.shape, b_pre.shape, a_dec.shape, b_dec.shape)
    t, n = a_pre.shape[0], a_dec.shape[0]

    def rel(x, y):  # per row: max |x - y| / max |y|
        return np.abs(x - y).max(axis=1) / np.abs(y).max(axis=1)

    first = first_topk_difference(a, b, t)
    agree = first[0] if first else t  # rows [0, agree) selected identical top-k sets in every layer
    # NLL of the next token under each run, rows 0..T-2 of the prefill.
    nll_a = -log_softmax(a_pre[:-1])[np.arange(t - 1), ids[1:]]
    nll_b = -log_softmax(b_pre[:-1])[np.arange(t - 1), ids[1:]]
    r_pre, r_dec = rel(a_pre, b_pre), rel(a_dec, b_dec)  # decode row j is position t - n + j
    dec_agree = r_dec[: max(0, agree - (t - n))]
    print(json.dumps({
        "label": label,
        "tokens": t,
        "decode_steps": n,
        "topk_identical_rows": agree,
        "first_topk_difference": None if first is None else {"row": first[0], "layer": first[1], "score_gap": first[2]},
        "rel_max_identical_rows": float(r_pre[:agree].max()),
        "rel_median_identical_rows": float(np.median(r_pre[:agree])),
        "decode_rel_max_identical_rows": float(dec_agree.max()) if len(dec_agree) else None,
        "decode_steps_identical_rows": int(len(dec_agree)),
        "last_token_rel": float(r_pre[-1]),
        "prefill_rel_max": float(r_pre.max()),
        "decode_rel_max": float(r_dec.max()),
        "nll_abs_diff_mean": float(np.abs(nll_a - nll_b).mean()),
        "nll_abs_diff_max": float(np.abs(nll_a - nll_b).max()),
        "mean_nll_a": float(nll_a.mean()),
        "mean_nll_b": float(nll_b.mean()),
        "argmax_agree": float((a_pre.argmax(1) == b_pre.argmax(1)).mean()),
        "finite": bool(np.isfinite(a_pre).all() and np.isfinite(b_pre).all()),
    }))


def max_rss_kib(time_log: str) -> int:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(time_log).read())
    return int(m.group(1)) if m else 0


def cmd_record(engine, variant, ctx, rep, kind, json_path, time_log) -> None:
    rec = {"engine": engine, "variant": variant, "ctx": int(ctx), "rep": int(rep), "kind": kind,
           "max_rss_kib": max_rss_kib(time_log)}
    data = json.load(open(json_path))
    if engine == "llama.cpp":  # a list of tests; this script runs one per invocation
        (test,) = data
        rec["tok_s"] = test["avg_ts"]
        rec["build"] = test.get("build_commit")
    else:
        (row,) = data["rows"]
        if row.get("error"):
            rec["error"] = row["error"]
        rec["prefill_tok_s"] = row["prefill_tok_s"]
        rec["decode_tok_s"] = row["decode_tok_s"]
        rec["schedule"] = row["schedule"]
        rec["peak_memory_bytes"] = row.get("peak_memory_bytes")
    print(json.dumps(rec))


def cmd_table(raw_path: str, logits_path: str | None = None) -> None:
    recs = [json.loads(line) for line in open(raw_path) if line.strip()]
    keys = sorted({(r["ctx"], r["variant"]) for r in recs}, key=lambda k: (k[0], k[1] != "all-Full"))

    def med(vals):
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def f(v, fmt="{:.1f}"):
        return "—" if v is None else fmt.format(v)

    if keys:
        print("| context | variant | llama.cpp prefill / decode tok/s | indexcache prefill / decode tok/s "
              "| decode ratio | prefill ratio | peak RSS llama.cpp / indexcache | runs |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for ctx, var in keys:
        rs = [r for r in recs if r["ctx"] == ctx and r["variant"] == var]
        pp = med([r["tok_s"] for r in rs if r["engine"] == "llama.cpp" and r["kind"] == "pp"])
        tg = med([r["tok_s"] for r in rs if r["engine"] == "llama.cpp" and r["kind"] == "tg"])
        ours = [r for r in rs if r["engine"] == "indexcache"]
        opp, otg = med([r["prefill_tok_s"] for r in ours]), med([r["decode_tok_s"] for r in ours])
        # Peak RSS of llama.cpp: the larger of its prefill and decode runs, per repetition.
        reps = sorted({r["rep"] for r in rs})
        lrss = med([max([r["max_rss_kib"] for r in rs if r["engine"] == "llama.cpp" and r["rep"] == k] or [0])
                    for k in reps])
        orss = med([r["max_rss_kib"] for r in ours])
        ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
        ctx_s = f"{ctx // 1024}K" if ctx % 1024 == 0 else str(ctx)
        print(f"| {ctx_s} | {var} | {f(pp)} / {f(tg)} | {f(opp)} / {f(otg)} | {f(ratio(otg, tg), '{:.2f}×')} "
              f"| {f(ratio(opp, pp), '{:.2f}×')} | {f(lrss and lrss / 1024, '{:.0f}')} / {f(orss and orss / 1024, '{:.0f}')} MiB "
              f"| {len(reps)} |")
    checks = [json.loads(line) for line in open(logits_path) if line.strip()] if logits_path else []
    if checks:
        print()
        print("Logits agreement, indexcache (f32) vs llama.cpp (flash attention off, f32 K/V cache). "
              "rel = max|Δlogit| / max|logit| of a row. The engines' top-k sets are compared row by row; "
              "\"identical rows\" = the rows before the first difference in any layer, which both engines "
              "compute from the same selections; the first difference's score gap = the spread of llama.cpp's "
              "indexer scores over the swapped keys / the row's max |score| (a near-tie when at the level of "
              "the rounding differences). Decode: a prefill of 256 tokens, then one-token steps. "
              "The bf16 GGUF's own line against the f32 GGUF shows what llama.cpp's bf16 path does alone "
              "(its CPU matmul rounds activations to bf16).")
        print()
        print("| run vs llama.cpp run | identical rows of T | first top-k difference (row, layer: score gap) "
              "| max rel, identical rows: prefill / decode | max rel, all rows: prefill / decode "
              "| mean \\|ΔNLL\\| | argmax agree |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for c in checks:
            fd = c["first_topk_difference"]
            fd_s = "none" if fd is None else f"row {fd['row']}, layer {fd['layer']}: {fd['score_gap']:.1e}"
            dec = c["decode_rel_max_identical_rows"]
            print(f"| {c['label']} | {c['topk_identical_rows']} of {c['tokens']} | {fd_s} "
                  f"| {c['rel_max_identical_rows']:.1e} / {'—' if dec is None else f'{dec:.1e}'} "
                  f"| {c['prefill_rel_max']:.1e} / {c['decode_rel_max']:.1e} "
                  f"| {c['nll_abs_diff_mean']:.1e} | {c['argmax_agree']:.3f} |")


if __name__ == "__main__":
    cmds = {"ids": cmd_ids, "compare": cmd_compare, "record": cmd_record, "table": cmd_table}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[sys.argv[1]](*sys.argv[2:])
