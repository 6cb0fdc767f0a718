// llama-l2kv-scorer.h - eviction policies as scorers (internal to libllama)
//
// A policy is one scorer: it gives every cached entry of one (layer, group) a score, lower = kept
// first. The eviction (llama-kv-cache-l2.cpp) computes the features a scorer asks for once per
// event, calls the scorer per group, and applies the shared selection rule (protected sinks and
// recent entries first, then ascending score, ties to the newer position) and the compaction.
// Adding a policy = one scorer class here + one enum value in llama-l2kv.h.

#pragma once

#include <cstdint>
#include <memory>

// features a scorer can ask for; each is laid out [cell*n_head + head] for the cells [0, n_cells)
enum llama_l2kv_feature : uint32_t {
    LLAMA_L2KV_FEATURE_NONE       = 0,
    LLAMA_L2KV_FEATURE_NORM2      = 1u << 0, // squared key L2 norm, stored by the graph when K is stored
    LLAMA_L2KV_FEATURE_KEY_COSINE = 1u << 1, // cosine of the key with the mean unit key of its (layer, head),
                                             // computed on the backend from the cached K at eviction time
};

// one (layer, group) of the cache as a scorer sees it; entries i = 0 .. n-1
struct llama_l2kv_group {
    int32_t  il;       // model layer
    uint32_t group;    // the KV head (per-head mode) or 0 (per-layer mode)
    uint32_t n_head;   // KV heads of the layer
    bool     per_head; // false: one score per cell for all heads (features summed over the heads)
    uint32_t n;        // entries

    const uint32_t * cell;  // [n] cell of each entry
    const int32_t  * pos;   // [n] true position of each entry (of this group's head)
    const float    * norm2; // LLAMA_L2KV_FEATURE_NORM2, else nullptr
    const float    * kcos;  // LLAMA_L2KV_FEATURE_KEY_COSINE, else nullptr

    // the feature of entry i for this group: the head's value, or the sum over the heads (in head order)
    // of f(value) in per-layer mode
    template <typename F>
    float feature(const float * data, uint32_t i, F f) const {
        const float * row = data + (size_t) cell[i]*n_head;
        if (per_head) {
            return f(row[group]);
        }
        float s = 0.0f;
        for (uint32_t h = 0; h < n_head; ++h) {
            s += f(row[h]);
        }
        return s;
    }
};

struct llama_l2kv_scorer {
    virtual ~llama_l2kv_scorer() = default;

    // the llama_l2kv_feature bits this scorer reads
    virtual uint32_t features() const = 0;

    // out[i] = the score of entry i (lower = kept first; NaN = kept last)
    virtual void score(const llama_l2kv_group & g, float * out) const = 0;
};

// the scorer of a policy (enum llama_l2kv_policy), nullptr for an unknown policy
std::unique_ptr<llama_l2kv_scorer> llama_l2kv_scorer_init(int32_t policy, uint64_t seed);

// sinks + most recent entries: the WINDOW policy and the skipped layers of every policy
const llama_l2kv_scorer & llama_l2kv_recency_scorer();
