"""Saving and restoring a context whose cache was evicted: the restored context continues exactly like
the original (same logits bit for bit, same kept entries at later evictions), and states that cannot
be restored correctly are refused with the cache left empty, never half restored."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conftest import make_llm, random_tokens

from l2kv_cpp import _lib, cache
from l2kv_cpp.config import L2KVConfig, Policy
from l2kv_cpp.decode import decode

CONFIG = L2KVConfig(kv_budget=96, n_sink=2, n_recent=4, policy=Policy.KEY_DIFF)


def _save(llm) -> bytes:
    lc = _lib.llama_cpp()
    size = lc.llama_state_get_size(llm.ctx)
    assert size > 0, "the state was refused"
    buf = (ctypes.c_uint8 * size)()
    assert lc.llama_state_get_data(llm.ctx, buf, size) == size
    return bytes(buf)


def _load(llm, state: bytes) -> int:
    lc = _lib.llama_cpp()
    buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    return lc.llama_state_set_data(llm.ctx, buf, len(state))


def _continue(llm, pos0: int, n: int) -> list[np.ndarray]:
    """Decode n fixed tokens one at a time (an eviction every n_batch tokens); the logits of each."""
    out = []
    for i, tok in enumerate(random_tokens(n, seed=99)):
        decode(llm, [tok], pos0 + i)
        out.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
    return out


def _layers(llm) -> list[tuple[np.ndarray, np.ndarray]]:
    n_layer = int(llm.metadata["llama.block_count"])
    return [cache.read_layer(llm.ctx, il) for il in range(n_layer)]


@pytest.mark.parametrize("n_prompt", [60, 300], ids=["before-any-eviction", "after-evictions"])
def test_a_restored_context_continues_bit_for_bit(tiny_model, n_prompt):
    original = make_llm(tiny_model, n_ctx=256, n_batch=64)
    restored = make_llm(tiny_model, n_ctx=256, n_batch=64)
    try:
        cache.enable(original.ctx, CONFIG)
        decode(original, random_tokens(n_prompt), 0)
        state = _save(original)
        saved_layers = _layers(original)
        saved_stats = cache.stats(original.ctx)

        cache.enable(restored.ctx, CONFIG)
        decode(restored, random_tokens(30, seed=5), 0)  # something to overwrite
        assert _load(restored, state) == len(state)

        st = cache.stats(restored.ctx)
        fields = ("n_cells_used", "n_cells_compacted", "pos_max")
        assert [getattr(st, f) for f in fields] == [getattr(saved_stats, f) for f in fields]
        for (norms_a, pos_a), (norms_b, pos_b) in zip(saved_layers, _layers(restored), strict=True):
            assert np.array_equal(pos_a, pos_b) and np.array_equal(norms_a, norms_b)

        # 200 more tokens: at least two more evictions in both, which must choose the same entries
        want = _continue(original, n_prompt, 200)
        got = _continue(restored, n_prompt, 200)
        assert cache.stats(restored.ctx).n_evictions >= 2
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert np.array_equal(a, b), f"logits differ at continued token {i}"
        for (_, pos_a), (_, pos_b) in zip(_layers(original), _layers(restored), strict=True):
            assert np.array_equal(pos_a, pos_b)
    finally:
        original.close()
        restored.close()


def test_a_state_without_eviction_data_is_refused_and_leaves_the_cache_empty(tiny_model):
    stock = make_llm(tiny_model, n_ctx=256, n_batch=64)
    evicting = make_llm(tiny_model, n_ctx=256, n_batch=64)
    try:
        decode(stock, random_tokens(50), 0)
        state = _save(stock)  # eviction off: no l2kv block, no key norms

        cache.enable(evicting.ctx, CONFIG)
        decode(evicting, random_tokens(30, seed=5), 0)
        assert _load(evicting, state) == 0  # refused (the reason goes to llama.cpp's log)
        st = cache.stats(evicting.ctx)
        assert (st.n_cells_used, st.n_cells_compacted, st.pos_max) == (0, 0, -1)
        decode(evicting, random_tokens(20), 0)  # and the context is usable
        assert cache.stats(evicting.ctx).pos_max == 19
    finally:
        stock.close()
        evicting.close()


def test_per_sequence_states_are_refused_where_they_would_be_wrong(tiny_model):
    lc = _lib.llama_cpp()
    llm = make_llm(tiny_model, n_ctx=256, n_batch=64)
    try:
        cache.enable(llm.ctx, CONFIG)
        decode(llm, random_tokens(60), 0)
        # before any eviction a sequence state can be saved (it holds true positions) ...
        size = lc.llama_state_seq_get_size(llm.ctx, 0)
        assert size > 0
        buf = (ctypes.c_uint8 * size)()
        assert lc.llama_state_seq_get_data(llm.ctx, buf, size, 0) == size
        # ... but not loaded while eviction is on (it carries no key norms): refused, cache untouched
        before = cache.stats(llm.ctx)
        assert lc.llama_state_seq_set_data(llm.ctx, buf, size, 0) == 0
        assert cache.stats(llm.ctx) == before
        # after an eviction its cells have virtual positions that only a whole-context state keeps
        decode(llm, random_tokens(240, seed=1), 60)
        assert cache.stats(llm.ctx).n_evictions >= 1
        assert lc.llama_state_seq_get_size(llm.ctx, 0) == 0
    finally:
        llm.close()


def test_model_save_state_and_load_state(tiny_model, tmp_path):
    from l2kv_cpp.errors import InvalidParamsError
    from l2kv_cpp.session import L2KVModel, ModelSettings

    settings = ModelSettings(n_ctx=256, n_batch=64, n_ubatch=64)
    state = tmp_path / "chat.state"
    with L2KVModel(tiny_model, settings, CONFIG) as first:
        first.feed(random_tokens(300))
        first.save_state(state)
        with L2KVModel(tiny_model, settings, CONFIG) as second:
            second.load_state(state)
            assert second.n_past == first.n_past == 300
            for tok in random_tokens(100, seed=3):  # an eviction on the way
                first.feed([tok])
                second.feed([tok])
                assert np.array_equal(first.logits(), second.logits())

        with L2KVModel(tiny_model, settings, CONFIG) as other:
            with pytest.raises(InvalidParamsError, match="does not exist"):
                other.load_state(tmp_path / "missing.state")
            stock_state = tmp_path / "stock.state"
            with L2KVModel(tiny_model, settings, None) as stock:
                stock.feed(random_tokens(40))
                stock.save_state(stock_state)
            other.feed(random_tokens(10))
            with pytest.raises(InvalidParamsError, match="no l2kv data"):
                other.load_state(stock_state)
            assert other.n_past == 0 and other.stats().n_cells_used == 0


def test_a_damaged_state_file_is_refused_before_anything_is_loaded(tiny_model, tmp_path):
    """save_state's file carries a SHA-256 of the state: a truncated or changed copy is refused with one line
    naming the file, and the context keeps what it held; a failed save keeps the previous file."""
    from l2kv_cpp.errors import InvalidParamsError
    from l2kv_cpp.session import L2KVModel, ModelSettings

    settings = ModelSettings(n_ctx=256, n_batch=64, n_ubatch=64)
    state = tmp_path / "chat.state"
    with L2KVModel(tiny_model, settings, CONFIG) as m:
        m.feed(random_tokens(300))
        m.save_state(state)
        good = state.read_bytes()
        m.reset()
        m.feed(random_tokens(20, seed=5))
        logits = m.logits().copy()
        n = len(good)
        damaged = {
            "truncated": good[: n - 100],
            "bit flip in the K/V": good[: n // 2] + bytes([good[n // 2] ^ 1]) + good[n // 2 + 1 :],
            "zeros in the K/V": good[: n // 3] + bytes(64) + good[n // 3 + 64 :],
            "checksum changed": good[:12] + bytes(32) + good[44:],
            "header only": good[:12],
        }
        for what, data in damaged.items():
            state.write_bytes(data)
            with pytest.raises(InvalidParamsError, match=f"the state file {state} is damaged") as err:
                m.load_state(state)
            assert "\n" not in str(err.value), what
            assert m.n_past == 20 and np.array_equal(m.logits(), logits), what  # nothing was loaded

        state.write_bytes(good)
        (tmp_path / "chat.state.part").mkdir()  # the temporary file cannot be created
        with pytest.raises(InvalidParamsError, match="cannot write .* the previous file is unchanged"):
            m.save_state(state)
        assert state.read_bytes() == good
        m.load_state(state)
        assert m.n_past == 300


def test_gemma3_iswa_state_after_evictions_restores_both_caches(gemma_path):
    """Gemma 3: the budgeted full-attention cache and the sliding-window cache are saved one after the
    other; the l2kv block sits between them and a restored context continues bit for bit."""
    original = make_llm(gemma_path, n_ctx=1024, n_batch=256)
    restored = make_llm(gemma_path, n_ctx=1024, n_batch=256)
    try:
        config = L2KVConfig(kv_budget=512)
        cache.enable(original.ctx, config)
        decode(original, random_tokens(1300, high=5000), 0)
        assert cache.stats(original.ctx).n_evictions >= 2
        state = _save(original)
        cache.enable(restored.ctx, config)
        assert _load(restored, state) == len(state)
        want = _continue(original, 1300, 40)
        got = _continue(restored, 1300, 40)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert np.array_equal(a, b), f"logits differ at continued token {i}"
    finally:
        original.close()
        restored.close()
