// llama-kv-cache-l2.h - eviction state of one llama_kv_cache (internal to libllama)
//
// Past a budget, every (layer, KV head) keeps the entries its policy scores best (llama-l2kv-scorer.h):
// KeyDiff (the default), the L2-norm rule of Devoto et al., EMNLP 2024 (arXiv:2406.11430), whose key
// norms this file stores, and their baselines.
//
// How it works in this llama.cpp (design notes in the l2kv-cpp repository, docs/design.md):
// - key norms: when K is stored, the graph also stores sum(k^2) per KV head into an F32 tensor
//   kn[n_head_kv, kv_size] per layer, with the same cell indices as K (cpy_k_norm);
// - eviction: when a batch finds no free cells, llama_context::decode asks the memory for an
//   update (memory_update(true)); llama_kv_cache::init_update then returns our update context,
//   which computes the features the policy reads (norms, key cosines), ranks the entries of every
//   (layer, head) on the host and moves the kept K/V/norm rows into cells [0, T) (in place for host
//   memory, else one get_rows/set_rows pair per tensor on the backend);
// - every layer keeps the same number T of entries, so the shared cell metadata stays valid:
//   cells [0, T) get virtual positions ending at the last position (all visible to later tokens,
//   whose positions keep increasing); the true position of every (layer, cell, head) lives
//   in a host table;
// - RoPE positions (llama-l2kv-positions.cpp): with LLAMA_L2KV_POSITIONS_CACHE an eviction renumbers the
//   kept keys of every (layer, head) 0..T-1 in the order of their true positions and re-rotates K by the
//   difference (llama.cpp's K-shift, per row) when positions would pass rope_limit; new tokens are rotated
//   to their position minus pos_delta
//   (the hook in llm_graph_input_pos), so RoPE distances stay inside the cache while the positions
//   callers pass, the cells and the masks keep the text's positions.

#pragma once

#include "llama-l2kv.h"
#include "llama-l2kv-archive.h"
#include "llama-l2kv-scorer.h"

#include "llama-batch.h"
#include "llama-graph.h"
#include "llama-memory.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

class llama_kv_cache;
class llama_kv_cells;
struct llama_context;
struct ggml_context;
struct ggml_tensor;
class llm_graph_input_i;
class llama_io_read_i;
class llama_io_write_i;
class llm_graph_result;

// one entry of a selection, its sort keys packed into one integer (selection is the hot loop of an
// eviction: an integer compare makes nth_element about twice as fast as comparing the fields one by one)
//   bit 63: 0 for a protected sink or recent entry, 1 otherwise
//   bits 62..31: the policy's score as an order-preserving integer (NaN as +inf)
//   bits 30..0: INT32_MAX - true position (ties go to the newer entry)
struct llama_l2kv_candidate {
    uint64_t key;
    uint32_t idx; // index in the group: the last tie-break, so that the order is total
};

// the candidates of one (layer, group): protected entries are pos < n_sink or pos > pos_last - n_recent;
// positions must be >= 0
void llama_l2kv_candidates(
        const int32_t * pos,
          const float * score,
             uint32_t   n,
             uint32_t   n_sink,
             uint32_t   n_recent,
              int32_t   pos_last,
        std::vector<llama_l2kv_candidate> & out);

// the order of the selection rule: protected first, then ascending score, ties to the newer position
// (then to the lower index, so that it is a strict total order)
inline bool llama_l2kv_candidate_better(const llama_l2kv_candidate & a, const llama_l2kv_candidate & b) {
    return a.key != b.key ? a.key < b.key : a.idx < b.idx;
}

// shrink cand to its n_keep best entries, in no particular order (linear time: what an eviction needs)
void llama_l2kv_keep_best(std::vector<llama_l2kv_candidate> & cand, uint32_t n_keep);

// the tensor whose per-head norms are stored for k_cur: the input of its RoPE when that is a pure rotation
// (norm-preserving), else k_cur itself; with LLAMA_L2KV_NORM_AFTER_ROPE set, always k_cur (for A/B runs)
ggml_tensor * llama_l2kv_rope_source(ggml_tensor * k_cur);

// sort candidates, built in index order, into the rule's full order (a whole ranking, e.g. the hybrid's)
void llama_l2kv_sort_candidates(std::vector<llama_l2kv_candidate> & cand);

// runs fn(0) .. fn(n - 1) on up to n_threads threads, the calling one included (the host part of an
// eviction: features, ranking and moves are independent per layer)
void llama_l2kv_parallel_for(uint32_t n, int32_t n_threads, const std::function<void(uint32_t)> & fn);

// the selection rule, shared by the eviction and by tests: returns the cells to keep, in order of
// preference, for one (layer, head) group
//   pos   [n] true positions of the candidate entries
//   score [n] the policy's score (lower = more worth keeping), e.g. the key norm
//   protected entries (first n_sink positions, n_recent newest) come first, then ascending score,
//   ties broken by the newer position
std::vector<uint32_t> llama_l2kv_select(
        const std::vector<int32_t> & pos,
        const std::vector<float>   & score,
        uint32_t n_keep,
        uint32_t n_sink,
        uint32_t n_recent,
        int32_t  pos_last);

// the layers a policy keeps by recency when n_skip_layers is -1: {0, 1} for the key-norm rule, its control and
// random (the paper leaves its first two layers uncompressed), none for the others
std::vector<int32_t> llama_l2kv_default_skip_layers(int32_t policy);

// LLAMA_L2KV_FORCE_GRAPHS is set: run the key-cosine and compaction graphs even where the cache is in host
// memory (which is otherwise handled in place), so that the CPU tests cover what GPU backends run
bool llama_l2kv_force_graphs();

// log an error through llama.cpp's log and keep it (without the trailing newline) for llama_l2kv_last_error()
void llama_l2kv_error(const char * fmt, ...);
void llama_l2kv_clear_error();

// deterministic pseudo-random score of the RANDOM policy (splitmix64 of seed, layer, head, position)
float llama_l2kv_random_score(uint64_t seed, int32_t il, int32_t head, int32_t pos);

// graph input of our own graphs (compaction, key cosines, re-rotation): index tensors set from host vectors
class llm_graph_input_l2_moves : public llm_graph_input_i {
public:
    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        for (const auto & [t, v] : src) {
            ggml_backend_tensor_set(t, v.data(), 0, v.size()*sizeof(int32_t));
        }
        for (const auto & [t, v] : dst) {
            ggml_backend_tensor_set(t, v.data(), 0, v.size()*sizeof(int64_t));
        }
    }

    std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>> src; // I32 inputs
    std::vector<std::pair<ggml_tensor *, std::vector<int64_t>>> dst; // I64 inputs
};

struct llama_kv_cache_l2 {
    // tensors of our own with their ggml contexts and backend buffers (see alloc_layer_tensors)
    using layer_tensors_bufs = std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>>;

    llama_kv_cache_l2(llama_kv_cache & kv, const llama_l2kv_params & params, std::vector<int32_t> skip_layers);

    llama_kv_cache & kv;

    llama_l2kv_params    params;
    uint32_t             n_slack = 0; // the cache evicts once kv_budget + n_slack cells are used (n_batch by default)
    std::vector<int32_t> skip_layers; // model layer ids (params.skip_layers points here)
    std::vector<bool>    skip;        // [ikv] the layer keeps sinks + recent entries

    std::unique_ptr<llama_l2kv_scorer> scorer; // the policy

    // per cache layer: squared key norms, F32 [n_head_kv, kv_size]
    std::vector<ggml_tensor *> kn;

    // per cache layer: F32 aliases of the K, V and kn bytes, one row per (cell, group), used to move
    // rows bit-exactly whatever the cache type
    std::vector<ggml_tensor *> k_rows;
    std::vector<ggml_tensor *> v_rows;
    std::vector<ggml_tensor *> kn_rows;
    std::array<ggml_tensor *, 3> row_aliases(uint32_t ikv) const { return { k_rows[ikv], v_rows[ikv], kn_rows[ikv] }; }

    layer_tensors_bufs ctxs_bufs;
    ggml_context_ptr ctx_alias;

    // true positions of the compacted cells: tpos[ikv][cell*n_head_kv + head], cells [0, n_comp)
    std::vector<std::vector<int32_t>> tpos;

    // RoPE positions of the compacted cells' K rows, laid out as tpos (equal to tpos while keys keep their
    // original positions); a cell past n_comp holds a new token, rotated to its position - pos_delta
    std::vector<std::vector<int32_t>> rpos;
    int32_t pos_delta = 0;

    bool rope_cache = false; // LLAMA_L2KV_POSITIONS_CACHE in effect (asked for, and the model's keys can be shifted)

    // an eviction renumbers the kept keys only when the RoPE positions could otherwise pass this before the next
    // one: min(4 (kv_budget + n_slack), 3/4 n_ctx_train), at least kv_budget + n_slack (every eviction); measured
    // closer to a full cache than renumbering at every eviction (see rope_limit_for)
    int32_t rope_limit = 0;

    // the sliding-window cache of an iSWA model (nullptr otherwise): its K rows follow pos_delta too, since
    // every layer's queries get the same positions
    llama_kv_cache * kv_swa = nullptr;

    uint32_t n_comp     = 0;  // cells [0, n_comp) hold compacted entries (virtual positions)
    int32_t  p_comp_max = -1; // last true position at the last compaction

    bool pending_reset = true;  // graphs built before enabling must not be reused
    bool pending_evict = false; // llama_l2kv_evict_now() asked for an eviction

    // llama_l2kv_read_key_cosines() asked for the key cosines of a layer (they may need a graph on the
    // scheduler, so they are computed in a memory update, like an eviction)
    struct {
        bool      active      = false;
        uint32_t  ikv         = 0;
        float   * out         = nullptr;
        int32_t   n_cells_max = 0;
        int32_t   result      = 0;
    } pending_read;

    // the archive of dropped entries (llama_l2kv_archive_enable); without it an eviction loses them
    bool               archive_on = false;
    llama_l2kv_archive archive;

    // positions the last recall brought back: protected like the sinks until the next recall
    llama_l2kv_spans pinned;

    // during a recall's eviction: [ikv][cell*n_group + group] is 1 for a row that only pads its group to
    // the recall's cell count (evicted first, never archived; see recall_inject)
    std::vector<std::vector<uint8_t>> filler;

    // entries per (layer, group) the next eviction keeps instead of kv_budget (0: kv_budget); set by a recall
    uint32_t evict_target = 0;

    // a recall put rows back with the rotation they were archived with: the next eviction runs (renumbering
    // the RoPE positions, see llama-l2kv-positions.cpp) even when it has nothing to drop
    bool pending_renumber = false;

    // the queries of the last ubatch, kept for recall while capture_q (llama_l2kv_capture_queries): per cache
    // layer, F32 [n_embd_head_k * n_head, n_q_max], token t in column t
    bool                       capture_q = false;
    uint32_t                   n_q_max   = 0;
    std::vector<ggml_tensor *> qcap;
    layer_tensors_bufs qcap_bufs;

    // counters
    uint64_t n_recalls    = 0;  // recalls that brought entries back
    uint64_t n_recalled   = 0;  // (layer, group) rows brought back, summed over recalls
    int64_t  t_recall_us  = 0;  // all of every recall, its eviction included
    uint64_t n_evictions  = 0;
    uint64_t n_dropped    = 0;
    uint64_t n_moved_rows = 0;
    int64_t  t_evict_us   = 0; // all of evict()
    int64_t  t_feature_us = 0; // of which: norm read-back and the key-cosine graph
    int64_t  t_rank_us    = 0; // of which: scores and selection on the host
    int64_t  t_move_us    = 0; // of which: the compaction graph
    int64_t  t_rotate_us  = 0; // of which: the re-rotation graph
    uint64_t n_rotated_rows = 0;

    // access to the state of a cache (this struct is a friend of llama_kv_cache)
    static llama_kv_cache_l2 * get(const llama_kv_cache & kv);
    static void attach(llama_kv_cache & kv, std::shared_ptr<llama_kv_cache_l2> l2);
    static ggml_tensor * get_kv_tensor(const llama_kv_cache & kv, int32_t il, int32_t kind); // kind 0 = K, 1 = V

    bool detaching = false; // being disabled: build graphs without the norm nodes
    bool failed    = false; // the last compaction failed on the backend

    uint32_t n_layer() const;                 // cache layers
    int32_t  layer_il (uint32_t ikv) const;   // cache layer -> model layer
    int32_t  layer_ikv(int32_t il) const;     // model layer -> cache layer, -1 if not in this cache
    uint32_t n_head_kv(uint32_t ikv) const;
    uint32_t n_group  (uint32_t ikv) const;   // rows per cell in the alias tensors: n_head_kv or 1
    const llama_kv_cells & cells() const;

    // threads for the host part of an eviction: the context's decode or batch threads
    static int32_t n_threads(const llama_context * lctx);

    // check that the cache can be served and allocate the norm buffers; returns a status
    int32_t init();

    // one tensor per cache layer, made by make(ctx, ikv), allocated (zeroed) in the buffer type of the layer's K so
    // that the ops on it run where K is stored; out[ikv] the tensors, their contexts and buffers appended to bufs;
    // returns a status (an error naming `what` when a buffer cannot be allocated)
    int32_t alloc_layer_tensors(const char * what, const std::function<ggml_tensor * (ggml_context *, uint32_t)> & make,
            std::vector<ggml_tensor *> & out, layer_tensors_bufs & bufs) const;

    size_t norm_bytes() const;

    // K/V buffer size of any cache, with or without eviction (total_size is private to llama_kv_cache)
    static size_t kv_bytes(const llama_kv_cache & kv);

    // graph hook: store the squared norms of k_cur [n_embd_head_k, n_head_kv, n_tokens] (nullptr when
    // the layer is not under eviction)
    ggml_tensor * cpy_k_norm(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t il) const;

    // prepare hook: false when the ubatches would take the cache past kv_budget + n_slack entries
    bool fits(const std::vector<llama_ubatch> & ubatches) const;

    // memory-update hook: an update context when an eviction (or a graph reset) is due, else nullptr
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize);

    // evict down to params.kv_budget entries per (layer, group); returns false on a backend failure
    bool evict(llama_context * lctx);

    // the non-empty cells, ascending
    std::vector<uint32_t> used_cells() const;

    // archive (llama-l2kv-recall.cpp): start keeping dropped entries, with the row layout of every layer, in RAM
    // or in temporary files; false when a temporary file cannot be created
    bool archive_start(bool on_disk, uint64_t max_bytes); // (llama_l2kv_archive::init)
    void archive_layout(std::vector<uint32_t> & groups, std::vector<llama_l2kv_archive::row_layout> & layout) const;
    bool archive_write_failed = false; // a dropped entry could not be written (logged once)

    // archive the entries of cache layer ikv that an eviction drops: (cell, group, true position) each;
    // called before the compaction overwrites them
    struct dropped_entry {
        uint32_t cell;
        uint32_t group;
        int32_t  pos;
        int32_t  rot; // its RoPE position
    };
    // in host memory: read in place (layers in parallel); elsewhere (CUDA, Metal, RPC): one graph gathers only the
    // dropped rows of every such layer on its backend, so an eviction reads back what it archives, not whole caches
    bool archive_dropped(llama_context * lctx, const std::vector<std::vector<dropped_entry>> & dropped);
    // dropped[j]'s row in the aliases of its layer (cell*n_group + group)
    std::vector<int32_t> dropped_rows(uint32_t ikv, const std::vector<dropped_entry> & dropped) const;
    // archive.add for every dropped entry, its K, V and kn rows at base[i] + row*nb; row_of[j] is dropped[j]'s row
    // (nullptr: row j, rows gathered in order)
    void archive_rows(uint32_t ikv, const std::vector<dropped_entry> & dropped, const uint8_t * const base[3],
            const int32_t * row_of);

    // the first half of a recall: with the cache compacted to exactly kv_budget cells, put the archived
    // entries of `spans` back into cells [kv_budget, kv_budget + R) of every (layer, group) that holds
    // them, R the largest count of any group, pad the other groups with filler rows, and pin the spans;
    // the eviction that follows (pending_evict) keeps kv_budget + m entries per group, m the smallest
    // count any group got back (evict_target), dropping the fillers and, where a group got more than m
    // back, the entries the policy ranks lowest. Returns R
    uint32_t recall_inject(const llama_l2kv_spans & spans);

    // graph hook: copy q_cur [n_embd_head, n_head, n_tokens] (after RoPE) into qcap (nullptr unless capturing)
    ggml_tensor * cpy_q(ggml_context * ctx, ggml_tensor * q_cur, int32_t il) const;

    // allocate qcap for n_q_max tokens per ubatch and start capturing (the graphs are rebuilt), or stop and free it
    int32_t capture_start(uint32_t n_q_max);
    void    capture_stop();

    // rows [r0, r0 + n) of one of the alias tensors (row = cell*n_group + group), as bytes: memcpy in host
    // memory, else one transfer through the backend
    static void rows_get(const ggml_tensor * rows, uint32_t r0, uint32_t n, void * dst);
    static void rows_set(ggml_tensor * rows, uint32_t r0, uint32_t n, const void * src);

    // a graph on the context's scheduler (reset, so the next decode rebuilds its own): begin_graph gives the
    // result to build in, run_graph allocates, sets the inputs and computes it; false (and an error naming
    // `what`) on a backend failure
    static llm_graph_result * begin_graph(llama_context * lctx);
    static bool run_graph(llama_context * lctx, llm_graph_result * res, std::unique_ptr<llm_graph_input_i> inp,
            const char * what);

    // the scorer of cache layer ikv (the recency scorer for skipped layers)
    const llama_l2kv_scorer & layer_scorer(uint32_t ikv) const;

    // the features the scorers of the layers in `layers` read, for the cells in `used` (all non-empty
    // cells, ascending); out[ikv] is laid out [cell*n_head + head] for cells [0, used.back() + 1);
    // false on a backend failure
    struct layer_features {
        std::vector<float> norm2;
        std::vector<float> kcos;
    };
    bool compute_features(llama_context * lctx, const std::vector<uint32_t> & used, const std::vector<uint32_t> & layers,
            std::vector<layer_features> & out, uint32_t extra_features = 0);

    // the key cosines of cache layer ikv computed on the host, for a K cache in host memory
    void key_cosines_host(uint32_t ikv, const std::vector<uint32_t> & used, std::vector<float> & kcos) const;

    // the scores of every entry of cache layer ikv's group g: pos[i], score[i] for the cells in used
    void group_scores(uint32_t ikv, uint32_t g, const std::vector<uint32_t> & used, const layer_features & feat,
            std::vector<int32_t> & pos, std::vector<float> & score) const;

    // the key cosines of cache layer ikv for cells [0, n), [cell*n_head + head]; returns n or a negative
    // status (may run a graph: call it from a memory update, see pending_read)
    int32_t read_key_cosines(llama_context * lctx, uint32_t ikv, float * out, int32_t n_cells_max);

    // true position of the entry in (cache layer ikv, cell, kv head)
    int32_t true_pos(uint32_t ikv, uint32_t cell, uint32_t head) const;

    // RoPE position of the K row of (cache layer ikv, cell, kv head)
    int32_t rope_pos(uint32_t ikv, uint32_t cell, uint32_t head) const;

    // positions (llama-l2kv-positions.cpp): whether the model's keys can be re-rotated (as llama.cpp's
    // get_can_shift, before our own refusal); logs why not
    bool can_rotate() const;

    // rope_limit for this cache's K type, budget, slack and training context
    int32_t rope_limit_for() const;

    // the RoPE positions the kept entries of an eviction get: from the true positions new_tpos of cells
    // [0, n_keep) (layout of tpos), the ranks per (layer, head) with rope_cache, else the true positions
    std::vector<std::vector<int32_t>> target_rope_positions(const std::vector<std::vector<int32_t>> & new_tpos,
            uint32_t n_keep, int32_t n_threads) const;

    // the RoPE position of the newest entry (-1 when empty): the next token is rotated to one more
    int32_t rope_pos_max() const;

    // re-rotate K: the row of (cache layer ikv, cell, head) by delta[ikv][cell*n_head_kv + head] for cells
    // [0, n_cells) (an empty vector: no change in that layer), and every cell of the sliding-window cache by
    // swa_delta; one graph on the context's scheduler; false on a backend failure
    bool rotate(llama_context * lctx, const std::vector<std::vector<int32_t>> & delta, uint32_t n_cells,
            int32_t swa_delta);

    // seq_rm hook: false refuses a removal that cannot be honoured after a compaction
    bool seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1);

    // seq_add / seq_div hook: always refused while enabled (logs why)
    bool shift_allowed() const;

    void on_clear();

    // state save/load: a whole-context state (seq_id -1) carries, after the stock cells, an l2kv block
    // with the compaction state, the true positions and the key norms of the cells it wrote; a
    // per-sequence state cannot be restored into the same cells, so it is refused where it would be wrong
    void state_write(llama_io_write_i & io, llama_seq_id seq_id) const; // throws for a per-sequence state after a compaction
    void check_state_read(llama_seq_id seq_id) const;                   // throws for a per-sequence state
    void state_read(llama_io_read_i & io);                              // on a bad block: clears the cache, then throws
};
