"""Choosing what to recall (l2kv_cpp.recall) and recall in a conversation on a real model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from l2kv_cpp import archive, cache
from l2kv_cpp.chat import Conversation
from l2kv_cpp.config import L2KVConfig
from l2kv_cpp.errors import InvalidParamsError
from l2kv_cpp.eval import niah
from l2kv_cpp.eval.tasks import niah_document
from l2kv_cpp.recall import (
    RecallSettings,
    bm25_scores,
    choose_spans,
    combine_scores,
    lexical_spans,
    query_block_scores,
    words,
)
from l2kv_cpp.sampling import SamplingSettings
from l2kv_cpp.session import L2KVModel, ModelSettings


def test_words_fold_case_and_drop_punctuation():
    assert words(b" San") == ["san"]
    assert words("Ünïcode".encode()) == ["ünïcode"]
    assert words(b"?!") == [] and words(b" ") == []
    assert words(b"\xe2\x82") == []  # half a UTF-8 character: no word


def test_bm25_ranks_rare_shared_words_first():
    blocks = [Counter({"the": 3, "sky": 1}), Counter({"the": 2, "pass": 1, "key": 1}), Counter({"the": 1})]
    scores = bm25_scores(blocks, ["what", "is", "the", "pass", "key"])
    assert scores[1] > 5 * max(scores[0], scores[2]) > 0  # "the", in every block, is worth little
    assert bm25_scores(blocks, ["absent"]) == [0.0, 0.0, 0.0]


def test_spans_take_the_best_blocks_with_their_followers_within_the_budget():
    s = RecallSettings(mode="lexical", n_tokens=64, block=16, n_context_blocks=1)
    scores = [0, 5, 0, 0, 9, 0, 0, 1]
    archived = [True] * 8
    # block 4 (+5), then block 1 (+2): 4 blocks = 64 positions
    assert choose_spans(scores, archived, s, 128, 1000) == [(16, 48), (64, 96)]
    # a smaller limit from the cache (n_max) wins over n_tokens
    assert choose_spans(scores, archived, s, 128, 32) == [(64, 96)]
    # blocks the cache still holds everywhere are not worth a recall
    archived[5] = False
    assert choose_spans(scores, archived, s, 128, 1000) == [(16, 48), (64, 80), (112, 128)]
    assert choose_spans([0.0] * 8, [True] * 8, s, 128, 1000) == []  # nothing matches: nothing comes back
    # the last block may be short
    assert choose_spans([0, 0, 3], [True] * 3, s, 40, 1000) == [(32, 40)]


def test_lexical_spans_find_a_needle():
    hay = [b" The", b" sky", b" is", b" blue", b"."] * 40
    needle = [b" The", b" pass", b" key", b" is", b" 714", b"32", b"."]
    history = hay[:100] + needle + hay[100:]
    s = RecallSettings(mode="lexical", n_tokens=32, block=8)
    spans = lexical_spans(history, [b"What", b" is", b" the", b" pass", b" key", b"?"], [1] * len(history), s, 1000)
    covered = {p for a, b in spans for p in range(a, b)}
    assert set(range(100, 107)) <= covered and len(covered) <= 32


def test_settings_are_checked():
    assert RecallSettings.parse("lexical:64:exchange") == RecallSettings("lexical", 64, grow=False)
    assert RecallSettings.parse("lexical:disk:max=0") == RecallSettings("lexical", on_disk=True, max_mib=0)
    for bad in ("lexicon", "lexical:0", "lexical:x", "lexical:1:2:3", "lexical:max=-1", "lexical:max=x"):
        with pytest.raises(InvalidParamsError):
            RecallSettings.parse(bad)


@pytest.mark.parametrize("grow", [True, False])
def test_a_question_brings_its_needle_back_into_every_head(smollm2_path, grow):
    """A 1000-token needle document at a quarter of the cache: after the eviction most heads lost the
    needle; the question's recall puts its positions back into every (layer, head), the cache stays
    within budget + slack (exactly the budget with :exchange), and the archive shrinks by what came back."""
    recall = RecallSettings("lexical", 128, grow=grow)
    with L2KVModel(smollm2_path, ModelSettings(n_batch=256, n_ubatch=256), None) as tok:
        doc = niah_document(tok, niah.NiahCase(n_tokens=1000, depth=0.5))
    config = L2KVConfig(kv_budget=250, recall=recall)
    with L2KVModel(smollm2_path, ModelSettings(n_batch=256, n_ubatch=256), config) as m:
        conv = Conversation(m)
        question = niah.question(chat=True)
        conv.load_document(doc, next_text=question)
        cache.evict_now(m.llm.ctx)
        before = archive.stats(m.llm.ctx)
        text = m.detokenize(conv.tokens).decode()
        start = text.index(niah.NEEDLE.strip()[:30])
        # positions of the needle: the tokens whose text lies inside it
        pieces, at, needle_pos = m.token_pieces(conv.tokens), 0, []
        for p, piece in enumerate(pieces):
            if start <= at < start + len(niah.NEEDLE.strip()):
                needle_pos.append(p)
            at += len(piece.decode(errors="replace"))
        n_layer = int(m.llm.metadata["llama.block_count"])
        lost = sum(
            not set(needle_pos) <= set(cache.read_layer(m.llm.ctx, il)[1][:, h].tolist())
            for il in range(n_layer)
            for h in range(cache.read_layer(m.llm.ctx, il)[1].shape[1])
        )
        assert lost > 0  # the eviction dropped the needle somewhere
        spans = conv.recall(question)
        assert spans and sum(b - a for a, b in spans) <= 128
        assert conv.recall(question) == []  # once per turn
        for il in range(n_layer):
            pos = cache.read_layer(m.llm.ctx, il)[1]
            for h in range(pos.shape[1]):
                assert set(needle_pos) <= set(pos[:, h].tolist()), (il, h)
        used = cache.stats(m.llm.ctx).n_cells_used
        assert used == 250 if not grow else 250 <= used <= 250 + 128
        after = archive.stats(m.llm.ctx)
        assert after.n_recalls == 1 and after.n_recalled > 0
        # growing keeps what came back on top of the budget; an exchange sends as many entries back
        assert after.n_entries < before.n_entries if grow else after.n_entries == before.n_entries
        answer = "".join(r.text for r in conv.ask(question, SamplingSettings(temperature=0.0), 30))
        assert answer.strip() and archive.stats(m.llm.ctx).n_recalls == 1  # ask did not recall again


def test_recall_is_on_by_default_and_its_setting_round_trips():
    d = L2KVConfig().recall
    assert d.mode == "lexical" and d.grow and not d.on_disk and RecallSettings.parse(d.spec) == d
    for spec in ("off", "query:64:exchange", "both:32:disk", "lexical:16:exchange:disk", "lexical:128:disk:max=64"):
        assert RecallSettings.parse(spec).spec == spec


def test_the_default_archive_is_limited_and_forgets_the_oldest(tiny_model):
    """Recall on by default keeps its archive under RecallSettings.max_mib: a stream of any length holds
    bounded memory (here a limit of 1 MiB on the tiny model)."""
    config = L2KVConfig(kv_budget=64, recall=RecallSettings.parse("lexical:max=1"))
    assert L2KVConfig().recall.max_mib > 0
    with L2KVModel(tiny_model, ModelSettings(n_batch=64, n_ubatch=64), config) as m:
        st = archive.stats(m.llm.ctx)
        n_tokens = 2 * (2**20 // st.bytes_per_position)  # twice what fits
        for start in range(0, n_tokens, 256):
            m.feed(list((np.arange(start, start + 256) % 200 + 3).tolist()))
        st = archive.stats(m.llm.ctx)
        assert st.max_bytes == 2**20 and 0.9 * 2**20 < st.n_bytes <= 2**20
        assert st.n_forgotten > 0


def test_without_recall_nothing_is_archived(tiny_model):
    config = L2KVConfig(kv_budget=64, recall=RecallSettings())
    with L2KVModel(tiny_model, ModelSettings(n_batch=64, n_ubatch=64), config) as m:
        m.feed(list(np.arange(3, 300) % 200 + 3))
        assert cache.stats(m.llm.ctx).n_evictions > 0
        st = archive.stats(m.llm.ctx)
        assert not st.enabled and st.n_entries == 0


def test_query_scores_put_the_attended_block_first():
    rng = np.random.default_rng(0)
    d = 16
    keys = rng.normal(size=(64, d))
    pos = np.arange(64) + 100  # archived positions 100..163: blocks 6..10 of 16
    target = keys[37] * 3  # a query aligned with the key at position 137 (block 8)
    scores = query_block_scores([(pos, keys, np.stack([target, rng.normal(size=d)]))], 11, 16)
    assert int(np.argmax(scores)) == 137 // 16
    assert scores[:6].sum() == 0  # blocks with no archived entry get nothing
    assert combine_scores([0, 2, 1], [0.5, 0, 1]) == [0.25, 0.5, 0.75]
    assert combine_scores([0, 0], [0, 0]) == [0.0, 0.0]


def test_a_turn_that_diverges_from_the_cache_goes_back_before_the_recall(tiny_model):
    """The newest tokens differ from the turn's (as after an interrupted answer): the cache goes back to
    the divergence before the recall's eviction compacts them, so nothing is re-read from the history."""
    with L2KVModel(tiny_model, ModelSettings(n_batch=32, n_ubatch=32), L2KVConfig(kv_budget=64)) as m:
        conv = Conversation(m)
        conv.load_document("word " * 60 + "the pass key is 123. " + "word " * 60)
        assert m.stats().n_evictions > 0 and archive.stats(m.llm.ctx).n_entries > 0
        target = conv.turn_tokens(" pass key?")
        conv.tokens[-1] = (conv.tokens[-1] + 1) % m.llm.n_vocab()
        list(conv.ask(" pass key?", SamplingSettings(temperature=0.0), 2))
        assert conv.n_reevaluations == 0 and conv.last_recall
        assert conv.tokens[: len(target)] == target  # the turn's tokens, whole, after the recall
        assert archive.stats(m.llm.ctx).n_recalls == 1
