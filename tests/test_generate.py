"""Generation layers and conversations over L2KVModel, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_llm, random_tokens

from l2kv_cpp import _lib, cache
from l2kv_cpp.chat import Conversation
from l2kv_cpp.config import L2KVConfig
from l2kv_cpp.decode import decode, logits_ith
from l2kv_cpp.generate import generate, generate_step, stream_generate
from l2kv_cpp.sampling import SamplingSettings
from l2kv_cpp.session import L2KVModel, ModelSettings

GREEDY = SamplingSettings(temperature=0)
SMALL = ModelSettings(n_batch=32, n_ubatch=32)
BUDGET = L2KVConfig(kv_budget=64, n_sink=2, n_recent=4)


def test_steps_are_greedy_argmax_with_their_logprob(tiny_model):
    with L2KVModel(tiny_model, SMALL, BUDGET) as m:
        prompt = m.tokenize("hello", add_bos=True, special=False)
        steps = list(generate_step(m, prompt, GREEDY, max_tokens=5))
        assert len(steps) == 5
    # reference: the same model without eviction, argmax by hand
    with L2KVModel(tiny_model, SMALL, l2kv=None) as ref:
        ref.feed(ref.tokenize("hello", add_bos=True, special=False))
        for step in steps:
            logits = ref.logits().astype(np.float64)
            assert step.token == int(logits.argmax())
            want = logits[step.token] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            assert step.logprob == pytest.approx(want, abs=1e-4)
            ref.feed([step.token])


def test_generation_far_past_the_buffer_is_bounded_and_matches_windowed_reference(tiny_model):
    """8x past budget + batch: cells stay bounded, positions grow, and every token is the stream's."""
    with L2KVModel(tiny_model, SMALL, BUDGET) as m:
        prompt = m.tokenize("abc", add_bos=True, special=False)
        n = 8 * (64 + 32)
        used = []
        pieces = []
        for resp in stream_generate(m, prompt, GREEDY, max_tokens=n):
            used.append(resp.stats.n_cells_used)
            pieces.append(resp.text)
        st = m.stats()
        assert max(used) <= 64 + 32
        assert st.pos_max == len(prompt) + n - 1 and m.n_past == len(prompt) + n
        assert st.n_evictions >= n // 32 - 3
        assert resp.finish_reason == "length" and resp.n_generated_tokens == n
        assert st.kv_size == m.stats().kv_size


@pytest.mark.parametrize("positions", ["original", "cache"])
def test_window_eviction_equals_dropping_the_same_tokens_in_a_stock_cache(tmp_path, monkeypatch, positions):
    """The whole machinery (moves, virtual positions, mask, re-rotation) against stock llama.cpp: with the
    window policy, eviction keeps the sinks and the newest tokens in every layer; removing exactly those
    positions with seq_rm from a stock cache at the same moments must give the same logits, up to the
    summation-order noise of the model, which the test measures itself: the same stock run with a
    different batch size (f32 weights and cache, so nothing else differs). With the positions in the cache
    the stock run does llama.cpp's own context shift (seq_rm, then seq_add, whose K-shift graph re-rotates
    the kept keys): StreamingLLM's rule computed by someone else's code path, renumbering at every eviction as
    the context shift does (LLAMA_L2KV_ROPE_STRICT)."""
    monkeypatch.setenv("LLAMA_L2KV_ROPE_STRICT", "1")
    from l2kv_cpp.tiny_model import TinyModelConfig, write_tiny_model

    model = write_tiny_model(tmp_path / "f32.gguf", TinyModelConfig(weight_type="f32", seed=3))
    budget, n_batch, n_sink, f32 = 128, 64, 4, 0
    lc = _lib.llama_cpp()
    tokens = random_tokens(600)

    def stock(batch: int) -> list[np.ndarray]:
        llm = make_llm(model, n_ctx=1024, n_batch=batch, type_k=f32, type_v=f32)
        mem, used, out = lc.llama_get_memory(llm.ctx), 0, []
        shift = 0  # cache positions: how far the stock cache's positions are behind the text's
        try:
            for s in range(0, len(tokens), n_batch):
                chunk = tokens[s : s + n_batch]
                if used + len(chunk) > budget + n_batch:
                    if positions == "original":
                        assert lc.llama_memory_seq_rm(mem, 0, n_sink, s - (budget - n_sink))
                    else:  # llama.cpp's context shift: drop the oldest non-sinks, move the rest down
                        n_discard = used - budget
                        assert lc.llama_memory_seq_rm(mem, 0, n_sink, n_sink + n_discard)
                        lc.llama_memory_seq_add(mem, 0, n_sink + n_discard, -1, -n_discard)
                        shift += n_discard
                    used = budget
                decode(llm, chunk, s - shift)
                used += len(chunk)
                out.append(logits_ith(llm))
        finally:
            llm.close()
        return out

    a = make_llm(model, n_ctx=budget + n_batch, n_batch=n_batch, type_k=f32, type_v=f32)
    try:
        config = L2KVConfig(
            kv_budget=budget, n_sink=n_sink, n_recent=0, policy="window", skip_layers=(), positions=positions
        )
        cache.enable(a.ctx, config)
        evicted = []
        for s in range(0, len(tokens), n_batch):
            decode(a, tokens[s : s + n_batch], s)
            evicted.append(logits_ith(a))
        assert cache.stats(a.ctx).n_evictions >= 6
    finally:
        a.close()
    ref, ref_small_batches = stock(n_batch), stock(n_batch // 2)
    noise = max(float(np.abs(x - y).max()) for x, y in zip(ref, ref_small_batches, strict=True))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(evicted, ref, strict=True))
    assert 0 < noise < 0.1  # the noise floor exists and is small
    assert diff <= 4 * noise, f"eviction differs by {diff:.4g}, reordering noise is {noise:.4g}"
    assert all(int(x.argmax()) == int(y.argmax()) for x, y in zip(evicted, ref, strict=True))


def test_conversation_only_appends_to_the_cache(tiny_model):
    """Plain (no template) multi-turn: the cache holds exactly the tokens of the text fed so far."""
    with L2KVModel(tiny_model, SMALL, BUDGET) as m:
        conv = Conversation(m)
        assert not conv.chat
        for turn in ("first question", " and a second one"):
            before = m.n_past
            out = list(conv.ask(turn, GREEDY, 6))
            assert m.n_past > before
            assert out[-1].finish_reason in ("length", "stop")
        assert len(conv.messages) == 4 and len(conv.tokens) == m.n_past
        first = m.tokenize("first question", add_bos=m.add_bos, special=False)
        assert conv.tokens[: len(first)] == first
        conv.reset()
        assert m.n_past == 0 and conv.tokens == [] and m.stats().n_cells_used == 0


def test_document_then_question_far_longer_than_the_budget(tiny_model):
    with L2KVModel(tiny_model, SMALL, BUDGET) as m:
        conv = Conversation(m)
        n = conv.load_document("word " * 300)
        assert n > 4 * 64 and m.stats().n_evictions > 0
        result_text = "".join(r.text for r in conv.ask(" question", GREEDY, 4))
        assert result_text is not None and m.stats().n_cells_used <= 64 + 32


def test_generate_returns_the_streamed_text(tiny_model):
    texts = []
    for use_stream in (True, False):
        with L2KVModel(tiny_model, SMALL, BUDGET) as m:
            prompt = m.tokenize("xyz", add_bos=True, special=False)
            if use_stream:
                texts.append("".join(r.text for r in stream_generate(m, prompt, GREEDY, 20)))
            else:
                texts.append(generate(m, prompt, GREEDY, 20).text)
    assert texts[0] == texts[1]
