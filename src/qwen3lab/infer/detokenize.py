"""Token ids in, text pieces out, as the engine emits them: what generate(), stream() and the server's streams
give the user."""

from __future__ import annotations

from ..text.tokenizer import Tokenizer


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


class TextStream:
    """Token ids in, text pieces out: a piece never ends inside a multi-byte character, and nothing from a stop
    string on is ever given out (text that could still begin one is held back).

    O(1) per token, whatever the length (reasoning traces run to tens of thousands of tokens): each step decodes only
    the ids since the last complete piece, and stop strings are searched for in the new text and the few characters
    before it that could begin one.
    """

    def __init__(self, tok: Tokenizer, stop: list[str]):
        self.tok, self.stop = tok, stop
        self.hold = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of `text`; decoding restarts at `prefix`
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of text given out

    def _pending(self) -> tuple[str, bool]:
        """Text of the ids after `read`, and whether it is complete (not ending inside a character)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        complete = len(after) > len(before) and not after.endswith("\ufffd")
        return after[len(before) :], complete

    def add(self, token: int) -> tuple[str, bool]:
        """The new piece (maybe empty) and whether a stop string was reached."""
        self.ids.append(token)
        new, complete = self._pending()
        if not complete:  # an incomplete UTF-8 sequence: wait for the rest of the character
            return "", False
        self.prefix, self.read = self.read, len(self.ids)
        search_from = max(len(self.text) - self.hold + 1, 0)  # a stop string may begin in the held-back tail
        self.text += new
        cut = _find_stop(self.text[search_from:], self.stop)
        cut = None if cut is None else search_from + cut
        ready = cut if cut is not None else len(self.text) - max(self.hold - 1, 0)
        piece = self.text[self.sent : ready] if ready > self.sent else ""
        self.sent += len(piece)
        return piece, cut is not None

    def flush(self) -> str:
        """What is left once generation ends without a stop string."""
        new, _ = self._pending()
        self.text += new
        self.prefix = self.read = len(self.ids)
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece
