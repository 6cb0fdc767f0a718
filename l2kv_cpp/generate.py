"""Short generations through llama-cpp-python: what `l2kv-cpp run` does until its own decode loop lands.

Instruct models with a chat template (SmolLM2) are prompted through it; base models (Gemma 3
270M, the tiny test models) get a plain completion. llama-cpp-python's `Llama` stops at
`n_ctx` tokens, which is fine for short generations; unbounded sessions need the l2kv decode loop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _lib
from .errors import InvalidParamsError, ModelError
from .gguf_file import check_gguf


@dataclass(frozen=True)
class GenerationSettings:
    n_predict: int = 64  # tokens to generate at most
    n_ctx: int = 2048  # context size (tokens) of the llama.cpp context
    temperature: float = 0.0  # 0 = greedy, deterministic
    seed: int = 0
    n_threads: int | None = None  # None = llama-cpp-python's default (physical cores)
    n_gpu_layers: int = 0  # layers to offload; -1 = all
    flash_attn: bool = True  # l2kv eviction needs flash attention (non-transposed V)
    chat: bool | None = None  # None = use the chat template when the model has one

    def __post_init__(self) -> None:
        if self.n_predict < 1:
            raise InvalidParamsError(f"n_predict must be >= 1 (got {self.n_predict})")
        if self.n_ctx < 16:
            raise InvalidParamsError(f"n_ctx must be >= 16 (got {self.n_ctx})")
        if self.temperature < 0:
            raise InvalidParamsError(f"temperature must be >= 0 (got {self.temperature})")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    n_prompt_tokens: int
    n_generated_tokens: int
    seconds: float
    chat_template: bool

    @property
    def tokens_per_second(self) -> float:
        return self.n_generated_tokens / self.seconds if self.seconds > 0 else 0.0


def load_llama(model_path: str | os.PathLike[str], settings: GenerationSettings, verbose: bool = False) -> Any:
    """A llama_cpp.Llama for a checked GGUF file; load failures become one-line ModelErrors."""
    path = Path(model_path)
    check_gguf(path)
    llama_cpp = _lib.llama_cpp()
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            flash_attn=settings.flash_attn,
            seed=settings.seed,
            verbose=verbose,
        )
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise ModelError(f"llama.cpp could not load {path} ({exc}); run with -v for its log") from None


def has_chat_template(llm: Any) -> bool:
    return bool(llm.metadata.get("tokenizer.chat_template"))


def generate(llm: Any, prompt: str, settings: GenerationSettings) -> GenerationResult:
    """One greedy (or sampled) answer to `prompt`, through the chat template when there is one."""
    use_chat = has_chat_template(llm) if settings.chat is None else settings.chat
    if use_chat and not has_chat_template(llm):
        raise ModelError("the model has no chat template; use a plain completion (chat=False)")
    common = dict(max_tokens=settings.n_predict, temperature=settings.temperature, seed=settings.seed)
    t0 = time.perf_counter()
    if use_chat:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], **common)
        text = out["choices"][0]["message"]["content"] or ""
    else:
        out = llm.create_completion(prompt, **common)
        text = out["choices"][0]["text"]
    seconds = time.perf_counter() - t0
    usage = out["usage"]
    return GenerationResult(text, usage["prompt_tokens"], usage["completion_tokens"], seconds, use_chat)
