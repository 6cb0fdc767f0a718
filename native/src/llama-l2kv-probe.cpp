// llama-l2kv-probe.cpp - an eval callback that captures attention weights and keys (analysis only)
//
// Used by the norm-attention analysis of l2kv-cpp (l2kv_cpp/eval/attention.py): with flash attention
// off, llama.cpp computes "kq_soft_max-<il>"; the callback copies it, and the keys "Kcur-<il>", per
// layer. Not used on the inference path.

#include "llama-l2kv.h"

#include "llama-kv-cache-l2.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

struct llama_l2kv_probe_tensor {
    int64_t ne[4] = { 0, 0, 0, 0 };
    std::vector<float> data;
};

struct llama_l2kv_probe {
    std::map<int32_t, llama_l2kv_probe_tensor> attn;
    std::map<int32_t, llama_l2kv_probe_tensor> keys;
};

struct llama_l2kv_probe * llama_l2kv_probe_new(void) {
    return new llama_l2kv_probe();
}

void llama_l2kv_probe_free(struct llama_l2kv_probe * probe) {
    delete probe;
}

// "kq_soft_max-12" -> (0, 12), "Kcur-3" -> (1, 3), anything else -> false
static bool llama_l2kv_probe_parse(const char * name, int32_t & what, int32_t & il) {
    const char * dash = strrchr(name, '-');
    if (dash == nullptr || dash[1] == '\0') {
        return false;
    }
    const size_t n = dash - name;
    if (n == strlen("kq_soft_max") && strncmp(name, "kq_soft_max", n) == 0) {
        what = 0;
    } else if (n == strlen("Kcur") && strncmp(name, "Kcur", n) == 0) {
        what = 1;
    } else {
        return false;
    }
    char * end = nullptr;
    il = (int32_t) strtol(dash + 1, &end, 10);
    return end != nullptr && *end == '\0';
}

bool llama_l2kv_probe_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    int32_t what = 0;
    int32_t il   = 0;
    const bool wanted = t->type == GGML_TYPE_F32 && llama_l2kv_probe_parse(t->name, what, il);
    if (ask) {
        return wanted;
    }
    if (!wanted) {
        return true;
    }
    auto * probe = (llama_l2kv_probe *) user_data;
    auto & dst = what == 0 ? probe->attn[il] : probe->keys[il];
    for (int i = 0; i < 4; ++i) {
        dst.ne[i] = t->ne[i];
    }
    dst.data.resize(ggml_nelements(t));
    if (ggml_is_contiguous(t)) {
        ggml_backend_tensor_get(t, dst.data.data(), 0, ggml_nbytes(t));
    } else { // row by row (e.g. a permuted view)
        std::vector<char> row(t->nb[1]);
        size_t k = 0;
        for (int64_t i3 = 0; i3 < t->ne[3]; ++i3) {
            for (int64_t i2 = 0; i2 < t->ne[2]; ++i2) {
                for (int64_t i1 = 0; i1 < t->ne[1]; ++i1) {
                    const size_t off = i1*t->nb[1] + i2*t->nb[2] + i3*t->nb[3];
                    for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) {
                        float v = 0.0f;
                        ggml_backend_tensor_get(t, &v, off + i0*t->nb[0], sizeof(float));
                        dst.data[k++] = v;
                    }
                }
            }
        }
    }
    return true;
}

int64_t llama_l2kv_probe_get(const struct llama_l2kv_probe * probe, int32_t il, int32_t what, int64_t * ne,
        float * dst, int64_t dst_count) {
    if (probe == nullptr || ne == nullptr || (what != 0 && what != 1)) {
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    const auto & m = what == 0 ? probe->attn : probe->keys;
    const auto it = m.find(il);
    if (it == m.end()) {
        llama_l2kv_error("%s: nothing captured for layer %d (is flash attention off?)\n", __func__, il);
        return LLAMA_L2KV_STATUS_INVALID_STATE;
    }
    for (int i = 0; i < 4; ++i) {
        ne[i] = it->second.ne[i];
    }
    const int64_t n = (int64_t) it->second.data.size();
    if (dst != nullptr) {
        if (dst_count < n) {
            return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
        }
        memcpy(dst, it->second.data.data(), n*sizeof(float));
    }
    return n;
}
