#!/usr/bin/env python3
"""Random-weight GLM-MoE-DSA checkpoint for the llama.cpp peer benchmark (scripts/bench/llamacpp_peer.sh).

Writes a transformers checkpoint directory (`config.json`, `model.safetensors` in bf16,
`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`) of the `configs/small-glm5.json`
shape, seeded, with an IndexCache schedule:

* `--pattern FFFFFFFF` (all-Full: every layer owns a lightning indexer), or
* `--pattern FSSSFSSS` (IndexCache 1/4): Shared layers are built by transformers without an indexer,
  so their indexer weights are absent from the file, as in GLM-5.2 checkpoints.

The schedule is written the way `indexcache export --format hf` writes it: `indexer_types`
(`["full", "shared", …]`, what transformers, SGLang and llama.cpp's `convert_hf_to_gguf.py` read; the
converter stores it as the GGUF key `glm-dsa.attention.indexer.types`) and `index_topk_pattern`
(`"FSSS…"`, what vLLM reads). indexcache reads either (`indexer_types` wins).

Weights: every Linear weight ~ N(0, (gain / sqrt(fan_in))^2) — the same small per-element
magnitude as transformers' 0.02 init for these widths (1/sqrt(1024) = 0.031), but scaled to the
fan-in so activations stay O(1) through the layers, logits are finite and the indexer's scores are
well separated (near-tied scores would make top-k sets, and so a logits comparison between two
engines, depend on rounding). The gains and rules are those of scripts/fixtures/make_fixtures.py.
Stored as bf16, except the MoE router (`mlp.gate.weight`, `e_score_correction_bias`), which
transformers keeps in f32 and llama.cpp's converter keeps F32 too; those are rounded to
bf16-representable values first, so an f32 and a bf16 GGUF of this checkpoint hold the same values.

Tokenizer: llama.cpp's converter only accepts a BPE tokenizer whose pre-tokenizer it recognises (it
hashes the ids of a probe string), and GLM's vocabulary has 151k entries, far more than this
shape's 32768. So the tokenizer is DeepSeek-Coder's (32256 entries, a byte-level BPE that
llama.cpp knows as `deepseek-coder`), rebuilt from the vocab-only GGUF that ships in llama.cpp's
source (`models/ggml-vocab-deepseek-coder.gguf`), checked against the expected token ids shipped
beside it (`.inp` / `.out`), plus the four GLM special tokens the converter's GLM vocab code looks up
(`[gMASK]`, `<|user|>`, `<|endoftext|>`, `<|observation|>`, ids 32022..32025). The benchmark and the
logits check feed token ids, so the tokenizer only has to be accepted by both loaders.

Run with the pinned environment (scripts/fixtures/requirements.txt):
    python scripts/bench/make_peer_checkpoint.py --config configs/small-glm5.json --pattern FSSSFSSS \
        --vocab-gguf .../llama.cpp/models/ggml-vocab-deepseek-coder.gguf --seed 8 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

# The GLM special tokens that llama.cpp's `_set_vocab_glm` looks up by name (ids 32022..32025).
GLM_SPECIALS = ["[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>"]
DSC_BPE_SIZE = 32000  # DeepSeek-Coder: ids < 32000 are BPE merges' vocabulary, 32000..32021 added tokens
DSC_BOS = "<｜begin▁of▁sentence｜>"
# The probe string and hash of llama.cpp's get_vocab_base_pre (conversion/base.py) for
# deepseek-ai/deepseek-coder-6.7b-base: the converter maps this hash to the `deepseek-coder` pre-tokenizer.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
DSC_CHKHSH = "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821"

# Tensors transformers keeps in f32 (`_keep_in_fp32_modules_strict`).
KEEP_F32_RE = re.compile(r"mlp\.gate\.(weight|e_score_correction_bias)$")


def gguf_strings(field) -> list[str]:
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def make_tokenizer(vocab_gguf: Path, out_dir: Path) -> None:
    """DeepSeek-Coder's byte-level BPE rebuilt from llama.cpp's vocab GGUF, + GLM specials."""
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    r = gguf.GGUFReader(str(vocab_gguf))
    tokens = gguf_strings(r.fields["tokenizer.ggml.tokens"])
    merges = gguf_strings(r.fields["tokenizer.ggml.merges"])
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    bos = int(r.fields["tokenizer.ggml.bos_token_id"].parts[-1][0])
    assert tokens[bos] == DSC_BOS, tokens[bos]

    vocab = {t: i for i, t in enumerate(tokens[:DSC_BPE_SIZE])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    # DeepSeek-Coder's pre-tokenizer (llama.cpp: LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER), then bytes -> unicode.
    split = lambda rx: pre_tokenizers.Split(Regex(rx), behavior="isolated")  # noqa: E731
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        split("[\r\n]"),
        split("\\s?\\p{L}+"),
        split("\\s?\\p{P}+"),
        split("[一-龥ࠀ-一가-퟿]+"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Added tokens take the next free ids, in order: 32000..32021 as in DeepSeek-Coder (GGUF type 3 =
    # control = special), then the GLM specials at 32022.. (the GGUF's [PAD…] slots).
    n_added = max(i for i, t in enumerate(tokens) if not t.startswith("[PAD")) + 1
    for i in range(DSC_BPE_SIZE, n_added):
        special = types[i] == 3
        tok.add_tokens([AddedToken(tokens[i], special=special, normalized=not special)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{DSC_BOS} $A", pair=f"{DSC_BOS} $A {DSC_BOS} $B", special_tokens=[(DSC_BOS, bos)])
    for i, t in enumerate(GLM_SPECIALS):
        assert tok.token_to_id(t) == n_added + i, (t, tok.token_to_id(t))

    # The expected ids llama.cpp ships for this vocabulary (from the original HF tokenizer, no BOS).
    inp = Path(str(vocab_gguf) + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = Path(str(vocab_gguf) + ".out").read_text(encoding="utf-8").split("\n")
    bad = [t for t, o in zip(inp, out) if tok.encode(t, add_special_tokens=False).ids != [int(x) for x in o.split()]]
    assert len(inp) >= 30 and not bad, f"{len(bad)} of {len(inp)} vocab tests differ, e.g. {bad[:2]!r}"
    chkhsh = hashlib.sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
    assert chkhsh == DSC_CHKHSH, f"pre-tokenizer hash {chkhsh} is not llama.cpp's deepseek-coder one"

    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": DSC_BOS,
        "eos_token": "<|endoftext|>",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    print(f"tokenizer: {len(inp)} of llama.cpp's deepseek-coder vocab tests pass, hash {chkhsh[:12]}…", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="indexcache model config (configs/small-glm5.json)")
    ap.add_argument("--pattern", required=True, help="one F/S per layer, layer 0 F (FFFFFFFF, FSSSFSSS)")
    ap.add_argument("--vocab-gguf", type=Path, required=True, help="llama.cpp's models/ggml-vocab-deepseek-coder.gguf")
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(a.config.read_text())
    n = cfg["num_hidden_layers"]
    if not re.fullmatch(r"F[FS]*", a.pattern) or len(a.pattern) != n:
        sys.exit(f"--pattern must be {n} letters F/S starting with F, got {a.pattern!r}")
    cfg["indexer_types"] = ["full" if c == "F" else "shared" for c in a.pattern]
    for k in ("architectures", "model_type"):
        cfg.pop(k, None)

    a.out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(a.vocab_gguf, a.out)
    tok_ids = {t: 32022 + i for i, t in enumerate(GLM_SPECIALS)}
    cfg.update(bos_token_id=tok_ids["[gMASK]"], eos_token_id=tok_ids["<|endoftext|>"], pad_token_id=tok_ids["<|endoftext|>"])

    torch.manual_seed(a.seed)
    config = AutoConfig.for_model("glm_moe_dsa", **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    got = "".join("F" if layer.self_attn.indexer is not None else "S" for layer in model.model.layers)
    assert got == a.pattern, f"transformers built {got}, asked for {a.pattern}"
    # The fixtures' init rule (std = gain / sqrt(fan_in), norms around 1): transformers' flat 0.02
    # would leave indexer scores near zero and top-k mostly ties.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_fixtures import reinit_

    reinit_(model, a.seed)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the checkpoint names (one matrix per expert) and config.json
        state = {}
        for f in sorted(Path(tmp).glob("model*.safetensors")):
            state.update(load_file(f))
        for f in ("config.json", "generation_config.json"):
            shutil.copy(Path(tmp) / f, a.out / f)
    stored = {}
    for name, t in state.items():
        t = t.to(torch.bfloat16)  # every value bf16-representable ...
        stored[name] = t.float() if KEEP_F32_RE.search(name) else t  # ... the router stored as f32
    assert all(torch.isfinite(t.float()).all() for t in stored.values())
    save_file(stored, a.out / "model.safetensors", metadata={"format": "pt"})

    config_json = json.loads((a.out / "config.json").read_text())
    config_json["dtype"] = "bfloat16"
    config_json["indexer_types"] = cfg["indexer_types"]
    config_json["index_topk_pattern"] = a.pattern
    (a.out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")

    indexer = sorted({int(m.group(1)) for k in stored if (m := re.match(r"model\.layers\.(\d+)\.self_attn\.indexer\.", k))})
    expect = [i for i, c in enumerate(a.pattern) if c == "F"]
    assert indexer == expect, f"indexer weights on layers {indexer}, expected {expect}"
    size = (a.out / "model.safetensors").stat().st_size
    print(f"{a.out}: {a.pattern}, {sum(t.numel() for t in stored.values()) / 1e6:.1f} M parameters, "
          f"{size / 2**20:.0f} MiB, indexers on layers {indexer}", file=sys.stderr)


if __name__ == "__main__":
    main()
