"""Token-level helpers that keep the cache equal to the tokenization of the whole prompt.

BPE and SentencePiece merges depend on what follows a point in the text: on SmolLM2,
"document\\n\\n" ends in one token on its own and in two when a word follows. So a text is never
tokenized in pieces where more text can follow it; these helpers say how far two tokenizations
agree, which leading tokens of a text stay the same whatever follows it, and how many tokens of
a whole prompt lie inside a prefix of its text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# continuations tried by stable_prefix_len: a question or a template may follow a document with any
# of these (letters, digits, spaces, newlines, punctuation, quotes, accented and CJK text, an emoji)
CONTINUATIONS = (
    "a", "A", " a", " A", "1", " 1", "12", ".", ",", "?", "!", ":", ";", "-", "'", '"', "(", ")",
    " ", "  ", "\t", "\n", "\n\n", " \n", "\r\n", "é", " é", "中", "あ", "한", "😀", " 😀", "<", "/",
)  # fmt: skip


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def stable_prefix_len(tokenize: Callable[[str], list[int]], text: str, tokens: Sequence[int] | None = None) -> int:
    """How many leading tokens of tokenize(text) stay the same when more text follows it.

    Checked against CONTINUATIONS: the tokens after that point may merge with what comes next and
    are held back until it is known (a continuation not in the set that changes more is caught by
    the caller comparing the whole prompt's tokens with what it fed).
    """
    if tokens is None:
        tokens = tokenize(text)
    n = len(tokens)
    for c in CONTINUATIONS:
        n = min(n, common_prefix_len(tokens, tokenize(text + c)))
        if n == 0:
            break
    return n


def tokens_within(pieces: Sequence[bytes], text: str, prefix: str, skip: int = 0) -> int | None:
    """How many tokens of `text` lie entirely inside its first len(prefix) characters.

    pieces: every token's bytes (as llama_token_to_piece gives them); the first `skip` tokens are
    not part of the text (a BOS the tokenizer added). None when the pieces do not spell `text`
    byte for byte (a tokenizer that adds or drops spaces), or `prefix` does not start it.
    """
    if not text.startswith(prefix):
        return None
    body = pieces[skip:]
    if b"".join(body) != text.encode():
        return None
    limit = len(prefix.encode())
    done = 0
    for i, p in enumerate(body):
        done += len(p)
        if done > limit:
            return skip + i
    return len(pieces)
