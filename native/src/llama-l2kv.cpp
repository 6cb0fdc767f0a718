// llama-l2kv.cpp - the l2kv-cpp C API (see include/llama-l2kv.h)
//
// Compiled into libllama by native/l2kv.cmake, which the l2kv-cpp patch series includes from
// src/CMakeLists.txt. Lives beside the upstream sources so it can use llama.cpp internals.

#include "llama-l2kv.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache-l2.h"
#include "llama-kv-cache.h"
#include "llama-model.h"
#include "llama-version.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// set by native/l2kv.cmake from the build script: a hash of patches/ + native/
#ifndef LLAMA_L2KV_SOURCE_HASH
#define LLAMA_L2KV_SOURCE_HASH "unknown"
#endif

#define LLAMA_L2KV_STR_(x) #x
#define LLAMA_L2KV_STR(x)  LLAMA_L2KV_STR_(x)

int32_t llama_l2kv_abi_version(void) {
    return LLAMA_L2KV_ABI_VERSION;
}

const char * llama_l2kv_build_info(void) {
    return "l2kv-cpp abi " LLAMA_L2KV_STR(LLAMA_L2KV_ABI_VERSION)
           "; llama.cpp " LLAMA_COMMIT
           "; source " LLAMA_L2KV_SOURCE_HASH;
}

const char * llama_l2kv_status_str(int32_t status) {
    switch (status) {
        case LLAMA_L2KV_STATUS_OK:                 return "ok";
        case LLAMA_L2KV_STATUS_INVALID_ARGUMENT:   return "invalid argument";
        case LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY: return "unsupported memory";
        case LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG: return "unsupported configuration";
        case LLAMA_L2KV_STATUS_INVALID_STATE:      return "invalid state";
        case LLAMA_L2KV_STATUS_NOT_ENABLED:        return "not enabled";
        case LLAMA_L2KV_STATUS_COMPUTE_FAILED:     return "compute failed";
        default:                                   return "unknown status";
    }
}

// warnings, with their continuation lines; everything else is dropped without a call out of C
static void llama_l2kv_log_quiet(enum ggml_log_level level, const char * text, void * user_data) {
    GGML_UNUSED(user_data);
    static thread_local bool shown = false;
    if (level != GGML_LOG_LEVEL_CONT) {
        shown = level == GGML_LOG_LEVEL_WARN;
    }
    if (shown) {
        fputs(text, stderr);
        fflush(stderr);
    }
}

void llama_l2kv_log_set_quiet(void) {
    llama_log_set(llama_l2kv_log_quiet, nullptr);
}

static int32_t g_fatal_exit_code = 0;
static char    g_fatal_hint[512];

// ggml_abort's callback: message is "path/file.cpp:line: text"; abort() follows unless the process ends here
static void llama_l2kv_on_fatal_error(const char * message) {
    const char * text = strstr(message, ": ");
    std::string where(message, text != nullptr ? (size_t) (text - message) : 0);
    const size_t slash = where.find_last_of("/\\");
    if (slash != std::string::npos) {
        where = where.substr(slash + 1);
    }
    std::string line(text != nullptr ? text + 2 : message);
    while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) {
        line.pop_back();
    }
    std::string out = "error: " + line;
    if (!where.empty()) {
        out += " (" + where + ")";
    }
    if (g_fatal_hint[0] != '\0') {
        out += std::string(": ") + g_fatal_hint;
    }
    fprintf(stderr, "%s\n", out.c_str());
    fflush(stderr);
    std::_Exit(g_fatal_exit_code);
}

void llama_l2kv_exit_on_fatal_error(int32_t exit_code, const char * hint) {
    snprintf(g_fatal_hint, sizeof(g_fatal_hint), "%s", hint != nullptr ? hint : "");
    g_fatal_exit_code = exit_code;
    ggml_set_abort_callback(exit_code != 0 ? llama_l2kv_on_fatal_error : nullptr);
}

int32_t llama_l2kv_get_flash_attn(const struct llama_context * ctx, bool * out) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || out == nullptr) {
        llama_l2kv_error("%s: ctx (%p) and out (%p) must not be NULL\n", __func__, (const void *) ctx, (const void *) out);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    *out = ctx->get_cparams().flash_attn;
    return LLAMA_L2KV_STATUS_OK;
}

// the KV cache eviction applies to: the whole cache, or the full-attention part of an iSWA cache
static llama_kv_cache * llama_l2kv_find_cache(const llama_context * ctx, const char * func) {
    llama_memory_i * mem = ctx->get_memory();
    if (mem == nullptr) {
        llama_l2kv_error("%s: the context has no KV cache (e.g. an embedding-only context)\n", func);
        return nullptr;
    }
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    llama_l2kv_error("%s: the context's memory is not a plain or sliding-window KV cache "
            "(recurrent, hybrid and other caches are not supported)\n", func);
    return nullptr;
}

struct llama_l2kv_params llama_l2kv_default_params(void) {
    struct llama_l2kv_params p = {
        /*.kv_budget     =*/ 4096,
        /*.n_slack       =*/ 0,
        /*.n_sink        =*/ 4,
        /*.n_recent      =*/ 32,
        /*.policy        =*/ LLAMA_L2KV_POLICY_KEY_DIFF,
        /*.per_head      =*/ true,
        /*.seed          =*/ 0,
        /*.n_skip_layers =*/ -1,
        /*.skip_layers   =*/ nullptr,
        /*.positions     =*/ LLAMA_L2KV_POSITIONS_CACHE,
    };
    return p;
}

int32_t llama_l2kv_enable(struct llama_context * ctx, const struct llama_l2kv_params * params) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || params == nullptr) {
        llama_l2kv_error("%s: ctx and params must not be NULL\n", __func__);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    llama_kv_cache * kv = llama_l2kv_find_cache(ctx, __func__);
    if (kv == nullptr) {
        return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
    }
    if (llama_kv_cache_l2::get(*kv) != nullptr) {
        llama_l2kv_error("%s: eviction is already enabled on this context; disable it first\n", __func__);
        return LLAMA_L2KV_STATUS_INVALID_STATE;
    }
    if (!ctx->get_cparams().flash_attn) {
        llama_l2kv_error("%s: flash attention is off; create the context with flash attention enabled\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG;
    }

    const uint32_t n_layer = llama_model_n_layer(&ctx->get_model());
    const uint32_t kv_size = kv->get_size();
    const uint32_t n_batch = ctx->n_batch();

    if (params->kv_budget < 1) {
        llama_l2kv_error("%s: kv_budget (%u) must be >= 1\n", __func__, params->kv_budget);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    if ((uint64_t) params->n_sink + params->n_recent >= params->kv_budget) {
        llama_l2kv_error("%s: n_sink (%u) + n_recent (%u) must be < kv_budget (%u)\n", __func__, params->n_sink, params->n_recent, params->kv_budget);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    if (params->n_slack != 0 && params->n_slack < n_batch) {
        llama_l2kv_error("%s: n_slack (%u) must be 0 (n_batch) or >= n_batch (%u): a batch is stored whole\n",
                __func__, params->n_slack, n_batch);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const uint32_t n_slack = params->n_slack != 0 ? params->n_slack : n_batch;
    if ((uint64_t) params->kv_budget + n_slack > kv_size) {
        llama_l2kv_error("%s: kv_budget (%u) + %s (%u) exceeds the KV cache size (%u cells); "
                "create the context with n_ctx >= %llu\n", __func__, params->kv_budget,
                params->n_slack != 0 ? "n_slack" : "n_batch", n_slack, kv_size,
                (unsigned long long) params->kv_budget + n_slack);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    if (params->policy < LLAMA_L2KV_POLICY_KEEP_LOW_NORM || params->policy > LLAMA_L2KV_POLICY_HYBRID) {
        llama_l2kv_error("%s: policy (%d) is not a llama_l2kv_policy\n", __func__, params->policy);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    if (params->n_skip_layers < -1 || (params->n_skip_layers > 0 && params->skip_layers == nullptr)) {
        llama_l2kv_error("%s: n_skip_layers (%d) must be -1, 0, or the length of skip_layers (not NULL)\n", __func__, params->n_skip_layers);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    if (params->positions != LLAMA_L2KV_POSITIONS_ORIGINAL && params->positions != LLAMA_L2KV_POSITIONS_CACHE) {
        llama_l2kv_error("%s: positions (%d) is not a llama_l2kv_positions\n", __func__, params->positions);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    std::vector<int32_t> skip;
    if (params->n_skip_layers == -1) {
        skip = llama_l2kv_default_skip_layers(params->policy);
    } else {
        skip.assign(params->skip_layers, params->skip_layers + params->n_skip_layers);
    }
    for (int32_t il : skip) {
        if (il < 0 || (uint32_t) il >= n_layer) {
            llama_l2kv_error("%s: skip layer %d is out of range [0, %u)\n", __func__, il, n_layer);
            return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
        }
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(ctx->get_memory())) {
        // the sliding-window cache must hold its window plus a batch on its own; llama.cpp sizes it by
        // min(n_ctx, n_swa + n_ubatch), and with eviction n_ctx can be smaller than that
        const uint32_t n_swa   = ctx->get_model().hparams.n_swa;
        const uint32_t need    = n_swa + ctx->n_ubatch();
        const uint32_t swa_len = iswa->get_swa()->get_size();
        if (swa_len < need) {
            llama_l2kv_error("%s: the sliding-window cache has %u cells but needs n_swa (%u) + n_ubatch (%u) = %u; "
                    "create the context with n_ctx >= %u\n", __func__, swa_len, n_swa, ctx->n_ubatch(), need, need);
            return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
        }
    }
    if (kv->get_cells(0).get_used() > 0) {
        llama_l2kv_error("%s: the KV cache already holds %u entries; enable eviction before the first decode "
                "(or clear the memory first)\n", __func__, kv->get_cells(0).get_used());
        return LLAMA_L2KV_STATUS_INVALID_STATE;
    }

    auto l2 = std::make_shared<llama_kv_cache_l2>(*kv, *params, std::move(skip));
    l2->n_slack = n_slack;
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(ctx->get_memory())) {
        l2->kv_swa = iswa->get_swa(); // its keys follow the RoPE positions of the queries
    }
    const int32_t status = l2->init();
    if (status != LLAMA_L2KV_STATUS_OK) {
        return status;
    }
    llama_kv_cache_l2::attach(*kv, l2);

    // graphs built so far lack the norm nodes: the pending reset makes memory_update drop them and
    // reserve the worst-case graph again, now with the norm nodes
    ctx->memory_update(false);

    LLAMA_LOG_INFO("%s: L2 eviction on %u layers: budget %u of %u cells, n_sink %u, n_recent %u, policy %d, %s, "
            "%zu skip layers, norms %.2f MiB, %s positions\n", __func__, l2->n_layer(), params->kv_budget, kv_size,
            params->n_sink, params->n_recent, params->policy, params->per_head ? "per head" : "per layer",
            l2->skip_layers.size(), l2->norm_bytes()/1024.0/1024.0, l2->rope_cache ? "cache" : "original");

    return LLAMA_L2KV_STATUS_OK;
}

int32_t llama_l2kv_disable(struct llama_context * ctx) {
    llama_l2kv_clear_error();
    if (ctx == nullptr) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    llama_kv_cache * kv = llama_l2kv_find_cache(ctx, __func__);
    if (kv == nullptr) {
        return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
    }
    llama_kv_cache_l2 * l2 = llama_kv_cache_l2::get(*kv);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    ctx->synchronize();
    // rebuild the graphs without the norm nodes before the norm tensors go away
    l2->detaching     = true;
    l2->pending_reset = true;
    ctx->memory_update(false);
    llama_kv_cache_l2::attach(*kv, nullptr);
    return LLAMA_L2KV_STATUS_OK;
}

int32_t llama_l2kv_get_stats(const struct llama_context * ctx, struct llama_l2kv_stats * out) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const llama_kv_cache * kv = llama_l2kv_find_cache(ctx, __func__);
    if (kv == nullptr) {
        return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
    }
    const llama_kv_cache_l2 * l2 = llama_kv_cache_l2::get(*kv);
    const auto & cells = kv->get_cells(0);

    *out = {};
    out->enabled      = l2 != nullptr;
    out->kv_size      = kv->get_size();
    out->n_cells_used = cells.get_used();
    out->pos_max      = cells.seq_pos_max(0);
    out->kv_bytes     = llama_kv_cache_l2::kv_bytes(*kv);
    if (l2) {
        out->kv_budget         = l2->params.kv_budget;
        out->n_cells_compacted = l2->n_comp;
        out->n_layers          = l2->n_layer();
        out->n_evictions       = l2->n_evictions;
        out->n_dropped         = l2->n_dropped;
        out->n_moved_rows      = l2->n_moved_rows;
        out->t_evict_ms        = l2->t_evict_us/1000.0;
        out->t_feature_ms      = l2->t_feature_us/1000.0;
        out->t_rank_ms         = l2->t_rank_us/1000.0;
        out->t_move_ms         = l2->t_move_us/1000.0;
        out->norm_bytes        = l2->norm_bytes();
        out->positions         = l2->rope_cache ? LLAMA_L2KV_POSITIONS_CACHE : LLAMA_L2KV_POSITIONS_ORIGINAL;
        out->rope_pos_max      = l2->rope_pos_max();
        out->n_rotated_rows    = l2->n_rotated_rows;
        out->t_rotate_ms       = l2->t_rotate_us/1000.0;
    } else {
        out->rope_pos_max      = out->pos_max;
    }
    return LLAMA_L2KV_STATUS_OK;
}

static llama_kv_cache_l2 * llama_l2kv_get_enabled(const llama_context * ctx, const char * func) {
    const llama_kv_cache * kv = llama_l2kv_find_cache(ctx, func);
    if (kv == nullptr) {
        return nullptr;
    }
    llama_kv_cache_l2 * l2 = llama_kv_cache_l2::get(*kv);
    if (l2 == nullptr) {
        llama_l2kv_error("%s: L2 eviction is not enabled on this context\n", func);
    }
    return l2;
}

int32_t llama_l2kv_n_head_kv(const struct llama_context * ctx, int32_t il) {
    llama_l2kv_clear_error();
    if (ctx == nullptr) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    const int32_t ikv = l2->layer_ikv(il);
    if (ikv < 0) {
        llama_l2kv_error("%s: layer %d is not in the budgeted cache (out of range or sliding-window)\n", __func__, il);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    return (int32_t) l2->n_head_kv(ikv);
}

// llama_l2kv_read_layer and llama_l2kv_read_rope_positions: the norms and the true positions of model layer il, or
// (rope) the RoPE positions its K rows are rotated to, [cell][kv head] for the cells written (returned)
static int32_t llama_l2kv_read_cells(struct llama_context * ctx, int32_t il, float * norms, int32_t * pos,
        int32_t n_cells_max, bool rope) {
    const int32_t nh = llama_l2kv_n_head_kv(ctx, il);
    if (nh < 0) {
        return nh;
    }
    const llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    const uint32_t ikv = l2->layer_ikv(il);
    const auto & cells = l2->cells();
    const uint32_t n = std::min<uint32_t>(cells.used_max_p1(), n_cells_max);

    ctx->synchronize();
    if (norms != nullptr && n > 0) {
        ggml_backend_tensor_get(l2->kn[ikv], norms, 0, (size_t) n*nh*sizeof(float));
    }
    for (uint32_t c = 0; c < n; ++c) {
        const bool empty = cells.is_empty(c);
        for (int32_t h = 0; h < nh; ++h) {
            const size_t i = (size_t) c*nh + h;
            if (norms != nullptr) {
                norms[i] = empty ? 0.0f : std::sqrt(norms[i]);
            }
            if (pos != nullptr) {
                pos[i] = empty ? -1 : rope ? l2->rope_pos(ikv, c, h) : l2->true_pos(ikv, c, h);
            }
        }
    }
    return (int32_t) n;
}

int32_t llama_l2kv_read_rope_positions(struct llama_context * ctx, int32_t il, int32_t * pos, int32_t n_cells_max) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || pos == nullptr || n_cells_max < 0) {
        llama_l2kv_error("%s: ctx and pos must not be NULL, n_cells_max (%d) must be >= 0\n", __func__, n_cells_max);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    return llama_l2kv_read_cells(ctx, il, nullptr, pos, n_cells_max, true);
}

int32_t llama_l2kv_read_layer(struct llama_context * ctx, int32_t il, float * norms, int32_t * pos, int32_t n_cells_max) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || n_cells_max < 0) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    return llama_l2kv_read_cells(ctx, il, norms, pos, n_cells_max, false);
}

int32_t llama_l2kv_read_key_cosines(struct llama_context * ctx, int32_t il, float * cosines, int32_t n_cells_max) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || cosines == nullptr || n_cells_max < 0) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const int32_t nh = llama_l2kv_n_head_kv(ctx, il);
    if (nh < 0) {
        return nh;
    }
    llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    auto & rd = l2->pending_read;
    rd.active      = true;
    rd.ikv         = l2->layer_ikv(il);
    rd.out         = cosines;
    rd.n_cells_max = n_cells_max;
    rd.result      = LLAMA_L2KV_STATUS_COMPUTE_FAILED;
    ctx->memory_update(false);
    rd.active = false;
    return rd.result;
}

int32_t llama_l2kv_evict_now(struct llama_context * ctx) {
    llama_l2kv_clear_error();
    if (ctx == nullptr) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    l2->failed        = false;
    l2->pending_evict = true;
    ctx->memory_update(false);
    return l2->failed ? LLAMA_L2KV_STATUS_COMPUTE_FAILED : LLAMA_L2KV_STATUS_OK;
}

int32_t llama_l2kv_set_n_sink(struct llama_context * ctx, uint32_t n_sink) {
    llama_l2kv_clear_error();
    if (ctx == nullptr) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    if ((uint64_t) n_sink + l2->params.n_recent >= l2->params.kv_budget) {
        llama_l2kv_error("%s: n_sink (%u) + n_recent (%u) must be < kv_budget (%u)\n", __func__, n_sink,
                l2->params.n_recent, l2->params.kv_budget);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    l2->params.n_sink = n_sink; // read by every eviction's selection; nothing else depends on it
    return LLAMA_L2KV_STATUS_OK;
}

int64_t llama_l2kv_read_kv(struct llama_context * ctx, int32_t il, int32_t kind, int32_t cell0, int32_t n_cells, void * dst, size_t dst_size) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || dst == nullptr || (kind != 0 && kind != 1) || cell0 < 0 || n_cells < 0) {
        llama_l2kv_error("%s: bad argument (kind %d, cell0 %d, n_cells %d)\n", __func__, kind, cell0, n_cells);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    llama_kv_cache * kv = llama_l2kv_find_cache(ctx, __func__);
    if (kv == nullptr) {
        return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
    }
    ggml_tensor * t = llama_kv_cache_l2::get_kv_tensor(*kv, il, kind);
    if (t == nullptr) {
        llama_l2kv_error("%s: layer %d has no %s tensor in this cache\n", __func__, il, kind == 0 ? "K" : "V");
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const size_t row = t->nb[1];
    if ((int64_t) cell0 + n_cells > t->ne[1] || dst_size < row*n_cells) {
        llama_l2kv_error("%s: cells [%d, %d) of %lld, or dst_size %zu < %zu\n", __func__, cell0, cell0 + n_cells,
                (long long) t->ne[1], dst_size, row*n_cells);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    ctx->synchronize();
    ggml_backend_tensor_get(t, dst, row*cell0, row*n_cells);
    return (int64_t) row;
}

int32_t llama_l2kv_select(const int32_t * pos, const float * score, int32_t n, int32_t n_keep, int32_t n_sink,
        int32_t n_recent, int32_t pos_last, int32_t * out_idx) {
    if (pos == nullptr || score == nullptr || out_idx == nullptr || n < 0 || n_keep < 0 || n_sink < 0 || n_recent < 0) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const std::vector<int32_t> p(pos, pos + n);
    const std::vector<float>   s(score, score + n);
    const auto keep = llama_l2kv_select(p, s, n_keep, n_sink, n_recent, pos_last);
    std::copy(keep.begin(), keep.end(), out_idx);
    return (int32_t) keep.size();
}

int32_t llama_l2kv_model_layer_info(const struct llama_model * model, int32_t il, struct llama_l2kv_layer_info * out) {
    llama_l2kv_clear_error();
    if (model == nullptr || out == nullptr) {
        llama_l2kv_error("%s: model and out must not be NULL\n", __func__);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const auto & hp = model->hparams;
    if (il < 0 || (uint32_t) il >= hp.n_layer()) {
        llama_l2kv_error("%s: layer %d is out of range [0, %u)\n", __func__, il, hp.n_layer());
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    out->has_kv        = hp.has_kv(il);
    out->is_swa        = hp.is_swa(il);
    out->n_head_kv     = (int32_t) hp.n_head_kv(il);
    out->n_embd_head_k = (int32_t) hp.n_embd_head_k(il);
    out->n_embd_head_v = (int32_t) hp.n_embd_head_v(il);
    return LLAMA_L2KV_STATUS_OK;
}

int32_t llama_l2kv_model_n_swa(const struct llama_model * model) {
    return model ? (int32_t) model->hparams.n_swa : LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
}

//
// archive and recall
//

struct llama_l2kv_archive_params llama_l2kv_archive_default_params(void) {
    struct llama_l2kv_archive_params p = {
        /*.on_disk   =*/ false,
        /*.max_bytes =*/ 0,
    };
    return p;
}

int32_t llama_l2kv_archive_enable(struct llama_context * ctx, const struct llama_l2kv_archive_params * params) {
    llama_l2kv_clear_error();
    if (ctx == nullptr) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    ctx->synchronize();
    l2->pinned.clear();
    if (params == nullptr) {
        l2->archive_on = false;
        l2->archive    = llama_l2kv_archive(); // frees the rows and closes the temporary files
        return LLAMA_L2KV_STATUS_OK;
    }
    std::vector<uint32_t> groups;
    std::vector<llama_l2kv_archive::row_layout> layout;
    l2->archive_layout(groups, layout);
    const uint64_t per_pos = llama_l2kv_archive::bytes_per_position(groups, layout);
    if (params->max_bytes > 0 && params->max_bytes < per_pos) {
        llama_l2kv_error("%s: max_bytes %llu is less than one evicted position takes (%llu bytes)\n", __func__,
                (unsigned long long) params->max_bytes, (unsigned long long) per_pos);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    if (!l2->archive_start(params->on_disk, params->max_bytes)) {
        llama_l2kv_error("%s: cannot create a temporary file for the archive (is $TMPDIR writable?)\n", __func__);
        return LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY;
    }
    return LLAMA_L2KV_STATUS_OK;
}

int32_t llama_l2kv_archive_get_stats(const struct llama_context * ctx, struct llama_l2kv_archive_stats * out) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    *out = {};
    out->enabled      = l2->archive_on;
    out->on_disk      = l2->archive_on && l2->archive.on_disk();
    out->n_entries    = l2->archive.n_entries();
    out->n_bytes      = l2->archive.n_bytes();
    out->n_disk_bytes = l2->archive.n_disk_bytes();
    out->n_recalls   = l2->n_recalls;
    out->n_recalled  = l2->n_recalled;
    out->t_recall_ms = l2->t_recall_us/1000.0;
    {
        std::vector<uint32_t> groups;
        std::vector<llama_l2kv_archive::row_layout> layout;
        l2->archive_layout(groups, layout);
        out->bytes_per_position = llama_l2kv_archive::bytes_per_position(groups, layout);
    }
    out->max_bytes   = l2->archive_on ? l2->archive.max_bytes() : 0;
    out->n_forgotten = l2->archive.n_forgotten();
    return LLAMA_L2KV_STATUS_OK;
}

int32_t llama_l2kv_archive_coverage(const struct llama_context * ctx, int32_t * counts, int32_t n_pos) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || n_pos < 0 || (counts == nullptr && n_pos > 0)) {
        llama_l2kv_error("%s: counts must hold n_pos (%d >= 0) entries\n", __func__, n_pos);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    std::fill(counts, counts + n_pos, 0);
    l2->archive.coverage(counts, n_pos);
    int32_t n_groups = 0;
    for (uint32_t ikv = 0; ikv < l2->n_layer(); ++ikv) {
        n_groups += (int32_t) l2->n_group(ikv);
    }
    return n_groups;
}

int32_t llama_l2kv_archive_read(const struct llama_context * ctx, int32_t il, int32_t group, int32_t * pos,
        void * rows, int32_t n_max, int64_t * row_bytes) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || n_max < 0) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    const int32_t ikv = l2->layer_ikv(il);
    if (ikv < 0 || group < 0 || (uint32_t) group >= l2->n_group(ikv)) {
        llama_l2kv_error("%s: layer %d, group %d is not in the budgeted cache\n", __func__, il, group);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    if (!l2->archive_on) {
        llama_l2kv_error("%s: the archive is off (llama_l2kv_archive_enable)\n", __func__);
        return LLAMA_L2KV_STATUS_INVALID_STATE;
    }
    const auto & lay = l2->archive.layout(ikv);
    if (row_bytes != nullptr) {
        row_bytes[0] = (int64_t) lay.k;
        row_bytes[1] = (int64_t) lay.v;
        row_bytes[2] = (int64_t) lay.kn;
    }
    const uint32_t n = l2->archive.size(ikv, group);
    if ((pos == nullptr && rows == nullptr) || n_max == 0) {
        return (int32_t) n; // sizes only: no copy of the rows (they may be on disk)
    }
    std::vector<int32_t> p;
    std::vector<int32_t> rot;
    std::vector<uint8_t> r;
    l2->archive.read(ikv, group, p, rot, r);
    const size_t n_out = std::min<size_t>(n, n_max);
    if (pos != nullptr) {
        std::copy(p.begin(), p.begin() + n_out, pos);
    }
    if (rows != nullptr) {
        memcpy(rows, r.data(), n_out*lay.total());
    }
    return (int32_t) n;
}

int32_t llama_l2kv_recall(struct llama_context * ctx, const int32_t * span_first, const int32_t * span_end, int32_t n_spans) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || n_spans < 0 || (n_spans > 0 && (span_first == nullptr || span_end == nullptr))) {
        llama_l2kv_error("%s: give n_spans (%d >= 0) spans as two arrays of positions\n", __func__, n_spans);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    if (!l2->archive_on) {
        llama_l2kv_error("%s: the archive is off: nothing evicted was kept (llama_l2kv_archive_enable)\n", __func__);
        return LLAMA_L2KV_STATUS_INVALID_STATE;
    }

    // the spans, sorted and merged
    llama_l2kv_spans spans;
    for (int32_t i = 0; i < n_spans; ++i) {
        if (span_first[i] < 0 || span_end[i] <= span_first[i]) {
            llama_l2kv_error("%s: span %d is [%d, %d): positions must be >= 0 and the span not empty\n", __func__, i,
                    span_first[i], span_end[i]);
            return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
        }
        spans.emplace_back(span_first[i], span_end[i]);
    }
    std::sort(spans.begin(), spans.end());
    llama_l2kv_spans merged;
    uint64_t n_pos = 0;
    for (const auto & s : spans) {
        if (!merged.empty() && s.first <= merged.back().second) {
            merged.back().second = std::max(merged.back().second, s.second);
        } else {
            merged.push_back(s);
        }
    }
    for (const auto & s : merged) {
        n_pos += (uint64_t) (s.second - s.first);
    }
    const auto & par = l2->params;
    const uint64_t n_max = std::min<uint64_t>(l2->n_slack, (uint64_t) par.kv_budget - par.n_sink - par.n_recent);
    if (n_pos > n_max) {
        llama_l2kv_error("%s: the spans cover %llu positions; a recall brings back at most %llu (n_slack %u, "
                "kv_budget - n_sink - n_recent %u)\n", __func__, (unsigned long long) n_pos,
                (unsigned long long) n_max, l2->n_slack, par.kv_budget - par.n_sink - par.n_recent);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }

    const int64_t t_start_us = ggml_time_us();
    ctx->synchronize();

    l2->pinned = merged;
    if (l2->n_comp == 0) {
        return 0; // nothing was ever evicted: nothing is archived (the spans stay pinned)
    }
    // the recall fills the cells past the budget: evict the entries added since the last eviction first
    const auto & cells = l2->cells();
    if (cells.get_used() > par.kv_budget) {
        l2->failed        = false;
        l2->pending_evict = true;
        ctx->memory_update(false);
        if (l2->failed) {
            return LLAMA_L2KV_STATUS_COMPUTE_FAILED;
        }
    }
    if (l2->n_comp != par.kv_budget || cells.get_used() != par.kv_budget || cells.used_max_p1() != par.kv_budget) {
        llama_l2kv_error("%s: the cache holds %u entries (%u compacted) for a budget of %u; cannot recall\n", __func__,
                cells.get_used(), l2->n_comp, par.kv_budget);
        return LLAMA_L2KV_STATUS_INVALID_STATE;
    }

    const uint32_t n_new = l2->recall_inject(merged);
    if (n_new > 0) {
        l2->failed        = false;
        l2->pending_evict = true;
        ctx->memory_update(false);
        l2->filler.clear();
        l2->evict_target = 0;
        if (l2->failed) {
            return LLAMA_L2KV_STATUS_COMPUTE_FAILED;
        }
    }
    l2->t_recall_us += ggml_time_us() - t_start_us;
    return (int32_t) n_new;
}

int32_t llama_l2kv_capture_queries(struct llama_context * ctx, int32_t n_tokens_max) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || n_tokens_max < 0) {
        llama_l2kv_error("%s: n_tokens_max must be >= 0 (got %d)\n", __func__, n_tokens_max);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    ctx->synchronize();
    int32_t status = LLAMA_L2KV_STATUS_OK;
    if (n_tokens_max == 0) {
        l2->capture_stop();
    } else {
        status = l2->capture_start((uint32_t) n_tokens_max);
    }
    ctx->memory_update(false); // rebuild the graphs with (or without) the copy
    return status;
}

int32_t llama_l2kv_read_queries(struct llama_context * ctx, int32_t il, int32_t n_tokens, float * out) {
    llama_l2kv_clear_error();
    if (ctx == nullptr || n_tokens < 0) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const llama_kv_cache_l2 * l2 = llama_l2kv_get_enabled(ctx, __func__);
    if (l2 == nullptr) {
        return LLAMA_L2KV_STATUS_NOT_ENABLED;
    }
    if (!l2->capture_q) {
        llama_l2kv_error("%s: queries are not captured (llama_l2kv_capture_queries)\n", __func__);
        return LLAMA_L2KV_STATUS_INVALID_STATE;
    }
    const int32_t ikv = l2->layer_ikv(il);
    if (ikv < 0 || (uint32_t) n_tokens > l2->n_q_max) {
        llama_l2kv_error("%s: layer %d is not budgeted, or n_tokens (%d) > the %u captured per ubatch\n", __func__, il,
                n_tokens, l2->n_q_max);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const ggml_tensor * q = l2->qcap[ikv];
    if (out != nullptr && n_tokens > 0) {
        ctx->synchronize();
        ggml_backend_tensor_get(q, out, 0, (size_t) n_tokens*q->nb[1]);
    }
    return (int32_t) q->ne[0];
}
