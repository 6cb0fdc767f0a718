"""Sampling through llama.cpp's sampler chain (penalties -> top-k -> top-p -> min-p -> temperature -> dist).

Temperature 0 is greedy. The chain is owned by `Sampler` and freed by `close()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import _lib
from .errors import InvalidParamsError


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64  # tokens the penalty looks back at
    seed: int = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED = random
    ignore_eos: bool = False  # never sample an end-of-generation token (fixed-length answers, for load tests)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InvalidParamsError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise InvalidParamsError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise InvalidParamsError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p <= 1:
            raise InvalidParamsError(f"min_p must be in [0, 1] (got {self.min_p})")
        if self.repeat_penalty <= 0:
            raise InvalidParamsError(f"repeat_penalty must be > 0 (got {self.repeat_penalty})")
        if not 0 <= self.seed < 2**32:
            raise InvalidParamsError(f"seed must be in [0, 2^32) (got {self.seed})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """A llama.cpp sampler chain for one model; `sample(ctx)` picks from the last decode's logits."""

    def __init__(self, settings: SamplingSettings, banned: Sequence[int] = (), n_vocab: int = 0):
        """banned: tokens never sampled (logit bias -inf; n_vocab needed then)."""
        lc = _lib.llama_cpp()
        self._lc = lc
        params = lc.llama_sampler_chain_default_params()
        self._chain = lc.llama_sampler_chain_init(params)
        add = lambda s: lc.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        if banned:
            biases = (lc.llama_logit_bias * len(banned))(*[lc.llama_logit_bias(t, -math.inf) for t in banned])
            add(lc.llama_sampler_init_logit_bias(n_vocab, len(banned), biases))
        if settings.repeat_penalty != 1.0:
            add(lc.llama_sampler_init_penalties(settings.repeat_last_n, settings.repeat_penalty, 0.0, 0.0))
        if settings.greedy:
            add(lc.llama_sampler_init_greedy())
        else:
            if settings.top_k > 0:
                add(lc.llama_sampler_init_top_k(settings.top_k))
            if settings.top_p < 1.0:
                add(lc.llama_sampler_init_top_p(settings.top_p, 1))
            if settings.min_p > 0.0:
                add(lc.llama_sampler_init_min_p(settings.min_p, 1))
            add(lc.llama_sampler_init_temp(settings.temperature))
            add(lc.llama_sampler_init_dist(settings.seed))

    def sample(self, ctx: Any, idx: int = -1) -> int:
        return int(self._lc.llama_sampler_sample(self._chain, ctx, idx))

    def accept(self, token: int) -> None:
        """Tell stateful samplers (penalties) about a token that was not sampled here (e.g. the prompt)."""
        self._lc.llama_sampler_accept(self._chain, token)

    def reset(self) -> None:
        self._lc.llama_sampler_reset(self._chain)

    def close(self) -> None:
        if self._chain is not None:
            self._lc.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
