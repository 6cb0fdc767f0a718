"""Layered generation over an `L2KVModel` (steps -> stream -> whole text), with no n_ctx limit.

- `generate_step` feeds the prompt, then samples, feeds and yields one token at a time with its
  log-probability; every yielded token is already in the cache, so stopping at any point leaves
  the cache consistent with what the caller saw.
- `stream_generate` turns steps into text pieces (UTF-8 safe) with speeds and KV statistics.
- `generate` returns the whole answer.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .cache import L2KVStats
from .errors import InvalidParamsError
from .sampling import Sampler, SamplingSettings
from .session import L2KVModel, ProgressFn


@dataclass(frozen=True)
class GenerationStep:
    token: int
    logprob: float  # natural log of the token's probability under the raw logits
    is_eog: bool  # an end-of-generation token (already fed; its text is not part of the answer)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities over the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _logprob(logits: np.ndarray, token: int) -> float:
    return float(log_softmax(logits)[token])


def generate_step(
    model: L2KVModel,
    prompt: Sequence[int],
    sampling: SamplingSettings,
    max_tokens: int = -1,
    progress: ProgressFn | None = None,
) -> Iterator[GenerationStep]:
    """Feed `prompt`, then yield up to max_tokens sampled tokens (-1 = until end of generation).

    An empty prompt continues from the last decode (the caller fed the prompt itself).
    """
    if not prompt and model.n_past == 0:
        raise InvalidParamsError("the prompt is empty: nothing to continue from")
    model.feed(prompt, progress)
    banned = model.eog_tokens() if sampling.ignore_eos else []
    sampler = Sampler(sampling, banned, model.n_vocab)
    try:
        n = 0
        while max_tokens < 0 or n < max_tokens:
            logits = model.logits()
            token = sampler.sample(model.llm.ctx)
            eog = model.is_eog(token)
            model.feed([token])
            n += 1
            yield GenerationStep(token, _logprob(logits, token), eog)
            if eog:
                return
    finally:
        sampler.close()


@dataclass(frozen=True)
class GenerationResponse:
    text: str  # the new piece of text (may be empty while a UTF-8 character is incomplete)
    token: int
    logprob: float
    n_prompt_tokens: int
    n_generated_tokens: int
    prompt_tokens_per_second: float
    tokens_per_second: float  # generation speed so far, first token excluded
    stats: L2KVStats | None  # KV statistics after this token (None when eviction is off)
    finish_reason: str | None  # "stop" (end of generation), "length" (max_tokens) or None


def stream_generate(
    model: L2KVModel,
    prompt: Sequence[int],
    sampling: SamplingSettings,
    max_tokens: int = -1,
    progress: ProgressFn | None = None,
    n_prompt_fed: int = 0,
) -> Iterator[GenerationResponse]:
    """Text pieces of the answer; n_prompt_fed counts prompt tokens the caller already fed (for the stats)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    t0 = time.perf_counter()
    t_first: float | None = None
    n = 0
    prompt_tps = 0.0
    for step in generate_step(model, prompt, sampling, max_tokens, progress):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            prompt_tps = len(prompt) / (now - t0) if now > t0 and prompt else 0.0
        n += 1
        tps = (n - 1) / (now - t_first) if n > 1 and now > t_first else 0.0
        text = "" if step.is_eog else decoder.decode(model.token_text(step.token))
        finish = "stop" if step.is_eog else ("length" if n == max_tokens else None)
        if finish:
            text += decoder.decode(b"", final=True)
        stats = model.stats() if model.l2kv is not None else None
        yield GenerationResponse(
            text,
            step.token,
            step.logprob,
            len(prompt) + n_prompt_fed,
            n - int(step.is_eog),
            prompt_tps,
            tps,
            stats,
            finish,
        )


@dataclass(frozen=True)
class GenerationResult:
    text: str
    n_prompt_tokens: int
    n_generated_tokens: int
    prompt_tokens_per_second: float
    tokens_per_second: float
    finish_reason: str | None
    stats: L2KVStats | None


def generate(
    model: L2KVModel,
    prompt: Sequence[int],
    sampling: SamplingSettings,
    max_tokens: int = -1,
    progress: ProgressFn | None = None,
) -> GenerationResult:
    pieces: list[str] = []
    last: GenerationResponse | None = None
    for last in stream_generate(model, prompt, sampling, max_tokens, progress):
        pieces.append(last.text)
    assert last is not None
    return GenerationResult(
        "".join(pieces),
        last.n_prompt_tokens,
        last.n_generated_tokens,
        last.prompt_tokens_per_second,
        last.tokens_per_second,
        last.finish_reason,
        last.stats,
    )
