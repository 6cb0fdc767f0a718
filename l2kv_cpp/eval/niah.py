"""Needle in a haystack on the Paul Graham essays (gkamradt's LLMTest_NeedleInAHaystack setup).

The haystack is the essays of `../shared/data/paul-graham-essays` (read in file-name order, never
copied) cut to a token length; the standard needle is inserted at a depth, at the sentence
boundary just before that point. Scoring rule: the needle has two facts, "sandwich" and
"Dolores Park"; the score is the fraction of them the answer mentions (case-insensitive): 1.0,
0.5 or 0.0.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import L2KVError

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
CHAT_QUESTION = "What is the best thing to do in San Francisco? Answer in one sentence, using only the text above."
COMPLETION_QUESTION = (
    "\n\nQuestion: What is the best thing to do in San Francisco?\nAnswer: The best thing to do in San Francisco is"
)
FACTS = ("sandwich", "dolores park")


def essays_dir() -> Path:
    """$L2KV_ESSAYS_DIR, else ../shared/data/paul-graham-essays from the repository root."""
    env = os.environ.get("L2KV_ESSAYS_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data" / "paul-graham-essays"
    if not d.is_dir() or not any(d.glob("*.txt")):
        raise L2KVError(f"the essay corpus is missing: {d} (set L2KV_ESSAYS_DIR to the paul-graham-essays folder)")
    return d


def corpus_text() -> str:
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in sorted(essays_dir().glob("*.txt")))


@dataclass(frozen=True)
class NiahCase:
    n_tokens: int  # target length of the document (haystack + needle), in model tokens
    depth: float  # 0 = start, 1 = end

    def as_config(self) -> dict:
        return asdict(self)


def build_document(case: NiahCase, tokenize, detokenize, corpus: str | None = None) -> str:
    """Haystack cut to n_tokens minus the needle's tokens, with the needle at the sentence boundary before depth."""
    corpus = corpus if corpus is not None else corpus_text()
    n_needle = len(tokenize(" " + NEEDLE))
    tokens = tokenize(corpus)[: max(0, case.n_tokens - n_needle)]
    hay = detokenize(tokens)
    at = int(len(hay) * case.depth)
    if 0 < at < len(hay):
        dot = hay.rfind(".", 0, at)
        at = dot + 1 if dot >= 0 else 0
    before, after = hay[:at].rstrip(), hay[at:].lstrip()
    return " ".join(part for part in (before, NEEDLE, after) if part)


def needle_depth(document: str) -> float:
    """Where the needle landed, as a fraction of the document's characters."""
    return document.index(NEEDLE) / max(1, len(document) - len(NEEDLE))


def question(chat: bool) -> str:
    return CHAT_QUESTION if chat else COMPLETION_QUESTION


def score(answer: str) -> float:
    a = answer.lower()
    return sum(f in a for f in FACTS) / len(FACTS)
