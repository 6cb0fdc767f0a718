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

from .. import _lib
from ..config import L2KVConfig
from ..decode import decode
from ..generate import log_softmax
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
