"""Conversation slots: the model loaded once, one bounded KV cache per slot, served in turn by one thread.

A request goes to the free slot that already holds the most of it (the chat's earlier messages, or the
completion prompt it continues), as llama.cpp's server does, so a multi-turn chat only processes its new
turn; otherwise to the slot used least recently, whose cache is cleared first. One worker thread runs
every busy slot one step at a time (its prompt, then one token), so slots share the CPU fairly and
llama.cpp never runs two decodes at once; requests beyond the free slots wait in a bounded queue.
Memory: n_slots x (budget + slack) KV cells, whatever the traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import cache
from ..cache import L2KVStats
from ..chat import Conversation
from ..config import L2KVConfig
from ..prompt_tokens import common_prefix_len
from ..sampling import SamplingSettings
from ..session import L2KVModel, ModelSettings
from .stops import StopMatcher

log = logging.getLogger(__name__)

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class TurnRequest:
    """One request, checked and normalised by the HTTP layer."""

    chat: bool  # chat messages through the template, else a plain completion of `prompt`
    messages: tuple[Message, ...] = ()  # chat: every message, the last one the user's
    prompt: str = ""  # completion
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int = 1024
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Started:
    """The prompt is accepted and about to be processed."""

    n_prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop", "length" or "cancelled" (the client went away)
    prompt_tokens: int  # the whole prompt
    cached_tokens: int  # of which already in the slot's cache (not processed again)
    completion_tokens: int
    kv: dict[str, float]  # the slot's KV statistics after the answer


@dataclass(frozen=True)
class Failed:
    status: int  # the HTTP status to answer with
    message: str


Event = Started | Delta | Done | Failed


@dataclass
class Job:
    request: TurnRequest
    emit: Callable[[Event], None]  # called from the worker thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)


def kv_report(stats: L2KVStats | None, model: L2KVModel, slot: int) -> dict[str, float]:
    """A slot's KV statistics as the API shows them (`l2kv` field, /slots, /metrics)."""
    n_past = model.n_past
    if stats is None:
        return {"slot": slot, "tokens_seen": n_past, "tokens_decoded": model.n_decoded}
    per_cell = stats.kv_bytes / stats.kv_size if stats.kv_size else 0.0
    return {
        "slot": slot,
        "tokens_seen": n_past,
        "tokens_decoded": model.n_decoded,  # over the slot's life: prompt tokens read + tokens generated
        "cells": stats.n_cells_used,
        "kv_budget": stats.kv_budget,
        "kv_size": stats.kv_size,
        "evictions": stats.n_evictions,
        "kv_bytes": stats.kv_bytes + stats.norm_bytes,
        "full_cache_bytes": round(per_cell * n_past),
        "rope_pos_max": stats.rope_pos_max,
    }


class Slot:
    """One conversation's context (the weights are shared) and what its cache holds."""

    def __init__(self, index: int, model: L2KVModel, max_prompt_tokens: int):
        self.index = index
        self.model = model
        self.max_prompt_tokens = max_prompt_tokens
        self.conv: Conversation | None = None
        self.history: tuple[Message, ...] = ()  # chat: the messages its cache holds, its answer last
        self.text = ""  # completion: the prompt and answer its cache holds
        self.answer_tokens: dict[str, list[int]] = {}  # answer text -> the tokens sampled for it
        self.last_used = 0.0
        self.busy = False
        self.n_requests = 0
        self.kv: dict[str, float] = kv_report(None, model, index)  # written by the worker only

    def match(self, req: TurnRequest) -> int:
        """How much of the request this slot already holds (messages or characters; 0 = nothing)."""
        if self.conv is None or self.conv.chat != req.chat:
            return 0
        if req.chat:
            earlier = req.messages[:-1]
            return common_prefix_len(self.history, earlier)  # type: ignore[arg-type]
        return len(self.text) if self.text and req.prompt.startswith(self.text) else 0

    def _start_over(self, req: TurnRequest) -> Conversation:
        """A cleared cache and a new conversation, whose system turn (if any) is protected from eviction."""
        self.model.reset()
        if self.model.l2kv is not None:
            cache.set_n_sink(self.model.llm.ctx, self.model.l2kv.n_sink)  # the last conversation's may be longer
        self.history, self.text, self.answer_tokens = (), "", {}
        system = [{"role": r, "content": c} for r, c in req.messages if r == "system"]
        self.conv = Conversation(self.model, chat=req.chat, messages=system if req.chat else [])
        return self.conv

    def run(self, job: Job) -> Iterator[None]:
        """Serve one request, yielding after the prompt is checked, after the prompt is processed and after
        every token, so that the worker can serve the other slots in between."""
        req = job.request
        conv = self.conv if self.match(req) > 0 else None
        if conv is None:
            conv = self._start_over(req)
        if req.chat:
            *earlier, (_, text) = req.messages
            conv.messages = [{"role": r, "content": c} for r, c in earlier]
            conv.answers = [
                self.answer_tokens.get(c) or self.model.tokenize(c, special=False)
                for r, c in earlier
                if r == "assistant"
            ]
        else:
            conv.messages, conv.answers, text = [], [], req.prompt
        target = conv.turn_tokens(text)
        if len(target) > self.max_prompt_tokens:
            job.emit(Failed(413, f"the prompt has {len(target)} tokens; this server accepts {self.max_prompt_tokens}"))
            return
        if not target:
            job.emit(Failed(400, "the prompt is empty"))
            return
        job.emit(Started(len(target)))
        yield
        n_cached = common_prefix_len(conv.tokens[: self.model.n_past], target)
        n_reevaluations = conv.n_reevaluations
        for _ in conv.prefill_steps(text):  # one batch per step: a long prompt does not stall the other slots
            self.kv = kv_report(self.model.stats() if self.model.l2kv else None, self.model, self.index)
            if job.cancelled.is_set():
                job.emit(Done("cancelled", len(target), n_cached, 0, dict(self.kv)))
                return
            yield
        stopper = StopMatcher(req.stops)
        parts: list[str] = []
        finish, n_gen = "length", 0
        stream = conv.ask(text, req.sampling, req.max_tokens)
        try:
            for resp in stream:
                if conv.n_reevaluations != n_reevaluations:
                    n_cached = 0  # the cache could not go back to where the prompt differs: all of it was read
                n_gen = resp.n_generated_tokens
                self.kv = kv_report(resp.stats, self.model, self.index)
                out, hit = stopper.feed(resp.text)
                if out:
                    parts.append(out)
                    job.emit(Delta(out))
                if hit:
                    finish = "stop"
                    break
                if resp.finish_reason:
                    finish = resp.finish_reason
                    break
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                yield
        finally:
            stream.close()  # the conversation records the turn (the cache keeps what was generated)
        if finish != "stop":
            rest = stopper.flush()
            if rest:
                parts.append(rest)
                job.emit(Delta(rest))
        answer = "".join(parts)
        if conv.answers:
            self.answer_tokens[answer] = conv.answers[-1]
        self.history = (*req.messages, ("assistant", answer)) if req.chat else ()
        self.text = "" if req.chat else req.prompt + answer
        self.n_requests += 1
        self.kv = kv_report(self.model.stats() if self.model.l2kv else None, self.model, self.index)
        job.emit(Done(finish, len(target), n_cached, n_gen, dict(self.kv)))

    def drop(self) -> None:
        """Forget the conversation (after an error, so that a broken state is never reused)."""
        self.conv = None
        self.history, self.text, self.answer_tokens = (), "", {}


class SlotPool:
    """The model loaded once and n_slots contexts on its weights."""

    def __init__(
        self, path: Path, settings: ModelSettings, l2kv: L2KVConfig | None, n_slots: int, max_prompt_tokens: int
    ):
        self.path = path
        first = L2KVModel(path, settings, l2kv)
        models = [first]
        try:
            for _ in range(n_slots - 1):
                models.append(L2KVModel(path, settings, l2kv, share_weights_with=first))
        except Exception:
            for m in reversed(models):
                m.close()
            raise
        self.slots = [Slot(i, m, max_prompt_tokens) for i, m in enumerate(models)]

    @property
    def has_chat_template(self) -> bool:
        return self.slots[0].model.has_chat_template

    def close(self) -> None:
        for s in reversed(self.slots):  # the contexts on shared weights before the model's own
            s.model.close()


class Scheduler:
    """The worker thread: assigns waiting requests to free slots and steps every busy slot in turn."""

    def __init__(self, slots: Sequence[Slot], queue_size: int):
        self.slots = list(slots)
        self.queue_size = queue_size
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: dict[int, tuple[Job, Iterator[None]]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="l2kv-slots", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    def submit(self, job: Job) -> bool:
        """Queue a request; False when the queue is full (the caller answers 503)."""
        with self._cv:
            if self._stopping or len(self._waiting) >= self.queue_size + sum(not s.busy for s in self.slots):
                return False
            self._waiting.append(job)
            self._cv.notify()
            return True

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(s.busy for s in self.slots)

    def _assign(self) -> None:
        while self._waiting:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                continue
            slot = max(free, key=lambda s: (s.match(job.request), -s.last_used))
            slot.busy = True
            self._running[slot.index] = (job, slot.run(job))

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._assign()
                while not self._running and not self._stopping:
                    self._cv.wait()
                    self._assign()
                if self._stopping:
                    break
                work = list(self._running.items())
            for index, (job, steps) in work:
                try:
                    next(steps)
                    continue
                except StopIteration:
                    pass
                except Exception as exc:  # one request's failure must not take the server down
                    log.exception("slot %d failed", index)
                    self.slots[index].drop()
                    job.emit(Failed(500, f"generation failed: {exc}"))
                with self._cv:
                    del self._running[index]
                    slot = self.slots[index]
                    slot.busy, slot.last_used = False, time.monotonic()
        with self._cv:
            for job, steps in self._running.values():
                steps.close()
                job.emit(Failed(503, "the server is shutting down"))
            for job in self._waiting:
                job.emit(Failed(503, "the server is shutting down"))
            self._running.clear()
            self._waiting.clear()
