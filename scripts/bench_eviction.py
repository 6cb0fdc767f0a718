#!/usr/bin/env python3
"""Benchmark of L2 eviction: norm overhead, eviction cost, decode speed at depth. Prints a table.

    python scripts/bench_eviction.py                       # SmolLM2 (default model) and a tiny model
    python scripts/bench_eviction.py --model gemma3-270m --budget 512 --repeats 3

All ratios are measured in one run, on the same context settings:
  1. norm overhead: prompt and generation tokens/s with eviction off vs on with a budget the run
     never reaches (the norm nodes are the only difference);
  2. eviction cost: time per eviction event and its share of decode time, while decoding
     --gen-tokens tokens one at a time past the budget (one eviction per n_batch tokens);
  3. depth: decode tokens/s after a prompt of 8x the budget divided by decode tokens/s after a
     prompt of 1x the budget (both with eviction on);
  4. the cost of each policy's scorer: library time per eviction event while decoding past the
     budget, split into features (norm read-back, key cosines) / ranking / moves, and the wall
     time the evicting decode calls took beyond a plain decode call. With --events-in-prefill the
     events come from decoding n_batch-token chunks past the budget instead (one event per chunk;
     fast enough for the 1B shape on a CPU), and the last column is the share of a chunk's time.

    python scripts/bench_eviction.py --synthetic llama-3.2-1b --budget 4096 --batch 512 \\
        --policies-only --events-in-prefill --no-tiny
    python scripts/bench_eviction.py --synthetic llama-3.2-1b --gpu-layers -1 --budget 4096 --batch 512 \\
        --no-tiny                                         # on a GPU build: every layer offloaded
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402  (before numpy-heavy imports, see l2kv_cpp/_lib.py)
import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

from l2kv_cpp import cache  # noqa: E402
from l2kv_cpp._ffi import native  # noqa: E402
from l2kv_cpp.config import L2KVConfig, Policy  # noqa: E402
from l2kv_cpp.decode import decode  # noqa: E402
from l2kv_cpp.gguf_file import read_gguf  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.tiny_model import SYNTHETIC_SHAPES, TinyModelConfig, write_tiny_model  # noqa: E402
from l2kv_cpp.upstream import cache_dir  # noqa: E402


def synthetic_model(name: str) -> Path:
    """The random-weight Q4_0 model of a benchmark shape (SYNTHETIC_SHAPES), written once into the model cache."""
    path = cache_dir() / "models" / f"synthetic-{name}-q4_0.gguf"
    if not path.is_file():
        print(f"writing {path} (random Q4_0 weights in the shape of {name}) ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        write_tiny_model(tmp, SYNTHETIC_SHAPES[name])
        tmp.rename(path)
    return path


@dataclass(frozen=True)
class Backend:
    """Where the contexts run: CPU threads (None = llama.cpp's default) and layers offloaded to a GPU."""

    threads: int | None = None
    gpu_layers: int = 0


def make(model: Path, n_ctx: int, n_batch: int, backend: Backend):
    return llama_cpp.Llama(
        model_path=str(model),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        flash_attn=True,
        n_gpu_layers=backend.gpu_layers,
        n_threads=backend.threads,
        n_threads_batch=backend.threads,
        verbose=False,
    )


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(10, min(vocab, 30000), size=n).tolist()


def decode_one_by_one(llm, pos0: int, n: int) -> tuple[list[float], list[float], float]:
    """Decode n fixed tokens one at a time from position pos0: the seconds of the calls that did not
    evict, of those that evicted, and of all of them (stock contexts report no eviction)."""
    plain, evicting = [], []
    n_ev = cache.stats(llm.ctx).n_evictions
    t_start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        decode(llm, [100 + i % 50], pos0 + i)
        dt = time.perf_counter() - t
        n_now = cache.stats(llm.ctx).n_evictions
        (evicting if n_now > n_ev else plain).append(dt)
        n_ev = n_now
    return plain, evicting, time.perf_counter() - t_start


def timed_prompt_and_gen(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) feeding fixed tokens (no sampling cost)."""
    t0 = time.perf_counter()
    decode(llm, prompt, 0)
    t1 = time.perf_counter()
    pos = len(prompt)
    for i in range(gen):
        decode(llm, [prompt[i % len(prompt)]], pos + i)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), gen / (t2 - t1)


def bench_model(name: str, model: Path, budget: int, n_batch: int, gen: int, repeats: int, backend: Backend):
    vocab = read_gguf(model).n_vocab
    rows = []
    # 1. norm overhead, no eviction: the same context size, eviction off vs on (budget never reached)
    prompt = tokens(2 * n_batch, 1, vocab)
    n_ctx = 2 * n_batch + gen + n_batch + 256
    res = {False: [], True: []}
    for _ in range(repeats):
        for on in (False, True):
            llm = make(model, n_ctx, n_batch, backend)
            if on:
                cache.enable(llm.ctx, L2KVConfig(kv_budget=n_ctx - n_batch))
            res[on].append(timed_prompt_and_gen(llm, prompt, gen))
            if on:
                assert cache.stats(llm.ctx).n_evictions == 0
            llm.close()
    for i, what in enumerate(("prompt", "generation")):
        off = statistics.median(r[i] for r in res[False])
        on = statistics.median(r[i] for r in res[True])
        rows.append(
            [
                name,
                f"{what} t/s, norms off / on",
                f"{off:.1f} / {on:.1f}",
                f"{100 * (off - on) / off:+.2f}%",
                "overhead < 2%",
            ]
        )

    # 2 + 3. eviction cost and depth ratio, eviction on
    speeds = {}
    for depth in (budget, 8 * budget):
        llm = make(model, budget + n_batch, n_batch, backend)
        cache.enable(llm.ctx, L2KVConfig(kv_budget=budget))
        decode(llm, tokens(depth, 2, vocab), 0)
        before = cache.stats(llm.ctx)
        _, _, dt = decode_one_by_one(llm, depth, gen if depth == budget else max(gen, 2 * n_batch))
        after = cache.stats(llm.ctx)
        n_gen = after.pos_max + 1 - depth
        speeds[depth] = n_gen / dt
        if depth == 8 * budget:
            n_ev = after.n_evictions - before.n_evictions
            t_ev = after.t_evict_ms - before.t_evict_ms
            per = t_ev / n_ev if n_ev else 0.0
            rows.append(
                [
                    name,
                    "eviction time per event (decode)",
                    f"{per:.2f} ms ({n_ev} events)",
                    f"{100 * t_ev / 1000 / dt:.2f}% of decode",
                    "amortized < 2%",
                ]
            )
            rows.append(
                [
                    name,
                    f"prompt of {depth} tokens with eviction",
                    f"{after.n_evictions} evictions total",
                    f"{after.t_evict_ms:.0f} ms evicting",
                    "",
                ]
            )
        llm.close()
    ratio = speeds[8 * budget] / speeds[budget]
    rows.append(
        [
            name,
            f"decode t/s at depth {8 * budget} / depth {budget}",
            f"{speeds[8 * budget]:.1f} / {speeds[budget]:.1f}",
            f"{ratio:.3f}",
            "ratio >= 0.9",
        ]
    )
    return rows


def bench_policies(
    name: str,
    model: Path,
    budget: int,
    n_batch: int,
    backend: Backend,
    events: int = 6,
    in_prefill: bool = False,
    positions: str = "cache",
):
    vocab = read_gguf(model).n_vocab
    rows = []
    for policy in Policy:
        llm = make(model, budget + n_batch, n_batch, backend)
        cache.enable(llm.ctx, L2KVConfig(kv_budget=budget, policy=policy, positions=positions))
        prompt = tokens(budget + events * n_batch, 2, vocab)
        decode(llm, prompt[:budget], 0)
        s0 = cache.stats(llm.ctx)
        if in_prefill:
            t0 = time.perf_counter()
            for p in range(budget, len(prompt), n_batch):
                decode(llm, prompt[p : p + n_batch], p)
            chunk_s = (time.perf_counter() - t0) / events
        else:
            plain, evicting, _ = decode_one_by_one(llm, budget, events * n_batch)
        s1 = cache.stats(llm.ctx)
        llm.close()
        n = s1.n_evictions - s0.n_evictions

        def per(field: str, s0=s0, s1=s1, n=n) -> float:
            return (getattr(s1, field) - getattr(s0, field)) / n

        if in_prefill:
            share = 100 * per("t_evict_ms") / 1e3 / chunk_s
            result = f"{share:.2f}% of a {n_batch}-token chunk ({1e3 * chunk_s:.0f} ms)"
        else:
            wall = 1e3 * (statistics.median(evicting) - statistics.median(plain))
            result = f"wall {wall:.2f} ms; {100 * wall / 1e3 / (n_batch * statistics.median(plain)):.2f}% of decode"
        rows.append(
            [
                name,
                f"eviction per event, {policy.cli_name}, {positions} positions",
                f"{per('t_evict_ms'):.2f} ms = {per('t_feature_ms'):.2f} + {per('t_rank_ms'):.2f} + "
                f"{per('t_move_ms'):.2f} + {per('t_rotate_ms'):.2f} ({n} events)",
                result,
                "features + rank + move + re-rotation",
            ]
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model name or GGUF path (default: smollm2)")
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC_SHAPES), help="a random Q4_0 model of this shape instead")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256, help="n_batch = n_ubatch")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gpu-layers", type=int, default=0, help="-1 offloads every layer (GPU builds)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny random model")
    ap.add_argument("--policies-only", action="store_true", help="only part 4, the cost of each policy")
    ap.add_argument("--positions", default="cache", help="part 4: RoPE positions modes, comma-separated")
    ap.add_argument(
        "--events-in-prefill",
        action="store_true",
        help="part 4: evict between n_batch-token chunks instead of single decoded tokens",
    )
    args = ap.parse_args()
    # llama.cpp's log filtered in C: llama-cpp-python's Python log callback would add its calls to the timings
    native().set_log(verbose=False)

    model = synthetic_model(args.synthetic) if args.synthetic else resolve_model(args.model)
    name = args.synthetic or args.model
    backend = Backend(args.threads, args.gpu_layers)
    rows = (
        []
        if args.policies_only
        else bench_model(name, model, args.budget, args.batch, args.gen_tokens, args.repeats, backend)
    )
    for positions in args.positions.split(","):
        rows += bench_policies(
            name, model, args.budget, args.batch, backend, in_prefill=args.events_in_prefill, positions=positions
        )
    if not args.no_tiny:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = write_tiny_model(Path(tmp) / "tiny.gguf", TinyModelConfig(n_layer=8, head_dim=64, n_ff=512))
            name = "tiny (8L, 4H/2KV, d64)"
            if not args.policies_only:
                rows += bench_model(name, tiny, args.budget, args.batch, args.gen_tokens, args.repeats, backend)
            rows += bench_policies(name, tiny, args.budget, args.batch, backend, in_prefill=args.events_in_prefill)
    print(tabulate(rows, headers=["model", "measure", "values", "result", "target"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
