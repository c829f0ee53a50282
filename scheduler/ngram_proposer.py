"""Prompt-lookup drafts: the tokens that followed the last occurrence of the sequence's own suffix.

vLLM's `ngram` method. Text that repeats its input (an edit of code, a correction of a text, an
answer quoting its context) makes the model copy spans it has already seen; the suffix of the
sequence found earlier in its prompt or output predicts the tokens to come, and the model checks
them all in one forward. The index is built once per sequence and grows by a few entries a token,
so drafting costs the same whether the context is short or long.
"""

from scheduler.sequence import Sequence


class NgramIndex:
    """For n from `min_n` to `max_n`: each n-gram of a sequence's tokens -> the position that
    follows its latest occurrence, for every occurrence with a token after it."""

    __slots__ = ("_follower", "_indexed", "max_n", "min_n")

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._follower: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n - min_n + 1)]
        self._indexed = 0  # follower positions [0, _indexed) are in the index

    def propose(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Up to `num_tokens` tokens that followed the longest suffix (of at most `max_n` tokens)
        seen before, at its latest occurrence; [] when no suffix of `min_n` tokens recurs."""
        length = seq.num_tokens
        for position in range(max(self._indexed, self.min_n), length):  # followers now known
            for n, table in zip(range(self.min_n, self.max_n + 1), self._follower, strict=True):
                if position >= n:
                    table[tuple(seq.token_slice(position - n, position))] = position
        self._indexed = length
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            follower = self._follower[n - self.min_n].get(tuple(seq.token_slice(length - n, length)))
            if follower is not None:
                return seq.token_slice(follower, min(follower + num_tokens, length))
        return []
