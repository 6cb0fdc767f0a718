#!/usr/bin/env python3
"""Perplexity by position over a text longer than the model's training context. Prints a table.

    python scripts/long_ppl.py                                   # SmolLM2 (8k context), 16384 tokens
    python scripts/long_ppl.py --policies window --n-sink 0      # the recent window only

The essays stream through an evicting context (budget --budget, n_batch 256) and, in the same run, a
full-cache context of the whole length; the table gives each one's perplexity per --bucket tokens and
the mean KL divergence of the evicting run from the full one. Eviction bounds memory, not the RoPE
distances: a kept key keeps the rotation of its original position, so past the training context the
distance from a new token to the oldest kept keys (the sinks) is one the model never saw.
"""

from __future__ import annotations

import argparse
import sys
import time

import llama_cpp  # noqa: F401  (before numpy: see l2kv_cpp/_lib.py)
import numpy as np
from tabulate import tabulate

from l2kv_cpp._ffi import native
from l2kv_cpp.config import L2KVConfig
from l2kv_cpp.eval.niah import corpus_text
from l2kv_cpp.eval.perplexity import run_perplexity, text_tokens
from l2kv_cpp.gguf_file import read_gguf
from l2kv_cpp.models import resolve_model
from l2kv_cpp.session import open_tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model name or GGUF path (default: smollm2)")
    ap.add_argument("--tokens", type=int, default=16384, help="length of the text in tokens")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--policies", default="window,key-diff", help="comma-separated policies")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--bucket", type=int, default=2048, help="tokens per table row")
    args = ap.parse_args()
    native().set_log(verbose=False)

    path = resolve_model(args.model)
    n_ctx_train = read_gguf(path).n_ctx_train
    with open_tokenizer(path) as tok:
        tokens = text_tokens(tok, corpus_text(), args.tokens)
    t0 = time.time()
    for policy in args.policies.split(","):
        config = L2KVConfig(kv_budget=args.budget, n_sink=args.n_sink, policy=policy)
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
        print(
            f"\n{path.name} (training context {n_ctx_train}), {len(tokens)} tokens, policy {policy}, "
            f"budget {args.budget}, n_sink {args.n_sink}, {r.n_evictions} evictions"
        )
        headers = ["positions", "ppl full cache", "ppl evicting", "KL(full || evicting)"]
        print(tabulate(rows, headers=headers, tablefmt="github"))
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
