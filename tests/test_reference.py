"""The native selection agrees with the numpy reference (l2kv_cpp.reference), synthetic and end to end."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_llm, random_tokens
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from l2kv_cpp import cache, reference
from l2kv_cpp._ffi import native
from l2kv_cpp.config import L2KVConfig, Policy
from l2kv_cpp.decode import decode
from l2kv_cpp.errors import NativeCallError
from l2kv_cpp.session import ggml_type_id


@pytest.mark.parametrize("seed", range(5))
def test_select_matches_reference_with_ties_nans_and_protection(seed):
    rng = np.random.default_rng(seed)
    for trial in range(100):
        # every 4th trial is large enough for the radix-sorted whole ranking (>= 256 entries)
        n = int(rng.integers(256, 1200)) if trial % 4 == 0 else int(rng.integers(0, 80))
        pos = rng.permutation(2000)[:n].astype(np.int32)
        score = rng.integers(0, 4, size=n).astype(np.float32)  # many ties
        score[rng.random(n) < 0.1] = np.nan
        n_keep = int(rng.integers(0, n + 20))  # also >= n: everything is kept
        n_sink, n_recent = int(rng.integers(0, 6)), int(rng.integers(0, 6))
        pos_last = int(pos.max()) if n else 0
        got = cache.native_select(pos, score, n_keep, n_sink, n_recent, pos_last)
        want = reference.select(pos, score, n_keep, n_sink, n_recent, pos_last)
        assert np.array_equal(got, want), f"n={n} keep={n_keep}: native {got[:8]} reference {want[:8]}"


def test_select_matches_reference_on_extreme_scores_and_positions():
    # the native rule packs (protected, score, position) into one integer: every float class and the
    # largest positions must keep the reference order (-0 == +0, NaN last, ties to the newer position)
    rng = np.random.default_rng(0)
    values = np.array(
        [-np.inf, -3.4e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, 3.4e38, np.inf, np.nan], dtype=np.float32
    )
    for trial in range(200):
        n = int(rng.integers(256, 900)) if trial % 4 == 0 else int(rng.integers(1, 60))
        pos = (np.iinfo(np.int32).max - rng.permutation(1000)[:n]).astype(np.int32)
        score = rng.choice(values, size=n)
        n_keep = int(rng.integers(0, n + 2))
        pos_last = int(pos.max())
        got = cache.native_select(pos, score, n_keep, 3, 3, pos_last)
        want = reference.select(pos, score, n_keep, 3, 3, pos_last)
        assert np.array_equal(got, want), f"native {got[:8]} reference {want[:8]}"


def test_select_keeps_protected_first_then_ties_to_newer():
    pos = np.array([0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int32)
    score = np.array([9, 9, 1, 1, 1, 5, 9, 9], dtype=np.float32)
    kept = cache.native_select(pos, score, 5, 1, 1, 7)
    assert list(pos[kept]) == [7, 0, 4, 3, 2]  # sink 0 and newest 7 (newer first), then the ties, newest first


def test_random_score_matches_reference():
    nat = native()
    for args in [(0, 0, 0, 0), (123, 5, 2, 77), (2**64 - 1, 29, 8, 100_000)]:
        assert nat.lib.llama_l2kv_random_score(*args) == reference.random_score(*args)


CONFIGS = [
    L2KVConfig(kv_budget=96, n_sink=2, n_recent=8, policy=Policy.KEEP_LOW_NORM, skip_layers=()),
    L2KVConfig(kv_budget=96, n_sink=0, n_recent=0, policy=Policy.KEEP_LOW_NORM, per_head=False),
    L2KVConfig(kv_budget=96, n_sink=4, n_recent=4, policy=Policy.KEEP_HIGH_NORM),
    L2KVConfig(kv_budget=96, n_sink=4, n_recent=4, policy=Policy.RANDOM, seed=7, skip_layers=(1,)),
    L2KVConfig(kv_budget=96, n_sink=4, n_recent=4, policy=Policy.WINDOW),
    L2KVConfig(kv_budget=96, n_sink=2, n_recent=8, policy=Policy.KEY_DIFF, skip_layers=()),
    L2KVConfig(kv_budget=96, n_sink=0, n_recent=0, policy=Policy.KEY_DIFF, per_head=False),
    L2KVConfig(kv_budget=96, n_sink=2, n_recent=8, policy=Policy.HYBRID, skip_layers=()),
    L2KVConfig(kv_budget=96, n_sink=4, n_recent=4, policy=Policy.HYBRID, per_head=False, skip_layers=(1,)),
    # a slack of two batches: the 200 tokens fit before the first eviction, so it ranks 200 fresh entries
    L2KVConfig(kv_budget=96, n_slack=128, n_sink=2, n_recent=8, policy=Policy.KEY_DIFF, skip_layers=()),
]

NEEDS_COSINES = (Policy.KEY_DIFF, Policy.HYBRID)


THREADINGS = {
    "default": {},  # the context's defaults (OpenMP workers when ggml uses OpenMP)
    "serial": {"n_threads": 1, "n_threads_batch": 1},
    "std-threads": {"n_threads": 4, "n_threads_batch": 4, "env": "LLAMA_L2KV_STD_THREADS"},  # builds without OpenMP
}


@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=lambda c: f"{c.policy.name}-{'head' if c.per_head else 'layer'}" + (f"-slack{c.n_slack}" if c.n_slack else ""),
)
def test_native_eviction_keeps_what_the_reference_keeps(tiny_model, config, monkeypatch, threading="default"):
    """Twice: once on fresh cells (true positions), once after a compaction (positions from the host table)."""
    settings = dict(THREADINGS[threading])
    if "env" in settings:
        monkeypatch.setenv(settings.pop("env"), "1")
    llm = make_llm(tiny_model, n_ctx=256, n_batch=64, **settings)
    try:
        cache.enable(llm.ctx, config)
        n_layer = int(llm.metadata["llama.block_count"])
        pos0 = 0
        for n_new in (200, 64):
            decode(llm, random_tokens(n_new, seed=pos0), pos0)
            pos0 += n_new
            if config.n_slack and n_new == 200:
                assert cache.stats(llm.ctx).n_evictions == 0  # 200 <= 96 + 128: no eviction yet
            before = {il: cache.read_layer(llm.ctx, il) for il in range(n_layer)}
            cosines = {il: cache.read_key_cosines(llm.ctx, il) for il in range(n_layer)}
            cache.evict_now(llm.ctx)
            for il, (norms, pos) in before.items():
                kcos = cosines[il] if config.policy in NEEDS_COSINES else None
                want = reference.kept_positions(config, il, norms, pos, pos_last=pos0 - 1, kcos=kcos)
                _, pos_after = cache.read_layer(llm.ctx, il)
                assert pos_after.shape[0] == config.kv_budget
                for h, kept in enumerate(want):
                    got = set(pos_after[:, h].tolist())
                    assert got == kept, f"layer {il} head {h}: {len(got ^ kept)} positions differ"
            st = cache.stats(llm.ctx)
            assert st.n_cells_used == config.kv_budget and st.n_cells_compacted == config.kv_budget
    finally:
        llm.close()


@pytest.mark.parametrize("threading", ["serial", "std-threads"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[5]], ids=["KEEP_LOW_NORM-head", "KEY_DIFF-head"])
def test_every_threading_path_keeps_what_the_reference_keeps(tiny_model, config, threading, monkeypatch):
    """The host work of an eviction runs per layer on the context's threads: one thread, and the
    std::thread path of builds without OpenMP, keep exactly what the reference keeps too."""
    test_native_eviction_keeps_what_the_reference_keeps(tiny_model, config, monkeypatch, threading)


def test_heads_keep_different_tokens_and_norms_move_with_rows(tiny_model):
    config = L2KVConfig(kv_budget=96, n_sink=0, n_recent=0, skip_layers=(), policy=Policy.KEEP_LOW_NORM)
    llm = make_llm(tiny_model)
    try:
        cache.enable(llm.ctx, config)
        decode(llm, random_tokens(200), 0)
        norms_before, pos_before = cache.read_layer(llm.ctx, 2)
        cache.evict_now(llm.ctx)
        norms_after, pos_after = cache.read_layer(llm.ctx, 2)
        assert set(pos_after[:, 0].tolist()) != set(pos_after[:, 1].tolist())
        for h in range(pos_after.shape[1]):
            by_pos = dict(zip(pos_before[:, h].tolist(), norms_before[:, h].tolist(), strict=True))
            assert all(
                by_pos[p] == n for p, n in zip(pos_after[:, h].tolist(), norms_after[:, h].tolist(), strict=True)
            )
            # keep-low-norm: every kept norm is <= every dropped norm
            dropped = [n for p, n in by_pos.items() if p not in set(pos_after[:, h].tolist())]
            assert norms_after[:, h].max() <= min(dropped)
    finally:
        llm.close()


@pytest.mark.parametrize("cache_type", ["f32", "f16"])
def test_stored_norms_are_the_norms_of_the_cached_keys(tiny_model, monkeypatch, cache_type):
    """The norm stored beside each K row is the L2 norm of that key per KV head. It is read before RoPE by
    default (a rotation; keeps the rotated K's single consumer for the CUDA ROPE->SET_ROWS fusion) and
    after it with LLAMA_L2KV_NORM_AFTER_ROPE: both agree with numpy on the cached rows."""
    dtype = {"f32": np.float32, "f16": np.float16}[cache_type]
    rtol = {"f32": 1e-5, "f16": 2e-3}[cache_type]  # f16: the cached key is rounded, the stored norm is not
    stored = {}
    for after_rope in (False, True):
        if after_rope:
            monkeypatch.setenv("LLAMA_L2KV_NORM_AFTER_ROPE", "1")
        else:
            monkeypatch.delenv("LLAMA_L2KV_NORM_AFTER_ROPE", raising=False)
        types = {"type_k": ggml_type_id(cache_type), "type_v": ggml_type_id(cache_type)}
        llm = make_llm(tiny_model, **types)
        try:
            cache.enable(llm.ctx, L2KVConfig(kv_budget=180))  # never reached: no eviction
            decode(llm, random_tokens(120), 0)
            n_layer = int(llm.metadata["llama.block_count"])
            per_layer = []
            for il in range(n_layer):
                norms, pos = cache.read_layer(llm.ctx, il)
                assert (pos[:, 0] == np.arange(120)).all()
                keys = np.frombuffer(cache.read_kv(llm.ctx, il, "k", 0, 120), dtype=dtype).astype(np.float64)
                want = np.linalg.norm(keys.reshape(120, norms.shape[1], -1), axis=-1)
                np.testing.assert_allclose(norms, want, rtol=rtol, err_msg=f"layer {il}, after RoPE: {after_rope}")
                per_layer.append(norms)
            stored[after_rope] = np.stack(per_layer)
        finally:
            llm.close()
    # the two sources differ by rounding only, and the switch does change the graph
    np.testing.assert_allclose(stored[False], stored[True], rtol=1e-5)
    assert not np.array_equal(stored[False], stored[True])


def _dequantized_keys(llm, il: int, n: int, cache_type: str) -> np.ndarray:
    raw = cache.read_kv(llm.ctx, il, "k", 0, n)
    return dequantize(raw, GGMLQuantizationType[cache_type.upper()]).reshape(n, -1)


@pytest.mark.parametrize("cache_type", ["f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("path", ["host", "host-baseline-isa", "graph"])
def test_key_cosines_match_numpy_on_the_cached_keys(tiny_model_hd64, monkeypatch, cache_type, path):
    """KeyDiff's feature, from the bytes in the cache: in place on the host (CPU; AVX2 loops where the CPU
    has them, and the baseline loops) and as a ggml graph (what GPU backends run; forced here by
    LLAMA_L2KV_FORCE_GRAPHS), before and after evictions."""
    if path == "graph":
        monkeypatch.setenv("LLAMA_L2KV_FORCE_GRAPHS", "1")
    if path == "host-baseline-isa":
        monkeypatch.setenv("LLAMA_L2KV_BASELINE_ISA", "1")
    types = {"type_k": ggml_type_id(cache_type), "type_v": ggml_type_id(cache_type)}
    llm = make_llm(tiny_model_hd64, n_ctx=256, n_batch=64, **types)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=128, policy=Policy.KEY_DIFF))
        n_layer = int(llm.metadata["llama.block_count"])
        pos0 = 0
        for n_new in (150, 64, 64):  # the later batches attend (and key-diff reads) a compacted cache
            decode(llm, random_tokens(n_new, seed=pos0), pos0)
            pos0 += n_new
            for il in range(n_layer):
                got = cache.read_key_cosines(llm.ctx, il)
                n_head = got.shape[1]
                want = reference.key_cosines(_dequantized_keys(llm, il, got.shape[0], cache_type), n_head)
                np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"layer {il}")
                assert np.ptp(want) > 0.1  # the feature is not constant
        assert cache.stats(llm.ctx).n_evictions >= 1
    finally:
        llm.close()


def test_key_cosines_are_refused_while_disabled(tiny_model):
    llm = make_llm(tiny_model)
    try:
        with pytest.raises(NativeCallError, match="not enabled"):
            cache.read_key_cosines(llm.ctx, 0)
    finally:
        llm.close()
