#!/usr/bin/env python3
"""End-to-end answers of a few needle documents under several recall modes (issue 18), without records.

    python scripts/compare_recall_modes.py --model smollm2 --policy key-diff --keep 0.25 \
        --recall off,lexical:128,query:128,both:128

Documents: (1000 tokens, depth 0.1), (1000, 0.5), (2000, 0.5), (2000, 0.9) of the needle task;
the question comes after compression (the evaluation protocol, l2kv_cpp/eval/qa.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402,F401  (load libllama before numpy-heavy modules)

from l2kv_cpp.eval import niah, tasks  # noqa: E402
from l2kv_cpp.eval.qa import Compression, document_tokens, run_qa  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.session import open_tokenizer  # noqa: E402

CASES = [(1000, 0.1), (1000, 0.5), (2000, 0.5), (2000, 0.9)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--policy", default="key-diff")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--recall", default="off,lexical:128,query:128,both:128")
    args = ap.parse_args()
    path = resolve_model(args.model)
    chat = tasks.uses_chat(path)
    question = niah.question(chat)
    totals: dict[str, float] = {}
    with open_tokenizer(path) as tok:
        docs = [(n, d, tasks.niah_document(tok, niah.NiahCase(n_tokens=n, depth=d))) for n, d in CASES]
        docs = [(n, d, doc, document_tokens(tok, doc, question, chat)) for n, d, doc in docs]
    for n, d, doc, n_doc in docs:
        for rc in args.recall.split(","):
            t = time.time()
            r = run_qa(path, doc, question, Compression(args.policy, args.keep, recall=rc), n_doc, chat, 40)
            score = niah.score(r.answer)
            totals[rc] = totals.get(rc, 0.0) + score
            print(f"n={n} depth={d} {rc}: {score:g} {r.answer[:60]!r} ({time.time() - t:.0f} s)", flush=True)
    for rc, total in totals.items():
        print(f"{rc}: {total:g} of {len(docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
