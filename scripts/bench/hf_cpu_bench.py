#!/usr/bin/env python3
"""CPU benchmark of the HF transformers peer (GlmMoeDsaForCausalLM) for docs/PERF.md.

Builds `GlmMoeDsaForCausalLM` from an indexcache model config with seeded random weights,
`attn_implementation="sdpa"`, and measures, per (context, IndexCache pattern):

* prefill: one forward over a fixed random prompt of L tokens with `use_cache=True` and
  `logits_to_keep=1` (= time to first token), after a 64-token warm-up forward on the same model;
* decode: `--decode` greedy one-token steps reusing the prefill cache (tokens/s);
* peak RSS (`ru_maxrss`) of the process that ran the case.

Every case runs in its own child process (fresh model, so `ru_maxrss` is per case and a crash or
OOM kill cannot take the driver down). Before a case starts, its memory need is estimated
(transformers materialises fp32 indexer scores [L, index_heads, L] and dense [heads, L, L]
attention scores per layer) and the case is skipped when the estimate exceeds MemAvailable.
The child also caps its address space (RLIMIT_AS) to the memory available, so an allocation
that the estimate missed raises instead of invoking the OOM killer.

Patterns: `full` (every layer runs the indexer), `a/b` (uniform keep with layer 0 Full:
n_full = max(1, ceil(n*a/b)), Full layers = floor(i*n/n_full)), or an explicit string such as
`FSSSFSSS`. Shared layers are built without an indexer (config `indexer_types`).

Example (the PERF.md numbers):
    /work/pyenv/bin/python scripts/bench/hf_cpu_bench.py --config configs/small-glm5.json \
        --contexts 1k,4k,16k --patterns full,1/4 --decode 16 --threads 2 \
        --json target/bench/hf_cpu_bench.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

GIB = 1024**3
RESULT_TAG = "HF_CPU_BENCH_RESULT "

# Driver-side helpers (no torch import here: the driver stays small so the children get the memory).


def parse_contexts(text: str) -> list[int]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        mult = 1
        if tok.endswith("k"):
            mult, tok = 1024, tok[:-1]
        elif tok.endswith("m"):
            mult, tok = 1024 * 1024, tok[:-1]
        val = int(float(tok) * mult)
        if val < 1:
            raise argparse.ArgumentTypeError(f"context must be >= 1: {tok!r}")
        out.append(val)
    if not out:
        raise argparse.ArgumentTypeError("no contexts given")
    return out


def pattern_layout(spec: str, n_layers: int) -> str:
    """Return the per-layer layout ('F'/'S' string) for a pattern spec."""
    s = spec.strip()
    if s.lower() == "full":
        return "F" * n_layers
    if "/" in s:
        num, den = (int(x) for x in s.split("/", 1))
        if num < 1 or den < 1 or num > den:
            raise ValueError(f"bad keep fraction {spec!r}")
        n_full = max(1, math.ceil(n_layers * num / den))
        full = {(i * n_layers) // n_full for i in range(n_full)}
        return "".join("F" if i in full else "S" for i in range(n_layers))
    up = s.upper()
    if set(up) <= {"F", "S"}:
        if len(up) != n_layers:
            raise ValueError(f"pattern {spec!r} has {len(up)} layers, model has {n_layers}")
        if up[0] != "F":
            raise ValueError(f"pattern {spec!r}: layer 0 must be Full (a Shared layer needs a preceding Full one)")
        return up
    raise ValueError(f"unknown pattern {spec!r} (use full, a/b, or an F/S string)")


def count_params(cfg: dict, layout: str) -> dict:
    """Analytic parameter count of GlmMoeDsaForCausalLM for this config and indexer layout."""
    h = cfg["hidden_size"]
    n = cfg["num_hidden_layers"]
    H = cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    Hi, Di = cfg["index_n_heads"], cfg["index_head_dim"]
    E, mi, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    ns = cfg.get("n_shared_experts", 1)
    vocab = cfg["vocab_size"]
    n_dense = min(cfg.get("first_k_dense_replace", 3), n)
    attn = h * qr + qr + qr * H * (nope + rope) + h * (kvr + rope) + kvr + kvr * H * (nope + v) + H * v * h + 2 * h
    indexer = qr * Hi * Di + h * Di + 2 * Di + h * Hi
    dense = 3 * h * I
    moe = 3 * E * mi * h + 3 * h * mi * ns
    router = E * h
    total = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + h
    fp32 = 0  # params kept in fp32 when running bf16 (router, indexer weights_proj)
    for i in range(n):
        total += attn + (dense if i < n_dense else moe + router)
        if i >= n_dense:
            fp32 += router
        if layout[i] == "F":
            total += indexer
            fp32 += h * Hi
    return {"total": total, "fp32": fp32}


def estimate_bytes(cfg: dict, layout: str, L: int, dtype: str) -> dict:
    """Conservative estimate of the peak RSS of one case (prefill of L tokens dominates).

    Quadratic terms (per layer, freed before the next layer, so counted once):
      * SDPA on CPU falls back to the math kernel (q head dim 96 != v head dim 64 here), which
        materialises fp32 [heads, L, L] scores and their softmax (2 x 4*heads bytes per L^2;
        bfloat16 additionally keeps reduced-precision copies: + 2 x 2*heads);
      * the indexer (Full layers) builds fp32 [L, index_heads, L] scores and their ReLU copy
        (2 x 4*index_heads) plus fp32 [L, L] index scores; not live at the same time as the above;
      * bool masks [L, L] (causal, top-k index mask, combined): ~8 bytes per L^2.
    Linear terms: q/k/v expansions, MLP/MoE activations, top-k indices, per token.
    Calibrated on this config against measured peak-RSS deltas at L = 512..2048 (fp32: ~136 B/L^2
    + ~62 KB/token; bf16 slightly more), activations padded by 25 %.
    """
    H = cfg["num_attention_heads"]
    Hi = cfg["index_n_heads"]
    h = cfg["hidden_size"]
    n = cfg["num_hidden_layers"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    v = cfg["v_head_dim"]
    Di = cfg["index_head_dim"]
    I = cfg["intermediate_size"]
    mi = cfg["moe_intermediate_size"]
    K = cfg["num_experts_per_tok"]
    E = cfg["n_routed_experts"]
    ns = cfg.get("n_shared_experts", 1)
    topk = cfg["index_topk"]
    b = 2 if dtype == "bfloat16" else 4
    p = count_params(cfg, layout)
    weights = (p["total"] - p["fp32"]) * b + p["fp32"] * 4
    runtime = int(0.85 * GIB)  # python + torch + transformers import, allocator slack
    attn_quad = 2 * 4 * H + (2 * 2 * H if b == 2 else 0)
    idx_quad = (2 * 4 * Hi + 2 * 4) if "F" in layout else 0
    quad = L * L * (max(attn_quad, idx_quad) + 8)
    per_token = 4 * (6 * H * qk + 3 * H * v + 12 * h + 3 * max(I, (K + ns) * mi * 2) + 3 * Hi * Di) + 16 * topk + 8 * K * (E + 1)
    linear = L * per_token
    kv_cache = n * L * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + Di) * b * 2
    total = runtime + weights + int(1.25 * (quad + linear)) + kv_cache
    return {"total": total, "weights": weights, "quadratic": quad, "linear": linear, "params": p["total"]}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def machine_info() -> dict:
    info: dict = {"hostname": platform.node(), "kernel": platform.release(), "python": platform.python_version()}
    model, procs, phys = None, 0, set()
    cur: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if cur:
                        phys.add((cur.get("physical id"), cur.get("core id")))
                    cur = {}
                    continue
                k, _, val = line.partition(":")
                k, val = k.strip(), val.strip()
                cur[k] = val
                if k == "model name" and model is None:
                    model = val
                if k == "processor":
                    procs += 1
            if cur:
                phys.add((cur.get("physical id"), cur.get("core id")))
    except OSError:
        pass
    info["cpu_model"] = model
    info["logical_cpus"] = procs or os.cpu_count()
    info["physical_cores"] = len(phys) if phys and None not in next(iter(phys)) else None
    info["affinity_cpus"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/meminfo") as f:
            mi = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.split()[1:2]}
        info["mem_total_gib"] = round(mi["MemTotal"] / GIB, 2)
        info["mem_available_gib_at_start"] = round(mi["MemAvailable"] / GIB, 2)
    except (OSError, KeyError, ValueError):
        pass
    try:
        info["loadavg_at_start"] = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        pass
    return info


def pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


# Worker (child process): builds the model and measures one case.


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"


def build_model(cfg: dict, layout: str, dtype_name: str, seed: int, experts_impl: str | None):
    import zlib

    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    cfg = dict(cfg)
    for k in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    cfg["indexer_types"] = ["full" if c == "F" else "shared" for c in layout]
    config = GlmMoeDsaConfig(**cfg)
    dtype = getattr(torch, dtype_name)
    kwargs = {"attn_implementation": "sdpa", "dtype": dtype}
    if experts_impl:
        kwargs["experts_implementation"] = experts_impl
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layout: fall back to default init, then overwrite below
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = GlmMoeDsaForCausalLM._from_config(config, **kwargs)
    # Seeded init keyed by parameter *name*, so layers common to two patterns get identical weights
    # (same routing, same attention) whether or not other layers carry an indexer.
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
                tmp = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g)
                p.copy_(tmp)
                del tmp
            elif name.endswith(".bias"):
                p.zero_()
            else:  # RMSNorm / LayerNorm weights
                p.fill_(1.0)
        # Keep the modules transformers keeps in fp32 on load (router, indexer weights_proj) in fp32.
        if dtype != torch.float32:
            for name, mod in model.named_modules():
                if name.endswith("indexer.weights_proj") or name.endswith("mlp.gate"):
                    mod.float()
    model.eval()
    return model, config


def _forward(model, ids, cache, cache_kw):
    kw = {"use_cache": True, "logits_to_keep": 1}
    if cache is not None:
        kw[cache_kw] = cache
    out = model(input_ids=ids, **kw)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits, new_cache


def run_case(spec: dict, res: dict) -> dict:
    """Measure one case; fills `res` as it goes, so a failure keeps what was measured before it."""
    import inspect

    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    res["torch_threads"] = torch.get_num_threads()
    res["torch_version"] = torch.__version__
    try:
        import transformers

        res["transformers_version"] = transformers.__version__
    except Exception:
        pass
    try:
        res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass

    if spec.get("rlimit", True):
        import resource

        # Address-space cap: what is mapped now (libraries, arenas) + what the machine can still give.
        room = int(0.92 * mem_available()) + 256 * 1024 * 1024
        if spec.get("max_mem_bytes"):
            room = min(room, spec["max_mem_bytes"] - _rss_now())
        cap = _vm_size() + max(room, 0)
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
        res["rlimit_as_gib"] = round(cap / GIB, 2)

    cfg, layout, L = spec["config"], spec["layout"], spec["context"]
    t0 = time.perf_counter()
    impl = spec.get("experts_impl") or None
    model, config = build_model(cfg, layout, spec["dtype"], spec["seed"], impl)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    res["build_s"] = round(time.perf_counter() - t0, 3)
    res["n_params"] = sum(p.numel() for p in model.parameters())
    res["attn_implementation"] = config._attn_implementation
    vocab = cfg["vocab_size"]

    with torch.inference_mode():
        # Warm-up: one short prefill + two decode steps (first-call allocations, kernel selection).
        wg = torch.Generator().manual_seed(spec["seed"] + 7)
        warm_ids = torch.randint(0, vocab, (1, spec["warmup"]), generator=wg)

        def warm():
            logits, cache = _forward(model, warm_ids, None, cache_kw)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):
                logits, cache = _forward(model, tok, cache, cache_kw)
                tok = logits[:, -1].argmax(-1, keepdim=True)

        try:
            warm()
        except (RuntimeError, NotImplementedError) as e:
            if impl is not None or "eager" == getattr(config, "_experts_implementation", None):
                raise
            # grouped_mm unavailable on this CPU build: rebuild with the eager experts loop.
            res["experts_fallback"] = _first_line(e)
            del model
            impl = "eager"
            model, config = build_model(cfg, layout, spec["dtype"], spec["seed"], impl)
            warm()
        res["experts_implementation"] = getattr(config, "_experts_implementation", None)
        res["rss_after_warmup_gib"] = round(_rss_now() / GIB, 3)

        pg = torch.Generator().manual_seed(spec["seed"] * 31 + L)
        prompt = torch.randint(0, vocab, (1, L), generator=pg)

        times = []
        for _ in range(spec["repeats"]):
            cache = None
            t = time.perf_counter()
            logits, cache = _forward(model, prompt, None, cache_kw)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t)
            if len(times) < spec["repeats"]:
                del logits, cache
        res["prefill_s_all"] = [round(x, 4) for x in times]
        res["prefill_s"] = statistics.median(times)
        res["prefill_tok_s"] = L / res["prefill_s"]
        res["rss_after_prefill_gib"] = round(_rss_now() / GIB, 3)
        res["peak_rss_prefill_gib"] = round(_peak_rss() / GIB, 3)

        generated = [int(tok)]
        step_times = []
        for _ in range(spec["decode"]):
            t = time.perf_counter()
            logits, cache = _forward(model, tok, cache, cache_kw)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            step_times.append(time.perf_counter() - t)
            generated.append(int(tok))
        if step_times:
            res["decode_s"] = sum(step_times)
            res["decode_tok_s"] = len(step_times) / sum(step_times)
            res["decode_ms_per_token_median"] = 1000 * statistics.median(step_times)
        res["generated_ids"] = generated
        try:
            res["cache_seq_len"] = int(cache.get_seq_length())
        except Exception:
            pass
    res["peak_rss_gib"] = round(_peak_rss() / GIB, 3)
    res["status"] = "ok"
    return res


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    out: dict = {}
    try:
        run_case(spec, out)
    except (RuntimeError, MemoryError, NotImplementedError, ValueError) as e:
        out["status"] = f"failed: {_first_line(e)}"
        out["peak_rss_gib"] = round(_peak_rss() / GIB, 3)
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


# Driver.


def fmt(x, nd):
    return "—" if x is None else f"{x:.{nd}f}"


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| context | pattern | prefill s | prefill tok/s | decode tok/s | peak RSS GiB | status |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        pat = r["pattern"] if r["pattern"] == r["layout"] else f"{r['pattern']} ({r['layout']})"
        lines.append(
            f"| {r['context']:,} | {pat} | {fmt(r.get('prefill_s'), 3)} | {fmt(r.get('prefill_tok_s'), 1)} | "
            f"{fmt(r.get('decode_tok_s'), 2)} | {fmt(r.get('peak_rss_gib'), 2)} | {r['status']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small-glm5.json", help="model config JSON (GlmMoeDsa fields)")
    ap.add_argument("--contexts", default="1k,4k,16k", help="comma list of prompt lengths, e.g. 1k,4k,16k or 256")
    ap.add_argument("--patterns", default="full,1/4", help="comma list: full, a/b keep fractions, or F/S strings")
    ap.add_argument("--decode", type=int, default=16, help="greedy decode steps after prefill")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and OMP/MKL threads)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--json", dest="json_out", default=None, help="write results JSON here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=64, help="warm-up prefill length")
    ap.add_argument("--repeats", type=int, default=1, help="prefills per case (median reported)")
    ap.add_argument("--experts-impl", default=None, help="force experts_implementation (default: transformers' choice, eager if it fails)")
    ap.add_argument("--mem-fraction", type=float, default=0.90, help="skip a case whose estimate exceeds this fraction of MemAvailable")
    ap.add_argument("--max-mem-gib", type=float, default=None,
                    help="treat min(MemAvailable, this) as the memory a case may use (estimate check and child RLIMIT_AS)")
    ap.add_argument("--no-rlimit", action="store_true", help="do not cap the child's address space")
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds before a case is killed (default: none)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        return worker_main(args.worker)

    with open(args.config) as f:
        cfg = json.load(f)
    n_layers = cfg["num_hidden_layers"]
    contexts = parse_contexts(args.contexts)
    patterns = [(p.strip(), pattern_layout(p, n_layers)) for p in args.patterns.split(",") if p.strip()]

    report = {
        "benchmark": "hf_cpu_bench",
        "description": "HF transformers GlmMoeDsaForCausalLM (sdpa, random weights) prefill/decode on CPU, one process per case",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine_info(),
        "software": {"torch": pkg_version("torch"), "transformers": pkg_version("transformers"), "python": platform.python_version()},
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "config": {"path": args.config, **{k: cfg.get(k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim",
            "index_topk", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "vocab_size")}},
        "patterns": {p: lay for p, lay in patterns},
        "results": [],
    }
    m = report["machine"]
    print(f"# HF transformers CPU peer: {m.get('cpu_model')} ({m.get('logical_cpus')} logical CPUs, "
          f"{m.get('mem_total_gib')} GiB), torch {report['software']['torch']}, transformers "
          f"{report['software']['transformers']}, {args.dtype}, {args.threads} threads, {report['date']}", flush=True)

    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(args.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")

    def flush_json():
        if args.json_out:
            d = os.path.dirname(os.path.abspath(args.json_out))
            os.makedirs(d, exist_ok=True)
            tmp = args.json_out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
            os.replace(tmp, args.json_out)

    for L in contexts:
        for pname, layout in patterns:
            est = estimate_bytes(cfg, layout, L, args.dtype)
            avail = mem_available()
            if args.max_mem_gib:
                avail = min(avail, int(args.max_mem_gib * GIB))
            row = {"context": L, "pattern": pname, "layout": layout, "dtype": args.dtype,
                   "est_gib": round(est["total"] / GIB, 2), "mem_available_gib": round(avail / GIB, 2),
                   "n_params_est": est["params"]}
            print(f"  L={L} {pname} ({layout}): estimated {est['total'] / GIB:.2f} GiB, available {avail / GIB:.2f} GiB",
                  file=sys.stderr, flush=True)
            if est["total"] > args.mem_fraction * avail:
                row["status"] = f"skipped: needs ~{est['total'] / GIB:.1f} GiB (available {avail / GIB:.1f} GiB)"
                report["results"].append(row)
                flush_json()
                continue
            spec = {"config": cfg, "layout": layout, "context": L, "dtype": args.dtype, "threads": args.threads,
                    "decode": args.decode, "seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
                    "experts_impl": args.experts_impl, "rlimit": not args.no_rlimit,
                    "max_mem_bytes": int(args.max_mem_gib * GIB) if args.max_mem_gib else None}
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      timeout=args.case_timeout)
                stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                stdout, stderr, rc = (e.stdout or ""), (e.stderr or ""), None
                if isinstance(stdout, bytes):
                    stdout, stderr = stdout.decode(errors="replace"), (stderr or b"").decode(errors="replace")
            row["wall_s"] = round(time.perf_counter() - t0, 2)
            got = None
            for line in stdout.splitlines():
                if line.startswith(RESULT_TAG):
                    got = json.loads(line[len(RESULT_TAG):])
            if got is not None:
                row.update(got)
            elif rc is None:
                row["status"] = f"failed: timed out after {args.case_timeout:.0f} s"
            elif rc < 0:
                row["status"] = f"failed: killed by signal {-rc}" + (" (out of memory?)" if -rc == 9 else "")
            else:
                tail = [l for l in stderr.strip().splitlines() if l.strip()]
                row["status"] = f"failed: exit {rc}: {tail[-1][:300] if tail else 'no output'}"
            if not row.get("status", "").startswith("ok") and stderr.strip():
                row["stderr_tail"] = stderr.strip().splitlines()[-5:]
            report["results"].append(row)
            flush_json()
            print(f"  -> {row['status']}" + (f", prefill {row['prefill_s']:.3f} s, decode {row.get('decode_tok_s', 0):.2f} tok/s, "
                                               f"peak RSS {row['peak_rss_gib']:.2f} GiB" if row["status"] == "ok" else ""),
                  file=sys.stderr, flush=True)

    # Record the versions the children actually ran with.
    for r in report["results"]:
        if r.get("torch_version"):
            report["software"]["torch"] = r["torch_version"]
            report["software"]["transformers"] = r.get("transformers_version", report["software"]["transformers"])
            report["machine"]["torch_cpu_capability"] = r.get("cpu_capability")
            break
    flush_json()
    print()
    print(markdown_table(report["results"]))
    if args.json_out:
        print(f"\nJSON written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
