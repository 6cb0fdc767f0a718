"""Eviction on the tiny models: bounded memory, bit-exact moves, no change while off, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_llm, random_tokens

from l2kv_cpp import _lib, cache
from l2kv_cpp.config import L2KVConfig, Policy, Positions
from l2kv_cpp.decode import decode, logits_ith
from l2kv_cpp.errors import InvalidParamsError, NativeCallError, UnsupportedModelError
from l2kv_cpp.session import ggml_type_id


@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.cli_name)
def test_cells_stay_within_budget_plus_batch_and_buffer_is_constant(tiny_model, policy):
    budget, n_batch = 128, 64
    llm = make_llm(tiny_model, n_ctx=256, n_batch=n_batch)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=budget, policy=policy))
        first = cache.stats(llm.ctx)
        tokens = random_tokens(8 * budget + 37)
        pos = 0
        for start in range(0, len(tokens), n_batch):  # one llama_decode per batch
            chunk = tokens[start : start + n_batch]
            decode(llm, chunk, pos)
            pos += len(chunk)
            st = cache.stats(llm.ctx)
            assert st.n_cells_used <= budget + n_batch
            assert st.pos_max == pos - 1  # positions keep growing past n_ctx
            assert (st.kv_bytes, st.norm_bytes, st.kv_size) == (first.kv_bytes, first.norm_bytes, first.kv_size)
        assert pos > 4 * st.kv_size
        assert st.n_evictions >= (len(tokens) - st.kv_size) // (st.kv_size - budget)
        assert np.all(np.isfinite(logits_ith(llm)))
        # decoding goes on token by token past the last eviction
        for i in range(3 * n_batch):
            decode(llm, [5 + i % 50], pos)
            pos += 1
            assert cache.stats(llm.ctx).n_cells_used <= budget + n_batch
    finally:
        llm.close()


@pytest.mark.parametrize("n_slack", [0, 64, 160])
def test_the_cache_grows_by_the_slack_between_evictions(tiny_model, n_slack):
    """The trigger rule: a batch that would take the cache past kv_budget + slack (n_batch when 0)
    evicts first; counted against a simulation of that rule, with odd-sized batches."""
    budget, n_batch = 64, 32
    limit = budget + (n_slack or n_batch)
    llm = make_llm(tiny_model, n_ctx=256, n_batch=n_batch)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=budget, n_slack=n_slack))
        used = evictions = highest = pos = 0
        for i in range(40):
            n = 1 + (7 * i) % n_batch
            if used + n > limit:
                used, evictions = budget, evictions + 1
            used += n
            decode(llm, random_tokens(n, seed=i), pos)
            pos += n
            st = cache.stats(llm.ctx)
            assert (st.n_cells_used, st.n_evictions) == (used, evictions)
            highest = max(highest, st.n_cells_used)
        assert evictions >= 2 and limit - n_batch < highest <= limit
    finally:
        llm.close()


def _stock_rows(model, tokens, n_batch, **types):
    llm = make_llm(model, n_ctx=2048, n_batch=n_batch, **types)
    try:
        decode(llm, tokens, 0)
        n_layer = int(llm.metadata["llama.block_count"])
        return {(il, kind): cache.read_kv(llm.ctx, il, kind, 0, len(tokens)) for il in range(n_layer) for kind in "kv"}
    finally:
        llm.close()


BYTE_EXACT_CASES = [
    *[
        (t, per_head, Policy.KEEP_LOW_NORM)
        for t in ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
        for per_head in (True, False)
    ],
    # the scorers that read the cached keys back: the same moves must stay byte-exact
    *[(t, True, p) for t in ("f16", "q8_0") for p in (Policy.KEY_DIFF, Policy.HYBRID)],
    ("q4_0", False, Policy.KEY_DIFF),
]
# the compaction and key-cosine graphs that GPU backends run (on the CPU the rows are copied in place)
GRAPH_CASES = [("f16", True, Policy.KEY_DIFF), ("q4_0", False, Policy.KEY_DIFF), ("q8_0", True, Policy.KEEP_LOW_NORM)]


@pytest.mark.parametrize(
    ("cache_type", "per_head", "policy", "graphs"),
    [(*c, False) for c in BYTE_EXACT_CASES] + [(*c, True) for c in GRAPH_CASES],
    ids=[f"{t}-{'head' if h else 'layer'}-{p.cli_name}" for t, h, p in BYTE_EXACT_CASES]
    + [f"{t}-{'head' if h else 'layer'}-{p.cli_name}-graphs" for t, h, p in GRAPH_CASES],
)
def test_kept_rows_are_byte_identical_to_a_stock_run(
    tiny_model_hd64, monkeypatch, cache_type, per_head, policy, graphs
):
    """Rows stored before the first eviction, and layer 0 rows (which depend only on token and
    position) through several evictions, equal the bytes a run without eviction stored."""
    n_batch, budget = 64, 128
    if graphs:
        monkeypatch.setenv("LLAMA_L2KV_FORCE_GRAPHS", "1")
    types = {"type_k": ggml_type_id(cache_type), "type_v": ggml_type_id(cache_type)}
    tokens = random_tokens(4 * 256)
    stock = _stock_rows(tiny_model_hd64, tokens, n_batch, **types)
    # original positions: nothing re-rotates a key (tests/test_positions.py checks the cache positions)
    config = L2KVConfig(
        kv_budget=budget, n_sink=2, n_recent=4, per_head=per_head, policy=policy, positions=Positions.ORIGINAL
    )
    llm = make_llm(tiny_model_hd64, n_ctx=256, n_batch=n_batch, **types)
    try:
        cache.enable(llm.ctx, config)
        n_layer = int(llm.metadata["llama.block_count"])
        full = budget + n_batch  # the cache evicts when a batch would take it past this

        def compare(layers, pos_limit):
            n = 0
            for il in layers:
                _, pos = cache.read_layer(llm.ctx, il)
                n_head = pos.shape[1]
                for kind in "kv":
                    rows = cache.read_kv(llm.ctx, il, kind, 0, pos.shape[0])
                    ref = stock[(il, kind)]
                    per = rows.shape[1] // n_head
                    for cell in range(pos.shape[0]):
                        for h in range(n_head):
                            p = pos[cell, h]
                            if p < 0 or p >= pos_limit:
                                continue
                            sl = slice(h * per, (h + 1) * per)
                            assert rows[cell, sl].tobytes() == ref[p, sl].tobytes(), (il, kind, cell, h, p)
                            n += 1
            return n

        # 1) every row was stored before any eviction: all layers must match after one
        decode(llm, tokens[:full], 0)
        cache.evict_now(llm.ctx)
        checked = compare(range(n_layer), full)
        # 2) later rows of deeper layers attend an evicted cache (they differ from stock by design);
        #    layer 0 rows depend only on token and position: they must match through many evictions
        decode(llm, tokens[full:], full)
        st = cache.stats(llm.ctx)
        assert st.n_evictions >= 5 and st.n_rotated_rows == 0 and st.rope_pos_max == st.pos_max
        checked += compare([0], len(tokens))
        assert checked > 1000
        for il in range(n_layer):  # every key at its original position
            np.testing.assert_array_equal(cache.read_rope_positions(llm.ctx, il), cache.read_layer(llm.ctx, il)[1])
    finally:
        llm.close()


def test_logits_are_bit_identical_while_the_budget_is_not_reached(tiny_model):
    """Eviction off is the stock code path (every hook is a no-op); eviction on below the budget only adds
    the norm nodes. Both must give the same logits bit for bit."""
    tokens = random_tokens(150)
    out = []
    for enable in (False, True):
        llm = make_llm(tiny_model, n_ctx=512, n_batch=64)
        try:
            if enable:
                cache.enable(llm.ctx, L2KVConfig(kv_budget=256))
            decode(llm, tokens[:100], 0, logits="all")
            first = logits_ith(llm, 10)
            decode(llm, tokens[100:], 100)
            out.append((first, logits_ith(llm)))
            if enable:
                assert cache.stats(llm.ctx).n_evictions == 0
        finally:
            llm.close()
    assert out[0][0].tobytes() == out[1][0].tobytes()
    assert out[0][1].tobytes() == out[1][1].tobytes()


def test_disable_restores_the_stock_graph(tiny_model):
    tokens = random_tokens(40)
    llm = make_llm(tiny_model, n_ctx=512, n_batch=64)
    ref = make_llm(tiny_model, n_ctx=512, n_batch=64)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=256))
        cache.disable(llm.ctx)
        assert not cache.stats(llm.ctx).enabled
        decode(llm, tokens, 0)
        decode(ref, tokens, 0)
        assert logits_ith(llm).tobytes() == logits_ith(ref).tobytes()
    finally:
        llm.close()
        ref.close()


def test_refused_configurations_return_their_status(tiny_model):
    llm = make_llm(tiny_model, n_ctx=256, n_batch=64, flash_attn=False)
    try:
        with pytest.raises(UnsupportedModelError, match="unsupported configuration"):
            cache.enable(llm.ctx, L2KVConfig(kv_budget=64))
    finally:
        llm.close()
    llm = make_llm(tiny_model, n_ctx=256, n_batch=64)
    try:
        with pytest.raises(InvalidParamsError, match="invalid argument"):  # 200 + 64 > 256 cells
            cache.enable(llm.ctx, L2KVConfig(kv_budget=200))
        with pytest.raises(InvalidParamsError, match=r"n_slack \(16\) must be 0 \(n_batch\) or >= n_batch \(64\)"):
            cache.enable(llm.ctx, L2KVConfig(kv_budget=64, n_slack=16))
        with pytest.raises(InvalidParamsError, match=r"kv_budget \(64\) \+ n_slack \(200\) exceeds .* n_ctx >= 264"):
            cache.enable(llm.ctx, L2KVConfig(kv_budget=64, n_slack=200))
        with pytest.raises(InvalidParamsError, match="invalid argument"):  # layer 9 of 4
            cache.enable(llm.ctx, L2KVConfig(kv_budget=64, skip_layers=(9,)))
        decode(llm, random_tokens(10), 0)
        with pytest.raises(InvalidParamsError, match="invalid state"):  # the cache is not empty
            cache.enable(llm.ctx, L2KVConfig(kv_budget=64))
    finally:
        llm.close()
    with pytest.raises(InvalidParamsError, match="n_sink \\+ n_recent must be < kv_budget"):
        L2KVConfig(kv_budget=8, n_sink=4, n_recent=4)
    with pytest.raises(InvalidParamsError, match="n_slack must be >= 0"):
        L2KVConfig(n_slack=-1)


def test_several_sequences_are_refused(tiny_model):
    """llama-cpp-python's Llama always asks for one sequence, so build the context by hand."""
    llama_cpp = _lib.llama_cpp()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 512, 64, 64, 2
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(tiny_model).encode(), mparams)
    ctx = llama_cpp.llama_init_from_model(model, params)
    try:
        with pytest.raises(UnsupportedModelError, match="unsupported configuration"):
            cache.enable(ctx, L2KVConfig(kv_budget=64))
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def test_cache_operations_after_an_eviction(tiny_model):
    llama_cpp = _lib.llama_cpp()
    llm = make_llm(tiny_model, n_ctx=256, n_batch=64)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=128))
        decode(llm, random_tokens(300), 0)
        st = cache.stats(llm.ctx)
        assert st.n_evictions >= 1 and st.pos_max == 299
        mem = llama_cpp.llama_get_memory(llm.ctx)
        # removing tokens newer than the last compaction works, and decoding resumes there
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 290, -1)
        assert cache.stats(llm.ctx).pos_max == 289
        decode(llm, random_tokens(5, seed=1), 290)
        # a partial removal inside the compacted region is refused and changes nothing
        before = cache.stats(llm.ctx)
        assert not llama_cpp.llama_memory_seq_rm(mem, 0, 10, 20)
        assert cache.stats(llm.ctx) == before
        # so is removing everything from a position inside it on: the kept entries before it (the sinks at
        # 0..3) must stay, although every compacted cell has a virtual position above it
        assert not llama_cpp.llama_memory_seq_rm(mem, 0, 10, -1)
        assert cache.stats(llm.ctx) == before
        # shifts are refused
        assert not llama_cpp.llama_memory_can_shift(mem)
        llama_cpp.llama_memory_seq_add(mem, 0, 0, -1, -5)
        assert cache.stats(llm.ctx).pos_max == before.pos_max
        # a per-sequence state of an evicted cache is refused (size 0, an error in the log); whole-context
        # states carry the eviction state (tests/test_state.py)
        assert llama_cpp.llama_state_seq_get_size(llm.ctx, 0) == 0
        assert llama_cpp.llama_state_get_size(llm.ctx) > 0
        # clearing the whole sequence works and the cache starts over
        assert llama_cpp.llama_memory_seq_rm(mem, 0, -1, -1)
        st = cache.stats(llm.ctx)
        assert (st.n_cells_used, st.n_cells_compacted, st.pos_max) == (0, 0, -1)
        decode(llm, random_tokens(20, seed=2), 0)
        assert cache.stats(llm.ctx).pos_max == 19
    finally:
        llm.close()


def test_set_n_sink_protects_the_first_positions_from_the_next_eviction_on(tiny_model):
    """keep-high-norm would drop low positions by score alone; after set_n_sink(20) positions 0..19 survive
    every eviction in every layer and head, and an impossible value is refused with the reason."""
    from l2kv_cpp._ffi import native

    llm = make_llm(tiny_model, n_ctx=256, n_batch=32)
    try:
        with pytest.raises(NativeCallError, match="not enabled"):
            cache.set_n_sink(llm.ctx, 8)
        cache.enable(llm.ctx, L2KVConfig(kv_budget=64, n_sink=0, n_recent=8, policy="keep-high-norm", skip_layers=()))
        with pytest.raises(InvalidParamsError):
            cache.set_n_sink(llm.ctx, 56)  # 56 + 8 is not < 64
        assert "must be < kv_budget" in native().ffi.string(native().lib.llama_l2kv_last_error()).decode()
        cache.set_n_sink(llm.ctx, 20)
        decode(llm, random_tokens(300, seed=3), 0)
        assert cache.stats(llm.ctx).n_evictions >= 3
        for il in range(cache.stats(llm.ctx).n_layers):
            _, pos = cache.read_layer(llm.ctx, il)
            for head in range(pos.shape[1]):
                assert set(range(20)) <= set(pos[:, head].tolist()), (il, head)
    finally:
        llm.close()
