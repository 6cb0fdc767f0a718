"""Passkey retrieval in the format of llama.cpp's examples/passkey (the paper's passkey task).

The document is the instruction, "grass is green" filler, and the key sentence at a chosen depth;
the question is "What is the pass key?" (through the chat template) or the completion suffix
" What is the pass key? The pass key is" (base models). Exact match: the first integer in the
answer equals the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
CHAT_QUESTION = "What is the pass key?"
COMPLETION_QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyCase:
    n_junk: int  # filler sentences (about 23 tokens each)
    depth: float  # 0 = right after the instruction, 1 = at the end
    seed: int  # picks the key

    @property
    def key(self) -> int:
        return random.Random(self.seed).randint(10000, 99999)

    def as_config(self) -> dict:
        return asdict(self)


def key_sentence(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def build_document(case: PasskeyCase) -> str:
    """PREFIX, then n_junk fillers with the key sentence before filler number round(depth * n_junk)."""
    i_pos = round(case.depth * case.n_junk)
    parts = [PREFIX]
    for i in range(case.n_junk + 1):
        if i == i_pos:
            parts.append(key_sentence(case.key))
        if i < case.n_junk:
            parts.append(" " + FILLER)
    return "".join(parts)


def question(chat: bool) -> str:
    return CHAT_QUESTION if chat else COMPLETION_QUESTION


def score(answer: str, key: int) -> float:
    m = re.search(r"\d+", answer)
    return 1.0 if m is not None and int(m.group()) == key else 0.0


def junk_for_tokens(n_tokens: int, tokens_per_filler: float = 23.0) -> int:
    return max(1, round((n_tokens - 40) / tokens_per_filler))
