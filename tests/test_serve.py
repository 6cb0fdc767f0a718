"""`l2kv-cpp serve`: the OpenAI API through the official `openai` client and raw HTTP, slots, errors, metrics.

Every server is started by its fixture as `l2kv-cpp serve` on 127.0.0.1 with a free port, and stopped (Ctrl-C)
at the end, which must exit cleanly.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "l2kv_cpp.cli"]
PROMPTS = [f"{chr(ord('a') + i)} question {i}: what comes next?" for i in range(16)]  # differ at the first token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path | str, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*CLI, "serve", str(model), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health within 120 s")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def post(self, path: str, body: object, **kwargs: object) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120, **kwargs)  # type: ignore[arg-type]

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        m = re.search(rf"^l2kv_{name}{re.escape(labels)} (\S+)$", text, re.M)
        assert m, f"l2kv_{name}{labels} not in /metrics"
        return float(m.group(1))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the server did not stop within 30 s of Ctrl-C") from None
        return self.proc.stdout.read()  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def tiny_server(tiny_model: Path) -> Iterator[Server]:
    """Two slots, budget 64: every prompt below evicts."""
    server = Server(tiny_model, "-np", "2", "--kv-budget", "64", "-b", "32", "-ub", "32", "--max-prompt-tokens", "400")
    yield server
    out = server.stop()
    assert server.proc.returncode == 0, out
    assert "Traceback" not in out, out


def _complete(server: Server, prompt: str, max_tokens: int = 24) -> str:
    r = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def test_completion_stream_equals_whole_and_counts_tokens(tiny_server: Server) -> None:
    client = tiny_server.client()
    prompt = "the quick brown fox " * 12  # past the budget of 64
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 40
    assert whole.usage.prompt_tokens > 64
    kv = whole.model_extra["l2kv"]
    assert kv["evictions"] > 0 and kv["cells"] <= kv["kv_budget"] + 32  # the budget + the slack (-b 32)
    pieces = []
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
    assert "".join(pieces) == whole.choices[0].text
    assert len(pieces) > 10  # streamed token by token, not in one piece


def test_stop_strings_end_the_answer_and_are_not_shown(tiny_server: Server) -> None:
    full = _complete(tiny_server, PROMPTS[0], 40)
    stop = full[10:13]
    assert stop.strip(), f"no usable stop string in {full!r}"
    client = tiny_server.client()
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop], stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_sixteen_clients_on_two_slots_get_the_answers_they_get_alone(tiny_server: Server) -> None:
    alone = [_complete(tiny_server, p) for p in PROMPTS]
    assert len(set(alone)) > 1  # the prompts lead somewhere different
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            got[i] = _complete(tiny_server, PROMPTS[i])
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [got[i] for i in range(len(PROMPTS))] == alone
    assert tiny_server.metric("slots_busy") == 0
    assert tiny_server.metric("queue_length") == 0


def test_a_continued_prompt_processes_only_its_new_tokens(tiny_server: Server) -> None:
    client = tiny_server.client()
    first = client.completions.create(model="tiny", prompt=PROMPTS[3] * 2, max_tokens=8, temperature=0)
    before = tiny_server.metric("prompt_tokens_processed_total")
    prompt = PROMPTS[3] * 2 + first.choices[0].text + " and then?"
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # the first prompt was not read again
    processed = tiny_server.metric("prompt_tokens_processed_total") - before
    assert processed == second.usage.prompt_tokens - cached
    # the same from the slot's decode loop: tokens decoded for the second request, less those generated
    decoded = second.model_extra["l2kv"]["tokens_decoded"] - first.model_extra["l2kv"]["tokens_decoded"]
    assert second.model_extra["l2kv"]["slot"] == first.model_extra["l2kv"]["slot"]
    assert decoded - second.usage.completion_tokens == processed
    assert processed <= len(" and then?") + first.usage.completion_tokens  # at most the text after the first prompt


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400),
        ("/v1/completions", {"prompt": ""}, 400),
        ("/v1/completions", {"max_tokens": 4}, 400),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404),
        ("/v1/completions", {"prompt": "word " * 500, "max_tokens": 4}, 413),
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400),  # no chat template
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400),
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_stays_healthy(
    tiny_server: Server, path: str, body: object, status: int
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(tiny_server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = tiny_server.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert httpx.get(tiny_server.url + "/health", timeout=10).json()["status"] == "ok"
    assert _complete(tiny_server, PROMPTS[1], 4)  # still answers


def test_a_body_past_the_limit_is_refused_before_it_is_parsed(tiny_server: Server) -> None:
    r = httpx.post(
        tiny_server.url + "/v1/completions",
        content=b"x" * (16 * 2**20 + 1),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_a_client_that_goes_away_stops_its_generation(tiny_server: Server) -> None:
    before = tiny_server.metric("cancelled_total")
    body = {"prompt": PROMPTS[5], "max_tokens": 30000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
    deadline = time.monotonic() + 30
    while tiny_server.metric("cancelled_total") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tiny_server.metric("cancelled_total") == before + 1
    assert tiny_server.metric("slots_busy") == 0


def test_ignore_eos_gives_answers_of_exactly_max_tokens(tiny_server: Server) -> None:
    free = tiny_server.client().completions.create(model="tiny", prompt=PROMPTS[6], max_tokens=30000, temperature=0)
    assert free.choices[0].finish_reason == "stop"  # this random model ends its answers by itself
    n = free.usage.completion_tokens + 50
    body = {"prompt": PROMPTS[6], "max_tokens": n, "temperature": 0, "ignore_eos": True}
    r = tiny_server.post("/v1/completions", body).json()
    assert r["usage"]["completion_tokens"] == n and r["choices"][0]["finish_reason"] == "length"


def test_the_server_keeps_serving_through_killed_clients_and_bad_requests_under_load(tiny_server: Server) -> None:
    """12 clients at once: 4 stream and hang up after a few tokens, 4 send malformed bodies, 4 ask properly;
    the proper ones get the answers they get alone, and the server is idle and healthy afterwards."""
    alone = {i: _complete(tiny_server, PROMPTS[i], 16) for i in (8, 9, 10, 11)}
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def proper(i: int) -> None:
        got[i] = _complete(tiny_server, PROMPTS[i], 16)

    def hang_up(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": 30000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)

    def malformed(i: int) -> None:
        r = httpx.post(tiny_server.url + "/v1/completions", content=b'{"prompt": "x", "max_tokens": [', timeout=60)
        assert r.status_code == 400

    def run(fn, i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    jobs = [(hang_up, i) for i in range(4)] + [(malformed, i) for i in range(4)] + [(proper, i) for i in alone]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert got == alone
    deadline = time.monotonic() + 30
    while tiny_server.metric("slots_busy") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tiny_server.metric("slots_busy") == 0 and tiny_server.metric("queue_length") == 0
    assert httpx.get(tiny_server.url + "/health", timeout=10).json()["status"] == "ok"


def test_metrics_and_models(tiny_server: Server) -> None:
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    _complete(tiny_server, PROMPTS[2], 4)
    assert tiny_server.metric("requests_total", '{endpoint="/v1/completions",status="200"}') >= 1
    assert tiny_server.metric("completion_tokens_total") >= 4
    for slot in (0, 1):
        assert tiny_server.metric("kv_bytes", f'{{slot="{slot}"}}') >= 0
    page = httpx.get(tiny_server.url + "/", timeout=10)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_a_full_queue_answers_503_with_retry_after(tiny_model: Path) -> None:
    server = Server(tiny_model, "-np", "1", "--queue", "0", "--kv-budget", "64", "-b", "32", "-ub", "32")
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 30000, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # (kept: a dropped generator closes the response, and the server cancels)
            first = next(lines)  # the only slot is busy
            assert first.startswith("data: {") and "error" not in first, first
            busy = server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert busy.status_code == 503, (busy.text, httpx.get(server.url + "/health").text)
            assert busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
    finally:
        out = server.stop()
    assert server.proc.returncode == 0, out


@pytest.mark.slow
def test_smollm2_chat_answers_as_llama_cpp_python_and_reuses_the_first_turn(smollm2_path: Path) -> None:
    """A budget larger than the conversation: the answer is create_chat_completion's (greedy); the second
    turn processes only its own tokens; streaming gives the same text."""
    from llama_cpp import Llama

    question = "What is the capital of France? Answer in one word."
    messages = [{"role": "user", "content": question}]
    llm = Llama(str(smollm2_path), n_ctx=2048, flash_attn=True, verbose=False)
    try:
        ref = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=24)["choices"][0]["message"]
    finally:
        llm.close()
    server = Server(smollm2_path, "--kv-budget", "1024", "-np", "2")
    try:
        client = server.client()
        first = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24)
        assert first.choices[0].message.content == ref["content"]
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="smollm2", messages=messages, temperature=0, max_tokens=24, stream=True
            )
        )
        assert streamed == ref["content"]
        follow = [
            *messages,
            {"role": "assistant", "content": ref["content"]},
            {"role": "user", "content": "And Italy?"},
        ]
        second = client.chat.completions.create(model="smollm2", messages=follow, temperature=0, max_tokens=24)
        assert second.choices[0].message.content
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens, (cached, first.usage)
        assert second.usage.prompt_tokens - cached < 20  # "And Italy?" and the template around it
        kv1, kv2 = first.model_extra["l2kv"], second.model_extra["l2kv"]
        assert kv2["slot"] == kv1["slot"]  # (the streamed request between them started over on the other slot)
        assert 0 < kv2["tokens_decoded"] - kv1["tokens_decoded"] - second.usage.completion_tokens < 20
    finally:
        out = server.stop()
    assert server.proc.returncode == 0, out


def test_serve_ignore_eos_is_the_default_a_request_can_override() -> None:
    from l2kv_cpp.sampling import SamplingSettings
    from l2kv_cpp.serve.api import CompletionRequest, completion_turn

    on = SamplingSettings(ignore_eos=True)
    assert completion_turn(CompletionRequest(prompt="a"), on, 16, 64).sampling.ignore_eos
    assert not completion_turn(CompletionRequest(prompt="a", ignore_eos=False), on, 16, 64).sampling.ignore_eos
    assert not completion_turn(CompletionRequest(prompt="a"), SamplingSettings(), 16, 64).sampling.ignore_eos
