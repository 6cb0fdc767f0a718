// llama-l2kv.h - public C API of l2kv-cpp, a KV cache eviction extension for llama.cpp
//
// Past a budget, every layer and KV head keeps the entries its policy scores best, without attention
// weights (so flash attention stays on): by default the keys least similar to their head's mean key
// (KeyDiff, arXiv:2504.15364); or the keys with the lowest L2 norm, which draw high attention
// (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
// EMNLP 2024, arXiv:2406.11430), the rule the project is named after; see enum llama_l2kv_policy.
//
// This header is compiled into libllama by the l2kv-cpp patch series (see patches/README.md in the
// l2kv-cpp repository). The Python binding parses the declarations between the L2KV_CDEF markers
// below with cffi, so keep that region plain C: no macros other than LLAMA_API, no preprocessor
// lines, no inline functions.
//
// Versioning: LLAMA_L2KV_ABI_VERSION is bumped whenever a struct layout or a function signature in
// this header changes. Callers compare llama_l2kv_abi_version() with the value they were built
// against before calling anything else.

#ifndef LLAMA_L2KV_H
#define LLAMA_L2KV_H

#include "llama.h"

#include <stdbool.h>
#include <stdint.h>

#define LLAMA_L2KV_ABI_VERSION 13

#ifdef __cplusplus
extern "C" {
#endif

// L2KV_CDEF_BEGIN

    // status codes returned by the l2kv functions; 0 is success, errors are negative
    // every error is also logged through llama.cpp's log with the offending value
    enum llama_l2kv_status {
        LLAMA_L2KV_STATUS_OK                 =  0,
        LLAMA_L2KV_STATUS_INVALID_ARGUMENT   = -1, // a NULL pointer or an out-of-range value
        LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY = -2, // the context has no KV cache the scheme can serve
        LLAMA_L2KV_STATUS_UNSUPPORTED_CONFIG = -3, // e.g. flash attention off, several sequences, MLA, ALiBi
        LLAMA_L2KV_STATUS_INVALID_STATE      = -4, // e.g. enabling on a cache that already holds tokens
        LLAMA_L2KV_STATUS_NOT_ENABLED        = -5, // eviction is not enabled on this context
        LLAMA_L2KV_STATUS_COMPUTE_FAILED     = -6, // the compaction graph failed on the backend
    };

    // which entries survive an eviction, per layer and KV head (or per layer, see per_head)
    enum llama_l2kv_policy {
        LLAMA_L2KV_POLICY_KEEP_LOW_NORM  = 0, // keep the keys with the lowest L2 norm (the paper's rule)
        LLAMA_L2KV_POLICY_KEEP_HIGH_NORM = 1, // keep the highest-norm keys (the paper's negative control)
        LLAMA_L2KV_POLICY_RANDOM         = 2, // keep a seeded pseudo-random subset (depends only on seed, layer, head, position)
        LLAMA_L2KV_POLICY_WINDOW         = 3, // keep the n_sink first and the most recent tokens (StreamingLLM)
        LLAMA_L2KV_POLICY_KEY_DIFF       = 4, // keep the keys least similar (cosine) to their head's mean unit key
                                              // (KeyDiff, arXiv:2504.15364), computed from the cached K (the default)
        LLAMA_L2KV_POLICY_HYBRID         = 5, // a merge of two rankings: 1/4 of the entries by lowest key norm,
                                              // 3/4 by KeyDiff (score min(rank_norm/0.25, rank_cos/0.75))
    };

    // the RoPE positions of the kept keys after an eviction
    enum llama_l2kv_positions {
        LLAMA_L2KV_POSITIONS_ORIGINAL = 0, // every key keeps the rotation of its position in the text: distances to old
                                           // keys grow without bound, past anything the model was trained on
        LLAMA_L2KV_POSITIONS_CACHE    = 1, // StreamingLLM's rule: each (layer, KV head) renumbers its kept keys 0..n-1 in
                                           // the order of their positions and re-rotates K; new tokens continue from n
                                           // (the positions callers pass, masks and recall keep the text's positions).
                                           // Renumbers only when positions would pass max(kv_budget + n_slack,
                                           // min(4 (kv_budget + n_slack), 3/4 n_ctx_train)) (measured closer to a
                                           // full cache): RoPE positions stay below that at any length
    };

    struct llama_l2kv_params {
        uint32_t kv_budget;          // entries kept per layer and KV head after an eviction (>= 1)
        uint32_t n_slack;            // entries the cache may hold past kv_budget: it grows to kv_budget + n_slack, then
                                     // evicts down to kv_budget (one eviction per n_slack tokens); 0: n_batch (the
                                     // default); otherwise >= n_batch, since a batch is stored whole. The context needs
                                     // n_ctx >= kv_budget + n_slack cells; a larger slack evicts less often, and
                                     // attention then spans up to kv_budget + n_slack entries
        uint32_t n_sink;             // tokens at the first positions (0 .. n_sink-1) that are never evicted
        uint32_t n_recent;           // newest tokens that are never evicted (n_sink + n_recent < kv_budget)
        int32_t  policy;             // enum llama_l2kv_policy
        bool     per_head;           // true: each KV head keeps its own entries (the paper); false: one choice per layer,
                                     // scored by the sum over the heads of the policy's feature (norm, cosine)
        uint64_t seed;               // seed of LLAMA_L2KV_POLICY_RANDOM
        int32_t  n_skip_layers;      // entries in skip_layers; 0: skip none; -1: the policy's default: layers {0, 1}
                                     // for KEEP_LOW_NORM, KEEP_HIGH_NORM and RANDOM (the paper's setting), none else
        const int32_t * skip_layers; // model layer ids that keep the n_sink first + most recent tokens instead
                                     // (every layer must hold the same number of entries, so skipped layers cannot
                                     // keep everything); copied by llama_l2kv_enable
        int32_t  positions;          // enum llama_l2kv_positions; CACHE falls back to ORIGINAL (with a warning) where
                                     // llama.cpp cannot shift the model's keys (llama_memory_can_shift)
    };

    struct llama_l2kv_stats {
        bool     enabled;            // eviction is enabled on the context
        uint32_t kv_budget;          // the configured budget (0 when disabled)
        uint32_t kv_size;            // cells in the budgeted KV cache (n_ctx, or the full-attention part of an iSWA cache)
        uint32_t n_cells_used;       // cells holding an entry now (<= kv_size)
        uint32_t n_cells_compacted;  // cells [0, n) hold entries kept by the last eviction
        uint32_t n_layers;           // cache layers under eviction (full-attention layers only for iSWA models)
        int32_t  pos_max;            // last position stored in the cache (-1 when empty)
        uint64_t n_evictions;        // eviction events so far
        uint64_t n_dropped;          // entries dropped per (layer, KV head), summed over events
        uint64_t n_moved_rows;       // K/V rows moved on the backend, all layers and heads
        double   t_evict_ms;         // wall time spent evicting: the three parts below and the cell bookkeeping
        double   t_feature_ms;       //   reading the key norms back and computing key cosines (KEY_DIFF, HYBRID)
        double   t_rank_ms;          //   scoring and selecting on the host
        double   t_move_ms;          //   the compaction graph
        uint64_t kv_bytes;           // K/V buffer size of the budgeted cache (also when eviction is off)
        uint64_t norm_bytes;         // size of the per-layer key norm buffers
        int32_t  positions;          // enum llama_l2kv_positions in effect
        int32_t  rope_pos_max;       // largest RoPE position in the cache (pos_max when keys keep original positions)
        uint64_t n_rotated_rows;     // K rows re-rotated, all layers and heads, summed over events
        double   t_rotate_ms;        // of t_evict_ms: the re-rotation graph
    };

    // attention layout of one model layer, as llama.cpp loaded it (see llama_l2kv_model_layer_info)
    struct llama_l2kv_layer_info {
        bool    has_kv;        // the layer stores K/V in a cache
        bool    is_swa;        // sliding-window attention (kept by the window cache, never budgeted)
        int32_t n_head_kv;     // KV heads
        int32_t n_embd_head_k; // K head size
        int32_t n_embd_head_v; // V head size
    };

    // ABI version of the library (LLAMA_L2KV_ABI_VERSION at build time)
    // call this first: a library without this symbol is a stock llama.cpp
    LLAMA_API int32_t llama_l2kv_abi_version(void);

    // human-readable build description, e.g. "l2kv-cpp abi 2; llama.cpp 0c1e5709; source 0123456789ab"
    // the returned string is static and must not be freed
    LLAMA_API const char * llama_l2kv_build_info(void);

    // short name of a status code, e.g. "invalid argument"; never NULL
    LLAMA_API const char * llama_l2kv_status_str(int32_t status);

    // the last error an l2kv function of this thread logged, one line naming the bad value ("" if none)
    // valid until the next l2kv call on the thread
    LLAMA_API const char * llama_l2kv_last_error(void);

    // route llama.cpp's (and ggml's) log to a C callback that prints warnings to stderr and drops the rest:
    // a binding whose log callback runs in an interpreter (llama-cpp-python) otherwise calls into it for
    // every debug line, e.g. ~180 per eviction from the graph re-reservation. Errors are dropped too: the
    // l2kv functions report theirs through llama_l2kv_last_error, and callers turn failures into messages
    // (llama-cpp-python with verbose off shows the same: warnings only). llama_log_set undoes it
    LLAMA_API void llama_l2kv_log_set_quiet(void);

    // make a fatal ggml error (GGML_ABORT) print one line, "error: <ggml's message> (<file:line>): <hint>", and end
    // the process with exit_code instead of abort() and a backtrace. For the RPC client: ggml's has no other way to
    // report an rpc-server that stopped answering. Process-wide; the hint is copied (NULL or "": none);
    // exit_code 0 restores ggml's default
    LLAMA_API void llama_l2kv_exit_on_fatal_error(int32_t exit_code, const char * hint);

    // whether flash attention is enabled on the context after llama.cpp resolved
    // LLAMA_FLASH_ATTN_TYPE_AUTO (the value the graphs are built with)
    // writes the answer to *out and returns a status
    LLAMA_API int32_t llama_l2kv_get_flash_attn(const struct llama_context * ctx, bool * out);

    // defaults: kv_budget 4096, n_sink 4, n_recent 32, KEY_DIFF, per head, seed 0, the policy's skip layers (-1),
    // positions CACHE
    LLAMA_API struct llama_l2kv_params llama_l2kv_default_params(void);

    // enable eviction on a context whose KV cache is still empty (call before the first decode)
    // checks the budget against the context size and refuses what the scheme cannot serve
    // (see enum llama_l2kv_status); on success every later decode stores key norms and evicts as needed
    LLAMA_API int32_t llama_l2kv_enable(struct llama_context * ctx, const struct llama_l2kv_params * params);

    // stop evicting and drop the norm buffers; the cache keeps its entries
    LLAMA_API int32_t llama_l2kv_disable(struct llama_context * ctx);

    // counters and sizes; works (enabled = false) on any context with a KV cache
    LLAMA_API int32_t llama_l2kv_get_stats(const struct llama_context * ctx, struct llama_l2kv_stats * out);

    // the key norms and true positions of model layer il, for cells [0, n) where n is the returned value
    // layout: [cell][kv head], n_cells_max*n_head_kv entries each; empty cells get norm 0 and position -1
    // either output may be NULL; returns the number of cells written (>= 0) or a negative status
    LLAMA_API int32_t llama_l2kv_read_layer(
            struct llama_context * ctx,
                         int32_t   il,
                           float * norms,
                         int32_t * pos,
                         int32_t   n_cells_max);

    // the RoPE position each K row of model layer il is rotated to, for cells [0, n) where n is the returned value;
    // layout [cell][kv head] as read_layer, empty cells get -1. With LLAMA_L2KV_POSITIONS_ORIGINAL these are the
    // true positions
    LLAMA_API int32_t llama_l2kv_read_rope_positions(
            struct llama_context * ctx,
                         int32_t   il,
                         int32_t * pos,
                         int32_t   n_cells_max);

    // KeyDiff's feature for model layer il now: the cosine of every cached key with the normalised sum of
    // its head's unit keys (the eviction computes the same, see LLAMA_L2KV_POLICY_KEY_DIFF), for cells
    // [0, n) where n is the returned value; layout [cell][kv head] as read_layer, empty cells get 0.
    // Runs a graph on the backend when K is not in host memory: call it between decodes
    LLAMA_API int32_t llama_l2kv_read_key_cosines(
            struct llama_context * ctx,
                         int32_t   il,
                           float * cosines,
                         int32_t   n_cells_max);

    // KV heads of model layer il in the budgeted cache, or a negative status (e.g. a sliding-window layer)
    LLAMA_API int32_t llama_l2kv_n_head_kv(const struct llama_context * ctx, int32_t il);

    // evict down to kv_budget now if more entries are held (normally this happens when the cache is full)
    LLAMA_API int32_t llama_l2kv_evict_now(struct llama_context * ctx);

    // change n_sink on an enabled context, from the next eviction on: e.g. a chat protects its rendered
    // system turn, whose length is known once the template is rendered (as llama.cpp's --keep protects the
    // initial prompt); n_sink + n_recent must stay < kv_budget. Positions an earlier eviction dropped stay
    // dropped
    LLAMA_API int32_t llama_l2kv_set_n_sink(struct llama_context * ctx, uint32_t n_sink);

    // copy the raw bytes of K (kind 0) or V (kind 1) of model layer il, cells [cell0, cell0 + n_cells), into dst
    // layout: [cell][row bytes], exactly as stored (any cache type); works with eviction on or off
    // returns the bytes per cell (>= 0) or a negative status (also when dst_size is too small)
    LLAMA_API int64_t llama_l2kv_read_kv(
            struct llama_context * ctx,
                         int32_t   il,
                         int32_t   kind,
                         int32_t   cell0,
                         int32_t   n_cells,
                            void * dst,
                          size_t   dst_size);

    // the attention layout of model layer il (works on a vocab-only model: no weights needed)
    LLAMA_API int32_t llama_l2kv_model_layer_info(
            const struct llama_model * model,
                             int32_t   il,
        struct llama_l2kv_layer_info * out);

    // the sliding window of the model in tokens (0 when it has none)
    LLAMA_API int32_t llama_l2kv_model_n_swa(const struct llama_model * model);

    // attention probe, for the norm-attention analysis: an eval callback (llama_context_params.cb_eval,
    // with cb_eval_user_data = the probe) that keeps, per layer, the attention weights "kq_soft_max-<il>"
    // [n_kv, n_tokens, n_head] (flash attention must be off so that they are computed) and the keys
    // "Kcur-<il>" [n_embd_head_k, n_head_kv, n_tokens] of the last ubatch; read them with _get
    struct llama_l2kv_probe;

    LLAMA_API struct llama_l2kv_probe * llama_l2kv_probe_new(void);
    LLAMA_API void llama_l2kv_probe_free(struct llama_l2kv_probe * probe);
    LLAMA_API bool llama_l2kv_probe_cb(struct ggml_tensor * t, bool ask, void * probe);

    // what = 0: attention weights, 1: keys; writes the 4 dimensions (ggml order) to ne and, if dst is
    // not NULL and holds dst_count floats, the data; returns the element count or a negative status
    LLAMA_API int64_t llama_l2kv_probe_get(
            const struct llama_l2kv_probe * probe,
                                  int32_t   il,
                                  int32_t   what,
                                  int64_t * ne,
                                    float * dst,
                                  int64_t   dst_count);

    // the selection rule on its own (what every eviction runs per layer and head), for tests and tools:
    // writes to out_idx the indices of the n_keep entries to keep, best first: protected entries
    // (pos < n_sink or pos > pos_last - n_recent) first, then ascending score (NaN last), ties to the
    // newer position; returns the number written
    LLAMA_API int32_t llama_l2kv_select(
            const int32_t * pos,
              const float * score,
                  int32_t   n,
                  int32_t   n_keep,
                  int32_t   n_sink,
                  int32_t   n_recent,
                  int32_t   pos_last,
                  int32_t * out_idx);

    // the score of LLAMA_L2KV_POLICY_RANDOM for one entry (lower is kept first)
    LLAMA_API float llama_l2kv_random_score(uint64_t seed, int32_t il, int32_t head, int32_t pos);

    //
    // archive and recall: evicted, not forgotten
    //
    // With the archive on, every entry an eviction drops goes, per layer and KV head, to host memory: its
    // true position and its K, V and key-norm rows, byte for byte as stored (any cache type). A recall
    // brings the archived entries of some position spans back into the cache (in every layer and head
    // that dropped them) before new text is processed: the spans are pinned (protected like the sinks
    // until the next recall), and every (layer, head) then keeps kv_budget + m entries, m the fewest any
    // (layer, head) got back: the entries beyond that are exchanged for those the policy ranks lowest
    // (they go to the archive). The cache never holds more than kv_budget + n_slack entries.

    struct llama_l2kv_archive_params {
        bool     on_disk;   // false: the rows in RAM; true: in unnamed temporary files (std::tmpfile, in $TMPDIR
                            // on POSIX systems, removed when closed), RAM holding only positions and slots (16 bytes a row)
        uint64_t max_bytes; // 0: no limit; else the most the archive's rows and positions may take (RAM or disk):
                            // each (layer, group) keeps the entries of the positions evicted last, and the oldest
                            // are forgotten (at least one position's rows, llama_l2kv_archive_stats.bytes_per_position)
    };

    struct llama_l2kv_archive_stats {
        bool     enabled;      // evicted entries go to the archive
        bool     on_disk;      // its rows are in temporary files
        uint64_t n_entries;    // (layer, group) rows held; a group is a KV head (per-head mode) or a layer
        uint64_t n_bytes;      // what they take: K, V and norm rows, and positions (in RAM unless on_disk)
        uint64_t n_disk_bytes; // size of the temporary files (their freed slots included; 0 in RAM)
        uint64_t n_recalls;   // recalls that brought entries back
        uint64_t n_recalled;  // rows brought back, summed over recalls
        double   t_recall_ms; // wall time of all recalls, the evictions they ran included
        uint64_t max_bytes;   // the limit it was started with (0: none)
        uint64_t bytes_per_position; // what one position evicted everywhere adds (rows and positions)
        uint64_t n_forgotten; // (layer, group) entries dropped for max_bytes, oldest first
    };

    // defaults: rows in RAM
    LLAMA_API struct llama_l2kv_archive_params llama_l2kv_archive_default_params(void);

    // start keeping evicted entries (params not NULL; a running archive is dropped and started again with the
    // params) or stop (NULL), which drops the archive. Entries evicted before the archive was started are lost
    LLAMA_API int32_t llama_l2kv_archive_enable(struct llama_context * ctx, const struct llama_l2kv_archive_params * params);

    LLAMA_API int32_t llama_l2kv_archive_get_stats(const struct llama_context * ctx, struct llama_l2kv_archive_stats * out);

    // counts[p] = how many (layer, group) rows of position p the archive holds, for p in [0, n_pos)
    // (0: the position is in the cache everywhere, or was never seen); returns the number of layers x groups
    // (the count of a position archived everywhere) or a negative status
    LLAMA_API int32_t llama_l2kv_archive_coverage(const struct llama_context * ctx, int32_t * counts, int32_t n_pos);

    // the archived entries of model layer il, group `group` (its KV head, or 0 per layer), ascending position:
    // positions to pos and rows to rows, [entry][K row, V row, norm row], at most n_max entries; row_bytes[3]
    // receives the three row sizes (pos and rows may be NULL to ask only for sizes); returns the number of
    // entries held (which may be more than n_max) or a negative status
    LLAMA_API int32_t llama_l2kv_archive_read(
            const struct llama_context * ctx,
                               int32_t   il,
                               int32_t   group,
                               int32_t * pos,
                                  void * rows,
                               int32_t   n_max,
                               int64_t * row_bytes);

    // bring back the archived entries of the position spans [span_first[i], span_end[i]) (any order, may
    // overlap); their total length (merged) must be <= n_slack and <= kv_budget - n_sink - n_recent. Call it
    // between decodes, before the text that asked for them is processed. Evicts down to kv_budget first when
    // more entries are held. Returns the number of cells the recall used (the most entries any group got
    // back; 0 when the archive holds none of the spans) or a negative status
    LLAMA_API int32_t llama_l2kv_recall(
            struct llama_context * ctx,
                   const int32_t * span_first,
                   const int32_t * span_end,
                         int32_t   n_spans);

    // keep the queries (after RoPE) of every decoded ubatch of up to n_tokens_max tokens, per budgeted layer, for
    // a recall that scores the archive with them; 0 stops. The graphs are rebuilt: call it between decodes
    LLAMA_API int32_t llama_l2kv_capture_queries(struct llama_context * ctx, int32_t n_tokens_max);

    // the captured queries of model layer il for the first n_tokens tokens of the last decoded ubatch, layout
    // [token][query head][n_embd_head_k] (rotated like K when the cache type asks for a Hadamard rotation, so
    // that q.k is the attention logit up to the scale); out holds n_tokens * (returned value) floats or is NULL;
    // returns the floats per token (query heads x head size) or a negative status
    LLAMA_API int32_t llama_l2kv_read_queries(
            struct llama_context * ctx,
                         int32_t   il,
                         int32_t   n_tokens,
                           float * out);

// L2KV_CDEF_END

#ifdef __cplusplus
}
#endif

#endif // LLAMA_L2KV_H
