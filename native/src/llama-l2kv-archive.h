// llama-l2kv-archive.h - the entries an eviction dropped, kept on the host for recall (internal to libllama)
//
// An eviction that does not know the next question cannot keep the fact only that question makes
// important. With the archive on, every entry an eviction drops goes here instead of being lost: per
// (cache layer, group) its true position and its K, V and key-norm rows, byte for byte as they were
// stored (any cache type). A recall (llama_kv_cache_l2::recall) takes the entries of some position
// spans back out and puts them into the cache again.

#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

// spans of true positions [first, second), sorted and disjoint
using llama_l2kv_spans = std::vector<std::pair<int32_t, int32_t>>;

// whether pos lies in one of the spans (binary search)
bool llama_l2kv_spans_contain(const llama_l2kv_spans & spans, int32_t pos);

class llama_l2kv_archive {
public:
    // one group's row sizes, in bytes, of the K, V and key-norm aliases (see llama_kv_cache_l2::k_rows)
    struct row_layout {
        size_t k  = 0;
        size_t v  = 0;
        size_t kn = 0;

        size_t total() const { return k + v + kn; }
    };

    // per cache layer: its groups and its row layout; drops every entry
    void init(const std::vector<uint32_t> & n_group, const std::vector<row_layout> & layout);

    // keep one dropped entry of (cache layer ikv, group g); different layers may be added from different threads
    void add(uint32_t ikv, uint32_t g, int32_t pos, const void * k, const void * v, const void * kn);

    // the entries of (ikv, g) whose position lies in `spans`, in ascending position, at most n_max
    uint32_t count(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans, uint32_t n_max) const;

    // remove the entries count() names (same arguments) and append their positions to pos and their rows
    // (K, V, norm, one entry after the other) to rows
    uint32_t take(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans, uint32_t n_max,
            std::vector<int32_t> & pos, std::vector<uint8_t> & rows);

    // the entries of (ikv, g), positions ascending: positions and rows as take() returns them; for tests
    uint32_t read(uint32_t ikv, uint32_t g, std::vector<int32_t> & pos, std::vector<uint8_t> & rows) const;

    // counts[p] += the (layer, group) rows archived at position p, for p < n_pos
    void coverage(int32_t * counts, int32_t n_pos) const;

    const row_layout & layout(uint32_t ikv) const { return layouts[ikv]; }

    // the raw store of (ikv, g), for saving a state: positions in arrival order, rows in the same order
    const std::vector<int32_t> & positions(uint32_t ikv, uint32_t g) const { return stores[ikv][g].pos; }
    const std::vector<uint8_t> & rows(uint32_t ikv, uint32_t g) const { return stores[ikv][g].rows; }

    // replace the store of (ikv, g) (loading a state); rows.size() must be pos.size() * layout(ikv).total()
    void restore(uint32_t ikv, uint32_t g, std::vector<int32_t> pos, std::vector<uint8_t> rows);

    uint64_t n_entries() const; // (layer, group) rows held
    size_t   n_bytes()   const; // bytes of rows and positions held

    void clear();

private:
    struct group_store {
        std::vector<int32_t> pos;  // [n] true positions, in the order the entries came
        std::vector<uint8_t> rows; // [n][layout.total()]
    };

    std::vector<row_layout>               layouts; // [ikv]
    std::vector<std::vector<group_store>> stores;  // [ikv][g]

    // the indices of (ikv, g)'s entries in spans, ascending position, at most n_max
    std::vector<uint32_t> select(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans, uint32_t n_max) const;
};
