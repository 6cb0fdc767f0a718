#!/usr/bin/env python3
"""Where each recall signal ranks the needle: a diagnostic of what to recall (issue 18).

For every needle document of the evaluation grid, compressed to `--keep` of its tokens, the archive
is scored with each signal and the needle's best block is ranked among the blocks that hold
archived entries (1 = recalled first). A recall of 128 positions (blocks of 16, each with its next
block) brings back the top 4 blocks.

    python scripts/recall_signals.py --model smollm2 --keep 0.25
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402,F401  (load libllama before numpy-heavy modules)
import numpy as np  # noqa: E402

from l2kv_cpp import archive, cache  # noqa: E402
from l2kv_cpp.chat import Conversation  # noqa: E402
from l2kv_cpp.config import L2KVConfig  # noqa: E402
from l2kv_cpp.eval import niah  # noqa: E402
from l2kv_cpp.eval.qa import document_tokens  # noqa: E402
from l2kv_cpp.eval.tasks import niah_document, uses_chat  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.recall import RecallSettings, archived_blocks, lexical_block_scores, query_block_scores  # noqa: E402
from l2kv_cpp.session import L2KVModel, ModelSettings, open_tokenizer  # noqa: E402

BLOCK = 16


def needle_positions(m: L2KVModel, tokens: list[int]) -> list[int]:
    pieces = m.token_pieces(tokens)
    text = b"".join(pieces).decode(errors="replace")
    start = text.index(niah.NEEDLE[:30])
    out, at = [], 0
    for p, piece in enumerate(pieces):
        n = len(piece.decode(errors="replace"))
        if at + n > start and at < start + len(niah.NEEDLE):
            out.append(p)
        at += n
    return out


def signals(m: L2KVModel, conv: Conversation, question: str, n_pos: int) -> dict[str, np.ndarray]:
    """Block scores of every signal for the question (the question's tokens are read and taken back)."""
    ctx = m.llm.ctx
    n_blocks = (n_pos + BLOCK - 1) // BLOCK
    target = conv.turn_tokens(question)
    todo = target[n_pos:]
    n0 = m.n_past
    m.feed(todo)
    per_group = []  # (layer, pos, keys, queries [tokens, heads, d])
    for il, n_head_kv, d in conv._layers():
        q = archive.read_queries(ctx, il, len(todo), d)
        r = q.shape[1] // n_head_kv
        for g in range(n_head_kv):
            pos, keys = archive.read_keys(ctx, il, g, m.settings.cache_type_k, d)
            per_group.append((il, pos, keys[:, 0, :], q[:, g * r : (g + 1) * r, :]))
    assert m.rewind(n0)
    n_q = len(todo)
    words = m.token_pieces(m.tokenize(question, add_bos=False, special=False))
    out = {"lexical": np.asarray(lexical_block_scores(m.token_pieces(conv.tokens[:n_pos]), words, BLOCK))}
    out["query mass (all tokens)"] = query_block_scores(
        ((p, k, q.reshape(-1, k.shape[1])) for _, p, k, q in per_group), n_blocks, BLOCK
    )
    out["query mass (last token)"] = query_block_scores(
        ((p, k, q[-1:].reshape(-1, k.shape[1])) for _, p, k, q in per_group), n_blocks, BLOCK
    )
    # the question's own words only: the template tokens after it attend elsewhere
    n_text = len(m.tokenize(question, add_bos=False, special=False))
    first = max(0, n_q - n_text - 6)
    out["query mass (question words)"] = query_block_scores(
        ((p, k, q[first : first + n_text].reshape(-1, k.shape[1])) for _, p, k, q in per_group), n_blocks, BLOCK
    )
    # per group: z-score of the block's max logit over the blocks, averaged
    z = np.zeros(n_blocks)
    for _, p, k, q in per_group:
        if len(p) == 0:
            continue
        logit = (k @ q.reshape(-1, k.shape[1]).T).max(axis=1)
        best = np.full(n_blocks, -np.inf)
        np.maximum.at(best, p // BLOCK, logit)
        ok = np.isfinite(best)
        if ok.sum() > 1:
            v = best[ok]
            z[ok] += (v - v.mean()) / (v.std() + 1e-9)
    out["query max logit (z)"] = z
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--policy", default="key-diff")
    args = ap.parse_args()
    path = resolve_model(args.model)
    chat = uses_chat(path)
    question = niah.question(chat)
    ranks: dict[str, list[int]] = {}
    with open_tokenizer(path) as tok:
        docs = [
            (c, niah_document(tok, c)) for n in (1000, 2000) for c in [niah.NiahCase(n, d) for d in (0.1, 0.5, 0.9)]
        ]
        n_docs = [document_tokens(tok, doc, question, chat) for _, doc in docs]
    for (case, doc), n_doc in zip(docs, n_docs, strict=True):
        config = L2KVConfig(kv_budget=round(args.keep * n_doc), policy=args.policy, recall=RecallSettings("query", 128))
        with L2KVModel(path, ModelSettings(n_batch=256, n_ubatch=256), config) as m:
            conv = Conversation(m, chat=chat)
            conv.load_document(doc, next_text=question)
            cache.evict_now(m.llm.ctx)
            n_pos = len(conv.tokens)
            counts, _ = archive.coverage(m.llm.ctx, n_pos)
            archived = np.array(archived_blocks(counts, n_pos, BLOCK))
            needle = {p // BLOCK for p in needle_positions(m, conv.tokens)}
            line = [f"n={case.n_tokens} depth={case.depth}: needle blocks {sorted(needle)}"]
            for name, score in signals(m, conv, question, n_pos).items():
                s = np.where(archived, score, -np.inf)
                order = list(np.argsort(-s, kind="stable"))
                rank = min(order.index(b) for b in needle if archived[b]) + 1 if archived[list(needle)].any() else 0
                ranks.setdefault(name, []).append(rank)
                line.append(f"{name} {rank}")
            print("; ".join(line), flush=True)
    print(
        f"\nrank of the needle's best archived block among {args.model}'s archived blocks (keep {args.keep}, "
        f"{args.policy}; 0 = the needle was not evicted anywhere; top 4 are recalled by 128 positions):"
    )
    for name, rs in ranks.items():
        print(f"  {name:30s} {rs}  in top 4: {sum(1 <= r <= 4 for r in rs)}/{len(rs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
