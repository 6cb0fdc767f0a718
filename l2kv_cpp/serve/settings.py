"""What `l2kv-cpp serve` listens on and how much work it accepts."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidParamsError


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless asked: the API has no authentication
    port: int = 8080  # llama-server's default
    n_slots: int = 1  # conversations held at once, each in its own bounded KV cache
    queue_size: int = 64  # requests waiting for a slot; past it, 503 with Retry-After
    max_tokens_limit: int = 32768  # the largest max_tokens a request may ask for (400 above)
    max_prompt_tokens: int = 262144  # the longest prompt accepted (413 above); eviction streams it in budget
    max_body_bytes: int = 16 * 2**20  # request bodies larger than this get 413 before they are parsed
    model_alias: str | None = None  # the model id clients use; None = the GGUF file's stem

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise InvalidParamsError(f"--port must be in [0, 65535] (got {self.port})")
        for name in ("n_slots", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise InvalidParamsError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.queue_size < 0:
            raise InvalidParamsError(f"the queue size must be >= 0 (got {self.queue_size})")
