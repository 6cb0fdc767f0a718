// llama-l2kv-archive.cpp - the entries an eviction dropped, kept on the host for recall

#include "llama-l2kv-archive.h"

#include <algorithm>
#include <cstring>
#include <numeric>

bool llama_l2kv_spans_contain(const llama_l2kv_spans & spans, int32_t pos) {
    // the first span that ends after pos
    const auto it = std::upper_bound(spans.begin(), spans.end(), pos,
            [](int32_t p, const std::pair<int32_t, int32_t> & s) { return p < s.second; });
    return it != spans.end() && it->first <= pos;
}

void llama_l2kv_archive::init(const std::vector<uint32_t> & n_group, const std::vector<row_layout> & layout) {
    layouts = layout;
    stores.assign(n_group.size(), {});
    for (size_t ikv = 0; ikv < n_group.size(); ++ikv) {
        stores[ikv].resize(n_group[ikv]);
    }
}

void llama_l2kv_archive::add(uint32_t ikv, uint32_t g, int32_t pos, const void * k, const void * v, const void * kn) {
    const row_layout & lay = layouts[ikv];
    group_store & st = stores[ikv][g];
    st.pos.push_back(pos);
    const size_t off = st.rows.size();
    st.rows.resize(off + lay.total());
    uint8_t * dst = st.rows.data() + off;
    memcpy(dst,                 k,  lay.k);
    memcpy(dst + lay.k,         v,  lay.v);
    memcpy(dst + lay.k + lay.v, kn, lay.kn);
}

std::vector<uint32_t> llama_l2kv_archive::select(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans,
        uint32_t n_max) const {
    const group_store & st = stores[ikv][g];
    std::vector<uint32_t> idx;
    for (uint32_t i = 0; i < st.pos.size(); ++i) {
        if (llama_l2kv_spans_contain(spans, st.pos[i])) {
            idx.push_back(i);
        }
    }
    std::sort(idx.begin(), idx.end(), [&](uint32_t a, uint32_t b) { return st.pos[a] < st.pos[b]; });
    if (idx.size() > n_max) {
        idx.resize(n_max);
    }
    return idx;
}

uint32_t llama_l2kv_archive::count(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans, uint32_t n_max) const {
    return (uint32_t) select(ikv, g, spans, n_max).size();
}

uint32_t llama_l2kv_archive::take(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans, uint32_t n_max,
        std::vector<int32_t> & pos, std::vector<uint8_t> & rows) {
    group_store & st = stores[ikv][g];
    const size_t row = layouts[ikv].total();
    const std::vector<uint32_t> idx = select(ikv, g, spans, n_max);

    std::vector<bool> taken(st.pos.size(), false);
    for (uint32_t i : idx) {
        taken[i] = true;
        pos.push_back(st.pos[i]);
        rows.insert(rows.end(), st.rows.begin() + (ptrdiff_t) (i*row), st.rows.begin() + (ptrdiff_t) ((i + 1)*row));
    }
    // keep the others, in their order
    size_t w = 0;
    for (size_t i = 0; i < st.pos.size(); ++i) {
        if (taken[i]) {
            continue;
        }
        if (w != i) {
            st.pos[w] = st.pos[i];
            memmove(st.rows.data() + w*row, st.rows.data() + i*row, row);
        }
        ++w;
    }
    st.pos.resize(w);
    st.rows.resize(w*row);
    return (uint32_t) idx.size();
}

void llama_l2kv_archive::restore(uint32_t ikv, uint32_t g, std::vector<int32_t> pos, std::vector<uint8_t> rows) {
    stores[ikv][g].pos  = std::move(pos);
    stores[ikv][g].rows = std::move(rows);
}

uint32_t llama_l2kv_archive::read(uint32_t ikv, uint32_t g, std::vector<int32_t> & pos, std::vector<uint8_t> & rows) const {
    const group_store & st = stores[ikv][g];
    const size_t row = layouts[ikv].total();
    std::vector<uint32_t> idx(st.pos.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::sort(idx.begin(), idx.end(), [&](uint32_t a, uint32_t b) { return st.pos[a] < st.pos[b]; });
    for (uint32_t i : idx) {
        pos.push_back(st.pos[i]);
        rows.insert(rows.end(), st.rows.begin() + (ptrdiff_t) (i*row), st.rows.begin() + (ptrdiff_t) ((i + 1)*row));
    }
    return (uint32_t) idx.size();
}

void llama_l2kv_archive::coverage(int32_t * counts, int32_t n_pos) const {
    for (const auto & layer : stores) {
        for (const auto & st : layer) {
            for (int32_t p : st.pos) {
                if (p >= 0 && p < n_pos) {
                    counts[p] += 1;
                }
            }
        }
    }
}

uint64_t llama_l2kv_archive::n_entries() const {
    uint64_t n = 0;
    for (const auto & layer : stores) {
        for (const auto & st : layer) {
            n += st.pos.size();
        }
    }
    return n;
}

size_t llama_l2kv_archive::n_bytes() const {
    size_t n = 0;
    for (const auto & layer : stores) {
        for (const auto & st : layer) {
            n += st.rows.size() + st.pos.size()*sizeof(int32_t);
        }
    }
    return n;
}

void llama_l2kv_archive::clear() {
    for (auto & layer : stores) {
        for (auto & st : layer) {
            st.pos.clear();
            st.rows.clear();
            st.rows.shrink_to_fit();
        }
    }
}
