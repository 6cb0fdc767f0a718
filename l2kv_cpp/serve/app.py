"""The FastAPI application: OpenAI routes over the slot scheduler, health, metrics and the chat page."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse

from ..sampling import SamplingSettings
from . import api
from .metrics import Metrics
from .settings import ServerSettings
from .slots import Delta, Done, Event, Failed, Job, Scheduler, SlotPool, Started, TurnRequest

RETRY_AFTER_S = 1  # what a 503 asks the client to wait


class _ClientGone(Exception):
    pass


@dataclass
class ServerState:
    pool: SlotPool
    scheduler: Scheduler
    settings: ServerSettings
    sampling: SamplingSettings  # defaults for what a request leaves out
    n_predict: int  # default max_tokens
    model_ids: tuple[str, ...]  # the names a request may use for the model; the first is listed
    metrics: Metrics


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return (f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg"))), where or None


async def _parse(request: Request, schema: type[BaseModel], limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise api.ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise api.ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise api.ApiError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise api.ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise api.ApiError(400, message, param=param) from None


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        try:
            yield
        finally:
            state.scheduler.stop()
            state.pool.close()

    app = FastAPI(title="l2kv-cpp", lifespan=lifespan, docs_url=None, redoc_url=None)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(api.ApiError)
    async def api_error(request: Request, exc: api.ApiError) -> JSONResponse:
        state.metrics.request(request.url.path, exc.status)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def check_model(name: str | None) -> str:
        if name and name not in state.model_ids:
            raise api.ApiError(404, f"the model '{name}' does not exist; this server has '{state.model_ids[0]}'",
                               param="model", code="model_not_found")  # fmt: skip
        return state.model_ids[0]

    async def next_event(queue: asyncio.Queue[Event], request: Request, job: Job) -> Event:
        """The next event of the job; a client that went away cancels it."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise _ClientGone from None

    async def start(request: Request, turn: TurnRequest) -> tuple[asyncio.Queue[Event], Job]:
        """Queue the turn and wait until its slot has accepted the prompt (errors are answered before any
        streaming starts, with their own status)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:  # (the worker thread)
            if isinstance(ev, Done):
                state.metrics.answered(ev)  # here, not where the answer is sent: also counts a client gone
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is closed (shutting down): nobody is listening
                job.cancelled.set()

        job = Job(turn, emit=emit)
        if not state.scheduler.submit(job):
            raise api.ApiError(503, "every slot is busy and the queue is full; retry later", code="queue_full")
        first = await next_event(queue, request, job)
        if isinstance(first, Failed):
            raise api.ApiError(first.status, first.message)
        assert isinstance(first, Started)
        return queue, job

    async def whole(request: Request, queue: asyncio.Queue[Event], job: Job) -> tuple[str, Done]:
        parts: list[str] = []
        while True:
            ev = await next_event(queue, request, job)
            if isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Done):
                return "".join(parts), ev
            elif isinstance(ev, Failed):
                raise api.ApiError(ev.status, ev.message)

    def stream(
        path: str,
        queue: asyncio.Queue[Event],
        job: Job,
        delta: Callable[[str], dict[str, Any]],
        final: Callable[[Done], dict[str, Any]],
        first: dict[str, Any] | None,
        include_usage: bool,
    ) -> EventSourceResponse:
        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                if first is not None:
                    yield {"data": json.dumps(first)}
                while True:
                    ev = await queue.get()
                    if isinstance(ev, Delta):
                        yield {"data": json.dumps(delta(ev.text))}
                    elif isinstance(ev, Done):
                        yield {"data": json.dumps(final(ev))}
                        if include_usage:
                            body = {**final(ev), "choices": [], "usage": api.usage(ev)}
                            yield {"data": json.dumps(body)}
                        break
                    elif isinstance(ev, Failed):
                        yield {"data": json.dumps(api.ApiError(ev.status, ev.message).body())}
                        break
                yield {"data": "[DONE]"}
            finally:
                job.cancelled.set()  # a client that went away stops the generation (no-op once done)

        state.metrics.request(path, 200)
        return EventSourceResponse(events(), sep="\n")

    def endpoint(
        schema: type[BaseModel], to_turn: Callable[..., TurnRequest], respond: Callable[..., Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            req = await _parse(request, schema, state.settings.max_body_bytes)
            model = check_model(req.model)
            limit = state.settings.max_tokens_limit
            turn = to_turn(req, state.sampling, state.n_predict, limit)
            if turn.chat and not state.pool.has_chat_template:
                raise api.ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
            try:
                queue, job = await start(request, turn)
                return await respond(request, req, model, queue, job)
            except _ClientGone:
                state.metrics.request(request.url.path, 499)
                return Response(status_code=499)

        return handle

    async def chat_response(request: Request, req: Any, model: str, queue: Any, job: Job) -> Response:
        rid = api.new_id("chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return stream(
                request.url.path,
                queue,
                job,
                lambda text: api.chat_chunk(rid, model, {"content": text}),
                lambda done: {**api.chat_chunk(rid, model, {}, api.finish_reason(done)), "l2kv": done.kv},
                api.chat_chunk(rid, model, {"role": "assistant", "content": ""}),
                include_usage,
            )
        text, done = await whole(request, queue, job)
        state.metrics.request(request.url.path, 200)
        return JSONResponse(api.chat_body(rid, model, text, done))

    async def completion_response(request: Request, req: Any, model: str, queue: Any, job: Job) -> Response:
        rid = api.new_id("cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return stream(
                request.url.path,
                queue,
                job,
                lambda text: api.completion_chunk(rid, model, text),
                lambda done: {**api.completion_chunk(rid, model, "", api.finish_reason(done)), "l2kv": done.kv},
                None,
                include_usage,
            )
        text, done = await whole(request, queue, job)
        state.metrics.request(request.url.path, 200)
        return JSONResponse(api.completion_body(rid, model, text, done))

    app.add_api_route(
        "/v1/chat/completions",
        endpoint(api.ChatCompletionRequest, api.chat_turn, chat_response),
        methods=["POST"],
    )
    app.add_api_route(
        "/v1/completions",
        endpoint(api.CompletionRequest, api.completion_turn, completion_response),
        methods=["POST"],
    )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": state.model_ids[0], "object": "model", "created": 0, "owned_by": "l2kv-cpp"}],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "slots_idle": len(state.pool.slots) - state.scheduler.busy_slots,
            "slots_processing": state.scheduler.busy_slots,
            "queue_length": state.scheduler.queue_length,
        }

    @app.get("/slots")
    async def slots() -> list[dict[str, Any]]:
        return [{**s.kv, "busy": s.busy, "n_requests": s.n_requests} for s in state.pool.slots]

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render(state.pool.slots, state.scheduler.queue_length)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app
