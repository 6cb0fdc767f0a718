#!/usr/bin/env python3
"""Perplexity by position over a text longer than the model's training context. Prints a table.

    python scripts/long_ppl.py                                   # SmolLM2 (8k context), 16384 tokens
    python scripts/long_ppl.py --tokens 65536 --budgets 1024,4096 --positions cache,original
    python scripts/long_ppl.py --reference full                  # beside one full cache of the whole text
    python scripts/long_ppl.py --recall off,lexical:128           # with and without recall (issue 18)

The essays stream through evicting contexts (each budget, policy and RoPE positions mode; n_batch 256).
The reference never leaves the training context: each bucket of --bucket tokens is scored in a fresh full
cache that first reads the --ref-context tokens before it. With original positions a kept key keeps the
rotation of its position in the text, so past the training context the distance from a new token to the
oldest kept keys (the sinks) is one the model never saw; with cache positions they stay inside the cache.
With --recall, every --recall-every tokens the archive is searched with the words of the text just read
(a recall during a long answer; the tokens still to be scored are never used).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import llama_cpp  # noqa: F401  (before numpy: see l2kv_cpp/_lib.py)
import numpy as np
from tabulate import tabulate

from l2kv_cpp._ffi import native
from l2kv_cpp.config import L2KVConfig
from l2kv_cpp.errors import L2KVError
from l2kv_cpp.eval.niah import corpus_text
from l2kv_cpp.eval.perplexity import run_perplexity, streaming_nll, text_tokens, windowed_reference_nll
from l2kv_cpp.gguf_file import read_gguf
from l2kv_cpp.models import resolve_model
from l2kv_cpp.recall import RecallSettings
from l2kv_cpp.session import open_tokenizer
from l2kv_cpp.upstream import cache_dir, sha256_file


def _reference_rows(args, path, tokens) -> None:
    """--reference full: the evicting runs beside one full cache of the whole length (the table of 2026-11-26)."""
    for policy in args.policies.split(","):
        for budget in _ints(args.budgets):
            for positions in args.positions.split(","):
                config = L2KVConfig(kv_budget=budget, n_sink=args.n_sink, policy=policy, positions=positions)
                r = run_perplexity(path, tokens, config, n_batch=256)
                rows = []
                for start in range(0, len(r.nll), args.bucket):
                    part = slice(start, start + args.bucket)
                    rows.append(
                        [
                            f"{start}-{min(start + args.bucket, len(r.nll))}",
                            f"{np.exp(r.nll_full[part].mean()):.2f}",
                            f"{np.exp(r.nll[part].mean()):.2f}",
                            f"{r.kld[part].mean():.3f}",
                        ]
                    )
                print(f"\npolicy {policy}, budget {budget}, {positions} positions, {r.n_evictions} evictions")
                headers = ["positions", "ppl full cache", "ppl evicting", "KL(full || evicting)"]
                print(tabulate(rows, headers=headers, tablefmt="github"))


def _reference(args, path, tokens: list[int]) -> np.ndarray:
    """The window reference's NLL, kept in the cache folder (it depends only on the model, the tokens, the
    bucket and the context before each bucket, and at 64k tokens it takes longer than the runs it scores)."""
    key = hashlib.sha256(
        f"{sha256_file(path)}|{args.bucket}|{args.ref_context}|".encode() + np.asarray(tokens, np.int32).tobytes()
    ).hexdigest()[:16]
    cached = cache_dir() / "long_ppl" / f"reference-{key}.npy"
    if cached.is_file():
        print(f"reference from {cached}", flush=True)
        return np.load(cached)
    ref = windowed_reference_nll(path, tokens, args.bucket, args.ref_context)
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.save(cached.with_suffix(".part.npy"), ref)
    cached.with_suffix(".part.npy").rename(cached)
    return ref


def _print_runs(args, runs: list[tuple[str, np.ndarray]]) -> None:
    """--reference none: perplexity per bucket of each run."""
    n = len(runs[0][1])
    rows = [
        [f"{s}-{min(s + args.bucket, n)}", *[f"{np.exp(nll[s : s + args.bucket].mean()):.2f}" for _, nll in runs]]
        for s in range(0, n, args.bucket)
    ]
    print(tabulate(rows, headers=["positions", *[name for name, _ in runs]], tablefmt="github"))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model name or GGUF path (default: smollm2)")
    ap.add_argument("--tokens", type=int, default=16384, help="length of the text in tokens")
    ap.add_argument("--budgets", default="1024", help="comma-separated KV budgets")
    ap.add_argument("--policies", default="window,key-diff", help="comma-separated policies")
    ap.add_argument("--positions", default="cache", help="comma-separated RoPE positions modes (cache, original)")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--n-recent", type=int, default=32, help="newest tokens never evicted")
    ap.add_argument("--bucket", type=int, default=2048, help="tokens per table row")
    ap.add_argument(
        "--reference",
        choices=("window", "full", "none"),
        default="window",
        help="window: each bucket scored in a fresh full cache holding the --ref-context tokens before it (never "
        "past the training context); full: one full cache of the whole text beside each run; none: the runs alone "
        "(beside a reference logged by an earlier run of the same tokens)",
    )
    ap.add_argument("--ref-context", type=int, default=4096, help="tokens before each bucket in the window reference")
    ap.add_argument("--cache-type", default="f16", help="K/V cache type of the evicting runs (the reference: f16)")
    ap.add_argument("--recall", default="off", help="comma-separated recall settings (off, lexical:128, ...)")
    ap.add_argument("--recall-every", type=int, default=512, help="tokens between recalls (a multiple of 256)")
    args = ap.parse_args()
    native().set_log(verbose=False)

    try:
        path = resolve_model(args.model)
    except L2KVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_ctx_train = read_gguf(path).n_ctx_train
    with open_tokenizer(path) as tok:
        tokens = text_tokens(tok, corpus_text(), args.tokens)
    print(
        f"{path.name} (training context {n_ctx_train}), {len(tokens)} tokens, n_sink {args.n_sink}, n_recent "
        f"{args.n_recent}, n_batch 256, "
        f"cache type {args.cache_type}"
    )
    t0 = time.time()
    if args.reference == "full":
        _reference_rows(args, path, tokens)
        print(f"done in {time.time() - t0:.0f} s")
        return 0

    ref = _reference(args, path, tokens) if args.reference == "window" else None
    print(f"reference: {time.time() - t0:.0f} s", flush=True)
    runs: list[tuple[str, np.ndarray]] = []
    for policy in args.policies.split(","):
        for budget in _ints(args.budgets):
            for positions in args.positions.split(","):
                for recall in args.recall.split(","):
                    t1 = time.time()
                    config = L2KVConfig(
                        kv_budget=budget,
                        n_sink=args.n_sink,
                        n_recent=args.n_recent,
                        policy=policy,
                        positions=positions,
                        recall=RecallSettings.parse(recall),
                    )
                    nll, n_ev = streaming_nll(
                        path, tokens, config, cache_type=args.cache_type, recall_every=args.recall_every
                    )
                    name = f"{policy} {budget} {positions}" + (f" recall {recall}" if recall != "off" else "")
                    runs.append((name, nll))
                    label = f"{policy}, budget {budget}, {positions} positions" + (
                        f", recall {recall}" if recall != "off" else ""
                    )
                    print(f"{label}: {n_ev} evictions, {time.time() - t1:.0f} s", flush=True)
    if ref is None:
        _print_runs(args, runs)
        print(f"done in {time.time() - t0:.0f} s")
        return 0
    rows = []
    worst = {name: 0.0 for name, _ in runs}
    for start in range(0, len(ref), args.bucket):
        part = slice(start, start + args.bucket)
        r = float(np.exp(ref[part].mean()))
        row = [f"{start}-{min(start + args.bucket, len(ref))}", f"{r:.2f}"]
        for name, nll in runs:
            v = float(np.exp(nll[part].mean()))
            worst[name] = max(worst[name], v / r - 1)
            row.append(f"{v:.2f} ({100 * (v / r - 1):+.0f}%)")
        rows.append(row)
    headers = ["positions", f"reference ({args.ref_context} before)", *[name for name, _ in runs]]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    for name, w in worst.items():
        print(f"{name}: worst bucket {100 * w:+.1f}% vs the reference")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
