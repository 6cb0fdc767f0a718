// llama-l2kv-positions.cpp - RoPE positions inside the budgeted cache (LLAMA_L2KV_POSITIONS_CACHE)
//
// Eviction bounds the cache, not RoPE distances: a kept key keeps the rotation of its position in the
// text, so at token 16k of a model trained on 8k the query sits 16k positions from the first sink, a
// distance it never saw. StreamingLLM's rule (mit-han-lab/streaming-llm, pos_shift) keeps distances
// inside the cache: at an eviction each (layer, KV head) renumbers its kept keys 0..T-1 in the order of
// their true positions, K is re-rotated by the per-row difference (llama.cpp's K-shift, build_rope_shift,
// which also handles quantized K and the Hadamard-rotated caches), and new tokens are rotated to their
// position minus pos_delta = (last position + 1 - T), so the next token sits at T. An eviction renumbers
// only when positions would otherwise pass rope_limit_for() (a few times the cache, at most three quarters
// of the training context) before the next one: measured closer to a full cache than renumbering at every one.
//
// Only RoPE sees these positions. The positions callers pass, the cells, the masks (causal and sliding
// window), the policies, recency protection, the archive and recall keep the true positions. Every
// layer's queries get the same positions, so the sliding-window cache of an iSWA model (whose keys are
// never evicted) is re-rotated by the change of pos_delta at each eviction.

#include "llama-kv-cache-l2.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cstdlib>

bool llama_kv_cache_l2::can_rotate() const {
    // llama_kv_cache::get_can_shift without the refusal that eviction itself adds (M-RoPE is refused by init)
    if (kv.model.arch == LLM_ARCH_STEP35 || kv.hparams.n_pos_per_embd() > 1) {
        LLAMA_LOG_WARN("%s: llama.cpp cannot shift this model's keys (per-layer RoPE dimensions or multi-dimensional "
                "positions): kept keys keep their original positions\n", __func__);
        return false;
    }
    return true;
}

int32_t llama_kv_cache_l2::rope_limit_for() const {
    const int32_t strict = (int32_t) (params.kv_budget + n_slack);
    if (getenv("LLAMA_L2KV_ROPE_STRICT") != nullptr) { // A/B and tests: renumber at every eviction
        return strict;
    }
    // measured (docs/results.md, issue 19), SmolLM2, KeyDiff, 64k tokens, worst bucket against a full cache: at
    // budget 1024 +39% renumbering at every eviction, +23% with positions up to half the training context, +19% up
    // to this limit; at budget 4096 +17.5% at every eviction (half the context is less than the cache there), +12%
    // here. Not for f16 rounding (an f32 cache renumbering at every eviction gives +39% too) but for the positions
    // left as in the text between renumberings (keeping every gap at every eviction instead: +30%). A quantized key
    // also drifts by up to half a quantization step per re-rotation (q4_0 at 12k: +102% against +20%). Gaps are
    // harmless inside the training context (the original positions have them all along): let positions grow to
    // 4x the cache, at most three quarters of the training context, and renumber then
    const int32_t n_train = (int32_t) kv.hparams.n_ctx_train;
    const int32_t lazy    = n_train > 0 ? std::min(4*strict, (int32_t) ((int64_t) n_train*3/4)) : strict;
    return std::max(strict, lazy);
}

std::vector<std::vector<int32_t>> llama_kv_cache_l2::target_rope_positions(
        const std::vector<std::vector<int32_t>> & new_tpos, uint32_t n_keep, int32_t n_threads) const {
    if (!rope_cache) {
        return new_tpos;
    }
    std::vector<std::vector<int32_t>> out(new_tpos.size());
    llama_l2kv_parallel_for(new_tpos.size(), n_threads, [&](uint32_t ikv) {
        const uint32_t nh = n_head_kv(ikv);
        const auto & tp = new_tpos[ikv];
        out[ikv].resize(tp.size());
        std::vector<uint64_t> key(n_keep); // true position, then cell: one integer sort per head
        for (uint32_t h = 0; h < nh; ++h) {
            for (uint32_t c = 0; c < n_keep; ++c) {
                key[c] = (uint64_t) (uint32_t) tp[(size_t) c*nh + h] << 32 | c;
            }
            std::sort(key.begin(), key.end());
            for (uint32_t r = 0; r < n_keep; ++r) {
                out[ikv][(size_t) (key[r] & 0xffffffffu)*nh + h] = (int32_t) r;
            }
        }
    });
    return out;
}

//
// the re-rotation graph: llama.cpp's K-shift with one position delta per (cell, head) row
//

class llm_graph_input_l2_rope : public llm_graph_input_l2_moves {
public:
    void set_input(const llama_ubatch * ubatch) override {
        llm_graph_input_l2_moves::set_input(ubatch); // the positions deltas (src)
        for (const auto & [t, cache] : k_rot) {
            if (t != nullptr && t->buffer != nullptr) {
                cache->set_input_k_rot(t);
            }
        }
    }

    std::vector<std::pair<ggml_tensor *, const llama_kv_cache *>> k_rot; // the Hadamard matrix of a rotated K cache
};

bool llama_kv_cache_l2::rotate(llama_context * lctx, const std::vector<std::vector<int32_t>> & delta, uint32_t n_cells,
        int32_t swa_delta) {
    llm_graph_result * res = begin_graph(lctx);
    auto * ctx = res->get_ctx();
    auto * gf  = res->get_gf();
    auto inp = std::make_unique<llm_graph_input_l2_rope>();
    const auto & cparams = lctx->get_cparams();

    // K of one layer of `cache`, viewed as [n_rot, n_head, n_rows] from its first cell, rotated by `shift` [n_rows]
    auto add_layer = [&](const llama_kv_cache & cache, const llama_kv_cache::kv_layer & layer, int64_t n_head,
            int64_t n_rows, std::vector<int32_t> shift, ggml_tensor * rot) {
        const uint32_t il = layer.il;
        const auto & hp = cache.hparams;
        const int64_t d = hp.n_embd_head_k(il);
        ggml_tensor * k = ggml_view_3d(ctx, layer.k, hp.n_rot(il), n_head, n_rows,
                ggml_row_size(layer.k->type, d), ggml_row_size(layer.k->type, d*n_head), 0);
        ggml_tensor * pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_rows);
        ggml_set_input(pos);
        inp->src.emplace_back(pos, std::move(shift));
        ggml_tensor * factors    = cache.model.get_rope_factors(cparams, il);
        const float   freq_base  = cache.model.get_rope_freq_base(cparams, il);
        const float   freq_scale = cache.model.get_rope_freq_scale(cparams, il);
        if (layer.k->type != GGML_TYPE_BF16) {
            ggml_build_forward_expand(gf, cache.build_rope_shift(cparams, ctx, k, pos, rot, factors, freq_base,
                    freq_scale, il));
            return;
        }
        // build_rope_shift ropes a non-quantized K in place, which the CPU backend cannot do in bf16: through F32
        ggml_tensor * tmp = ggml_rope_ext(ctx, ggml_cast(ctx, k, GGML_TYPE_F32), pos, factors, hp.n_rot(il),
                hp.rope_type, cparams.n_ctx_orig_yarn, freq_base, freq_scale, cparams.yarn_ext_factor,
                cparams.yarn_attn_factor, cparams.yarn_beta_fast, cparams.yarn_beta_slow);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, tmp, k));
    };

    // the budgeted layers: one row per (cell, head), each with its own delta
    ggml_tensor * rot = kv.build_input_k_rot(ctx);
    inp->k_rot.emplace_back(rot, &kv);
    bool any = false;
    for (uint32_t ikv = 0; ikv < n_layer(); ++ikv) {
        const auto & layer = kv.layers[ikv];
        if (delta[ikv].empty() || !kv.hparams.has_rope(layer.il)) {
            continue;
        }
        GGML_ASSERT(delta[ikv].size() == (size_t) n_cells*n_head_kv(ikv));
        add_layer(kv, layer, 1, (int64_t) n_cells*n_head_kv(ikv), delta[ikv], rot);
        any = true;
    }

    // the sliding-window cache: every cell by the same delta (its queries moved by that much)
    if (kv_swa != nullptr && swa_delta != 0) {
        ggml_tensor * rot_swa = kv_swa->build_input_k_rot(ctx);
        inp->k_rot.emplace_back(rot_swa, kv_swa);
        const uint32_t n = kv_swa->get_size();
        for (const auto & layer : kv_swa->layers) {
            if (!kv_swa->hparams.has_rope(layer.il)) {
                continue;
            }
            add_layer(*kv_swa, layer, kv_swa->hparams.n_head_kv(layer.il), n, std::vector<int32_t>(n, swa_delta), rot_swa);
            any = true;
        }
    }
    if (!any) {
        return true;
    }
    return run_graph(lctx, res, std::move(inp), "re-rotation");
}

int32_t llama_kv_cache_l2::rope_pos_max() const {
    const int32_t p = cells().seq_pos_max(0);
    return p < 0 ? -1 : p - pos_delta;
}

//
// the hook of llm_graph_input_pos (declared in llama-kv-cache.h by the patch series)
//

const llama_kv_cache * llama_kv_cache_context::get_kv_l2kv() const {
    return kv;
}

const llama_kv_cache * llama_l2kv_rope_cache(const llama_memory_context_i * mctx) {
    if (const auto * c = dynamic_cast<const llama_kv_cache_context *>(mctx)) {
        return c->get_kv_l2kv();
    }
    if (const auto * c = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
        return c->get_base()->get_kv_l2kv();
    }
    return nullptr;
}

void llama_l2kv_set_rope_positions(const llama_kv_cache * kv, ggml_tensor * dst, const llama_pos * pos, int64_t n_tokens) {
    // (read when the inputs are set, after the memory update of this ubatch: a reused graph sees the new delta)
    const llama_kv_cache_l2 * l2 = kv != nullptr ? llama_kv_cache_l2::get(*kv) : nullptr;
    if (l2 == nullptr || l2->pos_delta == 0) {
        return;
    }
    std::vector<llama_pos> shifted(pos, pos + n_tokens);
    for (auto & p : shifted) {
        p -= l2->pos_delta;
    }
    ggml_backend_tensor_set(dst, shifted.data(), 0, shifted.size()*sizeof(llama_pos));
}
