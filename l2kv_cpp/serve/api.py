"""The OpenAI API's shapes: request schemas (checked strictly), errors, and response bodies.

Fields the OpenAI API has and this server ignores (logit_bias, user, ...) are accepted; a known field of
the wrong type, a value out of range or a feature this server lacks (n > 1, tools, images) is a 400
with an OpenAI-style error body, never a crash.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import SamplingSettings
from .slots import Done, TurnRequest

LLAMA_DEFAULT_SEED = 0xFFFFFFFF


class ApiError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {404: "not_found_error", 413: "invalid_request_error", 503: "server_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request
    ignore_eos: bool | None = None  # llama-server's extension: answers of exactly max_tokens (load tests)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4:
        raise ApiError(400, "at most 4 stop sequences", param="stop")
    return stops


def _sampling(req: _Sampling, defaults: SamplingSettings) -> SamplingSettings:
    seed = defaults.seed if req.seed is None else req.seed
    if not 0 <= seed < 2**32:
        seed = seed % 2**32  # OpenAI seeds are any integer; llama.cpp's are 32-bit
    return SamplingSettings(
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_k=defaults.top_k,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        min_p=defaults.min_p,
        repeat_penalty=defaults.repeat_penalty,
        repeat_last_n=defaults.repeat_last_n,
        seed=seed,
        ignore_eos=defaults.ignore_eos if req.ignore_eos is None else req.ignore_eos,
    )


def _max_tokens(value: int | None, default: int, limit: int, param: str) -> int:
    if value is None:
        return min(default, limit) if default > 0 else limit
    if value < 1 or value > limit:
        raise ApiError(400, f"{param} must be in [1, {limit}] (got {value})", param=param)
    return value


def chat_turn(req: ChatCompletionRequest, defaults: SamplingSettings, n_predict: int, limit: int) -> TurnRequest:
    messages = [("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
    if messages[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    value, param = (
        (req.max_completion_tokens, "max_completion_tokens")
        if req.max_completion_tokens is not None
        else (req.max_tokens, "max_tokens")
    )
    return TurnRequest(
        chat=True,
        messages=tuple(messages),
        sampling=_sampling(req, defaults),
        max_tokens=_max_tokens(value, n_predict, limit, param),
        stops=_stops(req.stop),
    )


def completion_turn(req: CompletionRequest, defaults: SamplingSettings, n_predict: int, limit: int) -> TurnRequest:
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return TurnRequest(
        chat=False,
        prompt=prompt,
        sampling=_sampling(req, defaults),
        max_tokens=_max_tokens(req.max_tokens, n_predict, limit, "max_tokens"),
        stops=_stops(req.stop),
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(done: Done) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def finish_reason(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def chat_body(rid: str, model: str, text: str, done: Done) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason(done),
            }
        ],
        "usage": usage(done),
        "l2kv": done.kv,
    }


def completion_body(rid: str, model: str, text: str, done: Done) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(done)}],
        "usage": usage(done),
        "l2kv": done.kv,
    }


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
