"""Perplexity with the paper's language-modelling protocol, plus KL divergence against a full cache.

The text streams in n_batch chunks; the cache grows to the budget, then evicts as tokens arrive
(whenever budget + n_batch entries would be exceeded). Every token's next-token distribution is
compared with the same run on a full cache (decoded in lockstep, so no logits are stored):
negative log-likelihood of the actual next token, and KL(full || evicted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _lib, archive, cache
from ..config import L2KVConfig
from ..decode import decode
from ..generate import log_softmax
from ..recall import lexical_spans
from ..session import L2KVModel, ModelSettings


@dataclass(frozen=True)
class PerplexityResult:
    nll: np.ndarray  # [n-1] NLL of token i+1 given the prefix (evicted run)
    nll_full: np.ndarray  # the same with a full cache
    kld: np.ndarray  # [n-1] KL(full || evicted) of each next-token distribution
    n_evictions: int

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def ppl_full(self) -> float:
        return float(np.exp(self.nll_full.mean()))


def _chunk_logits(llm, n: int, n_vocab: int) -> np.ndarray:
    lc = _lib.llama_cpp()
    ptr = lc.llama_get_logits(llm.ctx)
    return np.ctypeslib.as_array(ptr, shape=(n, n_vocab)).copy()


def text_tokens(model: L2KVModel, text: str, n_tokens: int) -> list[int]:
    return model.tokenize(text, add_bos=model.add_bos, special=False)[:n_tokens]


def run_perplexity(
    model_path: Path, tokens: list[int], l2kv: L2KVConfig | None, n_batch: int = 256
) -> PerplexityResult:
    settings = ModelSettings(n_batch=n_batch, n_ubatch=n_batch)
    full_settings = ModelSettings(n_batch=n_batch, n_ubatch=n_batch, n_ctx=len(tokens) + n_batch)
    nll, nll_full, kld = [], [], []
    with (
        L2KVModel(model_path, settings if l2kv else full_settings, l2kv) as m,
        L2KVModel(model_path, full_settings, None) as ref,
    ):
        n_vocab = _lib.llama_cpp().llama_vocab_n_tokens(m._vocab)
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            decode(m.llm, chunk, start, logits="all")
            decode(ref.llm, chunk, start, logits="all")
            lp = log_softmax(_chunk_logits(m.llm, len(chunk), n_vocab))
            lq = log_softmax(_chunk_logits(ref.llm, len(chunk), n_vocab))
            nxt = tokens[start + 1 : start + len(chunk) + 1]
            k = len(nxt)  # the last token of the text has no next token
            rows = np.arange(k)
            nll.append(-lp[rows, nxt])
            nll_full.append(-lq[rows, nxt])
            kld.append((np.exp(lq[:k]) * (lq[:k] - lp[:k])).sum(axis=-1))
        n_ev = m.stats().n_evictions if l2kv else 0
    return PerplexityResult(np.concatenate(nll), np.concatenate(nll_full), np.concatenate(kld), n_ev)


def _next_token_nll(m: L2KVModel, tokens: list[int], start: int, n: int, n_vocab: int) -> np.ndarray:
    """NLL of tokens[start+1 .. start+n] after decoding tokens[start .. start+n) (logits of every token)."""
    lp = log_softmax(_chunk_logits(m.llm, n, n_vocab))
    nxt = tokens[start + 1 : start + n + 1]
    return -lp[np.arange(len(nxt)), nxt]


def streaming_nll(
    model_path: Path,
    tokens: list[int],
    l2kv: L2KVConfig,
    n_batch: int = 256,
    cache_type: str = "f16",
    recall_every: int = 0,
) -> tuple[np.ndarray, int]:
    """[n-1] NLL of every next token through an evicting context alone (no full-cache run beside it: at 64k
    tokens that one costs more than everything else), and the number of evictions.

    With l2kv.recall on and recall_every > 0: every recall_every tokens (a multiple of n_batch) the archive
    is searched with the words of the last recall_every tokens read, as a recall during a long answer
    would (never with the tokens about to be scored: their words would leak into the prediction)."""
    settings = ModelSettings(n_batch=n_batch, n_ubatch=n_batch, cache_type_k=cache_type, cache_type_v=cache_type)
    recalling = l2kv.recall.enabled and recall_every > 0
    if recalling and recall_every % n_batch:
        raise ValueError(f"recall_every ({recall_every}) must be a multiple of n_batch ({n_batch})")
    out = []
    with L2KVModel(model_path, settings, l2kv) as m:
        n_vocab = _lib.llama_cpp().llama_vocab_n_tokens(m._vocab)
        pieces = m.token_pieces(tokens) if recalling else []
        for start in range(0, len(tokens), n_batch):
            if recalling and start and start % recall_every == 0:
                _recall_recent(m, pieces[:start], recall_every)
            chunk = tokens[start : start + n_batch]
            decode(m.llm, chunk, start, logits="all")
            out.append(_next_token_nll(m, tokens, start, len(chunk), n_vocab))
        n_ev = m.stats().n_evictions
    return np.concatenate(out), n_ev


def _recall_recent(m: L2KVModel, history: list[bytes], n_query: int) -> None:
    """Recall what the last n_query tokens of the history match (Conversation.recall's lexical search and
    limit, with the words of text already read instead of a new user turn)."""
    l2kv = m.l2kv
    assert l2kv is not None
    ctx = m.llm.ctx
    if archive.stats(ctx).n_entries == 0:
        return
    counts, _ = archive.coverage(ctx, len(history))
    n_max = max(0, min(l2kv.slack(m.settings.n_batch), l2kv.kv_budget - l2kv.n_sink - l2kv.n_recent))
    spans = lexical_spans(history, history[-n_query:], counts, l2kv.recall, n_max)
    if spans:
        archive.recall(ctx, spans)
        if not l2kv.recall.grow:
            cache.evict_now(ctx)


def windowed_reference_nll(
    model_path: Path, tokens: list[int], bucket: int, context: int, n_batch: int = 256
) -> np.ndarray:
    """[n-1] NLL of every next token with a reference that never leaves the training context: each bucket of
    `bucket` tokens is scored in a fresh full cache that first reads the `context` tokens before it."""
    settings = ModelSettings(n_batch=n_batch, n_ubatch=n_batch, n_ctx=context + bucket)
    out = []
    with L2KVModel(model_path, settings, None) as m:
        n_vocab = _lib.llama_cpp().llama_vocab_n_tokens(m._vocab)
        for b0 in range(0, len(tokens), bucket):
            m.reset()
            c0 = max(0, b0 - context)
            if b0 > c0:
                decode(m.llm, tokens[c0:b0], 0, logits="none")
            for start in range(b0, min(b0 + bucket, len(tokens)), n_batch):
                chunk = tokens[start : min(start + n_batch, b0 + bucket)]
                decode(m.llm, chunk, start - c0, logits="all")
                out.append(_next_token_nll(m, tokens, start, len(chunk), n_vocab))
    return np.concatenate(out)
