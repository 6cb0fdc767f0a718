// llama-l2kv-archive.cpp - the entries an eviction dropped, kept on the host for recall

#include "llama-l2kv-archive.h"

#include <algorithm>
#include <cstring>
#include <numeric>

// 64-bit file offsets on every platform
static int llama_l2kv_seek(std::FILE * f, uint64_t off) {
#ifdef _WIN32
    return _fseeki64(f, (long long) off, SEEK_SET);
#else
    return fseeko(f, (off_t) off, SEEK_SET);
#endif
}

bool llama_l2kv_spans_contain(const llama_l2kv_spans & spans, int32_t pos) {
    // the first span that ends after pos
    const auto it = std::upper_bound(spans.begin(), spans.end(), pos,
            [](int32_t p, const std::pair<int32_t, int32_t> & s) { return p < s.second; });
    return it != spans.end() && it->first <= pos;
}

uint64_t llama_l2kv_archive::pool::alloc() {
    if (!free.empty()) {
        const uint64_t s = free.back();
        free.pop_back();
        return s;
    }
    return n_slots++;
}

bool llama_l2kv_archive::pool::write(uint64_t s, size_t row, const uint8_t * src) {
    if (!file) {
        if (ram.size() < (s + 1)*row) {
            ram.resize(std::max((s + 1)*row, ram.size()*3/2)); // amortized growth
        }
        memcpy(ram.data() + s*row, src, row);
        return true;
    }
    return llama_l2kv_seek(file.get(), s*row) == 0 && std::fwrite(src, 1, row, file.get()) == row;
}

void llama_l2kv_archive::pool::read(uint64_t s, size_t row, uint8_t * dst) const {
    if (!file) {
        memcpy(dst, ram.data() + s*row, row);
        return;
    }
    // (a row the archive wrote: a short read means the temporary file was damaged under us)
    if (llama_l2kv_seek(file.get(), s*row) != 0 || std::fread(dst, 1, row, file.get()) != row) {
        memset(dst, 0, row);
    }
}

uint64_t llama_l2kv_archive::bytes_per_position(const std::vector<uint32_t> & n_group,
        const std::vector<row_layout> & layout) {
    uint64_t n = 0;
    for (size_t ikv = 0; ikv < n_group.size(); ++ikv) {
        n += (uint64_t) n_group[ikv]*(layout[ikv].total() + 2*sizeof(int32_t));
    }
    return n;
}

bool llama_l2kv_archive::init(const std::vector<uint32_t> & n_group, const std::vector<row_layout> & layout, bool on_disk,
        uint64_t max_bytes) {
    disk    = on_disk;
    layouts = layout;
    const uint64_t per_pos = bytes_per_position(n_group, layout);
    limit = max_bytes;
    cap = max_bytes == 0 || per_pos == 0 ? 0 : std::max<uint64_t>(max_bytes/per_pos, 1);
    forgotten.assign(n_group.size(), 0);
    stores.assign(n_group.size(), {});
    pools.clear();
    pools.resize(n_group.size());
    for (size_t ikv = 0; ikv < n_group.size(); ++ikv) {
        stores[ikv].resize(n_group[ikv]);
        if (on_disk) {
            pools[ikv].file.reset(std::tmpfile());
            if (!pools[ikv].file) {
                return false;
            }
        }
    }
    return true;
}

bool llama_l2kv_archive::add(uint32_t ikv, uint32_t g, int32_t pos, int32_t rot, const void * k, const void * v, const void * kn) {
    const row_layout & lay = layouts[ikv];
    std::vector<uint8_t> row(lay.total());
    memcpy(row.data(),                 k,  lay.k);
    memcpy(row.data() + lay.k,         v,  lay.v);
    memcpy(row.data() + lay.k + lay.v, kn, lay.kn);
    pool & pl = pools[ikv];
    const uint64_t s = pl.alloc();
    if (!pl.write(s, row.size(), row.data())) {
        pl.free.push_back(s);
        return false;
    }
    group_store & st = stores[ikv][g];
    st.pos.push_back(pos);
    st.rot.push_back(rot);
    st.slot.push_back(s);
    return true;
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
        std::vector<int32_t> & pos, std::vector<int32_t> & rot, std::vector<uint8_t> & rows) {
    group_store & st = stores[ikv][g];
    pool & pl = pools[ikv];
    const size_t row = layouts[ikv].total();
    const std::vector<uint32_t> idx = select(ikv, g, spans, n_max);

    std::vector<bool> taken(st.pos.size(), false);
    for (uint32_t i : idx) {
        taken[i] = true;
        pos.push_back(st.pos[i]);
        rot.push_back(st.rot[i]);
        rows.resize(rows.size() + row);
        pl.read(st.slot[i], row, rows.data() + rows.size() - row);
        pl.free.push_back(st.slot[i]);
    }
    // keep the others, in their order
    size_t w = 0;
    for (size_t i = 0; i < st.pos.size(); ++i) {
        if (!taken[i]) {
            st.pos[w]  = st.pos[i];
            st.rot[w]  = st.rot[i];
            st.slot[w] = st.slot[i];
            ++w;
        }
    }
    st.pos.resize(w);
    st.rot.resize(w);
    st.slot.resize(w);
    return (uint32_t) idx.size();
}

void llama_l2kv_archive::trim(uint32_t ikv) {
    if (cap == 0) {
        return;
    }
    pool & pl = pools[ikv];
    for (group_store & st : stores[ikv]) {
        if (st.pos.size() <= cap) {
            continue;
        }
        // one erase per group and eviction: the entries came in eviction order, the oldest first
        const size_t n_drop = st.pos.size() - cap;
        pl.free.insert(pl.free.end(), st.slot.begin(), st.slot.begin() + n_drop);
        st.pos.erase(st.pos.begin(), st.pos.begin() + n_drop);
        st.rot.erase(st.rot.begin(), st.rot.begin() + n_drop);
        st.slot.erase(st.slot.begin(), st.slot.begin() + n_drop);
        forgotten[ikv] += n_drop;
    }
}

uint64_t llama_l2kv_archive::n_forgotten() const {
    uint64_t n = 0;
    for (uint64_t f : forgotten) {
        n += f;
    }
    return n;
}

uint32_t llama_l2kv_archive::read(uint32_t ikv, uint32_t g, std::vector<int32_t> & pos, std::vector<int32_t> & rot,
        std::vector<uint8_t> & rows) const {
    const group_store & st = stores[ikv][g];
    const pool & pl = pools[ikv];
    const size_t row = layouts[ikv].total();
    std::vector<uint32_t> idx(st.pos.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::sort(idx.begin(), idx.end(), [&](uint32_t a, uint32_t b) { return st.pos[a] < st.pos[b]; });
    for (uint32_t i : idx) {
        pos.push_back(st.pos[i]);
        rot.push_back(st.rot[i]);
        rows.resize(rows.size() + row);
        pl.read(st.slot[i], row, rows.data() + rows.size() - row);
    }
    return (uint32_t) idx.size();
}

bool llama_l2kv_archive::restore(uint32_t ikv, uint32_t g, const std::vector<int32_t> & pos,
        const std::vector<int32_t> & rot, const std::vector<uint8_t> & rows) {
    group_store & st = stores[ikv][g];
    pool & pl = pools[ikv];
    for (uint64_t s : st.slot) {
        pl.free.push_back(s);
    }
    st.pos.clear();
    st.rot.clear();
    st.slot.clear();
    const size_t row = layouts[ikv].total();
    // (a state saved under a larger limit: keep its newest positions)
    const size_t first = cap > 0 && pos.size() > cap ? pos.size() - cap : 0;
    forgotten[ikv] += first;
    for (size_t i = first; i < pos.size(); ++i) {
        const uint8_t * r = rows.data() + i*row;
        if (!add(ikv, g, pos[i], rot[i], r, r + layouts[ikv].k, r + layouts[ikv].k + layouts[ikv].v)) {
            return false;
        }
    }
    return true;
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
    for (size_t ikv = 0; ikv < stores.size(); ++ikv) {
        for (const auto & st : stores[ikv]) {
            n += st.pos.size()*(layouts[ikv].total() + 2*sizeof(int32_t));
        }
    }
    return n;
}

size_t llama_l2kv_archive::n_disk_bytes() const {
    size_t n = 0;
    for (size_t ikv = 0; ikv < pools.size(); ++ikv) {
        if (pools[ikv].file) {
            n += pools[ikv].n_slots*layouts[ikv].total();
        }
    }
    return n;
}

void llama_l2kv_archive::clear() {
    for (auto & layer : stores) {
        for (auto & st : layer) {
            st.pos.clear();
            st.rot.clear();
            st.slot.clear();
        }
    }
    for (auto & pl : pools) {
        pl.ram.clear();
        pl.ram.shrink_to_fit();
        pl.free.clear();
        pl.n_slots = 0;
        if (pl.file) {
            std::rewind(pl.file.get()); // the file keeps its size; its slots are written again from 0
        }
    }
}
