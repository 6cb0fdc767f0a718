#!/usr/bin/env python3
"""Soak (issue 21): a long stream through eviction at constant memory. Prints one line per sample and a verdict.

    python scripts/soak.py                                  # tiny random model, 1M tokens per policy
    python scripts/soak.py --model smollm2 --tokens 100000 --policies key-diff
    python scripts/soak.py --recall lexical:128:disk        # with the archive (in a temporary file)

Prompt chunks (1 to 4 batches) and answers (1 to 16 tokens, greedy) alternate; every --sample tokens the
process's RSS, the cache's cells and its largest RoPE position are read. Checks: the cells never exceed
budget + slack, every answer has at least one token, and RSS after warm-up (the first sample) grows by less
than --max-growth. The archive of evicted entries grows with the stream by design (in RAM unless ':disk'),
so recall is off unless asked.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402,F401  (libllama before numpy)

from l2kv_cpp.config import L2KVConfig, Policy  # noqa: E402
from l2kv_cpp.eval.niah import corpus_text  # noqa: E402
from l2kv_cpp.generate import generate_step  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.recall import RecallSettings  # noqa: E402
from l2kv_cpp.sampling import SamplingSettings  # noqa: E402
from l2kv_cpp.session import L2KVModel, ModelSettings  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(path: Path, policy: str, args: argparse.Namespace, text_tokens: list[int]) -> bool:
    config = L2KVConfig(
        kv_budget=args.budget, policy=policy, recall=RecallSettings.parse(args.recall), positions=args.positions
    )
    settings = ModelSettings(n_batch=args.batch, n_ubatch=args.batch)
    rng = random.Random(0)
    greedy = SamplingSettings(temperature=0)
    ok = True
    with L2KVModel(path, settings, config) as m:
        limit = config.max_cells(args.batch)
        done, next_sample, i = 0, args.sample, 0
        first_rss: float | None = None
        t0 = time.monotonic()
        n_answers = 0
        while done < args.tokens:
            n = rng.randint(1, 4 * args.batch)
            chunk = [text_tokens[(i + k) % len(text_tokens)] for k in range(n)]
            i += n
            m.feed(chunk)
            answer = list(generate_step(m, [], greedy, rng.randint(1, 16)))
            n_answers += 1
            if not answer:
                print(f"  FAIL: answer {n_answers} produced no token", flush=True)
                ok = False
            done += n + len(answer)
            st = m.stats()
            if st.n_cells_used > limit:
                print(f"  FAIL: {st.n_cells_used} cells > budget + slack {limit}", flush=True)
                ok = False
            if done >= next_sample:
                next_sample += args.sample
                rss = rss_mib()
                if first_rss is None:
                    first_rss = rss
                print(
                    f"  {policy:14s} {done:9d} tokens  RSS {rss:8.1f} MiB ({100 * (rss / first_rss - 1):+6.2f}%)  "
                    f"cells {st.n_cells_used:5d}/{limit}  RoPE pos max {st.rope_pos_max:6d}  "
                    f"evictions {st.n_evictions:6d}  {done / (time.monotonic() - t0):7.0f} t/s",
                    flush=True,
                )
        final = rss_mib()
        growth = final / first_rss - 1 if first_rss else 0.0
        verdict = growth < args.max_growth
        print(
            f"{policy}: {done} tokens, {n_answers} answers, RSS {first_rss:.1f} -> {final:.1f} MiB after warm-up "
            f"({100 * growth:+.2f}%, limit {100 * args.max_growth:.0f}%): {'ok' if verdict and ok else 'FAIL'}",
            flush=True,
        )
        return ok and verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (a random model written to a temporary file) or a model")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="tokens per policy")
    ap.add_argument("--policies", default=",".join(p.cli_name for p in Policy))
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sample", type=int, default=10_000, help="tokens between samples")
    ap.add_argument("--recall", default="off")
    ap.add_argument("--positions", default="cache")
    ap.add_argument("--max-growth", type=float, default=0.01, help="largest RSS growth after warm-up")
    args = ap.parse_args()
    if args.model == "tiny":
        from l2kv_cpp.tiny_model import write_tiny_model

        path = write_tiny_model(Path(tempfile.mkdtemp(prefix="l2kv-soak-")) / "tiny.gguf")
    else:
        path = resolve_model(args.model)
    with L2KVModel(path, ModelSettings(n_batch=args.batch, n_ubatch=args.batch), None) as tok:
        text_tokens = tok.tokenize(corpus_text()[:400_000], add_bos=False, special=False)
    print(f"{path.name}: {args.tokens} tokens per policy, budget {args.budget}, batch {args.batch}, "
          f"recall {args.recall}, positions {args.positions}", flush=True)  # fmt: skip
    results = [soak(path, p, args, text_tokens) for p in args.policies.split(",")]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
