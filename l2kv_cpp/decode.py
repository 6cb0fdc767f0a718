"""Low-level decoding over llama-cpp-python's C bindings, with no n_ctx limit on positions.

llama-cpp-python's `Llama.eval` keeps every token in an n_ctx-sized array, so it cannot go past
n_ctx; with eviction the cache is bounded but positions keep growing. These helpers feed tokens
at explicit positions in n_batch chunks and read logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _lib
from .errors import L2KVError


class DecodeError(L2KVError):
    """llama_decode failed (no memory slot, or a backend error)."""


def decode(llm: Any, tokens: Sequence[int], pos0: int, logits: str = "last") -> None:
    """Decode `tokens` at positions pos0, pos0+1, ... in chunks of n_batch.

    logits: "last" (only the last token of the whole call), "all", or "none".
    """
    llama_cpp = _lib.llama_cpp()
    n_batch = int(llm.n_batch)
    n = len(tokens)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        for start in range(0, n, n_batch):
            chunk = tokens[start : start + n_batch]
            for i, tok in enumerate(chunk):
                batch.token[i] = int(tok)
                batch.pos[i] = pos0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                last = start + i == n - 1
                batch.logits[i] = logits == "all" or (logits == "last" and last)
            batch.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(llm.ctx, batch)
            if rc != 0:
                raise DecodeError(f"llama_decode returned {rc} at position {pos0 + start} (chunk of {len(chunk)})")
    finally:
        llama_cpp.llama_batch_free(batch)


def logits_ith(llm: Any, i: int = -1) -> np.ndarray:
    """A copy of the logits of output i of the last decode (-1 = the last output)."""
    llama_cpp = _lib.llama_cpp()
    n_vocab = llama_cpp.llama_vocab_n_tokens(llm._model.vocab)
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
