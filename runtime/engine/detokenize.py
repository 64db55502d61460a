"""Incremental detokenization with stop strings.

Text is released to the client only when it is final: not the start of a multi-byte character
still being decoded (the decoder shows U+FFFD for it) and not a suffix that could be the start
of a stop string. When a stop string appears, the text before it is released and the rest is
dropped, so a client never sees any part of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

# Decode only the last tokens plus this many before them: enough context for byte-level BPE and
# SentencePiece to render the boundary right, and keeps each step O(1) instead of O(length).
_CONTEXT_TOKENS = 6


class TextStream:
    """Turns generated token ids into released text deltas.

    ``emitted`` is the number of characters released so far; a stream rebuilt elsewhere from
    the same token ids and ``emitted`` (live migration) continues exactly where it stopped.
    """

    def __init__(
        self,
        decode: Decode,
        stop: Sequence[str] = (),
        token_ids: Sequence[int] = (),
        emitted: int = 0,
    ) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.token_ids: list[int] = list(token_ids)
        self.text = decode(self.token_ids) if self.token_ids else ""
        self.emitted = emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly released text (possibly empty). After a
        stop string is seen, ``stopped`` is True and nothing more is released."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        self.text = self._extend(self.text, self.token_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Release what was held back (the generation ended for another reason than a stop)."""
        if self.stopped:
            return ""
        return self._release(final=True)

    def _extend(self, text: str, ids: list[int]) -> str:
        # Decode a short window with and without the newest token and append the difference;
        # fall back to a full decode if the window's rendering does not extend the old one.
        start = max(0, len(ids) - 1 - _CONTEXT_TOKENS)
        before = self._decode(ids[start:-1]) if len(ids) > 1 else ""
        after = self._decode(ids[start:])
        if after.startswith(before) and not before.endswith("\ufffd"):
            return text + after[len(before) :]
        return self._decode(ids)

    def _release(self, *, final: bool) -> str:
        text = self.text
        if self._stop:
            search_from = max(0, self.emitted - self._longest_stop + 1)
            hits = [p for p in (text.find(s, search_from) for s in self._stop) if p >= 0]
            if hits:
                cut = max(min(hits), self.emitted)
                self.stopped = True
                delta = text[self.emitted : cut]
                self.emitted = cut
                return delta
        end = len(text)
        if not final:
            # hold an unfinished multi-byte character (rendered as U+FFFD at the end)
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
            end -= self._held_for_stop(text[:end])
        if end <= self.emitted:
            return ""
        delta = text[self.emitted : end]
        self.emitted = end
        return delta

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` (past what was emitted) that is a proper
        prefix of a stop string: it may still turn into that stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text) - self.emitted), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
