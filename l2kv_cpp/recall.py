"""Which evicted spans to bring back when new text arrives (the archive: `l2kv_cpp.archive`).

An eviction before the question cannot know which fact the question needs; when the question comes,
the archive is searched with it and the best spans of positions come back into the cache before the
question is processed. An answer lives in the tokens around what the question matches, so recall
works on contiguous blocks of positions, each brought back with its neighbour.

Signal ("lexical"): BM25 of the new text's words against the words of every block of the
conversation so far (the archive knows the token ids of every position it holds): rare words shared
with the question rank a block high, words every block has count for nothing. It needs no model
pass, so it runs before the new text is decoded.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidParamsError

RECALL_MODES = ("off", "lexical")


@dataclass(frozen=True)
class RecallSettings:
    mode: str = "off"  # RECALL_MODES: "off" (evicted entries are lost), "lexical" (BM25 over blocks)
    n_tokens: int = 128  # positions one recall brings back at most (capped by n_slack and the budget)
    block: int = 16  # positions per block: the unit that is scored and recalled
    n_context_blocks: int = 1  # blocks recalled after a matching block (the answer follows its cue)
    # what every (layer, head) got back stays on top of the budget, in the slack cells the KV buffer holds
    # anyway (llama_l2kv_recall); False: evict back to the budget at once (equal entries, for comparisons)
    grow: bool = True

    def __post_init__(self) -> None:
        if self.mode not in RECALL_MODES:
            raise InvalidParamsError(f"recall mode {self.mode!r} is not one of: {', '.join(RECALL_MODES)}")
        if self.n_tokens < 1 or self.block < 1 or self.n_context_blocks < 0:
            raise InvalidParamsError(
                f"recall needs n_tokens >= 1, block >= 1, n_context_blocks >= 0 "
                f"(got {self.n_tokens}, {self.block}, {self.n_context_blocks})"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @classmethod
    def parse(cls, value: str) -> RecallSettings:
        """ "off", "lexical", "lexical:N" (N positions per recall), with ":exchange" to stay at the budget."""
        parts = value.strip().split(":")
        grow = parts[-1] != "exchange"
        if not grow:
            parts.pop()
        try:
            if len(parts) > 2:
                raise ValueError
            return cls(mode=parts[0], grow=grow, **({"n_tokens": int(parts[1])} if len(parts) == 2 else {}))
        except ValueError:
            raise InvalidParamsError(
                f"recall {value!r}: expected MODE[:N_TOKENS][:exchange], e.g. lexical:128"
            ) from None


_WORD = re.compile(r"\w+")


def words(piece: bytes) -> list[str]:
    """The normalised words of a token's text (case and accents folded); none for punctuation or space."""
    text = unicodedata.normalize("NFKC", piece.decode("utf-8", errors="ignore")).casefold()
    return _WORD.findall(text)


def block_words(pieces: Sequence[bytes], block: int) -> list[Counter[str]]:
    """The word counts of every block of `block` positions. Words split over tokens count per token, so a
    number such as 71432 tokenized as 714|32 contributes both parts: rare, and matched the same way."""
    out: list[Counter[str]] = []
    for start in range(0, len(pieces), block):
        c: Counter[str] = Counter()
        for p in pieces[start : start + block]:
            c.update(words(p))
        out.append(c)
    return out


def bm25_scores(blocks: Sequence[Counter[str]], query: Sequence[str], k1: float = 1.2) -> list[float]:
    """BM25 of every block for the query's distinct words (blocks have the same length: no length norm)."""
    n = len(blocks)
    terms = set(query)
    df = {t: sum(1 for b in blocks if t in b) for t in terms}
    idf = {t: math.log((n - df[t] + 0.5) / (df[t] + 0.5) + 1.0) for t in terms if df[t] > 0}
    scores = []
    for b in blocks:
        s = 0.0
        for t, w in idf.items():
            tf = b.get(t, 0)
            if tf:
                s += w * tf * (k1 + 1) / (tf + k1)
        scores.append(s)
    return scores


def choose_spans(
    scores: Sequence[float],
    archived: Sequence[bool],
    settings: RecallSettings,
    n_positions: int,
    n_max: int,
) -> list[tuple[int, int]]:
    """Spans of positions to recall, best first, within n_max positions: the best-scoring blocks with a
    positive score, each with its n_context_blocks following blocks; only blocks that hold archived
    entries are worth a recall (the others are in the cache everywhere)."""
    b = settings.block
    budget = min(settings.n_tokens, n_max)
    chosen: set[int] = set()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    for i in order:
        if scores[i] <= 0:
            break
        group = [j for j in range(i, min(i + 1 + settings.n_context_blocks, len(scores))) if archived[j]]
        new = [j for j in group if j not in chosen]
        if not new:
            continue
        if (len(chosen) + len(new)) * b > budget:
            if len(chosen) * b + b > budget:
                break
            new = new[: (budget - len(chosen) * b) // b]
        chosen.update(new)
    spans: list[tuple[int, int]] = []
    for j in sorted(chosen):
        lo, hi = j * b, min((j + 1) * b, n_positions)
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    return spans


def lexical_spans(
    history_pieces: Sequence[bytes],
    query_pieces: Sequence[bytes],
    archived_counts: Sequence[int],
    settings: RecallSettings,
    n_max: int,
) -> list[tuple[int, int]]:
    """The spans to recall for new text (query_pieces: its tokens' texts) over the conversation so far
    (history_pieces[p]: the text of the token at position p; archived_counts[p]: its archived rows)."""
    b = settings.block
    blocks = block_words(history_pieces, b)
    query = [w for p in query_pieces for w in words(p)]
    scores = bm25_scores(blocks, query)
    n = len(history_pieces)
    archived = [any(archived_counts[p] > 0 for p in range(j * b, min((j + 1) * b, n))) for j in range(len(blocks))]
    return choose_spans(scores, archived, settings, n, n_max)
