"""TextStream: text deltas from a growing list of tokens, whole characters only, stop strings cut."""

from tokenization.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental detokenizer of one completion.

    Text is decoded over a short window of recent tokens (so each push costs the same however long
    the completion), and a delta is released only when it does not end in an incomplete UTF-8
    sequence. With stop strings, the last `len(longest stop) - 1` characters are held back until
    it is clear they do not begin a stop string; the matched stop string is never released.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # everything decoded so far
        self._released = 0  # characters of _text handed out
        self.matched_stop: str | None = None

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; returns the text that became final. After a stop string matches, always ''."""
        if self.matched_stop is not None:
            return ""
        self._token_ids.extend(token_ids)
        decoded_before = len(self._text)
        self._text += self._decode_new()
        if self._stop:
            start = max(0, decoded_before - self._holdback)
            found = [(index, s) for s in self._stop if (index := self._text.find(s, start)) != -1]
            if found:
                index, self.matched_stop = min(found)
                self._text = self._text[:index]
                return self._release(len(self._text))
        return self._release(len(self._text) - self._holdback)

    def flush(self) -> str:
        """The held-back tail, at the end of the completion."""
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        if end <= self._released:
            return ""
        delta = self._text[self._released : end]
        self._released = end
        return delta

    def _decode_new(self) -> str:
        prefix = self._tokenizer.decode(self._token_ids[self._prefix_offset : self._read_offset])
        full = self._tokenizer.decode(self._token_ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full[len(prefix) :]
