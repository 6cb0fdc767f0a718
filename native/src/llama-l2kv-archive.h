// llama-l2kv-archive.h - the entries an eviction dropped, kept on the host for recall (internal to libllama)
//
// An eviction that does not know the next question cannot keep the fact only that question makes
// important. With the archive on, every entry an eviction drops goes here instead of being lost: per
// (cache layer, group) its true position, the RoPE position its K row is rotated to, and its K, V and key-norm rows, byte for byte as they were
// stored (any cache type). A recall (llama_kv_cache_l2::recall_inject) takes the entries of some
// position spans back out and puts them into the cache again.
//
// Rows live in one pool per cache layer, in slots of the layer's row size: in RAM, or in an unnamed
// temporary file (std::tmpfile, removed when closed) so that RAM holds only positions and slot
// numbers (16 bytes per row). Slots freed by a recall are reused by the next eviction.

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
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

    // per cache layer: its groups and its row layout; on_disk: rows in temporary files; max_bytes: 0, or the
    // most n_bytes() may reach (each (layer, group) keeps the entries of the max_bytes / bytes_per_position()
    // positions evicted last). Drops every entry; false when a temporary file cannot be created
    bool init(const std::vector<uint32_t> & n_group, const std::vector<row_layout> & layout, bool on_disk,
            uint64_t max_bytes);

    // what one position evicted from every (layer, group) takes: rows and positions (as n_bytes counts them)
    static uint64_t bytes_per_position(const std::vector<uint32_t> & n_group, const std::vector<row_layout> & layout);

    uint64_t max_bytes()   const { return limit; } // as given to init
    uint64_t max_entries() const { return cap; }   // per (layer, group); 0: no limit

    // drop the oldest entries (in the order they came) of every group of cache layer ikv past max_entries();
    // different layers may be trimmed from different threads
    void trim(uint32_t ikv);

    uint64_t n_forgotten() const; // entries trim() dropped since init

    bool on_disk() const { return disk; }

    // keep one dropped entry of (cache layer ikv, group g); different layers may be added from different
    // threads (each layer has its own pool); false on a write error of the disk pool
    bool add(uint32_t ikv, uint32_t g, int32_t pos, int32_t rot, const void * k, const void * v, const void * kn);

    // the entries of (ikv, g) whose position lies in `spans`, at most n_max (ascending position)
    uint32_t count(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans, uint32_t n_max) const;

    // remove the entries count() names (same arguments) and append their positions to pos, their RoPE
    // positions to rot and their rows (K, V, norm, one entry after the other) to rows
    uint32_t take(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans, uint32_t n_max,
            std::vector<int32_t> & pos, std::vector<int32_t> & rot, std::vector<uint8_t> & rows);

    // the entries of (ikv, g)
    uint32_t size(uint32_t ikv, uint32_t g) const { return (uint32_t) stores[ikv][g].pos.size(); }

    // every entry of (ikv, g), ascending position, as take() returns them (the archive keeps them)
    uint32_t read(uint32_t ikv, uint32_t g, std::vector<int32_t> & pos, std::vector<int32_t> & rot,
            std::vector<uint8_t> & rows) const;

    // replace the entries of (ikv, g) (loading a state); rows.size() must be pos.size() * layout(ikv).total()
    bool restore(uint32_t ikv, uint32_t g, const std::vector<int32_t> & pos, const std::vector<int32_t> & rot,
            const std::vector<uint8_t> & rows);

    // counts[p] += the (layer, group) rows archived at position p, for p < n_pos
    void coverage(int32_t * counts, int32_t n_pos) const;

    const row_layout & layout(uint32_t ikv) const { return layouts[ikv]; }

    uint64_t n_entries()    const; // (layer, group) rows held
    size_t   n_bytes()      const; // bytes of the rows held, wherever they are, and of their positions
    size_t   n_disk_bytes() const; // size of the temporary files (freed slots included)

    void clear();

private:
    struct group_store {
        std::vector<int32_t>  pos;  // [n] true positions, in the order the entries came
        std::vector<int32_t>  rot;  // [n] the RoPE position of each K row (pos unless positions are in the cache)
        std::vector<uint64_t> slot; // [n] slot of each entry's row in the layer's pool
    };

    struct closer {
        void operator()(std::FILE * f) const { std::fclose(f); }
    };

    // the rows of one cache layer, slots of layout.total() bytes
    struct pool {
        std::vector<uint8_t>               ram;   // in RAM: slot s at s * row
        std::unique_ptr<std::FILE, closer> file;  // on disk: slot s at offset s * row
        std::vector<uint64_t>              free;  // slots given back by take()
        uint64_t                           n_slots = 0;

        uint64_t alloc();
        bool     write(uint64_t s, size_t row, const uint8_t * src);
        void     read (uint64_t s, size_t row, uint8_t * dst) const;
    };

    bool                                  disk = false;
    uint64_t                              limit = 0; // max_bytes as given to init
    uint64_t                              cap  = 0;  // entries per (layer, group); 0: no limit
    std::vector<uint64_t>                 forgotten; // [ikv] entries trim() dropped
    std::vector<row_layout>               layouts; // [ikv]
    std::vector<std::vector<group_store>> stores;  // [ikv][g]
    std::vector<pool>                     pools;   // [ikv]

    // the indices of (ikv, g)'s entries in spans, ascending position, at most n_max
    std::vector<uint32_t> select(uint32_t ikv, uint32_t g, const llama_l2kv_spans & spans, uint32_t n_max) const;
};
