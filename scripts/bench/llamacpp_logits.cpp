// Logits of a fixed token sequence from llama.cpp, for the agreement check in
// scripts/bench/llamacpp_peer.sh (the counterpart of `indexcache forward --decode-last N`).
//
//   llamacpp_logits MODEL.gguf IDS.txt OUT_PREFIX THREADS DECODE_LAST
//
// IDS.txt: token ids separated by commas and/or whitespace (T of them). Writes, as raw little-endian f32:
//   OUT_PREFIX.prefill.f32  [T, n_vocab]  one llama_decode of all T tokens, logits for every row
//   OUT_PREFIX.decode.f32   [N, n_vocab]  a fresh cache: a prefill of T-N tokens, then N one-token
//                                          llama_decode calls; row j = logits after token T-N+j
//   OUT_PREFIX.topk.txt + OUT_PREFIX.topk.<name>.i32
//                                          the prefill's DSA top-k index tensors (graph names
//                                          "top_k-<layer>", i32 [T, k], each row's set in no
//                                          particular order), read through the eval callback; a
//                                          Shared layer renames its source's tensor, so the name
//                                          carries the last layer that used the set
//   OUT_PREFIX.topk.indexer_score-<layer>.f32  [T, n_kv] the masked lightning-indexer scores the
//                                          top-k was taken from (to tell ties from real differences)
// Flash attention off and f32 K/V caches (the indexer-key cache of DSA models takes type_k too), so
// the only approximations left are those of the model file's weights.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

static void die(const char * msg) {
    fprintf(stderr, "llamacpp_logits: %s\n", msg);
    exit(1);
}

static void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

// Decodes tokens[begin, end) at positions begin.. as one batch; out_all: logits for every row.
static void decode(llama_context * ctx, const std::vector<llama_token> & tokens, int begin, int end, bool out_all) {
    llama_batch batch = llama_batch_init(end - begin, 0, 1);
    batch.n_tokens = end - begin;
    for (int i = begin; i < end; ++i) {
        const int j = i - begin;
        batch.token[j] = tokens[i];
        batch.pos[j] = i;
        batch.n_seq_id[j] = 1;
        batch.seq_id[j][0] = 0;
        batch.logits[j] = out_all || i == end - 1;
    }
    if (llama_decode(ctx, batch) != 0) {
        die("llama_decode failed");
    }
    llama_batch_free(batch);
}

// Collects, through the eval callback, the top-k index tensors of a graph run and the scores they
// were taken from (CPU backend: tensor data is host memory). Keyed by name; a later tensor of the
// same name replaces an earlier one (several intermediate score tensors share a name; the last is
// the masked [n_kv, T] one that goes into top-k).
struct topk_dump {
    int64_t n_tokens = 0;
    std::map<std::string, std::pair<std::vector<char>, std::pair<int64_t, int64_t>>> tensors;
};

static bool named(const char * name, const char * prefix) {  // exactly "<prefix><digits>"
    const size_t n = strlen(prefix);
    return strncmp(name, prefix, n) == 0 && name[n] != '\0' && strspn(name + n, "0123456789") == strlen(name + n);
}

static bool collect_topk(ggml_tensor * t, bool ask, void * user) {
    auto * d = static_cast<topk_dump *>(user);
    const bool is_2d = t->ne[2] == 1 && t->ne[3] == 1 && ggml_is_contiguous(t);
    const bool wanted = is_2d && ((named(t->name, "top_k-") && t->type == GGML_TYPE_I32) ||
                                  (named(t->name, "indexer_score-") && t->type == GGML_TYPE_F32 &&
                                   t->ne[1] == d->n_tokens && t->ne[0] >= d->n_tokens));
    if (ask || !wanted) {
        return wanted;
    }
    const char * p = static_cast<const char *>(t->data);
    d->tensors[t->name] = { std::vector<char>(p, p + ggml_nbytes(t)), { t->ne[1], t->ne[0] } };
    return true;
}

static void append_rows(llama_context * ctx, int first, int n, int n_vocab, std::vector<float> & out) {
    for (int i = first; i < first + n; ++i) {
        const float * l = llama_get_logits_ith(ctx, i);
        if (!l) {
            die("no logits for a row");
        }
        out.insert(out.end(), l, l + n_vocab);
    }
}

static void write_f32(const std::string & path, const std::vector<float> & v) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char *>(v.data()), (std::streamsize) (v.size() * sizeof(float)));
    if (!f) {
        die("cannot write output");
    }
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        die("usage: llamacpp_logits MODEL.gguf IDS.txt OUT_PREFIX THREADS DECODE_LAST");
    }
    const std::string model_path = argv[1], ids_path = argv[2], out = argv[3];
    const int threads = atoi(argv[4]), n_dec = atoi(argv[5]);

    std::vector<llama_token> tokens;
    {
        std::ifstream f(ids_path);
        std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        for (char & c : text) {
            c = c == ',' ? ' ' : c;
        }
        std::istringstream in(text);
        for (long t; in >> t;) {
            tokens.push_back((llama_token) t);
        }
    }
    const int T = (int) tokens.size();
    if (T < 2 || n_dec < 1 || n_dec >= T) {
        die("need T >= 2 ids and 1 <= DECODE_LAST < T");
    }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) {
        die("cannot load model");
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) ((T + 255) / 256 * 256);
    cp.n_batch = cp.n_ubatch = (uint32_t) T;  // the whole prompt in one ubatch
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.no_perf = true;

    std::vector<float> prefill, dec;
    topk_dump topk;
    {
        llama_context_params cp_prefill = cp;
        cp_prefill.cb_eval = collect_topk;
        cp_prefill.cb_eval_user_data = &topk;
        topk.n_tokens = T;
        llama_context * ctx = llama_init_from_model(model, cp_prefill);
        if (!ctx) {
            die("cannot create context");
        }
        decode(ctx, tokens, 0, T, true);
        append_rows(ctx, 0, T, n_vocab, prefill);
        llama_free(ctx);
    }
    {
        llama_context * ctx = llama_init_from_model(model, cp);
        if (!ctx) {
            die("cannot create context");
        }
        decode(ctx, tokens, 0, T - n_dec, false);
        for (int i = T - n_dec; i < T; ++i) {
            decode(ctx, tokens, i, i + 1, true);
            append_rows(ctx, 0, 1, n_vocab, dec);
        }
        llama_free(ctx);
    }
    write_f32(out + ".prefill.f32", prefill);
    write_f32(out + ".decode.f32", dec);
    {
        std::ofstream index(out + ".topk.txt");
        for (const auto & [name, entry] : topk.tensors) {
            const auto & [data, shape] = entry;
            const std::string ext = name.rfind("top_k-", 0) == 0 ? ".i32" : ".f32";
            std::ofstream f(out + ".topk." + name + ext, std::ios::binary);
            f.write(data.data(), (std::streamsize) data.size());
            index << name << ext << " " << shape.first << " " << shape.second << "\n";
        }
    }
    printf("%d %d %d\n", T, n_dec, n_vocab);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
