"""Which evicted spans to bring back when new text arrives (the archive: `l2kv_cpp.archive`).

An eviction before the question cannot know which fact the question needs; when the question comes,
the archive is searched with it and the best spans of positions come back into the cache before the
question is processed. An answer lives in the tokens around what the question matches, so recall
works on contiguous blocks of positions, each brought back with its neighbour.

Signals:
- "lexical": BM25 of the new text's words against the words of every block of the conversation so
  far (the archive knows the token ids of every position it holds): rare words shared with the
  question rank a block high, words every block has count for nothing. It needs no model pass.
- "query": the attention the new text would pay to each archived block: the new text is decoded
  once with its queries kept (after RoPE, per layer), then per (layer, KV head) every query of the
  group's query heads is softmaxed over the archived keys and the mass of each block is taken at the
  query that attends to it most; blocks are ranked by that mass averaged over all (layer, head).
  The new text's tokens are then taken back out of the cache and read again after the recall.
- "both": the mean of the two scores, each divided by its maximum.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidParamsError

RECALL_MODES = ("off", "lexical", "query", "both")


# the archive's default limit: ~44k evicted SmolLM2 tokens (24 KB each), ~8k of an 8B model's (134 KB)
DEFAULT_ARCHIVE_MIB = 1024


@dataclass(frozen=True)
class RecallSettings:
    # RECALL_MODES: "off" (evicted entries are lost), "lexical", "query", "both" (module doc); L2KVConfig's
    # default is "lexical" (docs/results.md: it brought every needle back on both demo models)
    mode: str = "off"
    n_tokens: int = 128  # positions one recall brings back at most (capped by n_slack and the budget)
    block: int = 16  # positions per block: the unit that is scored and recalled
    n_context_blocks: int = 1  # blocks recalled after a matching block (the answer follows its cue)
    # what every (layer, head) got back stays on top of the budget, in the slack cells the KV buffer holds
    # anyway (llama_l2kv_recall); False: evict back to the budget at once (equal entries, for comparisons)
    grow: bool = True
    on_disk: bool = False  # the archived rows in temporary files instead of RAM (llama_l2kv_archive_params)
    # the most the archive holds, in MiB (RAM, or disk with on_disk); past it the entries evicted longest ago
    # are forgotten, so a stream of any length keeps bounded memory (0: no limit)
    max_mib: int = DEFAULT_ARCHIVE_MIB

    def __post_init__(self) -> None:
        if self.mode not in RECALL_MODES:
            raise InvalidParamsError(f"recall mode {self.mode!r} is not one of: {', '.join(RECALL_MODES)}")
        if self.max_mib < 0:
            raise InvalidParamsError(f"recall: the archive's limit must be >= 0 MiB (got {self.max_mib})")
        if self.n_tokens < 1 or self.block < 1 or self.n_context_blocks < 0:
            raise InvalidParamsError(
                f"recall needs n_tokens >= 1, block >= 1, n_context_blocks >= 0 "
                f"(got {self.n_tokens}, {self.block}, {self.n_context_blocks})"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def spec(self) -> str:
        """The setting as parse() reads it, e.g. "lexical:128"."""
        if not self.enabled:
            return "off"
        flags = ["exchange"] * (not self.grow) + ["disk"] * self.on_disk
        flags += [f"max={self.max_mib}"] * (self.max_mib != DEFAULT_ARCHIVE_MIB)
        return ":".join([self.mode, str(self.n_tokens), *flags])

    @property
    def max_bytes(self) -> int:
        return self.max_mib * 2**20

    @property
    def uses_queries(self) -> bool:
        return self.mode in ("query", "both")

    @classmethod
    def parse(cls, value: str) -> RecallSettings:
        """ "off", "lexical", "lexical:N" (N positions per recall), then any of ":exchange" (stay at the
        budget), ":disk" (the archive in temporary files) and ":max=MIB" (the archive's limit, 0: none),
        e.g. "lexical:128:exchange:disk:max=4096"."""
        parts = value.strip().split(":")
        flags = set()
        extra: dict[str, int] = {}
        try:
            while len(parts) > 1 and (parts[-1] in ("exchange", "disk") or parts[-1].startswith("max=")):
                last = parts.pop()
                if last.startswith("max="):
                    extra["max_mib"] = int(last[4:])
                else:
                    flags.add(last)
            if len(parts) > 2:
                raise ValueError
            if len(parts) == 2:
                extra["n_tokens"] = int(parts[1])
            return cls(mode=parts[0], grow="exchange" not in flags, on_disk="disk" in flags, **extra)
        except ValueError:
            raise InvalidParamsError(
                f"recall {value!r}: expected MODE[:N_TOKENS][:exchange][:disk][:max=MIB], e.g. lexical:128"
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


def query_block_scores(
    groups: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], n_blocks: int, block: int
) -> np.ndarray:
    """The attention mass each block of archived entries would draw from the new text, averaged over the
    (layer, KV head) groups: every group is (positions [n], keys [n, d], queries [m, d]) (its query
    heads' queries for every new token, as rows), scaled as the model scales them or not (a softmax per
    query is taken over the group's archived keys with 1/sqrt(d))."""
    total = np.zeros(n_blocks, dtype=np.float64)
    n_groups = 0
    for pos, keys, queries in groups:
        n_groups += 1
        if len(pos) == 0 or len(queries) == 0:
            continue
        logits = keys @ queries.T / np.sqrt(keys.shape[1])  # [n, m]
        logits -= logits.max(axis=0, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=0, keepdims=True)
        mass = np.zeros((n_blocks, p.shape[1]))
        np.add.at(mass, np.minimum(pos // block, n_blocks - 1), p)
        total += mass.max(axis=1)
    return total / max(n_groups, 1)


def combine_scores(lexical: Sequence[float], query: Sequence[float]) -> list[float]:
    """Mean of the two signals, each divided by its maximum (a signal that is 0 everywhere counts 0)."""
    a, b = np.asarray(lexical, dtype=np.float64), np.asarray(query, dtype=np.float64)
    a = a / a.max() if a.max() > 0 else a
    b = b / b.max() if b.max() > 0 else b
    return list((a + b) / 2)


def archived_blocks(archived_counts: Sequence[int], n_positions: int, block: int) -> list[bool]:
    """Per block of positions: whether any of its entries is archived somewhere."""
    n_blocks = (n_positions + block - 1) // block
    counts = np.asarray(archived_counts[:n_positions])
    return [bool(counts[j * block : (j + 1) * block].any()) for j in range(n_blocks)]


def lexical_block_scores(history_pieces: Sequence[bytes], query_pieces: Sequence[bytes], block: int) -> list[float]:
    """BM25 of every block of `block` positions of the history for the words of the new text."""
    query = [w for p in query_pieces for w in words(p)]
    return bm25_scores(block_words(history_pieces, block), query)


def lexical_spans(
    history_pieces: Sequence[bytes],
    query_pieces: Sequence[bytes],
    archived_counts: Sequence[int],
    settings: RecallSettings,
    n_max: int,
) -> list[tuple[int, int]]:
    """The spans to recall for new text (query_pieces: its tokens' texts) over the conversation so far
    (history_pieces[p]: the text of the token at position p; archived_counts[p]: its archived rows)."""
    n = len(history_pieces)
    scores = lexical_block_scores(history_pieces, query_pieces, settings.block)
    return choose_spans(scores, archived_blocks(archived_counts, n, settings.block), settings, n, n_max)
