"""RoPE positions inside the cache (LLAMA_L2KV_POSITIONS_CACHE): re-rotated keys against a numpy RoPE of the
keys a run without eviction stored, positions that stay bounded at any length, and the state that keeps them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_llm, random_tokens
from test_eviction import _stock_rows
from test_state import _load, _save

from l2kv_cpp import cache, reference
from l2kv_cpp.archive import dequantize_rows
from l2kv_cpp.config import L2KVConfig, Positions
from l2kv_cpp.decode import decode, logits_ith
from l2kv_cpp.session import ggml_type_id

HEAD_DIM = 64  # tiny_model_hd64
FREQ_BASE = 10000.0  # TinyModelConfig.rope_freq_base
# largest error of a re-rotated key element, relative to its row's largest magnitude: f16 rounds once per
# re-rotation, the quantized types requantize (llama.cpp's K-shift does the same)
TOLERANCE = {"f16": 4e-3, "bf16": 0.03, "q8_0": 0.06, "q4_0": 0.45}


def _hadamard(n: int) -> np.ndarray:
    """llama.cpp's orthonormal Walsh-Hadamard matrix (ggml_gen_hadamard: Sylvester's construction, H @ H == I)."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def _keys(raw: np.ndarray, cache_type: str) -> np.ndarray:
    """The keys [cell, head, HEAD_DIM] of raw K rows; a quantized K cache of head size 64 stores them rotated
    by a Hadamard matrix (llama.cpp's attn_rot_k), undone here so that RoPE applies."""
    if cache_type == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(len(raw), -1, HEAD_DIM)
    if cache_type == "bf16":
        bits = raw.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(len(raw), -1, HEAD_DIM)
    return dequantize_rows(raw, cache_type, HEAD_DIM) @ _hadamard(HEAD_DIM)


@pytest.mark.parametrize(
    ("cache_type", "per_head", "graphs"),
    [
        ("f16", True, False),
        ("f16", False, False),
        ("bf16", True, False),
        ("q8_0", True, False),
        ("q4_0", True, False),
        ("f16", True, True),
        ("q8_0", False, True),
    ],
    ids=["f16-head", "f16-layer", "bf16-head", "q8_0-head", "q4_0-head", "f16-head-graphs", "q8_0-layer-graphs"],
)
def test_rerotated_keys_equal_numpy_rope_of_the_stock_keys(tiny_model_hd64, monkeypatch, cache_type, per_head, graphs):
    """Layer 0's keys depend only on token and position: after many evictions each kept key must equal the
    stock key of its true position rotated to its RoPE position (the ranks of the kept true positions), and
    its V row must still be the stock bytes (V is never rotated)."""
    if graphs:
        monkeypatch.setenv("LLAMA_L2KV_FORCE_GRAPHS", "1")
    # a quantized K cache renumbers at every eviction only when asked (it defaults to fewer, see below)
    monkeypatch.setenv("LLAMA_L2KV_ROPE_STRICT", "1")
    n_batch, budget = 64, 128
    types = {"type_k": ggml_type_id(cache_type), "type_v": ggml_type_id(cache_type)}
    tokens = random_tokens(4 * 256, seed=3)
    stock = _stock_rows(tiny_model_hd64, tokens, n_batch, **types)
    config = L2KVConfig(kv_budget=budget, n_sink=2, n_recent=4, per_head=per_head, positions=Positions.CACHE)
    llm = make_llm(tiny_model_hd64, n_ctx=256, n_batch=n_batch, **types)
    try:
        cache.enable(llm.ctx, config)
        decode(llm, tokens, 0)
        st = cache.stats(llm.ctx)
        assert st.positions == Positions.CACHE and st.n_evictions >= 5 and st.n_rotated_rows > 0
        _, tpos = cache.read_layer(llm.ctx, 0)
        rpos = cache.read_rope_positions(llm.ctx, 0)
        nc = st.n_cells_compacted
        # the kept entries got the ranks of their true positions, per head; later tokens continue from there
        p_comp = tpos[:nc].max()
        for h in range(tpos.shape[1]):
            np.testing.assert_array_equal(rpos[:nc, h], reference.cache_positions(tpos[:nc, h]))
        np.testing.assert_array_equal(rpos[nc:], tpos[nc:] - (p_comp + 1 - nc))
        assert st.rope_pos_max == rpos.max() < budget + n_batch

        n = len(tpos)
        k = _keys(cache.read_kv(llm.ctx, 0, "k", 0, n), cache_type)
        v = cache.read_kv(llm.ctx, 0, "v", 0, n)
        k_stock = _keys(stock[(0, "k")], cache_type)
        per = v.shape[1] // tpos.shape[1]
        moved = 0
        for h in range(tpos.shape[1]):
            p, r = tpos[:, h], rpos[:, h]
            want = reference.rope(k_stock[p, h], r - p, FREQ_BASE)
            scale = np.abs(want).max(axis=1, keepdims=True)
            err = np.abs(k[:, h] - want) / scale
            assert err.max() <= TOLERANCE[cache_type], (h, float(err.max()))
            moved += int(((r != p) & (np.abs(k_stock[p, h] - want).max(axis=1) > 0.5 * scale[:, 0])).sum())
            for c in range(n):
                assert (
                    v[c, h * per : (h + 1) * per].tobytes() == stock[(0, "v")][p[c], h * per : (h + 1) * per].tobytes()
                )
        assert moved > n // 2  # most keys moved far from their original rotation: the check above can fail
        assert np.isfinite(logits_ith(llm)).all()
    finally:
        llm.close()


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_positions_stay_bounded_and_memory_constant_over_a_100k_token_stream(tiny_model, monkeypatch, strict):
    """The RoPE position of the next token stays below the renumbering limit whatever the text's length (budget
    + slack when renumbering at every eviction), with the memory of the cache fixed."""
    n_batch, budget, n = 256, 256, 100_000
    if strict:
        monkeypatch.setenv("LLAMA_L2KV_ROPE_STRICT", "1")
    limit = budget + n_batch if strict else min(4 * (budget + n_batch), 4096 * 3 // 4)  # tiny models: 4096 trained
    tokens = random_tokens(n, seed=4)
    llm = make_llm(tiny_model, n_ctx=budget + n_batch, n_batch=n_batch)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=budget, n_sink=4, n_recent=16))
        kv_bytes = cache.stats(llm.ctx).kv_bytes
        worst = 0
        for start in range(0, n, 4096):
            decode(llm, tokens[start : start + 4096], start)
            st = cache.stats(llm.ctx)
            assert st.kv_bytes == kv_bytes and st.n_cells_used <= budget + n_batch
            assert st.pos_max == min(start + 4096, n) - 1
            worst = max(worst, st.rope_pos_max + 1)  # the position the next token gets
        assert limit // 2 < worst <= limit
        assert st.n_evictions > n // n_batch // 2 and np.isfinite(logits_ith(llm)).all()
    finally:
        llm.close()


@pytest.mark.parametrize("cache_type", ["f16", "q8_0", "q4_0"])
def test_the_cache_renumbers_less_often_and_stays_below_its_limit(tiny_model_hd64, monkeypatch, cache_type):
    """Positions grow to 4x the cache (at most 3/4 of the training context) before the cache renumbers (measured
    closer to a full cache; a quantized key is also requantized at each re-rotation): far fewer rows re-rotated
    than renumbering at every eviction (LLAMA_L2KV_ROPE_STRICT), positions still bounded."""
    n_batch, budget, n = 64, 128, 6000
    types = {"type_k": ggml_type_id(cache_type), "type_v": ggml_type_id(cache_type)}
    tokens = random_tokens(n, seed=9)
    limit = min(4 * (budget + n_batch), 4096 * 3 // 4)  # tiny models are trained for 4096 tokens

    def run(strict: bool):
        if strict:
            monkeypatch.setenv("LLAMA_L2KV_ROPE_STRICT", "1")
        else:
            monkeypatch.delenv("LLAMA_L2KV_ROPE_STRICT", raising=False)
        llm = make_llm(tiny_model_hd64, n_ctx=budget + n_batch, n_batch=n_batch, **types)
        try:
            cache.enable(llm.ctx, L2KVConfig(kv_budget=budget, n_sink=2, n_recent=4))
            worst = 0
            for s in range(0, n, n_batch):
                decode(llm, tokens[s : s + n_batch], s)
                worst = max(worst, cache.stats(llm.ctx).rope_pos_max + 1)
            return cache.stats(llm.ctx), worst
        finally:
            llm.close()

    lazy, lazy_worst = run(False)
    strict, strict_worst = run(True)
    assert strict_worst <= budget + n_batch < lazy_worst <= limit
    assert lazy.n_evictions == strict.n_evictions > 50
    assert 0 < lazy.n_rotated_rows < strict.n_rotated_rows / 3


def test_original_positions_grow_with_the_text(tiny_model):
    llm = make_llm(tiny_model, n_ctx=192, n_batch=64)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=128, n_sink=4, n_recent=8, positions=Positions.ORIGINAL))
        decode(llm, random_tokens(1000), 0)
        st = cache.stats(llm.ctx)
        assert st.positions == Positions.ORIGINAL and st.rope_pos_max == st.pos_max == 999
        assert st.n_rotated_rows == 0
    finally:
        llm.close()


@pytest.mark.parametrize("saved", ["cache", "original"])
@pytest.mark.parametrize("loaded", ["cache", "original"])
def test_a_state_keeps_the_rotation_of_its_keys_in_either_mode(tiny_model, monkeypatch, saved, loaded):
    """A whole-context state carries the RoPE positions: restored into a context of the same mode the next
    logits are bit-identical, and into the other mode the keys stay consistent (the next eviction moves them
    to that mode's positions, renumbering at every eviction here so that it does)."""
    monkeypatch.setenv("LLAMA_L2KV_ROPE_STRICT", "1")
    tokens = random_tokens(700, seed=6)

    def run(mode: str):
        llm = make_llm(tiny_model, n_ctx=192, n_batch=64)
        cache.enable(llm.ctx, L2KVConfig(kv_budget=128, n_sink=4, n_recent=8, positions=mode))
        return llm

    a = run(saved)
    b = run(loaded)
    try:
        decode(a, tokens[:600], 0)
        assert _load(b, _save(a)) > 0
        for il in range(2):
            np.testing.assert_array_equal(cache.read_rope_positions(b.ctx, il), cache.read_rope_positions(a.ctx, il))
        decode(a, tokens[600:610], 600)
        decode(b, tokens[600:610], 600)
        np.testing.assert_array_equal(logits_ith(a), logits_ith(b))  # same keys, same positions
        decode(b, tokens[610:], 610)  # evicts: now every key follows b's mode
        st = cache.stats(b.ctx)
        assert st.n_evictions >= 1
        _, tpos = cache.read_layer(b.ctx, 0)
        rpos = cache.read_rope_positions(b.ctx, 0)
        nc = st.n_cells_compacted
        if loaded == "cache":
            for h in range(tpos.shape[1]):
                np.testing.assert_array_equal(rpos[:nc, h], reference.cache_positions(tpos[:nc, h]))
        else:
            np.testing.assert_array_equal(rpos, tpos)
            assert st.rope_pos_max == st.pos_max
    finally:
        a.close()
        b.close()


def test_recalled_keys_come_back_rotated_to_their_rank(tiny_model_hd64):
    """A recall in cache positions: the archived rows (kept with the rotation they had when dropped) come back
    and the recall's eviction re-rotates them, so every layer-0 key again equals the stock key of its true
    position rotated to its rank."""
    from l2kv_cpp import archive

    n_batch, budget = 64, 128
    tokens = random_tokens(5 * 64, seed=8)
    stock = _stock_rows(tiny_model_hd64, tokens, n_batch)
    llm = make_llm(tiny_model_hd64, n_ctx=256, n_batch=n_batch)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=budget, n_sink=2, n_recent=4, n_slack=n_batch))
        archive.enable(llm.ctx)
        decode(llm, tokens, 0)
        cache.evict_now(llm.ctx)
        assert archive.recall(llm.ctx, [(40, 60)]) > 0
        _, tpos = cache.read_layer(llm.ctx, 0)
        rpos = cache.read_rope_positions(llm.ctx, 0)
        assert set(range(40, 60)) <= set(tpos[:, 0].tolist())  # the span is back
        k = _keys(cache.read_kv(llm.ctx, 0, "k", 0, len(tpos)), "f16")
        k_stock = _keys(stock[(0, "k")], "f16")
        for h in range(tpos.shape[1]):
            np.testing.assert_array_equal(rpos[:, h], reference.cache_positions(tpos[:, h]))
            want = reference.rope(k_stock[tpos[:, h], h], rpos[:, h] - tpos[:, h], FREQ_BASE)
            err = np.abs(k[:, h] - want) / np.abs(want).max(axis=1, keepdims=True)
            assert err.max() <= TOLERANCE["f16"], (h, float(err.max()))
    finally:
        llm.close()
