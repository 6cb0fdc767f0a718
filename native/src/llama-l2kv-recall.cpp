// llama-l2kv-recall.cpp - the archive's side of an eviction, and recall: archived entries back into the cache
//
// A recall does not need an eviction of its own design: it puts the archived entries of the asked
// spans into the free cells past the budget, pins the spans (protected like the sinks) and lets the
// ordinary eviction take every (layer, group) back to a common count. So the policy decides what
// leaves (and the archive keeps it), the compaction stays the one that is tested bit-exact, and the
// cache never holds more than kv_budget + n_slack entries.
//
// Every layer must hold the same number of cells (one shared cell array and mask), but the groups
// hold different numbers of archived entries of a span (each head evicted its own). The recall
// therefore uses R = the largest count of any group new cells, and pads the other groups with
// filler rows (copies of kept rows, so that the key cosines of the eviction that follows see the
// same distribution of keys); the eviction drops every filler first and never archives one. It keeps
// kv_budget + m entries per group, m the fewest entries any group got back: what every group got back
// is added (the slack cells are allocated anyway), the rest is exchanged for the entries the policy
// ranks lowest. A recall of the whole archive thus restores every entry when they fit in
// kv_budget + n_slack (every eviction drops as many entries from every group, so all groups archive
// the same count).

#include "llama-kv-cache-l2.h"

#include "llama-impl.h"
#include "llama-kv-cache.h"

#include <algorithm>
#include <array>
#include <cstring>

// memory the host can read and write in place (LLAMA_L2KV_FORCE_GRAPHS takes the backend path, for tests)
static bool llama_l2kv_in_place(const ggml_tensor * t) {
    return ggml_backend_buffer_is_host(t->buffer) && !llama_l2kv_force_graphs();
}

void llama_kv_cache_l2::rows_get(const ggml_tensor * rows, uint32_t r0, uint32_t n, void * dst) {
    const size_t nb1 = rows->nb[1];
    if (llama_l2kv_in_place(rows)) {
        memcpy(dst, (const char *) rows->data + (size_t) r0*nb1, (size_t) n*nb1);
    } else if (n > 0) {
        ggml_backend_tensor_get(rows, dst, (size_t) r0*nb1, (size_t) n*nb1); // one transfer, not one per row
    }
}

void llama_kv_cache_l2::rows_set(ggml_tensor * rows, uint32_t r0, uint32_t n, const void * src) {
    const size_t nb1 = rows->nb[1];
    if (llama_l2kv_in_place(rows)) {
        memcpy((char *) rows->data + (size_t) r0*nb1, src, (size_t) n*nb1);
    } else if (n > 0) {
        ggml_backend_tensor_set(rows, src, (size_t) r0*nb1, (size_t) n*nb1);
    }
}

void llama_kv_cache_l2::archive_layout(std::vector<uint32_t> & groups, std::vector<llama_l2kv_archive::row_layout> & layout) const {
    groups.resize(n_layer());
    layout.resize(n_layer());
    for (uint32_t ikv = 0; ikv < n_layer(); ++ikv) {
        groups[ikv] = n_group(ikv);
        layout[ikv] = { k_rows[ikv]->nb[1], v_rows[ikv]->nb[1], kn_rows[ikv]->nb[1] };
    }
}

bool llama_kv_cache_l2::archive_start(bool on_disk, uint64_t max_bytes) {
    std::vector<uint32_t> groups;
    std::vector<llama_l2kv_archive::row_layout> layout;
    archive_layout(groups, layout);
    archive_write_failed = false;
    archive_on = archive.init(groups, layout, on_disk, max_bytes);
    return archive_on;
}

bool llama_kv_cache_l2::archive_dropped(llama_context * lctx, const std::vector<std::vector<dropped_entry>> & dropped) {
    std::vector<uint32_t> host_layers;
    std::vector<uint32_t> graph_layers;
    for (uint32_t ikv = 0; ikv < n_layer(); ++ikv) {
        if (dropped[ikv].empty()) {
            continue;
        }
        const auto t = row_aliases(ikv);
        const bool on_host = std::all_of(t.begin(), t.end(), [](const ggml_tensor * x) { return llama_l2kv_in_place(x); });
        (on_host ? host_layers : graph_layers).push_back(ikv);
    }

    llama_l2kv_parallel_for(host_layers.size(), n_threads(lctx), [&](uint32_t j) {
        const uint32_t ikv = host_layers[j];
        const auto t = row_aliases(ikv);
        const uint8_t * base[3] = { (const uint8_t *) t[0]->data, (const uint8_t *) t[1]->data, (const uint8_t *) t[2]->data };
        archive_rows(ikv, dropped[ikv], base, dropped_rows(ikv, dropped[ikv]).data());
    });
    if (graph_layers.empty()) {
        return true;
    }

    // the dropped rows, gathered on each layer's backend (get_rows on the F32 aliases copies the bytes) and
    // read back once per tensor
    llm_graph_result * res = begin_graph(lctx);
    auto * ctx = res->get_ctx();
    auto * gf  = res->get_gf();
    auto inp = std::make_unique<llm_graph_input_l2_moves>();
    std::vector<std::array<ggml_tensor *, 3>> out(graph_layers.size());
    for (size_t j = 0; j < graph_layers.size(); ++j) {
        const uint32_t ikv = graph_layers[j];
        ggml_tensor * idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) dropped[ikv].size());
        ggml_set_input(idx);
        inp->src.emplace_back(idx, dropped_rows(ikv, dropped[ikv]));
        const auto t = row_aliases(ikv);
        for (int i = 0; i < 3; ++i) {
            out[j][i] = ggml_get_rows(ctx, t[i], idx);
            ggml_set_output(out[j][i]);
            ggml_build_forward_expand(gf, out[j][i]);
        }
    }
    if (!run_graph(lctx, res, std::move(inp), "archive gather")) {
        return false;
    }
    for (size_t j = 0; j < graph_layers.size(); ++j) {
        std::vector<uint8_t> staged[3];
        const uint8_t * base[3];
        for (int i = 0; i < 3; ++i) {
            staged[i].resize(ggml_nbytes(out[j][i]));
            ggml_backend_tensor_get(out[j][i], staged[i].data(), 0, staged[i].size());
            base[i] = staged[i].data();
        }
        archive_rows(graph_layers[j], dropped[graph_layers[j]], base, nullptr);
    }
    return true;
}

std::vector<int32_t> llama_kv_cache_l2::dropped_rows(uint32_t ikv, const std::vector<dropped_entry> & dropped) const {
    const uint32_t ng = n_group(ikv);
    std::vector<int32_t> rows(dropped.size());
    for (size_t j = 0; j < dropped.size(); ++j) {
        rows[j] = (int32_t) (dropped[j].cell*ng + dropped[j].group);
    }
    return rows;
}

void llama_kv_cache_l2::archive_rows(uint32_t ikv, const std::vector<dropped_entry> & dropped,
        const uint8_t * const base[3], const int32_t * row_of) {
    const auto t = row_aliases(ikv);
    for (size_t j = 0; j < dropped.size(); ++j) {
        const auto & d = dropped[j];
        const size_t r = row_of != nullptr ? (size_t) row_of[j] : j;
        if (!archive.add(ikv, d.group, d.pos, d.rot, base[0] + r*t[0]->nb[1], base[1] + r*t[1]->nb[1],
                base[2] + r*t[2]->nb[1]) && !archive_write_failed) {
            archive_write_failed = true; // (the entry is lost, as without an archive)
            LLAMA_LOG_WARN("%s: cannot write to the archive's temporary file (disk full?): evicted entries are "
                    "lost from now on\n", __func__);
        }
    }
    archive.trim(ikv);
}

uint32_t llama_kv_cache_l2::recall_inject(const llama_l2kv_spans & spans) {
    auto & cells = kv.v_cells[0];
    const uint32_t n_keep  = params.kv_budget;
    const uint32_t n_layer = this->n_layer();

    // the caller evicted first: cells [0, kv_budget) hold the compacted entries and nothing else
    GGML_ASSERT(n_comp == n_keep && cells.get_used() == n_keep && cells.used_max_p1() == n_keep);

    pinned = spans;

    uint32_t n_new = 0;
    for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
        for (uint32_t g = 0; g < n_group(ikv); ++g) {
            n_new = std::max(n_new, archive.count(ikv, g, spans, n_slack));
        }
    }
    if (n_new == 0) {
        return 0;
    }
    GGML_ASSERT(n_keep + n_new <= cells.size());

    const int32_t pos_last = cells.seq_pos_max(0);
    const uint32_t n_cells = n_keep + n_new;

    filler.assign(n_layer, {});
    uint64_t n_back = 0;
    uint32_t m_min  = n_new;
    std::vector<int32_t> pos;
    std::vector<int32_t> rot;
    std::vector<uint8_t> rows;
    for (uint32_t ikv = 0; ikv < n_layer; ++ikv) {
        const uint32_t nh  = n_head_kv(ikv);
        const uint32_t ng  = n_group(ikv);
        const auto &   lay = archive.layout(ikv);
        auto & tp = tpos[ikv];
        auto & rp = rpos[ikv]; // (the eviction that follows re-rotates what it keeps to the cache's positions)
        tp.resize((size_t) n_cells*nh, -1);
        rp.resize((size_t) n_cells*nh, 0);
        filler[ikv].assign((size_t) n_cells*ng, 0);

        // per tensor: the new rows, staged and written at once; the kept rows fillers copy (cells [0, n_src))
        const auto    tensors    = row_aliases(ikv);
        const size_t  offset[3]  = { 0, lay.k, lay.k + lay.v };
        const uint32_t n_src = std::min(n_new, n_keep);
        std::vector<uint8_t> stage[3];
        std::vector<uint8_t> src[3];
        for (int i = 0; i < 3; ++i) {
            stage[i].resize((size_t) n_new*ng*tensors[i]->nb[1]);
            src[i].resize((size_t) n_src*ng*tensors[i]->nb[1]);
            rows_get(tensors[i], 0, n_src*ng, src[i].data());
        }

        for (uint32_t g = 0; g < ng; ++g) {
            pos.clear();
            rot.clear();
            rows.clear();
            const uint32_t m = archive.take(ikv, g, spans, n_new, pos, rot, rows);
            n_back += m;
            m_min   = std::min(m_min, m);
            for (uint32_t j = 0; j < n_new; ++j) {
                const uint32_t cell = n_keep + j;
                const size_t   dst  = (size_t) j*ng + g; // row in the stage
                if (j < m) {
                    for (int i = 0; i < 3; ++i) {
                        const size_t nb = tensors[i]->nb[1];
                        memcpy(stage[i].data() + dst*nb, rows.data() + (size_t) j*lay.total() + offset[i], nb);
                    }
                    for (uint32_t h = 0; h < (params.per_head ? 1 : nh); ++h) {
                        tp[(size_t) cell*nh + (params.per_head ? g : h)] = pos[j];
                        rp[(size_t) cell*nh + (params.per_head ? g : h)] = rot[j];
                    }
                } else {
                    // a filler: the kept entry of cell (j - m) mod kv_budget, evicted first
                    const uint32_t from = (j - m) % n_keep;
                    for (int i = 0; i < 3; ++i) {
                        const size_t nb = tensors[i]->nb[1];
                        memcpy(stage[i].data() + dst*nb, src[i].data() + ((size_t) from*ng + g)*nb, nb);
                    }
                    for (uint32_t h = 0; h < (params.per_head ? 1 : nh); ++h) {
                        const uint32_t hh = params.per_head ? g : h;
                        tp[(size_t) cell*nh + hh] = tp[(size_t) from*nh + hh];
                        rp[(size_t) cell*nh + hh] = rp[(size_t) from*nh + hh];
                    }
                    filler[ikv][(size_t) cell*ng + g] = 1;
                }
            }
        }
        for (int i = 0; i < 3; ++i) {
            rows_set(tensors[i], n_keep*ng, n_new*ng, stage[i].data());
        }
    }

    // cells [0, n_cells) now hold compacted entries: virtual positions ending at the last position, as
    // after an eviction (all visible to the next token); the eviction that follows renumbers them
    cells.reset();
    for (uint32_t j = 0; j < n_cells; ++j) {
        cells.pos_set(j, std::max<int32_t>(0, pos_last - (int32_t) n_cells + 1 + (int32_t) j));
        cells.seq_add(j, 0);
    }
    kv.v_heads[0] = n_cells;
    n_comp = n_cells;

    // what every group got back without dropping anything stays on top of the budget (in the slack, which
    // the buffer holds anyway); the fillers must go before anything attends to them
    evict_target     = n_keep + m_min;
    pending_renumber = true;

    n_recalls  += 1;
    n_recalled += n_back;
    return n_new;
}

ggml_tensor * llama_kv_cache_l2::cpy_q(ggml_context * ctx, ggml_tensor * q_cur, int32_t il) const {
    if (detaching || !capture_q) {
        return nullptr;
    }
    const int32_t ikv = layer_ikv(il);
    if (ikv < 0 || qcap[ikv] == nullptr) {
        return nullptr;
    }
    const int64_t d  = q_cur->ne[0];
    const int64_t nh = q_cur->ne[1];
    const int64_t nt = q_cur->ne[2];
    if (d*nh != qcap[ikv]->ne[0] || nt > qcap[ikv]->ne[1]) {
        return nullptr; // not this layout (cannot happen for the ubatches the context was made for)
    }
    ggml_tensor * dst = ggml_view_3d(ctx, qcap[ikv], d, nh, nt, d*sizeof(float), d*nh*sizeof(float), 0);
    return ggml_cpy(ctx, q_cur, dst);
}

int32_t llama_kv_cache_l2::capture_start(uint32_t n_q) {
    if (capture_q && n_q == n_q_max) {
        return LLAMA_L2KV_STATUS_OK;
    }
    capture_stop();
    qcap.clear();
    qcap_bufs.clear(); // (the graphs that read them are rebuilt before the next decode: pending_reset)
    const auto & hparams = kv.hparams;

    // like the norms: in the buffer type of the layer's K, so that the copy runs where Q is computed
    const int32_t status = alloc_layer_tensors("query", [&](ggml_context * ctx, uint32_t ikv) {
        const int32_t il = layer_il(ikv);
        ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, (int64_t) hparams.n_embd_head_k(il)*hparams.n_head(il), n_q);
        ggml_format_name(t, "l2kv_q_l%d", il);
        return t;
    }, qcap, qcap_bufs);
    if (status != LLAMA_L2KV_STATUS_OK) {
        return status;
    }
    n_q_max       = n_q;
    capture_q     = true;
    pending_reset = true; // graphs built so far lack the copy
    return LLAMA_L2KV_STATUS_OK;
}

void llama_kv_cache_l2::capture_stop() {
    if (capture_q) {
        pending_reset = true; // graphs built so far read qcap
    }
    capture_q = false;
    n_q_max   = 0;
}
