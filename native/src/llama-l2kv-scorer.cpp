// llama-l2kv-scorer.cpp - the eviction policies (see llama-l2kv-scorer.h)

#include "llama-l2kv-scorer.h"

#include "llama-kv-cache-l2.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

static float llama_l2kv_sqrt(float x) {
    return std::sqrt(x);
}

static float llama_l2kv_identity(float x) {
    return x;
}

// keep the keys with the lowest L2 norm (Devoto et al. 2024); sign -1 keeps the highest (the control)
struct llama_l2kv_scorer_norm : llama_l2kv_scorer {
    explicit llama_l2kv_scorer_norm(float sign) : sign(sign) {}

    uint32_t features() const override {
        return LLAMA_L2KV_FEATURE_NORM2;
    }

    void score(const llama_l2kv_group & g, float * out) const override {
        // the L2 norm itself (not its square): the value llama_l2kv_read_layer reports
        for (uint32_t i = 0; i < g.n; ++i) {
            out[i] = sign*g.feature(g.norm2, i, llama_l2kv_sqrt);
        }
    }

    float sign;
};

// a seeded pseudo-random subset: depends only on (seed, layer, group, position)
struct llama_l2kv_scorer_random : llama_l2kv_scorer {
    explicit llama_l2kv_scorer_random(uint64_t seed) : seed(seed) {}

    uint32_t features() const override {
        return LLAMA_L2KV_FEATURE_NONE;
    }

    void score(const llama_l2kv_group & g, float * out) const override {
        for (uint32_t i = 0; i < g.n; ++i) {
            out[i] = llama_l2kv_random_score(seed, g.il, g.group, g.pos[i]);
        }
    }

    uint64_t seed;
};

// newest first: with the protected sinks this is StreamingLLM's sink + recent window
struct llama_l2kv_scorer_recency : llama_l2kv_scorer {
    uint32_t features() const override {
        return LLAMA_L2KV_FEATURE_NONE;
    }

    void score(const llama_l2kv_group & g, float * out) const override {
        for (uint32_t i = 0; i < g.n; ++i) {
            out[i] = -(float) g.pos[i];
        }
    }
};

// KeyDiff (Park et al. 2025, arXiv:2504.15364): keep the keys least similar (cosine) to the mean
// unit key of their head, i.e. the distinctive ones
struct llama_l2kv_scorer_key_diff : llama_l2kv_scorer {
    uint32_t features() const override {
        return LLAMA_L2KV_FEATURE_KEY_COSINE;
    }

    void score(const llama_l2kv_group & g, float * out) const override {
        for (uint32_t i = 0; i < g.n; ++i) {
            out[i] = g.feature(g.kcos, i, llama_l2kv_identity);
        }
    }
};

// the rank of every entry in the selection rule's order without protections (ascending score, NaN
// last, ties to the newer position): 0 .. n-1
static void llama_l2kv_ranks(const std::vector<float> & score, const int32_t * pos, std::vector<float> & rank) {
    const uint32_t n = score.size();
    std::vector<llama_l2kv_candidate> cand;
    llama_l2kv_candidates(pos, score.data(), n, 0, 0, std::numeric_limits<int32_t>::max(), cand);
    llama_l2kv_sort_candidates(cand);
    rank.resize(n);
    for (uint32_t r = 0; r < n; ++r) {
        rank[cand[r].idx] = (float) r;
    }
}

// a merge of the two attention-free rankings: a quarter of the kept entries by key norm (low first),
// three quarters by key diversity (KeyDiff). Entry i scores min(rank_norm/s, rank_cos/(1 - s)), so the
// best B entries take about s*B from the head of the norm ranking and (1 - s)*B from the head of the
// cosine ranking (an entry on both lists counts once and lets both lists go further).
// Why: the key norm predicts where attention mass goes (negative norm-attention rank correlation in
// most layers, docs/results.md), so its head holds the attention sinks that keep the softmax
// calibrated; but keeping only low-norm keys drops the rare, distinctive keys that retrieval needs,
// which is exactly what KeyDiff keeps
struct llama_l2kv_scorer_hybrid : llama_l2kv_scorer {
    static constexpr float norm_share = 0.25f;

    uint32_t features() const override {
        return LLAMA_L2KV_FEATURE_NORM2 | LLAMA_L2KV_FEATURE_KEY_COSINE;
    }

    void score(const llama_l2kv_group & g, float * out) const override {
        std::vector<float> by_norm(g.n);
        std::vector<float> by_cos(g.n);
        norm.score(g, by_norm.data());
        diff.score(g, by_cos.data());
        std::vector<float> r_norm;
        std::vector<float> r_cos;
        llama_l2kv_ranks(by_norm, g.pos, r_norm);
        llama_l2kv_ranks(by_cos,  g.pos, r_cos);
        for (uint32_t i = 0; i < g.n; ++i) {
            out[i] = std::min(r_norm[i]/norm_share, r_cos[i]/(1.0f - norm_share));
        }
    }

    llama_l2kv_scorer_norm     norm{1.0f};
    llama_l2kv_scorer_key_diff diff;
};

std::unique_ptr<llama_l2kv_scorer> llama_l2kv_scorer_init(int32_t policy, uint64_t seed) {
    switch (policy) {
        case LLAMA_L2KV_POLICY_KEEP_LOW_NORM:  return std::make_unique<llama_l2kv_scorer_norm>(1.0f);
        case LLAMA_L2KV_POLICY_KEEP_HIGH_NORM: return std::make_unique<llama_l2kv_scorer_norm>(-1.0f);
        case LLAMA_L2KV_POLICY_RANDOM:         return std::make_unique<llama_l2kv_scorer_random>(seed);
        case LLAMA_L2KV_POLICY_WINDOW:         return std::make_unique<llama_l2kv_scorer_recency>();
        case LLAMA_L2KV_POLICY_KEY_DIFF:       return std::make_unique<llama_l2kv_scorer_key_diff>();
        case LLAMA_L2KV_POLICY_HYBRID:         return std::make_unique<llama_l2kv_scorer_hybrid>();
        default:                               return nullptr;
    }
}

const llama_l2kv_scorer & llama_l2kv_recency_scorer() {
    static const llama_l2kv_scorer_recency scorer;
    return scorer;
}
