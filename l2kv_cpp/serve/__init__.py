"""`l2kv-cpp serve`: an OpenAI-compatible HTTP server over bounded-KV conversation slots.

- `settings`: ServerSettings (host, port, slots, queue, limits).
- `slots`: the model loaded once, one evicting context per slot, and the worker thread that serves
  them in turn (a request goes to the slot whose conversation it continues).
- `stops`: stop strings over streamed text.
- `api`: the OpenAI request schemas, errors and response bodies.
- `metrics`: counters for `GET /metrics` (Prometheus text).
- `app`: the FastAPI application (routes, the static chat page at `/`).
"""

from .settings import ServerSettings

__all__ = ["ServerSettings"]
