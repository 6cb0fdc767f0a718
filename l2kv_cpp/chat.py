"""A conversation that only appends to the KV cache, so eviction and history stay consistent.

With a chat template, every turn renders the whole conversation and feeds only the new suffix
(the text after what the cache already holds, `fed_text`); the model's answer and its
end-of-turn token are already in the cache. Without a template (base models) user text is
appended as plain text. When the rendered conversation no longer extends what was fed (e.g.
the template rewrote earlier turns), the conversation is re-evaluated from its kept text
history; tokens that eviction dropped are never needed for that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import ModelError
from .generate import GenerationResponse, stream_generate
from .sampling import SamplingSettings
from .session import L2KVModel, ProgressFn

log = logging.getLogger(__name__)

_DOC_MARK = "\u2063L2KV_QUESTION\u2063"  # where the question goes after a loaded document


@dataclass
class Conversation:
    model: L2KVModel
    chat: bool | None = None  # None: the chat template when the model has one
    system: str | None = None  # system prompt (chat only)
    messages: list[dict[str, str]] = field(default_factory=list)
    fed_text: str = ""  # text whose tokens are in the cache
    document: str | None = None  # loaded document, prefixed to the next user message
    n_reevaluations: int = 0
    last_prompt_tokens_per_second: float = 0.0

    def __post_init__(self) -> None:
        if self.chat is None:
            self.chat = self.model.has_chat_template
        if self.chat and not self.model.has_chat_template:
            raise ModelError("the model has no chat template; use --no-chat for a plain completion")
        if self.system and self.chat:
            self.messages.append({"role": "system", "content": self.system})
        self._formatter = None

    # rendering

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            llm = self.model.llm
            self._formatter = Jinja2ChatFormatter(
                template=llm.metadata["tokenizer.chat_template"],
                eos_token=self.model.token_text(llm.token_eos()).decode(errors="replace"),
                bos_token=self.model.token_text(llm.token_bos()).decode(errors="replace"),
                add_generation_prompt=True,
            )
        self._formatter.add_generation_prompt = add_generation_prompt
        return self._formatter(messages=messages).prompt

    def _user_content(self, text: str) -> str:
        if self.document is None:
            return text
        return f"{self.document}\n\n{text}"

    def _user_turn(self, text: str) -> tuple[str, str]:
        """(message content, the whole text the cache must hold) for a user turn awaiting an answer."""
        if self.chat:
            content = self._user_content(text)
            return content, self._render(
                [*self.messages, {"role": "user", "content": content}], add_generation_prompt=True
            )
        return text, self.fed_text + text

    def _tokens_for(self, target: str, special: bool) -> list[int]:
        """Tokens that take the cache from fed_text to target (re-evaluating from scratch if needed)."""
        if not target.startswith(self.fed_text):
            log.warning("the conversation no longer extends the cached text; re-evaluating it from its history")
            self.model.reset()
            self.fed_text = ""
            self.n_reevaluations += 1
        delta = target[len(self.fed_text) :]
        add_bos = self.model.n_past == 0 and self.model.add_bos
        bos = self.model.token_text(self.model.llm.token_bos()).decode(errors="replace")
        if add_bos and special and delta.startswith(bos):
            add_bos = False  # the template writes its own BOS
        return self.model.tokenize(delta, add_bos=add_bos, special=special)

    def _feed(self, target: str, progress: ProgressFn | None) -> int:
        """Feed what takes the cache to `target`; on Ctrl-C roll back to the previous turn."""
        tokens = self._tokens_for(target, special=bool(self.chat))
        start = self.model.n_past
        t0 = time.perf_counter()
        try:
            self.model.feed(tokens, progress)
        except KeyboardInterrupt:
            if not self.model.rewind(start):  # an eviction already compacted part of it
                self.model.reset()
                self.fed_text = ""  # the next turn re-evaluates the conversation from its text
            raise
        self.fed_text = target
        dt = time.perf_counter() - t0
        self.last_prompt_tokens_per_second = len(tokens) / dt if tokens and dt > 0 else 0.0
        return len(tokens)

    # public API

    def load_document(self, text: str, progress: ProgressFn | None = None) -> int:
        """Process a (long) document now; the next question is asked about it. Returns its token count."""
        if self.chat:
            self.document = text
            rendered = self._render(
                [*self.messages, {"role": "user", "content": self._user_content(_DOC_MARK)}], add_generation_prompt=True
            )
            target = rendered[: rendered.index(_DOC_MARK)]
        else:
            target = self.fed_text + text
        return self._feed(target, progress)

    def ask(
        self, text: str, sampling: SamplingSettings, max_tokens: int = -1, progress: ProgressFn | None = None
    ) -> Iterator[GenerationResponse]:
        """Stream the answer to `text`. Stopping early (or Ctrl-C) keeps what was generated so far."""
        content, target = self._user_turn(text)
        n_prompt = self._feed(target, progress)
        pieces: list[bytes] = []
        answer: list[str] = []
        try:
            for resp in stream_generate(self.model, [], sampling, max_tokens, n_prompt_fed=n_prompt):
                pieces.append(self.model.token_text(resp.token))  # every yielded token is in the cache
                answer.append(resp.text)
                yield resp
        finally:
            self.fed_text += b"".join(pieces).decode("utf-8", errors="replace")
            self.document = None
            self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": "".join(answer)}]

    def feed_question(self, text: str, progress: ProgressFn | None = None) -> int:
        """Feed a user turn (with the generation prompt) without generating; returns the tokens fed.

        For protocols that compress the cache between the question and the answer; the turn is
        recorded with an empty answer.
        """
        content, target = self._user_turn(text)
        n = self._feed(target, progress)
        self.document = None
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
        return n

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.model.reset()
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.fed_text = ""
        self.document = None
