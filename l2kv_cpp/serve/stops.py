"""Stop strings over streamed text: what may be shown now, and where the answer ends."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces as they are generated; text that could still be the start of a stop string is held
    back until it is known not to be one (so a client never sees part of a stop string)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to emit, whether a stop string ended the answer); after True, feed no more."""
        text = self._held + piece
        if not self.stops:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0  # the longest end of `text` that begins a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if s.startswith(text[-n:]):
                    keep = n
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """What is still held back when the answer ends without a stop string."""
        text, self._held = self._held, ""
        return text
