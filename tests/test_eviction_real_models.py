"""Eviction on the two real models: SmolLM2 (llama, the default) and Gemma 3 270M (iSWA: only its
full-attention layers are budgeted, the sliding-window cache keeps its own window)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_llm

from l2kv_cpp import cache
from l2kv_cpp.config import L2KVConfig
from l2kv_cpp.decode import decode, logits_ith
from l2kv_cpp.errors import InvalidParamsError

pytestmark = pytest.mark.slow


def _text_tokens(llm, n: int) -> list[int]:
    text = " ".join(f"Item {i} of the list is the number {i * 7 % 1000}." for i in range(n // 8))
    return llm.tokenize(text.encode())[:n]


def test_smollm2_decodes_far_past_its_buffer_within_budget(smollm2_path):
    budget, n_batch = 256, 128
    llm = make_llm(smollm2_path, n_ctx=budget + n_batch, n_batch=n_batch)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=budget))
        tokens = _text_tokens(llm, 1500)
        for start in range(0, len(tokens), n_batch):
            decode(llm, tokens[start : start + n_batch], start)
            assert cache.stats(llm.ctx).n_cells_used <= budget + n_batch
        st = cache.stats(llm.ctx)
        assert st.pos_max == len(tokens) - 1 and st.n_evictions >= 8
        assert st.n_layers == 30
        assert np.all(np.isfinite(logits_ith(llm)))
    finally:
        llm.close()


def test_gemma3_budgets_only_full_attention_layers(gemma_path):
    llm = make_llm(gemma_path, n_ctx=1024, n_batch=256)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=512, skip_layers=()))
        tokens = _text_tokens(llm, 2000)
        decode(llm, tokens, 0)
        st = cache.stats(llm.ctx)
        assert st.n_layers == 3  # Gemma 3 270M: 3 global layers of 18
        assert st.n_evictions >= 4 and st.n_cells_used <= 512 + 256
        assert np.all(np.isfinite(logits_ith(llm)))
        with pytest.raises(InvalidParamsError, match="not in the budgeted cache"):
            cache.read_layer(llm.ctx, 0)  # a sliding-window layer
    finally:
        llm.close()


def test_gemma3_small_context_is_refused_with_the_size_it_needs(gemma_path):
    llm = make_llm(gemma_path, n_ctx=512, n_batch=256)
    try:
        with pytest.raises(InvalidParamsError, match=r"needs n_swa \(512\) \+ n_ubatch \(256\) = 768"):
            cache.enable(llm.ctx, L2KVConfig(kv_budget=256))
    finally:
        llm.close()
