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


def stable_prefix_len(
    tokenize: Callable[[str], list[int]],
    text: str,
    tokens: Sequence[int],
    pieces: Sequence[bytes] | None = None,
    skip: int = 0,
    window: int = 1024,
) -> int:
    """How many leading tokens of `tokens` (the tokens of `text`) stay the same when more text follows it.

    Checked against CONTINUATIONS: the tokens after that point may merge with what comes next and are
    held back until it is known (a continuation not in the set that changes more is caught by the caller
    comparing the whole prompt's tokens with what it fed). tokenize(t) must not add a BOS; the first
    `skip` tokens are not part of the text (a BOS). With `pieces` (every token's bytes), only the text's
    last `window` bytes or so are tokenized again, from a token boundary where that gives the same tokens.
    """
    start, tail = _tail(tokenize, text, tokens, pieces, skip, window)
    own = tokens[start:]
    n = len(own)
    for c in CONTINUATIONS:
        n = min(n, common_prefix_len(own, tokenize(tail + c)))
        if n == 0:
            break
    return start + n


def _tail(
    tokenize: Callable[[str], list[int]],
    text: str,
    tokens: Sequence[int],
    pieces: Sequence[bytes] | None,
    skip: int,
    window: int,
) -> tuple[int, str]:
    """(i, t): tokens[i:] are the tokens of t, the end of `text` from a token boundary about `window` bytes
    before its end (verified); (skip, text) when no such boundary is found."""
    data = text.encode()
    if pieces is None or b"".join(pieces[skip:]) != data:
        return skip, text
    offset, i = len(data), len(tokens)
    while i > skip and len(data) - offset < window:
        i -= 1
        offset -= len(pieces[i])
    while i > skip:
        try:
            tail = data[offset:].decode()  # a boundary inside a UTF-8 character does not decode
        except UnicodeDecodeError:
            i -= 1
            offset -= len(pieces[i])
            continue
        if tokenize(tail) == list(tokens[i:]):
            return i, tail
        break
    return skip, text


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
