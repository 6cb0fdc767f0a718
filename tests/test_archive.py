"""The archive of evicted entries and recall on the tiny models: what leaves the cache is kept byte for
byte, what comes back is the original at its true position in its own head, the budget holds."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_llm, random_tokens

from l2kv_cpp import archive, cache
from l2kv_cpp.config import L2KVConfig, Policy, Positions
from l2kv_cpp.decode import decode, logits_ith
from l2kv_cpp.errors import InvalidParamsError
from l2kv_cpp.session import ggml_type_id

N_BATCH, BUDGET = 64, 128
FULL = BUDGET + N_BATCH  # tokens held before the first eviction


def _stock(model, tokens, **types):
    """Per layer: K and V rows of every position, and the key norms (not squared), from a run that never evicts."""
    llm = make_llm(model, n_ctx=512, n_batch=N_BATCH, **types)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=len(tokens) + 1))  # on, never evicting: norms are stored
        decode(llm, tokens, 0)
        n_layer = int(llm.metadata["llama.block_count"])
        return {
            il: (
                cache.read_kv(llm.ctx, il, "k", 0, len(tokens)),
                cache.read_kv(llm.ctx, il, "v", 0, len(tokens)),
                cache.read_layer(llm.ctx, il)[0][: len(tokens)],
            )
            for il in range(n_layer)
        }
    finally:
        llm.close()


def _cache_positions(llm, il):
    _, pos = cache.read_layer(llm.ctx, il)
    return pos


def _check_layer(llm, il, stock, per_head, n_tokens):
    """Cache and archive of layer il partition the positions seen, and every row equals the stock row."""
    k_ref, v_ref, norm_ref = stock[il]
    pos = _cache_positions(llm, il)
    n_head = pos.shape[1]
    k_rows = cache.read_kv(llm.ctx, il, "k", 0, pos.shape[0])
    v_rows = cache.read_kv(llm.ctx, il, "v", 0, pos.shape[0])
    kb, vb = k_rows.shape[1] // n_head, v_rows.shape[1] // n_head
    n_checked = 0
    for h in range(n_head):
        in_cache = sorted(int(p) for p in pos[:, h] if p >= 0)
        ar = archive.read(llm.ctx, il, h if per_head else 0)
        if per_head:
            # archived rows: this head's slice of the stock row, and its norm
            for i, p in enumerate(ar.pos):
                assert ar.k[i].tobytes() == k_ref[p, h * kb : (h + 1) * kb].tobytes(), (il, h, p)
                assert ar.v[i].tobytes() == v_ref[p, h * vb : (h + 1) * vb].tobytes(), (il, h, p)
                assert np.sqrt(ar.norm[i].view(np.float32)[0]) == norm_ref[p, h], (il, h, p)  # squared norm kept
                n_checked += 1
        elif h == 0:
            for i, p in enumerate(ar.pos):  # a per-layer group row holds every head
                assert ar.k[i].tobytes() == k_ref[p].tobytes() and ar.v[i].tobytes() == v_ref[p].tobytes()
                assert np.array_equal(np.sqrt(ar.norm[i].view(np.float32)), norm_ref[p])
                n_checked += 1
        assert sorted(in_cache + ar.pos.tolist()) == list(range(n_tokens)), (il, h)
        # the cache rows: each at its true position, in its own head
        for cell in range(pos.shape[0]):
            p = pos[cell, h]
            if p >= 0:
                assert k_rows[cell, h * kb : (h + 1) * kb].tobytes() == k_ref[p, h * kb : (h + 1) * kb].tobytes()
                assert v_rows[cell, h * vb : (h + 1) * vb].tobytes() == v_ref[p, h * vb : (h + 1) * vb].tobytes()
    return n_checked


CASES = [
    ("f16", True, Policy.KEY_DIFF, False),
    ("q8_0", False, Policy.KEEP_LOW_NORM, False),
    ("q4_0", True, Policy.HYBRID, False),
    ("f16", True, Policy.KEY_DIFF, True),  # the graph paths GPU backends run
]


@pytest.mark.parametrize(
    ("cache_type", "per_head", "policy", "graphs"),
    CASES,
    ids=[f"{t}-{'head' if h else 'layer'}-{p.cli_name}{'-graphs' if g else ''}" for t, h, p, g in CASES],
)
def test_archived_and_recalled_rows_are_the_originals(
    tiny_model_hd64, monkeypatch, cache_type, per_head, policy, graphs
):
    if graphs:
        monkeypatch.setenv("LLAMA_L2KV_FORCE_GRAPHS", "1")
    types = {"type_k": ggml_type_id(cache_type), "type_v": ggml_type_id(cache_type)}
    tokens = random_tokens(FULL, seed=3)
    stock = _stock(tiny_model_hd64, tokens, **types)
    llm = make_llm(tiny_model_hd64, n_ctx=256, n_batch=N_BATCH, **types)
    try:
        # original positions: the archived and recalled rows are compared byte for byte with a stock run
        config = L2KVConfig(
            kv_budget=BUDGET, n_sink=2, n_recent=4, per_head=per_head, policy=policy, positions=Positions.ORIGINAL
        )
        cache.enable(llm.ctx, config)
        archive.enable(llm.ctx)
        decode(llm, tokens, 0)
        cache.evict_now(llm.ctx)
        n_layer = len(stock)
        st = archive.stats(llm.ctx)
        n_groups = n_layer * (2 if per_head else 1)
        assert st.enabled and st.n_entries == n_groups * (FULL - BUDGET) and st.n_bytes > 0
        assert sum(_check_layer(llm, il, stock, per_head, FULL) for il in range(n_layer)) > 0

        spans = [(30, 50), (100, 110)]
        wanted = {p for a, b in spans for p in range(a, b)}
        counts, total = archive.coverage(llm.ctx, FULL)
        assert total == n_groups and counts.sum() == st.n_entries
        n_new = archive.recall(llm.ctx, spans)
        assert 0 < n_new <= 30
        for il in range(n_layer):
            _check_layer(llm, il, stock, per_head, FULL)  # still a partition, still the original bytes
            pos = _cache_positions(llm, il)
            for h in range(pos.shape[1]):
                assert wanted <= {int(p) for p in pos[:, h]}, (il, h)
        st2 = archive.stats(llm.ctx)
        assert st2.n_recalls == 1 and st2.n_recalled > 0
        assert counts[list(wanted)].sum() == st2.n_recalled  # everything the spans held came back
        assert archive.coverage(llm.ctx, FULL)[0][list(wanted)].sum() == 0
        used = cache.stats(llm.ctx).n_cells_used
        assert BUDGET <= used <= BUDGET + n_new
        assert st2.n_entries == st.n_entries - (used - BUDGET) * n_groups
    finally:
        llm.close()


def test_recalled_spans_survive_later_evictions_and_the_budget_holds(tiny_model):
    llm = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=BUDGET, n_sink=2, n_recent=4))
        archive.enable(llm.ctx)
        tokens = random_tokens(600, seed=1)
        decode(llm, tokens[:400], 0)
        archive.recall(llm.ctx, [(50, 90)])
        n_ev = cache.stats(llm.ctx).n_evictions
        for i in range(400, 600, 7):  # odd-sized batches, several evictions
            decode(llm, tokens[i : i + 7], i)
            assert cache.stats(llm.ctx).n_cells_used <= BUDGET + N_BATCH
        assert cache.stats(llm.ctx).n_evictions >= n_ev + 2
        n_layer = int(llm.metadata["llama.block_count"])
        for il in range(n_layer):
            pos = _cache_positions(llm, il)
            for h in range(pos.shape[1]):
                assert set(range(50, 90)) <= {int(p) for p in pos[:, h]}, (il, h)
        assert np.all(np.isfinite(logits_ith(llm)))
    finally:
        llm.close()


def test_a_recall_of_the_whole_archive_restores_the_full_cache(tiny_model):
    """With the window policy every head drops the same positions; recalling them all gives back every
    entry (they fit in budget + slack): the next token's logits are the full cache's within the noise of
    the cells' order (measured here as the difference between two batch sizes of a stock run), and far
    from those of the evicted cache without the recall."""
    tokens = random_tokens(FULL, seed=7)

    def stock(n_batch):
        ref = make_llm(tiny_model, n_ctx=512, n_batch=n_batch)
        try:
            decode(ref, tokens + [11], 0)
            return logits_ith(ref)
        finally:
            ref.close()

    def evicted(recall):
        llm = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
        try:
            # a slack of 128: the next token fits without another eviction
            cache.enable(llm.ctx, L2KVConfig(kv_budget=BUDGET, n_slack=128, n_sink=4, n_recent=8, policy=Policy.WINDOW))
            archive.enable(llm.ctx)
            decode(llm, tokens, 0)
            cache.evict_now(llm.ctx)
            if recall:
                counts, _ = archive.coverage(llm.ctx, FULL)
                archived = np.flatnonzero(counts)
                assert len(archived) == FULL - BUDGET
                assert archive.recall(llm.ctx, [(int(archived[0]), int(archived[-1]) + 1)]) == FULL - BUDGET
                assert cache.stats(llm.ctx).n_cells_used == FULL and archive.stats(llm.ctx).n_entries == 0
            decode(llm, [11], FULL)
            return logits_ith(llm)
        finally:
            llm.close()

    ref = stock(N_BATCH)
    noise = np.abs(stock(256) - ref).max()
    assert 0 < noise < 0.01 * np.abs(ref).max()
    recalled, lost = evicted(True), evicted(False)
    assert np.argmax(recalled) == np.argmax(ref)
    assert np.abs(recalled - ref).max() <= 2 * noise
    assert np.abs(lost - ref).max() > 10 * noise


def test_recall_refuses_bad_input_and_is_a_no_op_without_an_archive_entry(tiny_model):
    llm = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=BUDGET))
        with pytest.raises(InvalidParamsError, match="the archive is off"):
            archive.recall(llm.ctx, [(0, 4)])
        archive.enable(llm.ctx)
        decode(llm, random_tokens(50), 0)
        assert archive.recall(llm.ctx, [(0, 4)]) == 0  # nothing evicted yet
        assert archive.recall(llm.ctx, []) == 0
        with pytest.raises(InvalidParamsError, match=r"span 0 is \[5, 5\)"):
            archive.recall(llm.ctx, [(5, 5)])
        with pytest.raises(InvalidParamsError, match="a recall brings back at most 64"):
            archive.recall(llm.ctx, [(0, 40), (30, 100)])
        assert cache.stats(llm.ctx).n_cells_used == 50
        archive.enable(llm.ctx, False)
        assert not archive.stats(llm.ctx).enabled
    finally:
        llm.close()


def test_the_archive_is_saved_and_restored_with_the_state(tiny_model):
    config = L2KVConfig(kv_budget=BUDGET, n_sink=2, n_recent=4)
    tokens = random_tokens(300, seed=4)
    llm = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
    other = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
    try:
        cache.enable(llm.ctx, config)
        archive.enable(llm.ctx)
        decode(llm, tokens, 0)
        archive.recall(llm.ctx, [(20, 30)])
        state = llm.save_state()
        cache.enable(other.ctx, config)
        other.load_state(state)
        assert archive.stats(other.ctx).n_entries == archive.stats(llm.ctx).n_entries > 0
        for il in (0, 1):
            for h in range(_cache_positions(llm, il).shape[1]):
                a, b = archive.read(llm.ctx, il, h), archive.read(other.ctx, il, h)
                assert np.array_equal(a.pos, b.pos)
                assert a.k.tobytes() == b.k.tobytes() and a.v.tobytes() == b.v.tobytes()
        decode(llm, tokens[:5], 300)
        decode(other, tokens[:5], 300)
        assert logits_ith(llm).tobytes() == logits_ith(other).tobytes()
    finally:
        llm.close()
        other.close()


def test_captured_queries_are_the_post_rope_queries(tiny_model):
    """Layer 0's queries and keys depend only on token and position, and RoPE makes q(p + o) . k(p) depend
    on the offset o alone: the captured query of one token against the cached key of another is the same
    at positions 0 and 37, and differs for another offset."""
    x, y, z = 17, 29, 41

    def dots(p0):
        llm = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
        try:
            cache.enable(llm.ctx, L2KVConfig(kv_budget=BUDGET))
            archive.capture_queries(llm.ctx, N_BATCH)
            if p0:
                decode(llm, random_tokens(p0), 0)
            decode(llm, [x, y, z], p0)
            n_head_kv = cache.read_layer(llm.ctx, 0)[1].shape[1]
            k = cache.read_kv(llm.ctx, 0, "k", p0, 3).view(np.float16).astype(np.float32)
            k = k.reshape(3, n_head_kv, -1)
            q = archive.read_queries(llm.ctx, 0, 3, k.shape[2])  # [token, head, d]
            r = q.shape[1] // n_head_kv
            kx = np.repeat(k[0], r, axis=0)  # the KV head of every query head
            return np.sum(q[1] * kx, axis=1), np.sum(q[2] * kx, axis=1)  # offsets 1 and 2, per query head
        finally:
            llm.close()

    (a1, a2), (b1, b2) = dots(0), dots(37)
    np.testing.assert_allclose(b1, a1, rtol=1e-2, atol=1e-2 * np.abs(a1).max())
    np.testing.assert_allclose(b2, a2, rtol=1e-2, atol=1e-2 * np.abs(a2).max())
    assert np.abs(a1 - a2).max() > 0.1 * np.abs(a1).max()  # the offset matters: these are rotated queries


def test_queries_are_refused_unless_captured(tiny_model):
    llm = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=BUDGET))
        decode(llm, random_tokens(10), 0)
        with pytest.raises(InvalidParamsError, match="queries are not captured"):
            archive.read_queries(llm.ctx, 0, 3, 32)
        archive.capture_queries(llm.ctx, N_BATCH)
        with pytest.raises(InvalidParamsError, match="n_tokens \\(65\\) > the 64 captured"):
            archive.read_queries(llm.ctx, 0, 65, 32)
        archive.capture_queries(llm.ctx, 0)
        decode(llm, random_tokens(5), 10)  # the graphs lost the copy and still run
        with pytest.raises(InvalidParamsError, match="queries are not captured"):
            archive.read_queries(llm.ctx, 0, 3, 32)
    finally:
        llm.close()


def test_an_archive_on_disk_holds_and_gives_back_the_same_rows(tiny_model):
    """Rows in temporary files instead of RAM: the same entries, the same bytes, the same recall; the files
    keep their slots for reuse after a recall, and stopping the archive drops them."""
    tokens = random_tokens(400, seed=9)
    out = []
    for on_disk in (False, True):
        llm = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
        try:
            cache.enable(llm.ctx, L2KVConfig(kv_budget=BUDGET, n_sink=2, n_recent=4))
            archive.enable(llm.ctx, on_disk=on_disk)
            decode(llm, tokens, 0)
            cache.evict_now(llm.ctx)
            st = archive.stats(llm.ctx)
            assert st.on_disk == on_disk and (st.n_disk_bytes > 0) == on_disk
            before = [archive.read(llm.ctx, il, h) for il in range(2) for h in range(2)]
            archive.recall(llm.ctx, [(100, 140)])
            after = [archive.read(llm.ctx, il, h) for il in range(2) for h in range(2)]
            kv = [cache.read_kv(llm.ctx, il, "k", 0, BUDGET + 40).tobytes() for il in range(2)]
            mid = archive.stats(llm.ctx)
            decode(llm, tokens[:70], 400)  # the next eviction reuses the slots the recall freed
            end = archive.stats(llm.ctx)
            if on_disk:
                row = st.n_bytes // st.n_entries - 8  # K + V + norm bytes of a row (8: its positions)
                added = end.n_entries - mid.n_entries
                assert end.n_disk_bytes >= end.n_entries * row  # every row held is in the files
                assert end.n_disk_bytes - st.n_disk_bytes < added * row  # not all new: freed slots reused
            out.append((st.n_entries, st.n_bytes, before, after, kv))
            archive.enable(llm.ctx, False)
            assert archive.stats(llm.ctx).n_disk_bytes == 0
        finally:
            llm.close()
    (n0, b0, before0, after0, kv0), (n1, b1, before1, after1, kv1) = out
    assert (n0, b0) == (n1, b1) and kv0 == kv1
    for a, b in zip(before0 + after0, before1 + after1, strict=True):
        assert np.array_equal(a.pos, b.pos) and a.k.tobytes() == b.k.tobytes() and a.v.tobytes() == b.v.tobytes()
        assert a.norm.tobytes() == b.norm.tobytes()


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_limited_archive_keeps_the_positions_evicted_last(tiny_model, on_disk):
    """max_bytes bounds the archive (RAM, or its temporary files): each (layer, head) keeps the entries of
    the positions evicted last, byte-exact, and counts the ones it forgot; a limit below one position is
    refused."""
    n_tokens, n_sink, n_keep = 420, 2, 100
    tokens = random_tokens(n_tokens, seed=4)
    stock = _stock(tiny_model, tokens)
    llm = make_llm(tiny_model, n_ctx=256, n_batch=N_BATCH)
    try:
        # (original positions: archived K rows keep the stock rotation, so they compare byte for byte)
        config = L2KVConfig(
            kv_budget=BUDGET, n_sink=n_sink, n_recent=4, policy=Policy.WINDOW, positions=Positions.ORIGINAL
        )
        cache.enable(llm.ctx, config)
        archive.enable(llm.ctx)
        per_pos = archive.stats(llm.ctx).bytes_per_position
        assert per_pos > 0
        with pytest.raises(InvalidParamsError, match="less than one evicted position takes"):
            archive.enable(llm.ctx, max_bytes=per_pos - 1)
        limit = n_keep * per_pos + per_pos // 2
        archive.enable(llm.ctx, on_disk=on_disk, max_bytes=limit)
        decode(llm, tokens, 0)
        cache.evict_now(llm.ctx)
        st = archive.stats(llm.ctx)
        # the window keeps the sinks and the last BUDGET - n_sink positions: it evicted [n_sink, first_kept)
        first_kept = n_tokens - (BUDGET - n_sink)
        n_layer = int(llm.metadata["llama.block_count"])
        n_head_kv = int(llm.metadata["llama.attention.head_count_kv"])
        n_groups = n_layer * n_head_kv  # per head
        assert st.max_bytes == limit and st.n_bytes <= limit
        assert st.n_entries == n_keep * n_groups
        assert st.n_forgotten == (first_kept - n_sink - n_keep) * n_groups
        if on_disk:  # freed slots are reused: the files hold the limit and at most an eviction's worth more
            assert st.n_disk_bytes <= (n_keep + 2 * N_BATCH) * per_pos
        for il in range(n_layer):
            k_ref, v_ref, _ = stock[il]
            for h in range(n_head_kv):
                ar = archive.read(llm.ctx, il, h)
                assert list(ar.pos) == list(range(first_kept - n_keep, first_kept)), (il, h)
                if il > 0:
                    continue  # (deeper rows depend on what the evicting run attended to: layer 0 is exact)
                kb, vb = ar.k.shape[1], ar.v.shape[1]
                for i, p in enumerate(ar.pos):
                    assert ar.k[i].tobytes() == k_ref[p, h * kb : (h + 1) * kb].tobytes(), (il, h, p)
                    assert ar.v[i].tobytes() == v_ref[p, h * vb : (h + 1) * vb].tobytes(), (il, h, p)
        # what it kept still comes back
        assert archive.recall(llm.ctx, [(first_kept - 20, first_kept)]) > 0
    finally:
        llm.close()
