"""Counters for `GET /metrics`, in Prometheus' text format (no client library needed for a dozen lines)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from .slots import Done, Slot

_PREFIX = "l2kv"


class Metrics:
    """Request and token counters; the slots' KV figures are read from the slots when rendered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> requests answered
        self.prompt_tokens = 0  # every prompt token of every answered request
        self.prompt_tokens_processed = 0  # of which decoded (the rest was already in a slot's cache)
        self.completion_tokens = 0
        self.cancelled = 0  # generations stopped because the client went away

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def answered(self, done: Done) -> None:
        with self._lock:
            self.prompt_tokens += done.prompt_tokens
            self.prompt_tokens_processed += done.prompt_tokens - done.cached_tokens
            self.completion_tokens += done.completion_tokens
            self.cancelled += done.finish_reason == "cancelled"

    def render(self, slots: Sequence[Slot], queue_length: int) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {_PREFIX}_{name} {help_}")
            out.append(f"# TYPE {_PREFIX}_{name} {kind}")
            out.extend(f"{_PREFIX}_{name}{labels} {value:g}" for labels, value in samples)

        with self._lock:
            metric(
                "requests_total",
                "counter",
                "HTTP requests answered, by endpoint and status",
                [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())],
            )
            metric("prompt_tokens_total", "counter", "prompt tokens of answered requests", [("", self.prompt_tokens)])
            metric(
                "prompt_tokens_processed_total",
                "counter",
                "prompt tokens decoded (the others were already in a slot's cache)",
                [("", self.prompt_tokens_processed)],
            )
            metric("completion_tokens_total", "counter", "tokens generated", [("", self.completion_tokens)])
            metric(
                "cancelled_total", "counter", "generations stopped by a client that went away", [("", self.cancelled)]
            )
        metric("queue_length", "gauge", "requests waiting for a slot", [("", queue_length)])
        metric("slots_busy", "gauge", "slots serving a request", [("", sum(s.busy for s in slots))])
        per_slot = [
            ("kv_cells", "gauge", "KV cells in use", "cells"),
            ("kv_bytes", "gauge", "KV memory in use (keys, values, key norms)", "kv_bytes"),
            (
                "kv_full_cache_bytes",
                "gauge",
                "KV memory a full cache of the slot's tokens would take",
                "full_cache_bytes",
            ),
            ("evictions_total", "counter", "evictions in the slot's current conversation", "evictions"),
            ("tokens_seen", "gauge", "tokens of the slot's current conversation", "tokens_seen"),
        ]
        for name, kind, help_, key in per_slot:
            metric(name, kind, help_, [(f'{{slot="{s.index}"}}', float(s.kv.get(key, 0))) for s in slots])
        return "\n".join(out) + "\n"
