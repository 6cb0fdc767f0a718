#!/usr/bin/env python3
"""What recall costs (issue 18): time per user turn against that turn's prefill, archive bytes per
evicted token, and decode speed with and without recall, in one run.

    python scripts/bench_recall.py                       # SmolLM2, an 8192-token document in 1024 entries
    python scripts/bench_recall.py --n-doc 2048 --budget 512

A document of essays streams into the cache (with one needle, so that one question has its fact
to find), then a few questions are asked, each once with recall off and once with it on (a fresh
context per setting, the same document); per turn: the recall's time (span choice in Python + the
native recall), the turn's prefill time, and the decode speed of its answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402,F401  (load libllama before numpy-heavy modules)

from l2kv_cpp import archive, cache  # noqa: E402
from l2kv_cpp.chat import Conversation  # noqa: E402
from l2kv_cpp.config import L2KVConfig  # noqa: E402
from l2kv_cpp.eval import niah  # noqa: E402
from l2kv_cpp.eval.tasks import niah_document  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.recall import RecallSettings  # noqa: E402
from l2kv_cpp.sampling import SamplingSettings  # noqa: E402
from l2kv_cpp.session import L2KVModel, ModelSettings, open_tokenizer  # noqa: E402

QUESTIONS = (
    niah.CHAT_QUESTION,
    "What does the author say about startups and investors?",
    "Summarize the last paragraph in one sentence.",
)


def run(path: Path, doc: str, recall: str, budget: int, n_predict: int, n_batch: int) -> list[dict[str, float]]:
    config = L2KVConfig(kv_budget=budget, recall=RecallSettings.parse(recall))
    out = []
    with L2KVModel(path, ModelSettings(n_batch=n_batch, n_ubatch=n_batch), config) as m:
        conv = Conversation(m)
        conv.load_document(doc)
        for q in QUESTIONS:
            t0 = time.perf_counter()
            conv.recall(q)
            t_recall = time.perf_counter() - t0
            t1 = time.perf_counter()
            last = list(conv.ask(q, SamplingSettings(temperature=0.0), n_predict))[-1]
            total = time.perf_counter() - t1
            t_decode = last.n_generated_tokens / last.tokens_per_second if last.tokens_per_second else 0.0
            ar = archive.stats(m.llm.ctx)
            st = cache.stats(m.llm.ctx)
            out.append(
                {
                    "recall_s": t_recall,
                    "prefill_s": total - t_decode,
                    "decode_tps": last.tokens_per_second,
                    "archive_bytes": ar.n_bytes,
                    # per token the cache does not hold (every layer and head archived it, or fewer)
                    "bytes_per_evicted": ar.n_bytes / max(1, m.n_past - st.n_cells_used),
                    "cells": st.n_cells_used,
                }
            )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n-doc", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    path = resolve_model(args.model)
    with open_tokenizer(path) as tok:
        doc = niah_document(tok, niah.NiahCase(args.n_doc, 0.5))
    print(f"{path.name}: {args.n_doc}-token document, budget {args.budget}, batch {args.batch}")
    print(
        "recall               turn  recall s  prefill s  recall/prefill  decode t/s  archive MiB  "
        "B/evicted token  cells"
    )
    for recall in ("off", "lexical", "lexical:128:exchange"):
        for i, r in enumerate(run(path, doc, recall, args.budget, args.n_predict, args.batch)):
            share = r["recall_s"] / r["prefill_s"] if r["prefill_s"] > 0 else float("nan")
            print(
                f"{recall:20s} {i + 1:4d}  {r['recall_s']:8.3f}  {r['prefill_s']:9.3f}  {share:14.2f}  "
                f"{r['decode_tps']:10.1f}  {r['archive_bytes'] / 2**20:11.1f}  {r['bytes_per_evicted']:15.0f}  "
                f"{r['cells']:5d}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
