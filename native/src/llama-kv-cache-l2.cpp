// llama-kv-cache-l2.cpp - L2-norm KV eviction for llama_kv_cache (see llama-kv-cache-l2.h)
//
// Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
// EMNLP 2024 (arXiv:2406.11430). The patch series (patches/ in l2kv-cpp) only adds the hooks
// that call into this file from llama-kv-cache.{h,cpp}, llama-graph.cpp and llama-kv-cache-iswa.cpp.

#include "llama-kv-cache-l2.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdarg>
#include <cstdlib>
#include <cstring>
#include <string>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <unordered_map>

//
// errors
//

static thread_local std::string llama_l2kv_last_error_msg;

void llama_l2kv_error(const char * fmt, ...) {
    char buf[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    LLAMA_LOG_ERROR("%s", buf);
    llama_l2kv_last_error_msg = buf;
    while (!llama_l2kv_last_error_msg.empty() && llama_l2kv_last_error_msg.back() == '\n') {
        llama_l2kv_last_error_msg.pop_back();
    }
}

void llama_l2kv_clear_error() {
    llama_l2kv_last_error_msg.clear();
}

const char * llama_l2kv_last_error(void) {
    return llama_l2kv_last_error_msg.c_str();
}

//
// selection rule
//

// a float as an unsigned integer of the same order (-0 and +0 equal, NaN as +inf)
static uint32_t llama_l2kv_ordered_bits(float x) {
    if (std::isnan(x)) {
        x = std::numeric_limits<float>::infinity();
    } else if (x == 0.0f) {
        x = 0.0f;
    }
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

void llama_l2kv_candidates(
        const int32_t * pos,
          const float * score,
             uint32_t   n,
             uint32_t   n_sink,
             uint32_t   n_recent,
              int32_t   pos_last,
        std::vector<llama_l2kv_candidate> & out) {
    out.resize(n);
    for (uint32_t i = 0; i < n; ++i) {
        GGML_ASSERT(pos[i] >= 0);
        const bool prot = pos[i] < (int64_t) n_sink || (int64_t) pos[i] > (int64_t) pos_last - (int64_t) n_recent;
        out[i].key = (uint64_t) !prot << 63
                   | (uint64_t) llama_l2kv_ordered_bits(score[i]) << 31
                   | (uint64_t) (INT32_MAX - pos[i]);
        out[i].idx = i;
    }
}

void llama_l2kv_keep_best(std::vector<llama_l2kv_candidate> & cand, uint32_t n_keep) {
    if (n_keep < cand.size()) {
        std::nth_element(cand.begin(), cand.begin() + n_keep, cand.end(), llama_l2kv_candidate_better);
        cand.resize(n_keep);
    }
}

void llama_l2kv_sort_candidates(std::vector<llama_l2kv_candidate> & cand) {
    const size_t n = cand.size();
    if (n < 256) {
        std::sort(cand.begin(), cand.end(), llama_l2kv_candidate_better);
        return;
    }
    // LSD radix sort on the packed key, 8 bits a pass: stable, so candidates with equal keys keep their
    // (index) order, which is the rule's last tie-break; about 3x faster than std::sort at 4k entries
    GGML_ASSERT(std::is_sorted(cand.begin(), cand.end(),
            [](const llama_l2kv_candidate & a, const llama_l2kv_candidate & b) { return a.idx < b.idx; }));
    std::vector<llama_l2kv_candidate> tmp(n);
    for (int shift = 0; shift < 64; shift += 8) {
        size_t count[256] = { 0 };
        for (const auto & c : cand) {
            count[(c.key >> shift) & 0xff]++;
        }
        if (count[(cand[0].key >> shift) & 0xff] == n) {
            continue; // every key has this digit: the pass would not move anything
        }
        size_t offs = 0;
        for (size_t & c : count) {
            const size_t k = c;
            c = offs;
            offs += k;
        }
        for (const auto & c : cand) {
            tmp[count[(c.key >> shift) & 0xff]++] = c;
        }
        cand.swap(tmp);
    }
}

std::vector<uint32_t> llama_l2kv_select(
        const std::vector<int32_t> & pos,
        const std::vector<float>   & score,
        uint32_t n_keep,
        uint32_t n_sink,
        uint32_t n_recent,
        int32_t  pos_last) {
    GGML_ASSERT(pos.size() == score.size());

    std::vector<llama_l2kv_candidate> cand;
    llama_l2kv_candidates(pos.data(), score.data(), pos.size(), n_sink, n_recent, pos_last, cand);

    // both selection paths, checked against each other: the whole ranking (what the hybrid uses) and
    // the linear-time kept set (what an eviction uses); tests call this with many ties
    std::vector<llama_l2kv_candidate> ranked = cand;
    llama_l2kv_sort_candidates(ranked);
    llama_l2kv_keep_best(cand, n_keep);
    std::sort(cand.begin(), cand.end(), llama_l2kv_candidate_better);
    for (size_t i = 0; i < cand.size(); ++i) {
        GGML_ASSERT(cand[i].idx == ranked[i].idx);
    }

    std::vector<uint32_t> idx(cand.size());
    for (size_t i = 0; i < cand.size(); ++i) {
        idx[i] = cand[i].idx;
    }
    return idx;
}

bool llama_l2kv_force_graphs() {
    return getenv("LLAMA_L2KV_FORCE_GRAPHS") != nullptr;
}

std::vector<int32_t> llama_l2kv_default_skip_layers(int32_t policy) {
    switch (policy) {
        case LLAMA_L2KV_POLICY_KEEP_LOW_NORM:
        case LLAMA_L2KV_POLICY_KEEP_HIGH_NORM:
        case LLAMA_L2KV_POLICY_RANDOM:
            return { 0, 1 };
        default:
            return {};
    }
}

static uint64_t llama_l2kv_splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

float llama_l2kv_random_score(uint64_t seed, int32_t il, int32_t head, int32_t pos) {
    uint64_t h = llama_l2kv_splitmix64(seed);
    h = llama_l2kv_splitmix64(h ^ (uint64_t) (uint32_t) il);
    h = llama_l2kv_splitmix64(h ^ (uint64_t) (uint32_t) head);
    h = llama_l2kv_splitmix64(h ^ (uint64_t) (uint32_t) pos);
    return (float) (h >> 40) / 16777216.0f; // 24 random bits in [0, 1)
}

//
// host work in parallel
//

void llama_l2kv_parallel_for(uint32_t n, int32_t n_threads, const std::function<void(uint32_t)> & fn) {
    const int32_t n_workers = (int32_t) std::max<int64_t>(1, std::min<int64_t>(n_threads, n));
    if (n_workers <= 1) {
        for (uint32_t i = 0; i < n; ++i) {
            fn(i);
        }
        return;
    }
#ifdef LLAMA_L2KV_USE_OPENMP
    // the CPU backend's OpenMP threads: after a graph they spin for milliseconds, so threads of our own
    // would have to share the cores with them (measured: ranking took 2x as long on 2 cores).
    // LLAMA_L2KV_STD_THREADS takes the std::thread path of builds without OpenMP (macOS), for tests
    if (getenv("LLAMA_L2KV_STD_THREADS") == nullptr) {
        // (an int index: MSVC's OpenMP 2.0 wants a signed int loop variable; n is a layer count)
        #pragma omp parallel for schedule(dynamic, 1) num_threads(n_workers)
        for (int i = 0; i < (int) n; ++i) {
            fn((uint32_t) i);
        }
        return;
    }
#endif
    // items differ in cost (a skipped layer ranks by recency only): each thread takes the next one
    std::atomic<uint32_t> next{0};
    auto work = [&]() {
        for (uint32_t i = next++; i < n; i = next++) {
            fn(i);
        }
    };
    std::vector<std::thread> threads;
    threads.reserve(n_workers - 1);
    for (int32_t t = 1; t < n_workers; ++t) {
        threads.emplace_back(work);
    }
    work();
    for (auto & t : threads) {
        t.join();
    }
}

//
// update context: runs an eviction (or only resets the graphs) inside llama_context::memory_update
//

class llama_kv_cache_l2_context : public llama_memory_context_i {
public:
    llama_kv_cache_l2_context(llama_kv_cache_l2 * l2, llama_context * lctx, bool do_evict) :
        l2(l2), lctx(lctx), do_evict(do_evict) {}

    bool next() override {
        return false;
    }

    bool apply() override {
        l2->pending_reset = false;
        l2->pending_evict = false;
        if (l2->pending_read.active) {
            // llama_l2kv_read_key_cosines runs here: its graph may use the scheduler, and memory_update resets the graphs afterwards
            auto & rd = l2->pending_read;
            rd.active = false;
            rd.result = l2->read_key_cosines(lctx, rd.ikv, rd.out, rd.n_cells_max);
        }
        return do_evict ? l2->evict(lctx) : true;
    }

    const llama_ubatch & get_ubatch() const override {
        GGML_ABORT("an l2kv update context has no ubatch");
    }

    llama_memory_status get_status() const override {
        return LLAMA_MEMORY_STATUS_SUCCESS;
    }

private:
    llama_kv_cache_l2 * l2;
    llama_context     * lctx;
    bool do_evict;
};

//
// llama_kv_cache_l2
//

llama_kv_cache_l2::llama_kv_cache_l2(llama_kv_cache & kv, const llama_l2kv_params & params, std::vector<int32_t> skip_layers) :
    kv(kv), params(params), skip_layers(std::move(skip_layers)) {
    this->params.n_skip_layers = (int32_t) this->skip_layers.size();
    this->params.skip_layers   = this->skip_layers.empty() ? nullptr : this->skip_layers.data();
}

llama_kv_cache_l2 * llama_kv_cache_l2::get(const llama_kv_cache & kv) {
    return kv.l2.get();
}

void llama_kv_cache_l2::attach(llama_kv_cache & kv, std::shared_ptr<llama_kv_cache_l2> l2) {
    kv.l2 = std::move(l2);
}

ggml_tensor * llama_kv_cache_l2::get_kv_tensor(const llama_kv_cache & kv, int32_t il, int32_t kind) {
    const auto it = kv.map_layer_ids.find(il);
    if (it == kv.map_layer_ids.end() || kv.n_stream != 1) {
        return nullptr;
    }
    const auto & layer = kv.layers[it->second];
    return kind == 0 ? layer.k : layer.v;
}

uint32_t llama_kv_cache_l2::n_layer() const {
    return kv.layers.size();
}

int32_t llama_kv_cache_l2::layer_il(uint32_t ikv) const {
    return kv.layers[ikv].il;
}

int32_t llama_kv_cache_l2::layer_ikv(int32_t il) const {
    const auto it = kv.map_layer_ids.find(il);
    return it == kv.map_layer_ids.end() ? -1 : it->second;
}

uint32_t llama_kv_cache_l2::n_head_kv(uint32_t ikv) const {
    return kv.hparams.n_head_kv(kv.layers[ikv].il);
}

uint32_t llama_kv_cache_l2::n_group(uint32_t ikv) const {
    return params.per_head ? n_head_kv(ikv) : 1;
}

const llama_kv_cells & llama_kv_cache_l2::cells() const {
    return kv.v_cells[0];
}

size_t llama_kv_cache_l2::norm_bytes() const {
    size_t res = 0;
    for (const auto * t : kn) {
        res += ggml_nbytes(t);
    }
    return res;
}

size_t llama_kv_cache_l2::kv_bytes(const llama_kv_cache & kv) {
    return kv.total_size();
}

int32_t llama_kv_cache_l2::alloc_layer_tensors(const char * what,
        const std::function<ggml_tensor * (ggml_context *, uint32_t)> & make, std::vector<ggml_tensor *> & out,
        layer_tensors_bufs & bufs) const {
    const uint32_t n_layer = this->n_layer();
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_map;
    std::vector<ggml_context_ptr> ctxs;
    out.assign(n_layer, nullptr);
    for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(kv.layers[ikv].k->buffer);
        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params ip = { size_t(n_layer)*ggml_tensor_overhead(), nullptr, true };
            ggml_context * ctx = ggml_init(ip);
            if (!ctx) {
                out.clear(); // (the tensors made so far die with ctxs)
                return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
            }
            ctxs.emplace_back(ctx);
            it = ctx_map.emplace(buft, ctx).first;
        }
        out[ikv] = make(it->second, ikv);
    }
    layer_tensors_bufs made;
    for (auto & ctx : ctxs) {
        ggml_backend_buffer_type_t buft = nullptr;
        for (const auto & [b, c] : ctx_map) {
            if (c == ctx.get()) {
                buft = b;
            }
        }
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (!buf) {
            out.clear();
            llama_l2kv_error("%s: failed to allocate the %s buffer\n", __func__, what);
            return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
        }
        ggml_backend_buffer_clear(buf, 0);
        made.emplace_back(std::move(ctx), buf);
    }
    for (auto & b : made) {
        bufs.push_back(std::move(b));
    }
    return LLAMA_L2KV_STATUS_OK;
}

int32_t llama_kv_cache_l2::init() {
    const auto & hparams = kv.hparams;

    if (kv.other) {
        llama_l2kv_error("%s: the KV cache shares its cells with another cache; not supported\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
    }
    if (kv.layers.empty()) {
        llama_l2kv_error("%s: the KV cache has no layers\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
    }
    if (kv.n_stream != 1 || kv.n_seq_max != 1) {
        llama_l2kv_error("%s: several sequences (n_seq_max = %u, streams = %u); eviction needs n_seq_max = 1\n", __func__, kv.n_seq_max, kv.n_stream);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
    }
    if (kv.v_trans) {
        llama_l2kv_error("%s: flash attention is off (the V cache is transposed); enable flash attention\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
    }
    if (hparams.is_mla()) {
        llama_l2kv_error("%s: multi-head latent attention (MLA) caches are not supported\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
    }
    if (hparams.use_alibi) {
        llama_l2kv_error("%s: ALiBi models are not supported (their mask depends on cell positions)\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
    }
    if (hparams.n_pos_per_embd() > 1) {
        llama_l2kv_error("%s: multi-dimensional positions (M-RoPE, %u per token) are not supported\n", __func__, hparams.n_pos_per_embd());
        return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
    }
    if (kv.has_cell_ext()) {
        llama_l2kv_error("%s: caches with per-cell extra data are not supported\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
    }
    if (kv.map_layer_ids.size() != kv.layers.size()) {
        llama_l2kv_error("%s: caches whose layers reuse other layers' K/V are not supported\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
    }
    const uint32_t n_layer = kv.layers.size();
    const uint32_t kv_size = kv.get_size();

    skip.assign(n_layer, false);
    for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
        skip[ikv] = std::find(skip_layers.begin(), skip_layers.end(), (int32_t) kv.layers[ikv].il) != skip_layers.end();
    }

    // rows of one (cell, group) must be a whole number of blocks and of 4-byte words, so that they can be
    // moved as F32 rows without touching the bytes
    for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
        const auto & layer = kv.layers[ikv];
        const uint32_t il = layer.il;
        const uint32_t g  = n_group(ikv);

        if (layer.k == nullptr || layer.v == nullptr || layer.k->data == nullptr || layer.v->data == nullptr) {
            llama_l2kv_error("%s: layer %u has no allocated K/V tensors\n", __func__, il);
            return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
        }
        for (const auto * t : { layer.k, layer.v }) {
            const int64_t n_embd_head = t == layer.k ? hparams.n_embd_head_k(il) : hparams.n_embd_head_v(il);
            const size_t  row_bytes   = ggml_row_size(t->type, t->ne[0]) / g;
            if ((params.per_head && n_embd_head % ggml_blck_size(t->type) != 0) || row_bytes % sizeof(float) != 0 ||
                t->ne[0] != n_embd_head * (int64_t) hparams.n_head_kv(il)) {
                llama_l2kv_error("%s: layer %u: %s rows of type %s (%zu bytes per %s) cannot be moved bit-exactly; "
                        "use another cache type or per-layer selection\n", __func__, il, t == layer.k ? "K" : "V",
                        ggml_type_name(t->type), row_bytes, params.per_head ? "head" : "cell");
                return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
            }
        }
    }

    // norm tensors live in the buffer type of their layer's K, so the norm ops run where K is stored
    const int32_t status = alloc_layer_tensors("key norm", [&](ggml_context * ctx, uint32_t ikv) {
        ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_head_kv(ikv), kv_size);
        ggml_format_name(t, "cache_kn_l%d", kv.layers[ikv].il);
        return t;
    }, kn, ctxs_bufs);
    if (status != LLAMA_L2KV_STATUS_OK) {
        return status;
    }

    // F32 aliases over the bytes of K, V and kn: row r = cell*n_group + group
    {
        ggml_init_params ip = { size_t(3*n_layer)*ggml_tensor_overhead(), nullptr, true };
        ctx_alias.reset(ggml_init(ip));
    }
    auto make_alias = [&](ggml_tensor * t, uint32_t g) {
        const int64_t n_rows = (int64_t) kv_size*g;
        ggml_tensor * a = ggml_new_tensor_2d(ctx_alias.get(), GGML_TYPE_F32, ggml_nbytes(t)/sizeof(float)/n_rows, n_rows);
        GGML_ASSERT(ggml_nbytes(a) == ggml_nbytes(t));
        ggml_format_name(a, "%s_rows", t->name);
        GGML_ASSERT(ggml_backend_tensor_alloc(t->buffer, a, t->data) == GGML_STATUS_SUCCESS);
        return a;
    };
    k_rows.resize(n_layer);
    v_rows.resize(n_layer);
    kn_rows.resize(n_layer);
    for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
        const uint32_t g = n_group(ikv);
        k_rows [ikv] = make_alias(kv.layers[ikv].k, g);
        v_rows [ikv] = make_alias(kv.layers[ikv].v, g);
        kn_rows[ikv] = make_alias(kn[ikv], g);
    }

    tpos.assign(n_layer, {});
    rpos.assign(n_layer, {});
    pos_delta  = 0;
    rope_cache = params.positions == LLAMA_L2KV_POSITIONS_CACHE && can_rotate();
    rope_limit = rope_limit_for();

    scorer = llama_l2kv_scorer_init(params.policy, params.seed);
    if (!scorer) {
        llama_l2kv_error("%s: policy (%d) is not a llama_l2kv_policy\n", __func__, params.policy);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }

    return LLAMA_L2KV_STATUS_OK;
}

ggml_tensor * llama_l2kv_rope_source(ggml_tensor * k_cur) {
    // read per graph build, like LLAMA_L2KV_FORCE_GRAPHS, so that a test can compare both sources
    if (getenv("LLAMA_L2KV_NORM_AFTER_ROPE") != nullptr || k_cur->op != GGML_OP_ROPE) {
        return k_cur;
    }
    ggml_tensor * src = k_cur->src[0];
    const int32_t * ip = (const int32_t *) k_cur->op_params;
    const int32_t mode = ip[2];
    float ext_factor;
    float attn_factor;
    memcpy(&ext_factor,  ip + 7, sizeof(float));
    memcpy(&attn_factor, ip + 8, sizeof(float));
    // a pure rotation: plain or NeoX pairs, no YaRN magnitude scaling (which would scale the rotated dims only)
    const bool rotation = (mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX) &&
                          ext_factor == 0.0f && attn_factor == 1.0f;
    return rotation && ggml_are_same_shape(src, k_cur) ? src : k_cur;
}

ggml_tensor * llama_kv_cache_l2::cpy_k_norm(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t il) const {
    if (detaching) {
        return nullptr;
    }
    const int32_t ikv = layer_ikv(il);
    if (ikv < 0) {
        return nullptr;
    }

    const int64_t n_embd_head = k_cur->ne[0];
    const int64_t n_head      = k_cur->ne[1];
    const int64_t n_tokens    = k_cur->ne[2];

    // read the key before RoPE (the same norm: a rotation), so that the rotated K keeps one consumer,
    // its store into the cache; the CUDA backend fuses ROPE -> VIEW -> SET_ROWS only then
    ggml_tensor * x = llama_l2kv_rope_source(k_cur);
    if (x->type != GGML_TYPE_F32) {
        x = ggml_cast(ctx, x, GGML_TYPE_F32);
    }
    if (!ggml_is_contiguous(x)) { // the CUDA unary kernels need contiguous input
        x = ggml_cont(ctx, x);
    }
    x = ggml_reshape_2d(ctx, x, n_embd_head, n_head*n_tokens);

    // squared L2 norm of every head: RoPE and the Hadamard rotation of quantized caches are
    // rotations, so this equals the norm of the key before them
    ggml_tensor * sq = ggml_sum_rows(ctx, ggml_sqr(ctx, x)); // [1, n_head*n_tokens]
    sq = ggml_reshape_2d(ctx, sq, n_head, n_tokens);

    return ggml_set_rows(ctx, kn[ikv], sq, k_idxs);
}

bool llama_kv_cache_l2::fits(const std::vector<llama_ubatch> & ubatches) const {
    uint64_t n_tokens = 0;
    for (const auto & ub : ubatches) {
        n_tokens += ub.n_tokens;
    }
    return cells().get_used() + n_tokens <= (uint64_t) params.kv_budget + n_slack;
}

llama_memory_context_ptr llama_kv_cache_l2::init_update(llama_context * lctx, bool optimize) {
    const bool over     = cells().get_used() > params.kv_budget;
    const bool do_evict = over && (optimize || pending_evict);

    if (!do_evict && !pending_reset && !pending_read.active) {
        pending_evict = false;
        return nullptr;
    }

    return std::make_unique<llama_kv_cache_l2_context>(this, lctx, do_evict);
}

int32_t llama_kv_cache_l2::true_pos(uint32_t ikv, uint32_t cell, uint32_t head) const {
    if (cell < n_comp) {
        return tpos[ikv][(size_t) cell*n_head_kv(ikv) + head];
    }
    return cells().pos_get(cell);
}

int32_t llama_kv_cache_l2::rope_pos(uint32_t ikv, uint32_t cell, uint32_t head) const {
    if (cell < n_comp) {
        return rpos[ikv][(size_t) cell*n_head_kv(ikv) + head];
    }
    return cells().pos_get(cell) - pos_delta;
}

std::vector<uint32_t> llama_kv_cache_l2::used_cells() const {
    const auto & cells = this->cells();
    std::vector<uint32_t> used;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (!cells.is_empty(c)) {
            used.push_back(c);
        }
    }
    return used;
}

int32_t llama_kv_cache_l2::n_threads(const llama_context * lctx) {
    // the larger of the two: evictions happen between batches as well as between single tokens
    const auto & cparams = lctx->get_cparams();
    return (int32_t) std::max(cparams.n_threads, cparams.n_threads_batch);
}

const llama_l2kv_scorer & llama_kv_cache_l2::layer_scorer(uint32_t ikv) const {
    return skip[ikv] ? llama_l2kv_recency_scorer() : *scorer;
}

llm_graph_result * llama_kv_cache_l2::begin_graph(llama_context * lctx) {
    ggml_backend_sched_reset(lctx->get_sched());
    auto * res = lctx->get_gf_res_reserve();
    res->reset();
    return res;
}

// Our graphs have no weights, which is what ggml's scheduler places ops by: a reduction over a cache in another
// backend's memory (an rpc-server's, a GPU's) would run on the CPU after copying the whole cache over. Pin every
// node that reads such a cache tensor, and every node that reads a pinned one, to the backend holding the cache;
// only inputs (indices, positions) and outputs (per-key scores) then cross between backends.
static void llama_l2kv_pin_to_cache_backends(ggml_backend_sched_t sched, ggml_cgraph * gf) {
    const int n_backends = ggml_backend_sched_get_n_backends(sched);
    std::unordered_map<const ggml_tensor *, ggml_backend_t> pinned;
    std::unordered_map<ggml_backend_buffer_type_t, ggml_backend_t> by_buft;
    auto backend_of_buffer = [&](ggml_backend_buffer_t buf) -> ggml_backend_t {
        if (buf == nullptr || ggml_backend_buffer_is_host(buf)) {
            return nullptr; // host memory: the CPU backend, the scheduler's default
        }
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(buf);
        auto it = by_buft.find(buft);
        if (it == by_buft.end()) {
            ggml_backend_t found = nullptr;
            for (int b = 0; b < n_backends && found == nullptr; ++b) {
                ggml_backend_t backend = ggml_backend_sched_get_backend(sched, b);
                if (ggml_backend_supports_buft(backend, buft)) {
                    found = backend;
                }
            }
            it = by_buft.emplace(buft, found).first;
        }
        return it->second;
    };
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->buffer != nullptr || (node->view_src != nullptr && node->view_src->buffer != nullptr)) {
            continue; // a view of a cache tensor: the scheduler places it with its buffer
        }
        ggml_backend_t backend = nullptr;
        for (int j = 0; j < GGML_MAX_SRC && backend == nullptr; ++j) {
            const ggml_tensor * src = node->src[j];
            if (src == nullptr) {
                continue;
            }
            auto it = pinned.find(src);
            if (it != pinned.end()) {
                backend = it->second;
            } else {
                backend = backend_of_buffer(src->view_src != nullptr ? src->view_src->buffer : src->buffer);
            }
        }
        if (backend != nullptr && ggml_backend_supports_op(backend, node)) {
            pinned[node] = backend;
            ggml_backend_sched_set_tensor_backend(sched, node, backend);
        }
    }
}

bool llama_kv_cache_l2::run_graph(llama_context * lctx, llm_graph_result * res,
        std::unique_ptr<llm_graph_input_i> inp, const char * what) {
    auto * gf = res->get_gf();
    res->add_input(std::move(inp));
    llama_l2kv_pin_to_cache_backends(lctx->get_sched(), gf);
    if (!ggml_backend_sched_alloc_graph(lctx->get_sched(), gf)) {
        llama_l2kv_error("%s: failed to allocate the %s graph\n", __func__, what);
        return false;
    }
    res->set_inputs(nullptr);
    if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        llama_l2kv_error("%s: failed to compute the %s graph\n", __func__, what);
        return false;
    }
    // the compute may still run on an asynchronous backend's stream (CUDA), and the outputs are read with
    // ggml_backend_tensor_get, which does not wait for it
    ggml_backend_sched_synchronize(lctx->get_sched());
    return true;
}

bool llama_kv_cache_l2::compute_features(llama_context * lctx, const std::vector<uint32_t> & used,
        const std::vector<uint32_t> & layers, std::vector<layer_features> & out, uint32_t extra_features) {
    const uint32_t n_cells = used.empty() ? 0 : used.back() + 1;
    const uint32_t n_used  = used.size();

    out.resize(kv.layers.size());

    // a K cache in host memory (the CPU backend) is scored in place: a ggml graph for this reduction
    // needs a transposed copy of every key, which costs the CPU backend more than the whole eviction
    const bool force_graph = llama_l2kv_force_graphs();

    std::vector<uint32_t> cos_layers;
    std::vector<uint32_t> cos_layers_host;
    for (uint32_t ikv : layers) {
        const uint32_t need = layer_scorer(ikv).features() | extra_features;
        const uint32_t nh   = n_head_kv(ikv);
        if (need & LLAMA_L2KV_FEATURE_NORM2) {
            out[ikv].norm2.resize((size_t) n_cells*nh);
            ggml_backend_tensor_get(kn[ikv], out[ikv].norm2.data(), 0, out[ikv].norm2.size()*sizeof(float));
        }
        if (need & LLAMA_L2KV_FEATURE_KEY_COSINE) {
            if (!force_graph && ggml_backend_buffer_is_host(kv.layers[ikv].k->buffer)) {
                cos_layers_host.push_back(ikv);
            } else {
                cos_layers.push_back(ikv);
            }
        }
    }
    llama_l2kv_parallel_for(cos_layers_host.size(), n_threads(lctx), [&](uint32_t j) {
        key_cosines_host(cos_layers_host[j], used, out[cos_layers_host[j]].kcos);
    });
    if (cos_layers.empty() || n_used == 0) {
        return true;
    }

    // key cosines on the backend: per (layer, head), the unit keys of the used cells (any cache type,
    // dequantized by get_rows) against their normalised sum; one graph for all layers
    auto * res = begin_graph(lctx);
    auto * ctx = res->get_ctx();
    auto * gf  = res->get_gf();

    auto inp = std::make_unique<llm_graph_input_l2_moves>();

    ggml_tensor * idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_used);
    ggml_set_input(idx);
    inp->src.emplace_back(idx, std::vector<int32_t>(used.begin(), used.end()));

    const float eps = 1e-12f;

    std::vector<ggml_tensor *> cos(cos_layers.size());
    for (size_t j = 0; j < cos_layers.size(); ++j) {
        const uint32_t ikv = cos_layers[j];
        const int64_t  nh  = n_head_kv(ikv);
        const int64_t  d   = kv.hparams.n_embd_head_k(kv.layers[ikv].il);

        ggml_tensor * k = ggml_get_rows(ctx, kv.layers[ikv].k, idx);               // F32 [d*nh, n_used]
        ggml_tensor * u = ggml_l2_norm(ctx, ggml_reshape_2d(ctx, k, d, nh*n_used), eps);
        u = ggml_reshape_3d(ctx, u, d, nh, n_used);                               // unit keys
        ggml_tensor * m = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, u, 1, 2, 0, 3))); // [1, d, nh]
        m = ggml_l2_norm(ctx, ggml_reshape_2d(ctx, m, d, nh), eps);                // unit mean key per head
        cos[j] = ggml_sum_rows(ctx, ggml_mul(ctx, u, ggml_reshape_3d(ctx, m, d, nh, 1))); // [1, nh, n_used]
        ggml_set_output(cos[j]);
        ggml_build_forward_expand(gf, cos[j]);
    }
    if (!run_graph(lctx, res, std::move(inp), "key-cosine")) {
        return false;
    }

    std::vector<float> buf;
    for (size_t j = 0; j < cos_layers.size(); ++j) {
        const uint32_t ikv = cos_layers[j];
        const uint32_t nh  = n_head_kv(ikv);
        buf.resize((size_t) n_used*nh);
        ggml_backend_tensor_get(cos[j], buf.data(), 0, buf.size()*sizeof(float));
        auto & kcos = out[ikv].kcos;
        kcos.assign((size_t) n_cells*nh, 0.0f);
        for (uint32_t i = 0; i < n_used; ++i) {
            std::copy(buf.begin() + (size_t) i*nh, buf.begin() + (size_t) (i + 1)*nh, kcos.begin() + (size_t) used[i]*nh);
        }
    }
    return true;
}

// half -> float for the host key cosines: ggml's scalar row conversion took 80% of a KeyDiff eviction on
// the CPU. x86-64 CPUs with F16C convert 8 values per instruction (checked at run time: the library is
// built for the baseline ISA); elsewhere, and for the tail, ggml's own conversion
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

__attribute__((target("avx,f16c")))
static void llama_l2kv_fp16_to_fp32_f16c(const ggml_fp16_t * x, float * y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i))));
    }
    ggml_fp16_to_fp32_row(x + i, y + i, n - i);
}
#endif

static void llama_l2kv_fp16_to_fp32_row(const ggml_fp16_t * x, float * y, int64_t n) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    static const bool has_f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    if (has_f16c) {
        llama_l2kv_fp16_to_fp32_f16c(x, y, n);
        return;
    }
#endif
    ggml_fp16_to_fp32_row(x, y, n);
}

// one cached key row as F32
static void llama_l2kv_load_key_row(const ggml_tensor * k, uint32_t cell, float * dst) {
    const char * row = (const char *) k->data + (size_t) cell*k->nb[1];
    if (k->type == GGML_TYPE_F32) {
        memcpy(dst, row, k->ne[0]*sizeof(float));
    } else if (k->type == GGML_TYPE_F16) {
        llama_l2kv_fp16_to_fp32_row((const ggml_fp16_t *) row, dst, k->ne[0]);
    } else {
        ggml_get_type_traits(k->type)->to_float(row, dst, k->ne[0]);
    }
}

#if defined(__GNUC__) || defined(__clang__)
#define LLAMA_L2KV_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define LLAMA_L2KV_ALWAYS_INLINE __forceinline
#else
#define LLAMA_L2KV_ALWAYS_INLINE inline
#endif

// a dot product with 8 independent partial sums, so that the compiler can vectorize it
static LLAMA_L2KV_ALWAYS_INLINE float llama_l2kv_dot(const float * a, const float * b, int64_t d) {
    float acc[8] = { 0.0f };
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
        for (int l = 0; l < 8; ++l) {
            acc[l] += a[j + l]*b[j + l];
        }
    }
    for (; j < d; ++j) {
        acc[0] += a[j]*b[j];
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// the two passes of the host key cosines over a layer's used key rows (rows are converted twice rather
// than stored: the layer's F32 copy would not fit in cache, and the conversion is cheap). Written once,
// inlined into a baseline-ISA function and, on x86-64, into an AVX2 + FMA one chosen at run time (the
// library is built for the baseline ISA, where these loops vectorize 4 floats wide without FMA)
static LLAMA_L2KV_ALWAYS_INLINE void llama_l2kv_key_cosines_passes(
        const ggml_tensor * k, const uint32_t * used, uint32_t n_used, uint32_t nh, int64_t d,
        float * x, float * inv, float * m, float * kcos) {
    // 1/|k| per (entry, head) and the sum of the unit keys per head
    for (uint32_t i = 0; i < n_used; ++i) {
        llama_l2kv_load_key_row(k, used[i], x);
        for (uint32_t h = 0; h < nh; ++h) {
            const float * v = x + (size_t) h*d;
            const float   r = 1.0f/std::max(std::sqrt(llama_l2kv_dot(v, v, d)), 1e-12f);
            float       * a = m + (size_t) h*d;
            for (int64_t j = 0; j < d; ++j) {
                a[j] += v[j]*r;
            }
            inv[(size_t) i*nh + h] = r;
        }
    }
    // the unit mean key per head
    for (uint32_t h = 0; h < nh; ++h) {
        float * a = m + (size_t) h*d;
        const float r = 1.0f/std::max(std::sqrt(llama_l2kv_dot(a, a, d)), 1e-12f);
        for (int64_t j = 0; j < d; ++j) {
            a[j] *= r;
        }
    }
    // one dot per (entry, head)
    for (uint32_t i = 0; i < n_used; ++i) {
        llama_l2kv_load_key_row(k, used[i], x);
        for (uint32_t h = 0; h < nh; ++h) {
            const float * v = x + (size_t) h*d;
            kcos[(size_t) used[i]*nh + h] = llama_l2kv_dot(v, m + (size_t) h*d, d)*inv[(size_t) i*nh + h];
        }
    }
}

static void llama_l2kv_key_cosines_baseline(
        const ggml_tensor * k, const uint32_t * used, uint32_t n_used, uint32_t nh, int64_t d,
        float * x, float * inv, float * m, float * kcos) {
    llama_l2kv_key_cosines_passes(k, used, n_used, nh, d, x, inv, m, kcos);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma")))
static void llama_l2kv_key_cosines_avx2(
        const ggml_tensor * k, const uint32_t * used, uint32_t n_used, uint32_t nh, int64_t d,
        float * x, float * inv, float * m, float * kcos) {
    llama_l2kv_key_cosines_passes(k, used, n_used, nh, d, x, inv, m, kcos);
}
#endif

void llama_kv_cache_l2::key_cosines_host(uint32_t ikv, const std::vector<uint32_t> & used, std::vector<float> & kcos) const {
    const ggml_tensor * k = kv.layers[ikv].k;

    const uint32_t n_used  = used.size();
    const uint32_t n_cells = used.empty() ? 0 : used.back() + 1;
    const uint32_t nh      = n_head_kv(ikv);
    const int64_t  d       = kv.hparams.n_embd_head_k(kv.layers[ikv].il);

    GGML_ASSERT(k->ne[0] == d*nh);

    std::vector<float> x(k->ne[0]);
    std::vector<float> inv((size_t) n_used*nh);
    std::vector<float> m(k->ne[0], 0.0f);
    kcos.assign((size_t) n_cells*nh, 0.0f);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    // LLAMA_L2KV_BASELINE_ISA: the baseline loops also on AVX2 machines (read per call, for the tests)
    static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (has_avx2 && getenv("LLAMA_L2KV_BASELINE_ISA") == nullptr) {
        llama_l2kv_key_cosines_avx2(k, used.data(), n_used, nh, d, x.data(), inv.data(), m.data(), kcos.data());
        return;
    }
#endif
    llama_l2kv_key_cosines_baseline(k, used.data(), n_used, nh, d, x.data(), inv.data(), m.data(), kcos.data());
}

void llama_kv_cache_l2::group_scores(uint32_t ikv, uint32_t g, const std::vector<uint32_t> & used,
        const layer_features & feat, std::vector<int32_t> & pos, std::vector<float> & score) const {
    const uint32_t n  = used.size();
    const uint32_t nh = n_head_kv(ikv);
    const uint32_t h  = params.per_head ? g : 0; // the head whose true positions the group follows

    // true_pos(ikv, c, h), with the layer's table and head count looked up once: this loop runs for every
    // entry of every group (calling true_pos here cost 0.2 ms of a 3 ms SmolLM2 eviction)
    const auto & cells = this->cells();
    const auto & tp    = tpos[ikv];

    pos.resize(n);
    for (uint32_t i = 0; i < n; ++i) {
        const uint32_t c = used[i];
        pos[i] = c < n_comp ? tp[(size_t) c*nh + h] : cells.pos_get(c);
    }

    llama_l2kv_group view = {
        /*.il       =*/ layer_il(ikv),
        /*.group    =*/ g,
        /*.n_head   =*/ nh,
        /*.per_head =*/ params.per_head,
        /*.n        =*/ n,
        /*.cell     =*/ used.data(),
        /*.pos      =*/ pos.data(),
        /*.norm2    =*/ feat.norm2.empty() ? nullptr : feat.norm2.data(),
        /*.kcos     =*/ feat.kcos.empty()  ? nullptr : feat.kcos.data(),
    };
    score.resize(n);
    layer_scorer(ikv).score(view, score.data());
}

int32_t llama_kv_cache_l2::read_key_cosines(llama_context * lctx, uint32_t ikv, float * out, int32_t n_cells_max) {
    const std::vector<uint32_t> used = used_cells();
    const uint32_t n  = std::min<uint32_t>(cells().used_max_p1(), std::max(n_cells_max, 0));
    const uint32_t nh = n_head_kv(ikv);

    lctx->synchronize();

    std::vector<layer_features> feat;
    if (!compute_features(lctx, used, { ikv }, feat, LLAMA_L2KV_FEATURE_KEY_COSINE)) {
        return LLAMA_L2KV_STATUS_COMPUTE_FAILED;
    }
    std::fill(out, out + (size_t) n*nh, 0.0f);
    const auto & kcos = feat[ikv].kcos;
    std::copy(kcos.begin(), kcos.begin() + std::min(kcos.size(), (size_t) n*nh), out);
    return (int32_t) n;
}

bool llama_kv_cache_l2::evict(llama_context * lctx) {
    // an asynchronous backend (an rpc-server, a GPU) may still be computing the last ubatch: wait here, so that
    // the eviction's times are its own (its first read would wait anyway)
    ggml_backend_sched_synchronize(lctx->get_sched());
    const int64_t t_start_us = ggml_time_us();

    auto & cells = kv.v_cells[0];

    // (a recall may keep more than the budget: see recall_inject)
    const std::vector<uint32_t> used = used_cells();
    const uint32_t n_keep = std::min<uint32_t>(evict_target > 0 ? evict_target : params.kv_budget, used.size());
    evict_target = 0;
    if (used.size() <= n_keep && !pending_renumber) {
        return true;
    }
    const bool pending_renumber_now = pending_renumber;
    pending_renumber = false;

    const uint32_t n_used  = used.size();
    const uint32_t n_cells = cells.used_max_p1();
    const int32_t pos_last = cells.seq_pos_max(0);

    lctx->synchronize();

    const uint32_t n_layer = kv.layers.size();

    // 1. the features the policy reads (key norms, key cosines)
    std::vector<layer_features> feat;
    {
        std::vector<uint32_t> layers(n_layer);
        std::iota(layers.begin(), layers.end(), 0);
        if (!compute_features(lctx, used, layers, feat)) {
            failed = true;
            return false;
        }
    }
    const int64_t t_feature_end_us = ggml_time_us();

    // 2. per (layer, group): scores, selection, and the rows to move
    std::vector<std::vector<int32_t>> new_tpos(n_layer);
    std::vector<std::vector<int32_t>> old_rpos(n_layer); // the RoPE position of each kept row before the eviction
    std::vector<std::vector<int32_t>> mv_src(n_layer);
    std::vector<std::vector<int64_t>> mv_dst(n_layer);
    std::vector<std::vector<dropped_entry>> dropped(n_layer); // for the archive

    // layers are independent: each one ranks its groups on one of the context's threads
    llama_l2kv_parallel_for(n_layer, n_threads(lctx), [&](uint32_t ikv) {
        const uint32_t nh = n_head_kv(ikv);
        const uint32_t ng = n_group(ikv);

        std::vector<int32_t> pos;
        std::vector<float>   score;
        std::vector<int32_t> kept(n_cells); // per cell: its index in `used` when kept, else -1
        std::vector<llama_l2kv_candidate> cand;
        std::vector<uint32_t> holes;
        std::vector<uint32_t> movers;

        new_tpos[ikv].assign((size_t) n_keep*nh, -1);
        old_rpos[ikv].assign((size_t) n_keep*nh, 0);

        for (uint32_t g = 0; g < ng; ++g) {
            group_scores(ikv, g, used, feat[ikv], pos, score);

            llama_l2kv_candidates(pos.data(), score.data(), n_used, params.n_sink, params.n_recent, pos_last, cand);
            // a recall's spans are protected like the sinks; its filler rows go first
            const uint8_t * fill = filler.empty() ? nullptr : filler[ikv].data();
            if (!pinned.empty() || fill != nullptr) {
                for (auto & c : cand) {
                    if (fill != nullptr && fill[(size_t) used[c.idx]*ng + g]) {
                        c.key = UINT64_MAX;
                    } else if (llama_l2kv_spans_contain(pinned, pos[c.idx])) {
                        c.key &= ~(1ull << 63);
                    }
                }
            }
            llama_l2kv_keep_best(cand, n_keep);

            std::fill(kept.begin(), kept.end(), -1);
            for (const auto & c : cand) {
                kept[used[c.idx]] = (int32_t) c.idx;
            }
            if (archive_on) {
                for (uint32_t i = 0; i < n_used; ++i) {
                    const uint32_t c = used[i];
                    if (kept[c] < 0 && (fill == nullptr || !fill[(size_t) c*ng + g])) {
                        dropped[ikv].push_back({ c, g, pos[i], rope_pos(ikv, c, params.per_head ? g : 0) });
                    }
                }
            }

            // kept entries below n_keep stay; the others fill the cells below n_keep that are free or evicted
            holes.clear();
            movers.clear();
            for (uint32_t c = 0; c < n_cells; ++c) {
                if (c < n_keep && kept[c] < 0) {
                    holes.push_back(c);
                } else if (c >= n_keep && kept[c] >= 0) {
                    movers.push_back(c);
                }
            }
            for (uint32_t c = n_cells; c < n_keep; ++c) {
                holes.push_back(c);
            }
            GGML_ASSERT(holes.size() >= movers.size());

            // per head, group_scores left the true positions of the group's head in pos; per layer, every
            // head keeps its own
            auto record = [&](uint32_t from, uint32_t to) {
                if (params.per_head) {
                    new_tpos[ikv][(size_t) to*nh + g] = pos[kept[from]];
                    old_rpos[ikv][(size_t) to*nh + g] = rope_pos(ikv, from, g);
                } else {
                    for (uint32_t h = 0; h < nh; ++h) {
                        new_tpos[ikv][(size_t) to*nh + h] = true_pos(ikv, from, h);
                        old_rpos[ikv][(size_t) to*nh + h] = rope_pos(ikv, from, h);
                    }
                }
            };
            for (uint32_t c = 0; c < std::min(n_cells, n_keep); ++c) {
                if (kept[c] >= 0) {
                    record(c, c);
                }
            }
            for (size_t m = 0; m < movers.size(); ++m) {
                record(movers[m], holes[m]);
                mv_src[ikv].push_back((int32_t) (movers[m]*ng + g));
                mv_dst[ikv].push_back((int64_t) holes[m]*ng + g);
            }
        }
    });

    // the dropped entries go to the archive before the compaction overwrites them
    if (archive_on && !archive_dropped(lctx, dropped)) {
        failed = true;
        return false;
    }
    filler.clear();
    const int64_t t_rank_end_us = ggml_time_us();

    // 3. move the kept rows: rows[dst] = rows[src] for K, V and the norms; sources (cells >= n_keep) and
    //    destinations (cells < n_keep) never overlap. Layers in host memory (the CPU backend) copy in
    //    place; the others run one compaction graph on their backend
    const bool force_graph = llama_l2kv_force_graphs();
    uint64_t n_moved = 0;
    {
        std::vector<uint32_t> host_layers;
        std::vector<uint32_t> graph_layers;
        for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
            if (mv_src[ikv].empty()) {
                continue;
            }
            n_moved += mv_src[ikv].size();
            const auto tensors = row_aliases(ikv);
            const bool on_host = !force_graph && std::all_of(tensors.begin(), tensors.end(),
                    [](const ggml_tensor * t) { return ggml_backend_buffer_is_host(t->buffer); });
            (on_host ? host_layers : graph_layers).push_back(ikv);
        }

        llama_l2kv_parallel_for(host_layers.size(), n_threads(lctx), [&](uint32_t j) {
            const uint32_t ikv = host_layers[j];
            const size_t n = mv_src[ikv].size();
            for (ggml_tensor * rows : row_aliases(ikv)) {
                char * data = (char *) rows->data;
                const size_t nb1 = rows->nb[1];
                for (size_t m = 0; m < n; ++m) {
                    memcpy(data + (size_t) mv_dst[ikv][m]*nb1, data + (size_t) mv_src[ikv][m]*nb1, nb1);
                }
            }
        });

        if (!graph_layers.empty()) {
            llm_graph_result * res = begin_graph(lctx);
            auto * ctx = res->get_ctx();
            auto * gf  = res->get_gf();
            auto inp = std::make_unique<llm_graph_input_l2_moves>();

            for (uint32_t ikv : graph_layers) {
                const int64_t n = mv_src[ikv].size();
                ggml_tensor * src = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
                ggml_tensor * dst = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
                ggml_set_input(src);
                ggml_set_input(dst);
                inp->src.emplace_back(src, std::move(mv_src[ikv]));
                inp->dst.emplace_back(dst, std::move(mv_dst[ikv]));

                for (ggml_tensor * rows : row_aliases(ikv)) {
                    ggml_build_forward_expand(gf, ggml_set_rows(ctx, rows, ggml_get_rows(ctx, rows, src), dst));
                }
            }
            if (!run_graph(lctx, res, std::move(inp), "compaction")) {
                failed = true;
                return false;
            }
        }
    }
    const int64_t t_move_end_us = ggml_time_us();

    // 4. RoPE positions: with rope_cache the kept keys of every (layer, head) become 0..n_keep-1 in the order of
    //    their true positions and the next token n_keep; K rows whose rotation changes are re-rotated (none
    //    while keys keep their original positions, so that mode runs exactly what it ran before); renumbered only
    //    when positions would pass rope_limit before the next eviction (see rope_limit_for);
    //    rows a recall put back are always renumbered
    const bool renumber = !rope_cache || pending_renumber_now ||
            (int64_t) pos_last + 1 - pos_delta + n_slack > (int64_t) rope_limit;
    std::vector<std::vector<int32_t>> new_rpos = renumber ? target_rope_positions(new_tpos, n_keep, n_threads(lctx)) : old_rpos;
    const int32_t new_delta = !rope_cache ? 0 : renumber ? pos_last + 1 - (int32_t) n_keep : pos_delta;
    {
        std::vector<std::vector<int32_t>> delta(n_layer);
        uint64_t n_rot = 0;
        for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
            const size_t n = new_rpos[ikv].size();
            std::vector<int32_t> d(n);
            uint64_t n_layer_rot = 0;
            for (size_t i = 0; i < n; ++i) {
                d[i] = new_rpos[ikv][i] - old_rpos[ikv][i];
                n_layer_rot += d[i] != 0;
            }
            if (n_layer_rot > 0) {
                delta[ikv] = std::move(d);
            }
            n_rot += n_layer_rot;
        }
        const int32_t swa_delta = pos_delta - new_delta;
        if (n_rot > 0 || (swa_delta != 0 && kv_swa != nullptr)) {
            if (!rotate(lctx, delta, n_keep, swa_delta)) {
                failed = true;
                return false;
            }
        }
        n_rotated_rows += n_rot;
    }
    ggml_backend_sched_synchronize(lctx->get_sched()); // the moves and rotations of an asynchronous backend
    const int64_t t_rotate_end_us = ggml_time_us();

    // cells [0, n_keep) now hold the kept entries of every (layer, head): give them virtual positions
    // that end at the last position, so that they stay visible to every later token
    // (every used cell is rewritten, so one reset replaces a removal per cell: each removal and each
    // re-add updates the cells' ordered position set, and at budget 4096 the removals cost ~0.8 ms)
    cells.reset();
    for (uint32_t j = 0; j < n_keep; ++j) {
        cells.pos_set(j, pos_last - (int32_t) n_keep + 1 + (int32_t) j);
        cells.seq_add(j, 0);
    }
    kv.v_heads[0] = n_keep;

    n_comp     = n_keep;
    p_comp_max = pos_last;
    tpos       = std::move(new_tpos);
    rpos       = std::move(new_rpos);
    pos_delta  = new_delta;

    const int64_t t_end_us = ggml_time_us();

    n_evictions  += 1;
    n_dropped    += n_used - n_keep;
    n_moved_rows += n_moved;
    t_evict_us   += t_end_us - t_start_us;
    t_feature_us += t_feature_end_us - t_start_us;
    t_rank_us    += t_rank_end_us - t_feature_end_us;
    t_move_us    += t_move_end_us - t_rank_end_us;
    t_rotate_us  += t_rotate_end_us - t_move_end_us;

    LLAMA_LOG_DEBUG("%s: kept %u of %u entries per layer and head, moved %llu rows in %.2f ms "
            "(features %.2f, ranking %.2f, moves %.2f)\n", __func__, n_keep, n_used, (unsigned long long) n_moved,
            (t_end_us - t_start_us)/1000.0, (t_feature_end_us - t_start_us)/1000.0,
            (t_rank_end_us - t_feature_end_us)/1000.0, (t_move_end_us - t_rank_end_us)/1000.0);

    return true;
}

bool llama_kv_cache_l2::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    GGML_UNUSED(seq_id);

    if (n_comp == 0) {
        return true; // nothing compacted: the cells hold true positions
    }
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    if (p0 > p_comp_max) {
        return true; // only entries added after the last compaction
    }
    // compacted cells hold virtual positions, so the cells' smallest position says nothing about the
    // true ones (the sinks keep position 0): only a removal from position 0 on takes every entry
    if (p0 == 0 && p1 == std::numeric_limits<llama_pos>::max()) {
        on_clear(); // everything goes
        return true;
    }
    LLAMA_LOG_WARN("%s: cannot remove positions [%d, %d) after an eviction: entries up to position %d were compacted; "
            "only positions > %d or the whole sequence can be removed\n", __func__, p0, p1, p_comp_max, p_comp_max);
    return false;
}

bool llama_kv_cache_l2::shift_allowed() const {
    llama_l2kv_error("%s: position shifts (context shift, seq_add/seq_div) are refused while L2 eviction is enabled\n", __func__);
    return false;
}

void llama_kv_cache_l2::on_clear() {
    n_comp     = 0;
    p_comp_max = -1;
    pos_delta  = 0;
    archive.clear();
    pinned.clear();
    filler.clear();
    for (auto & t : tpos) {
        t.clear();
    }
    for (auto & t : rpos) {
        t.clear();
    }
}

void llama_kv_cache_l2::check_state_read(llama_seq_id seq_id) const {
    if (seq_id != -1) {
        throw std::runtime_error("l2kv: loading a per-sequence state into a context with L2 eviction enabled is "
                "not supported; load a whole context state, or load it with eviction disabled");
    }
}

// "L2KV" little-endian, then the block's version
static constexpr uint32_t LLAMA_L2KV_STATE_MAGIC   = 0x564b324c;
// version 2 adds the archive block, version 3 the RoPE positions (pos_delta, the compacted rows' and the archived
// rows'); older states still load, as states whose keys kept their original positions
static constexpr uint32_t LLAMA_L2KV_STATE_VERSION = 3;

void llama_kv_cache_l2::state_write(llama_io_write_i & io, llama_seq_id seq_id) const {
    if (seq_id != -1) {
        // a per-sequence state is restored into cells that find_slot picks: fine for true positions,
        // wrong for compacted cells, whose true positions are kept per cell index
        if (n_comp > 0) {
            throw std::runtime_error("l2kv: a per-sequence state of an evicted KV cache is not supported (its "
                    "cells would be restored elsewhere); save the whole context state instead");
        }
        return; // no key norms: such a state loads only with eviction disabled
    }
    const std::vector<uint32_t> used = used_cells();
    const uint32_t n_used  = used.size();
    const uint32_t n_layer = kv.layers.size();

    // a whole-context restore puts the written cells at 0 .. n_used-1 in order: the compacted cells
    // [0, n_comp) keep their index (and their row in the true-position table) only if they are all used
    for (uint32_t c = 0; c < n_comp; ++c) {
        if (c >= n_used || used[c] != c) {
            throw std::runtime_error("l2kv: internal error: a compacted cell is empty, the state cannot be saved");
        }
    }

    io.write(&LLAMA_L2KV_STATE_MAGIC,   sizeof(uint32_t));
    io.write(&LLAMA_L2KV_STATE_VERSION, sizeof(uint32_t));
    io.write(&n_layer,    sizeof(n_layer));
    io.write(&n_comp,     sizeof(n_comp));
    io.write(&p_comp_max, sizeof(p_comp_max));
    io.write(&n_used,     sizeof(n_used));
    io.write(&pos_delta,  sizeof(pos_delta));

    for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
        const uint32_t nh = n_head_kv(ikv);
        io.write(&nh, sizeof(nh));
        if (n_comp > 0) {
            GGML_ASSERT(tpos[ikv].size() == (size_t) n_comp*nh && rpos[ikv].size() == (size_t) n_comp*nh);
            io.write(tpos[ikv].data(), tpos[ikv].size()*sizeof(int32_t));
            io.write(rpos[ikv].data(), rpos[ikv].size()*sizeof(int32_t));
        }
        // the norm rows of the used cells, one write per run of consecutive cells
        const size_t row = (size_t) nh*sizeof(float);
        for (uint32_t i = 0; i < n_used; ) {
            uint32_t j = i + 1;
            while (j < n_used && used[j] == used[j - 1] + 1) {
                ++j;
            }
            io.write_tensor(kn[ikv], (size_t) used[i]*row, (size_t) (j - i)*row);
            i = j;
        }
    }

    // the archive: whether it is on, the pinned spans, and per (layer, group) its entries
    const uint8_t on = archive_on;
    io.write(&on, sizeof(on));
    if (!archive_on) {
        return;
    }
    const uint32_t n_pinned = pinned.size();
    io.write(&n_pinned, sizeof(n_pinned));
    for (const auto & s : pinned) {
        io.write(&s.first,  sizeof(s.first));
        io.write(&s.second, sizeof(s.second));
    }
    for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
        const uint64_t row = archive.layout(ikv).total();
        io.write(&row, sizeof(row));
        for (uint32_t g = 0; g < n_group(ikv); ++g) {
            std::vector<int32_t> pos;
            std::vector<int32_t> rot;
            std::vector<uint8_t> rows;
            const uint32_t n = archive.read(ikv, g, pos, rot, rows);
            io.write(&n, sizeof(n));
            if (n > 0) { // (an empty vector's data() may be null, which memcpy must not get even for 0 bytes)
                io.write(pos.data(),  pos.size()*sizeof(int32_t));
                io.write(rot.data(),  rot.size()*sizeof(int32_t));
                io.write(rows.data(), rows.size());
            }
        }
    }
}

void llama_kv_cache_l2::state_read(llama_io_read_i & io) {
    const uint32_t n_layer = kv.layers.size();
    try {
        uint32_t magic = 0;
        uint32_t version = 0;
        try {
            io.read(&magic, sizeof(magic));
        } catch (const std::exception &) {
            magic = 0; // the state ends with the stock cells
        }
        if (magic != LLAMA_L2KV_STATE_MAGIC) {
            throw std::runtime_error("the state has no l2kv data (saved with eviction disabled?)");
        }
        io.read(&version, sizeof(version));
        if (version < 1 || version > LLAMA_L2KV_STATE_VERSION) {
            throw std::runtime_error(format("l2kv state version %u, this library reads versions 1 to %u",
                    version, LLAMA_L2KV_STATE_VERSION));
        }
        uint32_t n_layer_in = 0;
        uint32_t n_comp_in  = 0;
        int32_t  p_comp_in  = -1;
        uint32_t n_used_in  = 0;
        io.read(&n_layer_in, sizeof(n_layer_in));
        io.read(&n_comp_in,  sizeof(n_comp_in));
        io.read(&p_comp_in,  sizeof(p_comp_in));
        io.read(&n_used_in,  sizeof(n_used_in));
        int32_t pos_delta_in = 0; // (older states: every key at its original position)
        if (version >= 3) {
            io.read(&pos_delta_in, sizeof(pos_delta_in));
        }
        if (n_layer_in != n_layer) {
            throw std::runtime_error(format("the state has %u budgeted layers, this model %u", n_layer_in, n_layer));
        }
        // the stock restore above put the cells at 0 .. n_used-1
        if (n_used_in != cells().get_used() || n_used_in != cells().used_max_p1() || n_comp_in > n_used_in) {
            throw std::runtime_error(format("the state's %u cells (%u compacted) do not match the %u restored",
                    n_used_in, n_comp_in, cells().get_used()));
        }

        // the cells' positions, as an eviction leaves them: the compacted cells [0, n_comp) at consecutive
        // virtual positions that end at p_comp_max, every later cell at a position >= 0 that RoPE (position minus
        // pos_delta) sees at >= 0. A damaged state that breaks these would abort the next eviction
        const auto & cells_in = cells();
        if (n_comp_in == 0 ? p_comp_in < -1 : p_comp_in != cells_in.pos_get(n_comp_in - 1)) {
            throw std::runtime_error(format("the state's last compacted position %d does not match its cells (damaged)",
                    p_comp_in));
        }
        if (pos_delta_in < 0 || (int64_t) pos_delta_in > (int64_t) p_comp_in + 1) {
            throw std::runtime_error(format("the state's RoPE offset %d is out of range (damaged)", pos_delta_in));
        }
        for (uint32_t i = 0; i < n_used_in; ++i) {
            const llama_pos p = cells_in.pos_get(i);
            const bool ok = i < n_comp_in ? p == p_comp_in - (llama_pos) (n_comp_in - 1 - i)
                                          : p >= 0 && p >= pos_delta_in;
            if (!ok) {
                throw std::runtime_error(format("the state's cell %u has position %d (damaged)", i, p));
            }
        }

        std::vector<std::vector<int32_t>> tpos_in(n_layer);
        std::vector<std::vector<int32_t>> rpos_in(n_layer);
        for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
            uint32_t nh = 0;
            io.read(&nh, sizeof(nh));
            if (nh != n_head_kv(ikv)) {
                throw std::runtime_error(format("layer %d: the state has %u KV heads, this model %u",
                        layer_il(ikv), nh, n_head_kv(ikv)));
            }
            tpos_in[ikv].resize((size_t) n_comp_in*nh);
            rpos_in[ikv].resize((size_t) n_comp_in*nh);
            if (n_comp_in > 0) {
                io.read(tpos_in[ikv].data(), tpos_in[ikv].size()*sizeof(int32_t));
                if (version >= 3) {
                    io.read(rpos_in[ikv].data(), rpos_in[ikv].size()*sizeof(int32_t));
                } else {
                    rpos_in[ikv] = tpos_in[ikv];
                }
            }
            // a compacted entry's true position is one the cache saw before it was compacted; its RoPE position
            // never exceeds it (renumbering only closes gaps)
            for (size_t i = 0; i < tpos_in[ikv].size(); ++i) {
                const int32_t t = tpos_in[ikv][i];
                const int32_t r = rpos_in[ikv][i];
                if (t < 0 || t > p_comp_in || r < 0 || r > t) {
                    throw std::runtime_error(format("layer %d: a compacted entry has position %d, RoPE position %d, "
                            "outside [0, %d] (damaged)", layer_il(ikv), t, r, p_comp_in));
                }
            }
            if (n_used_in > 0) {
                io.read_tensor(kn[ikv], 0, (size_t) n_used_in*nh*sizeof(float));
            }
        }

        // the archive (version 2): read whole before anything changes
        uint8_t on = 0;
        llama_l2kv_spans pinned_in;
        struct archived_in {
            std::vector<int32_t> pos;
            std::vector<int32_t> rot;
            std::vector<uint8_t> rows;
        };
        std::vector<std::vector<archived_in>> archive_in;
        if (version >= 2) {
            io.read(&on, sizeof(on));
        }
        if (on) {
            // an archive holds each evicted position at most once per (layer, group), all before the newest
            // restored one: a larger count is damage (sized before it is read, it could ask for any memory)
            llama_pos pos_max_in = -1;
            for (uint32_t i = 0; i < n_used_in; ++i) {
                pos_max_in = std::max(pos_max_in, cells().pos_get(i));
            }
            const uint64_t n_archived_max = (uint64_t) std::max<llama_pos>(pos_max_in + 1, 0);
            if (!archive_on && !archive_start(false, 0)) { // the state had one: keep it (and go on archiving)
                throw std::runtime_error("cannot start the archive of evicted entries");
            }
            uint32_t n_pinned = 0;
            io.read(&n_pinned, sizeof(n_pinned));
            for (uint32_t i = 0; i < n_pinned; ++i) {
                int32_t s[2];
                io.read(s, sizeof(s));
                // llama_l2kv_recall pins sorted, merged, non-empty spans (the lookup is a binary search)
                if (s[0] < 0 || s[1] <= s[0] || (!pinned_in.empty() && s[0] <= pinned_in.back().second)) {
                    throw std::runtime_error(format("the state's pinned span [%d, %d) is empty, negative or out of "
                            "order (damaged)", s[0], s[1]));
                }
                pinned_in.emplace_back(s[0], s[1]);
            }
            archive_in.resize(n_layer);
            for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
                uint64_t row = 0;
                io.read(&row, sizeof(row));
                if (row != archive.layout(ikv).total()) {
                    throw std::runtime_error(format("layer %d: the state's archived rows have %llu bytes, this cache %zu "
                            "(another cache type or per-head setting?)", layer_il(ikv), (unsigned long long) row,
                            archive.layout(ikv).total()));
                }
                archive_in[ikv].resize(n_group(ikv));
                for (uint32_t g = 0; g < n_group(ikv); ++g) {
                    uint32_t n = 0;
                    io.read(&n, sizeof(n));
                    if (n > n_archived_max) {
                        throw std::runtime_error(format("layer %d: the state archives %u entries of a group, more than "
                                "the %llu positions seen (damaged)", layer_il(ikv), n,
                                (unsigned long long) n_archived_max));
                    }
                    auto & [pos, rot, rows] = archive_in[ikv][g];
                    if (n == 0) {
                        continue; // (nothing to read: see state_write)
                    }
                    pos.resize(n);
                    rows.resize((size_t) n*row);
                    io.read(pos.data(), pos.size()*sizeof(int32_t));
                    if (version >= 3) {
                        rot.resize(n);
                        io.read(rot.data(), rot.size()*sizeof(int32_t));
                    } else {
                        rot = pos;
                    }
                    for (uint32_t i = 0; i < n; ++i) {
                        if (pos[i] < 0 || pos[i] > pos_max_in || rot[i] < 0 || rot[i] > pos[i]) {
                            throw std::runtime_error(format("layer %d: an archived entry has position %d, RoPE "
                                    "position %d, outside [0, %d] (damaged)", layer_il(ikv), pos[i], rot[i],
                                    pos_max_in));
                        }
                    }
                    io.read(rows.data(), rows.size());
                }
            }
        }

        n_comp     = n_comp_in;
        p_comp_max = p_comp_in;
        tpos       = std::move(tpos_in);
        rpos       = std::move(rpos_in);
        pos_delta  = pos_delta_in; // (the next eviction re-rotates to this context's positions mode)
        if (archive_on) {
            archive.clear();
            for (uint32_t ikv = 0; ikv < archive_in.size(); ++ikv) {
                for (uint32_t g = 0; g < archive_in[ikv].size(); ++g) {
                    const auto & in = archive_in[ikv][g];
                    if (!archive.restore(ikv, g, in.pos, in.rot, in.rows)) {
                        archive.clear();
                        throw std::runtime_error("cannot write the archive of evicted entries to its temporary file");
                    }
                }
            }
            pinned = std::move(pinned_in);
        }
        pending_evict = false;
        failed        = false;
    } catch (const std::exception & err) {
        // the cells were restored without their norms: drop everything rather than evict on stale norms
        io.discard();
        kv.clear(true);
        // (also the API's last error, which llama_state_load_file and llama_state_set_data do not return)
        llama_l2kv_error("l2kv: cannot restore the state, the cache was cleared: %s\n", err.what());
        throw std::runtime_error(llama_l2kv_last_error());
    }
}

//
// llama_kv_cache_context hook (declared in llama-kv-cache.h by the patch series)
//

ggml_tensor * llama_kv_cache_context::cpy_k_norm(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t il) const {
    const auto * l2 = llama_kv_cache_l2::get(*kv);
    return l2 ? l2->cpy_k_norm(ctx, k_cur, k_idxs, il) : nullptr;
}

ggml_tensor * llama_kv_cache_context::cpy_q(ggml_context * ctx, ggml_tensor * q_cur, int32_t il) const {
    const auto * l2 = llama_kv_cache_l2::get(*kv);
    return l2 ? l2->cpy_q(ctx, q_cur, il) : nullptr;
}
