"""Text for streamed tokens: incremental detokenisation and stop strings (torch-free).

Incremental detokenisation. Decoding each token alone is wrong twice over: a byte-level token may
hold half a UTF-8 character, and some decoders (SentencePiece's "▁") drop a token's leading space
when it starts the text. So we decode a short window of ids twice, with and without the newest
tokens, and emit the difference; the window moves forward only at clean character boundaries
(the decoded text does not end in U+FFFD), and starts with the prompt's last few tokens so the
first generated token keeps its leading space.

Stop strings. Text that could still turn out to be the start of a stop string is held back (the
longest suffix that is a prefix of some stop string); when a stop string appears, the text up to
it is emitted and generation ends. The stop string itself is never returned.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 4


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0             # window start: decoded for context, never emitted again
        self.read_offset = len(self.ids)   # ids before this are already emitted as text

    def add(self, new_ids: list[int]) -> str:
        """The text that became final with these tokens ('' while a character is incomplete)."""
        self.ids += new_ids
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever text is left, incomplete characters included."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        new_text = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if not final and new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


class StopStrings:
    """Finds stop strings in streamed text; `feed` returns (text safe to emit, stopped)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # text held back: it may be the start of a stop string

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = self._held_back()
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of pending that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:n]):
                    longest = n
                    break
        return longest
