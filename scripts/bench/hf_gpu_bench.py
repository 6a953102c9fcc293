#!/usr/bin/env python3
"""GPU benchmark of the HF transformers peer (GlmMoeDsaForCausalLM), beside `indexcache bench --device cuda`.

Builds `GlmMoeDsaForCausalLM` from an indexcache model config (e.g. configs/small-glm5.json) with
seeded random weights generated on the GPU, in bf16 (or fp32), `attn_implementation="sdpa"`, and
measures per (context, IndexCache pattern):

* prefill: one forward over a fixed random prompt of L tokens with `use_cache=True` and only the
  last token's logits (`logits_to_keep=1`), timed between `torch.cuda.synchronize()` calls, after a
  warm-up (a short prefill + 2 decode steps on the same model); the median of `--repeats`;
* TTFT: prefill + the argmax of the first token;
* decode: `--decode` greedy one-token steps reusing the prefill cache (tokens/s), 0 to skip;
* peak GPU memory of the case (`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`),
  and the weights' memory;
* speedups of each pattern against the `full` row of the same context.

transformers prefills densely: the indexer materialises fp32 scores [L, index_heads, L] and the
attention gets a dense [L, L] mask, so long contexts run out of memory. An out-of-memory case is
caught and reported (status "oom: ..."); longer contexts of the same pattern are then skipped. Do
not expect a chunked prefill here: transformers' indexer resets its key cache on any forward of more
than one token, so a prompt cannot be fed in chunks.

Each pattern runs in its own child process (a fresh CUDA context: a crash or a fragmented allocator
cannot spill into the next pattern); `--in-process` runs everything in this process instead.

Patterns: `full` (every layer runs its indexer), `a/b` (uniform keep, layer 0 Full: n_full =
max(1, ceil(n*a/b)), Full layers floor(i*n/n_full), as `indexcache --keep`), an F/S string such as
`FSSSFSSS`, or a file holding one (a `search` pattern.json, or plain text). A pattern is set as the
config's per-layer `indexer_types` ("full"/"shared"), as the repository's configs and tests do.
transformers older than IndexCache support ignores `indexer_types`: the script checks that every
attention module's `skip_topk` matches the pattern and reports the pattern "unsupported" otherwise
(the `full` rows still run).

Needs only torch and transformers (no internet). Example (on the GPU machine):
    python scripts/bench/hf_gpu_bench.py --config configs/small-glm5.json \
        --contexts 1k,4k,16k --patterns full,1/4 --decode 16 --json bench-out/hf-gpu.json
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
import zlib

GIB = 1024**3
RESULT_TAG = "HF_GPU_BENCH_RESULT "
INFO_TAG = "HF_GPU_BENCH_INFO "

# ---------------------------------------------------------------------------------------------------
# Driver-side helpers (no torch import: the driver stays light; children own the GPU).


def parse_contexts(text: str) -> list[int]:
    """'1k,4k,10000' -> [1024, 4096, 10000] (k = 1024, plain numbers are token counts)."""
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        mult = 1
        if tok.endswith("k"):
            mult, tok = 1024, tok[:-1]
        try:
            val = int(tok) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid context {tok!r} (examples: 512, 4k, 10000)") from None
        if val < 1:
            raise argparse.ArgumentTypeError(f"context must be >= 1: {tok!r}")
        out.append(val)
    if not out:
        raise argparse.ArgumentTypeError("no contexts given")
    return out


def read_pattern_file(path: str) -> str:
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(data, dict) and isinstance(data.get("pattern"), str):
        return data["pattern"]
    if isinstance(data, str):
        return data
    raise ValueError(f"{path}: expected a pattern string or a JSON object with a 'pattern' field")


def pattern_layout(spec: str, n_layers: int) -> str:
    """The per-layer layout ('F'/'S' string) of a pattern spec."""
    s = spec.strip()
    if s.lower() in ("full", "off"):
        return "F" * n_layers
    if os.path.isfile(s):
        s = read_pattern_file(s)
    elif "/" in s:
        num, den = (int(x) for x in s.split("/", 1))
        if num < 1 or den < 1 or num > den:
            raise ValueError(f"bad keep fraction {spec!r}")
        n_full = max(1, math.ceil(n_layers * num / den))
        full = {(i * n_layers) // n_full for i in range(n_full)}
        return "".join("F" if i in full else "S" for i in range(n_layers))
    up = s.upper()
    if up and set(up) <= {"F", "S"}:
        if len(up) != n_layers:
            raise ValueError(f"pattern {spec!r} has {len(up)} layers, the model has {n_layers}")
        if up[0] != "F":
            raise ValueError(f"pattern {spec!r}: layer 0 must be Full (a Shared layer needs a preceding Full one)")
        return up
    raise ValueError(f"unknown pattern {spec!r} (use full, a/b, an F/S string or a pattern file)")


def pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"


# ---------------------------------------------------------------------------------------------------
# Worker: builds the model of one pattern and measures its contexts.


class Unsupported(Exception):
    """This transformers cannot run the requested pattern."""


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def build_model(cfg: dict, layout: str, dtype_name: str, seed: int, experts_impl: str | None, device):
    """GlmMoeDsaForCausalLM with seeded random weights generated on `device`.

    Raises ImportError when this transformers has no GlmMoeDsa model."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    cfg = dict(cfg)
    for k in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    cfg["indexer_types"] = ["full" if c == "F" else "shared" for c in layout]
    try:
        config = GlmMoeDsaConfig(**cfg)
    except TypeError as e:
        if "indexer_types" not in str(e):
            raise
        if "S" in layout:
            raise Unsupported(f"GlmMoeDsaConfig does not take indexer_types ({_first_line(e)})") from e
        del cfg["indexer_types"]  # all Full: the default schedule of a config without it
        config = GlmMoeDsaConfig(**cfg)
    dtype = getattr(torch, dtype_name)
    kwargs = {"attn_implementation": "sdpa"}
    if experts_impl:
        kwargs["experts_implementation"] = experts_impl
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # very old layout: default init runs, then is overwritten below
            import contextlib

            no_init_weights = contextlib.nullcontext
    with no_init_weights(), torch.device(device):
        try:
            model = GlmMoeDsaForCausalLM._from_config(config, dtype=dtype, **kwargs)
        except TypeError:  # older transformers: `torch_dtype`
            model = GlmMoeDsaForCausalLM._from_config(config, torch_dtype=dtype, **kwargs)
    model.to(device)
    # Seeded init keyed by parameter name, generated on the GPU (a large model's weights never
    # exist on the host); layers common to two patterns get identical weights.
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                g = torch.Generator(device=p.device).manual_seed(_seed_for(seed, name))
                p.normal_(0.0, std, generator=g)
            elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                p.zero_()
            else:  # RMSNorm / LayerNorm weights
                p.fill_(1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
    model.eval()
    return model, config


def pattern_support(model, layout: str) -> str | None:
    """None when the built model runs `layout`; otherwise why not.

    IndexCache support in transformers = attention modules with a per-layer `skip_topk` taken from
    `config.indexer_types` (a Shared layer may also be built without an indexer)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        return "cannot find the decoder layers to check the pattern"
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        want_shared = layout[i] == "S"
        skip = getattr(attn, "skip_topk", None)
        if skip is None:
            if want_shared:
                return "this transformers ignores indexer_types (no IndexCache support: no per-layer skip_topk)"
            continue
        if bool(skip) != want_shared:
            return f"layer {i}: skip_topk={bool(skip)} but the pattern says {layout[i]}"
    return None


def _forward(model, ids, cache, kw):
    args = dict(kw)
    if cache is not None:
        args["past_key_values"] = cache
    out = model(input_ids=ids, **args)
    return out.logits, getattr(out, "past_key_values", None)


def _clear_indexer_caches(model):
    # transformers' indexer keeps its key cache on the module (`_cached_keys`): drop it between cases
    # so the next case's peak memory is its own.
    for m in model.modules():
        if getattr(m, "_cached_keys", None) is not None:
            m._cached_keys = None


def _swap_weights_proj_dtype(model, dtype):
    """Put every `indexer.weights_proj` in `dtype` (transformers versions disagree on fp32 vs model dtype)."""
    n = 0
    for name, mod in model.named_modules():
        if name.endswith("indexer.weights_proj"):
            mod.to(dtype)
            n += 1
    return n


def emit(tag: str, obj: dict):
    sys.stdout.write("\n" + tag + json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_pattern(spec: dict, out=emit) -> None:
    """Measure every context of one pattern; `out(RESULT_TAG, row)` after each."""
    import inspect

    import torch

    info: dict = {"pattern": spec["pattern"], "layout": spec["layout"]}
    base = {"pattern": spec["pattern"], "layout": spec["layout"], "dtype": spec["dtype"]}

    def row(context: int, **kw) -> dict:
        r = dict(base)
        r["context"] = context
        r.update(kw)
        return r

    on_gpu = spec.get("torch_device", "cuda") == "cuda"
    if on_gpu and not torch.cuda.is_available():
        for L in spec["contexts"]:
            out(RESULT_TAG, row(L, status="failed: torch.cuda.is_available() is False (no GPU for torch)"))
        return
    if on_gpu:
        device = torch.device("cuda", spec["device_index"])
        torch.cuda.set_device(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 2)
    else:  # --torch-device cpu: only to test this script where there is no GPU
        device = torch.device("cpu")
        info["gpu"] = None
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    def allocated():
        return torch.cuda.memory_allocated(device) if on_gpu else None

    def peak():
        return torch.cuda.max_memory_allocated(device) if on_gpu else None

    def reset_peak():
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception as e:
        info["transformers"] = None
        info["error"] = _first_line(e)

    t0 = time.perf_counter()
    try:
        model, config = build_model(
            spec["config"], spec["layout"], spec["dtype"], spec["seed"], spec.get("experts_impl"), device
        )
    except ImportError as e:
        why = f"unsupported: transformers {info.get('transformers')} has no GlmMoeDsaForCausalLM ({_first_line(e)})"
        for L in spec["contexts"]:
            out(RESULT_TAG, row(L, status=why))
        out(INFO_TAG, info)
        return
    except Unsupported as e:
        for L in spec["contexts"]:
            out(RESULT_TAG, row(L, status=f"unsupported: {e}"))
        out(INFO_TAG, info)
        return
    except torch.cuda.OutOfMemoryError as e:
        for L in spec["contexts"]:
            out(RESULT_TAG, row(L, status=f"oom: building the model: {_first_line(e)}"))
        out(INFO_TAG, info)
        return
    except (RuntimeError, TypeError, ValueError) as e:
        for L in spec["contexts"]:
            out(RESULT_TAG, row(L, status=f"failed: building the model: {_first_line(e)}"))
        out(INFO_TAG, info)
        return
    sync()
    info["build_s"] = round(time.perf_counter() - t0, 3)
    info["n_params"] = sum(p.numel() for p in model.parameters())
    info["weights_bytes"] = allocated()
    info["attn_implementation"] = getattr(config, "_attn_implementation", None)
    info["experts_implementation"] = getattr(config, "_experts_implementation", None)

    why = pattern_support(model, spec["layout"])
    if why is not None:
        for L in spec["contexts"]:
            out(RESULT_TAG, row(L, status=f"unsupported: {why}"))
        out(INFO_TAG, info)
        return

    params = inspect.signature(model.forward).parameters
    kw = {"use_cache": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        kw["num_logits_to_keep"] = 1
    vocab = spec["config"]["vocab_size"]

    with torch.inference_mode():
        # Warm-up: kernel selection, allocator growth, lazy initialisation.
        wg = torch.Generator().manual_seed(spec["seed"] + 7)
        warm_ids = torch.randint(0, vocab, (1, spec["warmup"]), generator=wg).to(device)

        def warm():
            logits, cache = _forward(model, warm_ids, None, kw)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):
                logits, cache = _forward(model, tok, cache, kw)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            sync()

        try:
            try:
                warm()
            except RuntimeError as e:
                if "dtype" not in str(e) or isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                # The indexer's weights_proj in the other dtype than this version's forward expects.
                model_dtype = getattr(torch, spec["dtype"])
                current = next((m.weight.dtype for n, m in model.named_modules() if n.endswith("indexer.weights_proj")), None)
                target = torch.float32 if current == model_dtype else model_dtype
                if _swap_weights_proj_dtype(model, target) == 0:
                    raise
                info["weights_proj_dtype_fix"] = f"{current} -> {target} ({_first_line(e)})"
                warm()
        except Exception as e:  # noqa: BLE001 - report whatever stops the warm-up
            status = ("oom" if isinstance(e, torch.cuda.OutOfMemoryError) else "failed") + f": warm-up: {_first_line(e)}"
            for L in spec["contexts"]:
                out(RESULT_TAG, row(L, status=status))
            out(INFO_TAG, info)
            return
        _clear_indexer_caches(model)

        oom_at: int | None = None
        for L in spec["contexts"]:
            if oom_at is not None and L >= oom_at:
                out(RESULT_TAG, row(L, status=f"skipped: out of memory at {oom_at} tokens"))
                continue
            res = row(L)
            cache = logits = tok = None
            try:
                reset_peak()
                pg = torch.Generator().manual_seed(spec["seed"] * 31 + L)
                prompt = torch.randint(0, vocab, (1, L), generator=pg).to(device)
                prefill, ttft = [], []
                for r in range(spec["repeats"]):
                    cache = logits = None
                    _clear_indexer_caches(model)
                    sync()
                    t = time.perf_counter()
                    logits, cache = _forward(model, prompt, None, kw)
                    sync()
                    prefill.append(time.perf_counter() - t)
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                    int(tok)  # on the host: the first token is known
                    ttft.append(time.perf_counter() - t)
                res["prefill_s_all"] = [round(x, 5) for x in prefill]
                res["prefill_s"] = statistics.median(prefill)
                res["ttft_s"] = statistics.median(ttft)
                res["prefill_tok_s"] = L / res["prefill_s"]
                res["peak_prefill_bytes"] = peak()
                steps = []
                for _ in range(spec["decode"]):
                    sync()
                    t = time.perf_counter()
                    logits, cache = _forward(model, tok, cache, kw)
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                    int(tok)
                    steps.append(time.perf_counter() - t)
                if steps:
                    res["decode_s"] = sum(steps)
                    res["decode_tok_s"] = len(steps) / sum(steps)
                    res["decode_ms_per_token_median"] = 1000 * statistics.median(steps)
                sync()
                res["peak_memory_bytes"] = peak()
                res["status"] = "ok"
            except torch.cuda.OutOfMemoryError as e:
                res["status"] = f"oom: {_first_line(e)}"
                res["peak_memory_bytes"] = peak()
                oom_at = L if oom_at is None else min(oom_at, L)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                res["status"] = f"failed: {_first_line(e)}"
            finally:
                cache = logits = tok = None
                _clear_indexer_caches(model)
                if on_gpu:
                    torch.cuda.empty_cache()
            out(RESULT_TAG, res)
    out(INFO_TAG, info)


def worker_main(spec_json: str) -> int:
    run_pattern(json.loads(spec_json))
    return 0


# ---------------------------------------------------------------------------------------------------
# Driver.


def fmt(x, nd):
    return "—" if x is None else f"{x:.{nd}f}"


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| context | pattern | prefill s | TTFT s | prefill tok/s | decode tok/s | peak GiB | speedup (prefill / decode) | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        pat = r["pattern"] if r["pattern"] == r["layout"] else f"{r['pattern']} ({r['layout']})"
        peak = r.get("peak_memory_bytes")
        sp = "—"
        if r.get("prefill_speedup") is not None:
            sp = f"{r['prefill_speedup']:.2f}x / " + (
                f"{r['decode_speedup']:.2f}x" if r.get("decode_speedup") is not None else "—"
            )
        lines.append(
            f"| {r['context']:,} | {pat} | {fmt(r.get('prefill_s'), 3)} | {fmt(r.get('ttft_s'), 3)} | "
            f"{fmt(r.get('prefill_tok_s'), 1)} | {fmt(r.get('decode_tok_s'), 2)} | "
            f"{fmt(peak / GIB if peak else None, 2)} | {sp} | {r.get('status', '?')} |"
        )
    return "\n".join(lines)


def add_speedups(results: list[dict]) -> None:
    """Speedups against the all-Full row of the same context (when both ran)."""
    for r in results:
        base = next(
            (b for b in results if b["context"] == r["context"] and set(b["layout"]) == {"F"} and b.get("status") == "ok"),
            None,
        )
        if base is None or r.get("status") != "ok":
            continue
        r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
        if r.get("decode_tok_s") and base.get("decode_tok_s"):
            r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]


def parse_tagged(stdout: str) -> tuple[list[dict], dict | None]:
    rows, info = [], None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            rows.append(json.loads(line[len(RESULT_TAG):]))
        elif line.startswith(INFO_TAG):
            info = json.loads(line[len(INFO_TAG):])
    return rows, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small-glm5.json", help="model config JSON (GlmMoeDsa fields)")
    ap.add_argument("--contexts", "--tokens", default="1k,4k,16k",
                    help="prompt lengths: token counts or k = 1024 (e.g. 1k,4k,10000)")
    ap.add_argument("--patterns", default="full,1/4", help="comma list: full, a/b keep fractions, F/S strings or pattern files")
    ap.add_argument("--pattern", default=None,
                    help="shorthand for --patterns full,PATTERN: all-Full and this pattern (an a/b, F/S string or file)")
    ap.add_argument("--decode", type=int, default=16, help="greedy decode steps after each prefill (0: none)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--device-index", type=int, default=0, help="CUDA device ordinal")
    ap.add_argument("--json", dest="json_out", default=None, help="write results JSON here (directory created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=128, help="warm-up prefill length")
    ap.add_argument("--repeats", type=int, default=1, help="prefills per case (median reported)")
    ap.add_argument("--experts-impl", default=None, help="force transformers' experts_implementation (e.g. eager)")
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds before a pattern's child is killed")
    ap.add_argument("--in-process", action="store_true", help="run every pattern in this process (no children)")
    ap.add_argument("--torch-device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu only to test this script where there is no GPU (no memory numbers)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        return worker_main(args.worker)
    if args.decode < 0 or args.repeats < 1 or args.warmup < 1:
        ap.error("--decode must be >= 0, --repeats and --warmup >= 1")

    with open(args.config) as f:
        cfg = json.load(f)
    n_layers = cfg["num_hidden_layers"]
    try:
        contexts = parse_contexts(args.contexts)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    specs = args.patterns.split(",") if args.pattern is None else ["full", args.pattern]
    try:
        patterns = [(p.strip(), pattern_layout(p, n_layers)) for p in specs if p.strip()]
    except (ValueError, OSError) as e:
        ap.error(str(e))
    too_long = [L for L in contexts if L + args.decode > cfg.get("max_position_embeddings", 1 << 62)]
    if too_long:
        ap.error(f"contexts {too_long} + {args.decode} decode steps exceed max_position_embeddings")

    report = {
        "benchmark": "hf_gpu_bench",
        "description": "HF transformers GlmMoeDsaForCausalLM (sdpa, random weights on the GPU) prefill/decode, one process per pattern",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {"hostname": platform.node(), "python": platform.python_version()},
        "software": {"torch": pkg_version("torch"), "transformers": pkg_version("transformers")},
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "config": {"path": args.config, **{k: cfg.get(k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim",
            "index_topk", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "vocab_size")}},
        "patterns": {p: lay for p, lay in patterns},
        "workers": [],
        "results": [],
    }
    print(f"# HF transformers GPU peer: torch {report['software']['torch']}, transformers "
          f"{report['software']['transformers']}, {args.dtype}, {report['date']}", flush=True)

    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    def flush_json():
        if args.json_out:
            d = os.path.dirname(os.path.abspath(args.json_out))
            os.makedirs(d, exist_ok=True)
            tmp = args.json_out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
            os.replace(tmp, args.json_out)

    rows_by_key: dict = {}
    for pname, layout in patterns:
        spec = {"config": cfg, "layout": layout, "pattern": pname, "contexts": contexts, "dtype": args.dtype,
                "device_index": args.device_index, "decode": args.decode, "seed": args.seed,
                "warmup": args.warmup, "repeats": args.repeats, "experts_impl": args.experts_impl,
                "torch_device": args.torch_device}
        print(f"  pattern {pname} ({layout}): contexts {contexts}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if args.in_process:
            got_rows, info = [], None

            def collect(tag, obj):
                nonlocal info
                if tag == RESULT_TAG:
                    got_rows.append(obj)
                else:
                    info = obj

            try:
                run_pattern(spec, collect)
                why = "failed: the pattern reported nothing"
            except Exception as e:  # noqa: BLE001 - reported as the pattern's status
                info = {"error": _first_line(e)}
                why = f"failed: {_first_line(e)}"
            stderr_tail = []
        else:
            try:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      timeout=args.case_timeout)
                stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                stdout, stderr, rc = (e.stdout or ""), (e.stderr or ""), None
                if isinstance(stdout, bytes):
                    stdout, stderr = stdout.decode(errors="replace"), (stderr or b"").decode(errors="replace")
            got_rows, info = parse_tagged(stdout)
            stderr_tail = [l for l in stderr.strip().splitlines() if l.strip()][-5:]
            if rc is None:
                why = f"failed: timed out after {args.case_timeout:.0f} s"
            elif rc < 0:
                why = f"failed: killed by signal {-rc}" + (" (host out of memory?)" if -rc == 9 else "")
            elif rc != 0:
                why = f"failed: exit {rc}: {stderr_tail[-1][:300] if stderr_tail else 'no output'}"
            else:
                why = "failed: the worker reported nothing"
        # Contexts the pattern did not report (a crash, a timeout): the reason.
        done = {r["context"] for r in got_rows}
        for L in contexts:
            if L not in done:
                got_rows.append({"pattern": pname, "layout": layout, "dtype": args.dtype, "context": L,
                                 "status": why, "stderr_tail": stderr_tail})
        report["workers"].append({"pattern": pname, "layout": layout, "wall_s": round(time.perf_counter() - t0, 2),
                                  "info": info, "stderr_tail": stderr_tail})
        for r in got_rows:
            rows_by_key[(r["context"], pname)] = r
            st = r.get("status", "?")
            peak = r.get("peak_memory_bytes")
            extra = ""
            if st == "ok":
                extra = f", prefill {r['prefill_s']:.3f} s" + (f", peak {peak / GIB:.2f} GiB" if peak else "")
            print(f"  -> L={r['context']} {pname}: {st}{extra}", file=sys.stderr, flush=True)
        # Rows in (context, pattern) order of the command line.
        report["results"] = [rows_by_key[(L, p)] for L in contexts for p, _ in patterns if (L, p) in rows_by_key]
        add_speedups(report["results"])
        flush_json()

    for w in report["workers"]:
        i = w.get("info") or {}
        if i.get("transformers"):
            report["software"].update({"transformers": i["transformers"], "torch": i.get("torch"),
                                       "torch_cuda": i.get("torch_cuda")})
            report["machine"].update({"gpu": i.get("gpu"), "gpu_total_gib": i.get("gpu_total_gib")})
            break
    flush_json()
    print()
    print(markdown_table(report["results"]))
    if args.json_out:
        print(f"\nJSON written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
