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
from ._ffi import native
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
    prompt_seconds: float  # prompt processing, up to the first generated token
    generation_seconds: float  # the remaining tokens
    chat_template: bool

    @property
    def tokens_per_second(self) -> float:
        """Generation speed, excluding prompt processing (the first token comes with the prompt)."""
        n = self.n_generated_tokens - 1
        return n / self.generation_seconds if n > 0 and self.generation_seconds > 0 else 0.0


def load_llama(model_path: str | os.PathLike[str], settings: GenerationSettings, verbose: bool = False) -> Any:
    """A llama_cpp.Llama for a checked GGUF file; load failures become one-line ModelErrors."""
    path = Path(model_path)
    check_gguf(path)
    native()  # refuse a stock libllama before doing any work
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


def chat_prompt(llm: Any, user_text: str) -> str:
    """The user turn rendered with the model's own chat template (with the generation prompt)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model = llm._model
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=model.token_get_text(llm.token_eos()),
        bos_token=model.token_get_text(llm.token_bos()),
    )
    return formatter(messages=[{"role": "user", "content": user_text}]).prompt


def generate(llm: Any, prompt: str, settings: GenerationSettings) -> GenerationResult:
    """Up to `n_predict` tokens answering `prompt`, through the chat template when there is one.

    Generation stops at an end-of-generation token or after exactly `n_predict` tokens (the
    high-level llama-cpp-python completion may overshoot to finish a UTF-8 character).
    """
    llama_cpp = _lib.llama_cpp()
    use_chat = has_chat_template(llm) if settings.chat is None else settings.chat
    if use_chat and not has_chat_template(llm):
        raise ModelError("the model has no chat template; use a plain completion (--no-chat)")
    text = chat_prompt(llm, prompt) if use_chat else prompt
    # a template writes its own BOS token when it wants one; plain prompts get the model's default
    tokens = llm.tokenize(text.encode(), add_bos=not use_chat, special=use_chat)
    if len(tokens) + settings.n_predict > settings.n_ctx:
        raise InvalidParamsError(
            f"prompt ({len(tokens)} tokens) + n_predict ({settings.n_predict}) exceeds the context size "
            f"({settings.n_ctx}); raise -c/--ctx-size or shorten the prompt"
        )
    vocab = llm._model.vocab
    out: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    for token in llm.generate(tokens, temp=settings.temperature, top_k=40, top_p=0.95, min_p=0.05, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        if t_first is None:
            t_first = time.perf_counter()
        out.append(token)
        if len(out) >= settings.n_predict:
            break
    t_end = time.perf_counter()
    t_first = t_first or t_end
    answer = llm.detokenize(out).decode("utf-8", errors="replace")
    return GenerationResult(answer, len(tokens), len(out), t_first - t0, t_end - t_first, use_chat)
