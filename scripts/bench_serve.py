#!/usr/bin/env python3
"""Load on `l2kv-cpp serve` (issue 20): requests/s, tokens/s and latency at 1, 2 and 4 slots with 8 and 32
concurrent chat clients, RSS before and after a long load, and the same load on llama-cpp-python's own
server (`python -m llama_cpp.server`, one sequence) as the reference. Prints tables.

    python scripts/bench_serve.py                          # SmolLM2, 60 s per cell, a 600 s soak at 2 slots
    python scripts/bench_serve.py --duration 20 --soak 0 --no-reference

Every client holds multi-turn conversations: an essay excerpt and a question, then two follow-ups that send
the whole chat back (so a slot that kept the chat only processes the new turn), then a new conversation.
Answers are greedy, at most --max-tokens tokens. A cell stops issuing requests after --duration seconds and
waits for those in flight; a 503 (queue full) is counted and retried after its Retry-After.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l2kv_cpp.eval.niah import corpus_text  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402

QUESTIONS = ("Summarize this text in two sentences.", "What is the main claim?", "Give one example from it.")


@dataclass
class CellResult:
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    rejected: int = 0  # 503 answers (retried)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def excerpts(n: int, chars: int = 1200) -> list[str]:
    text = corpus_text()
    step = max(1, (len(text) - chars) // n)
    return [text[i * step : i * step + chars] for i in range(n)]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def start_ours(model: Path, port: int, slots: int, budget: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "l2kv_cpp.cli", "serve", str(model), "--port", str(port), "-np", str(slots)]
    cmd += ["--kv-budget", str(budget), "--queue", "256"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_reference(model: Path, port: int, n_ctx: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--n_ctx", str(n_ctx), "--flash_attn", "true"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def client_loop(
    http: httpx.AsyncClient, url: str, cid: int, docs: list[str], end: float, max_tokens: int, res: CellResult
) -> None:
    conv = 0
    while time.monotonic() < end:
        doc = docs[(cid * 7 + conv) % len(docs)]
        messages = [{"role": "user", "content": f"{doc}\n\n{QUESTIONS[0]}"}]
        for turn in range(len(QUESTIONS)):
            if time.monotonic() >= end:
                return
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
            while True:
                t0 = time.monotonic()
                try:
                    r = await http.post(url + "/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    res.errors.append(repr(exc))
                    return
                if r.status_code == 503:
                    res.rejected += 1
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                    continue
                break
            if r.status_code != 200:
                res.errors.append(f"{r.status_code} {r.text[:200]}")
                return
            data = r.json()
            res.latencies.append(time.monotonic() - t0)
            usage = data["usage"]
            res.completion_tokens += usage["completion_tokens"]
            res.prompt_tokens += usage["prompt_tokens"]
            res.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            answer = data["choices"][0]["message"]["content"]
            if turn + 1 < len(QUESTIONS):
                messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[turn + 1]}]
        conv += 1


async def run_cell(url: str, n_clients: int, duration: float, max_tokens: int, docs: list[str]) -> CellResult:
    res = CellResult()
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as http:
        end = t0 + duration
        await asyncio.gather(*(client_loop(http, url, c, docs, end, max_tokens, res) for c in range(n_clients)))
    res.wall_s = time.monotonic() - t0
    return res


def row(name: str, slots: str, clients: int, r: CellResult) -> list[str]:
    lat = sorted(r.latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return [
        name,
        slots,
        str(clients),
        str(len(lat)),
        f"{len(lat) / r.wall_s:.2f}",
        f"{r.completion_tokens / r.wall_s:.1f}",
        f"{statistics.median(lat) if lat else float('nan'):.2f}",
        f"{p(0.99):.2f}",
        f"{100 * r.cached_tokens / max(1, r.prompt_tokens):.0f}%",
        str(r.rejected),
        str(len(r.errors)),
        f"{r.wall_s:.0f}",
    ]


HEADERS = ["server", "slots", "clients", "requests", "req/s", "gen tok/s", "p50 s", "p99 s", "prompt cached",
           "503s", "errors", "wall s"]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--slots", default="1,2,4")
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--duration", type=float, default=60, help="seconds of new requests per cell")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--kv-budget", type=int, default=1024)
    ap.add_argument("--soak", type=float, default=600, help="seconds of RSS soak (0 = none)")
    ap.add_argument("--soak-slots", type=int, default=2)
    ap.add_argument("--soak-clients", type=int, default=8)
    ap.add_argument("--port", type=int, default=18180)
    ap.add_argument("--no-reference", action="store_true", help="skip llama-cpp-python's server")
    args = ap.parse_args()
    model = resolve_model(args.model)
    docs = excerpts(64)
    url = f"http://127.0.0.1:{args.port}"
    clients = [int(x) for x in args.clients.split(",")]
    rows = []
    print(f"{model.name}: kv budget {args.kv_budget} per slot, {args.max_tokens} tokens per answer, "
          f"{args.duration:.0f} s per cell", flush=True)  # fmt: skip
    for slots in [int(x) for x in args.slots.split(",")]:
        proc = start_ours(model, args.port, slots, args.kv_budget)
        try:
            wait_ready(url, proc)
            for n in clients:
                r = asyncio.run(run_cell(url, n, args.duration, args.max_tokens, docs))
                rows.append(row("l2kv-cpp serve", str(slots), n, r))
                print(tabulate([rows[-1]], headers=HEADERS, tablefmt="github"), flush=True)
                if r.errors:
                    print("  first error:", r.errors[0], flush=True)
        finally:
            proc.terminate()
            proc.wait()
    if not args.no_reference:
        proc = start_reference(model, args.port, 4096)
        try:
            wait_ready(url, proc)
            for n in clients:
                r = asyncio.run(run_cell(url, n, args.duration, args.max_tokens, docs))
                rows.append(row("llama_cpp.server", "1 (one sequence)", n, r))
                print(tabulate([rows[-1]], headers=HEADERS, tablefmt="github"), flush=True)
                if r.errors:
                    print("  first error:", r.errors[0], flush=True)
        finally:
            proc.terminate()
            proc.wait()
    print()
    print(tabulate(rows, headers=HEADERS, tablefmt="github"))
    if args.soak > 0:
        proc = start_ours(model, args.port, args.soak_slots, args.kv_budget)
        try:
            wait_ready(url, proc)
            before = rss_mib(proc.pid)
            warm = asyncio.run(run_cell(url, args.soak_clients, 60, args.max_tokens, docs))
            after_warmup = rss_mib(proc.pid)
            samples = []
            t0 = time.monotonic()
            total = CellResult()
            while time.monotonic() - t0 < args.soak:
                r = asyncio.run(run_cell(url, args.soak_clients, 60, args.max_tokens, docs))
                total.latencies += r.latencies
                total.errors += r.errors
                samples.append(rss_mib(proc.pid))
                print(f"  soak {time.monotonic() - t0:5.0f} s: RSS {samples[-1]:.1f} MiB, {len(r.latencies)} requests",
                      flush=True)  # fmt: skip
            end = samples[-1] if samples else after_warmup
            print(
                f"\nsoak: {args.soak_slots} slots, {args.soak_clients} clients, {args.soak:.0f} s after a 60 s warm-up "
                f"({len(warm.latencies)} requests): RSS {before:.1f} MiB idle, {after_warmup:.1f} after warm-up, "
                f"{end:.1f} at the end ({100 * (end / after_warmup - 1):+.2f}%), max {max(samples, default=end):.1f}; "
                f"{len(total.latencies)} requests, {len(total.errors)} errors"
            )
        finally:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
