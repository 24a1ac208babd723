"""Where speculative decoding's draft tokens come from: n-gram lookup, in a sequence's own tokens or in earlier ones.

Both proposers answer "what followed, the last time, the n tokens this sequence ends with?", for the longest n
in [lo, hi] that occurred before, and propose up to k of the tokens that followed. They cost no model: a dict
lookup per n and step, and one insertion per n for each token a sequence grows by.
"""
from __future__ import annotations

from collections import OrderedDict


def continuation(tokens: list[int], start: int, k: int) -> list[int]:
    """k tokens from tokens[start] on; where they run past the end, the text is taken to repeat with the period
    it has just shown (len(tokens) - start), as a sequence that repeats itself does."""
    out = tokens[start:start + k]
    while len(out) < k:
        out.append(out[len(out) - (len(tokens) - start)])
    return out


class NgramIndex:
    """Where each n-gram (lo <= n <= hi) of a token list last ended, for n-grams ending before its last token.

    The last token's n-grams are the ones looked up, so they join the index only once a token follows them:
    a lookup never finds the sequence's own end.
    """

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.length = 0  # tokens seen: n-grams ending before the last of them are indexed
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> position after its latest indexed occurrence

    def propose(self, tokens: list[int], k: int) -> tuple[int, list[int]]:
        """(n, up to k tokens that followed the latest earlier occurrence of the longest n-gram ending `tokens`);
        n = 0 and no tokens where none occurred. `tokens` starts with every token this index was given before."""
        for end in range(max(self.length, 1), len(tokens)):  # n-grams ending at end - 1, now that tokens[end] exists
            for n in range(self.lo, min(self.hi, end) + 1):
                self.ends[tuple(tokens[end - n:end])] = end
        self.length = len(tokens)
        for n in range(min(self.hi, len(tokens)), self.lo - 1, -1):
            end = self.ends.get(tuple(tokens[-n:]))
            if end is not None:
                return n, continuation(tokens, end, k)
        return 0, []


class SuffixCache:
    """N-grams of earlier requests' outputs, shared by all requests, bounded to `capacity` tokens (oldest out).

    An output is stored with the last `hi` tokens of its prompt before it, so that the n-grams a new output
    starts from -- the end of a prompt shared by template and agent traffic -- are found too.
    """

    def __init__(self, lo: int, hi: int, capacity: int) -> None:
        self.lo, self.hi, self.capacity = lo, hi, capacity
        self.texts: OrderedDict[int, list[int]] = OrderedDict()  # id -> tokens, oldest first
        self.ends: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (text id, position after it)
        self.size = 0
        self._next_id = 0

    def add(self, tokens: list[int]) -> None:
        if len(tokens) > self.capacity or len(tokens) <= self.lo:
            return
        text_id, self._next_id = self._next_id, self._next_id + 1
        self.texts[text_id] = tokens
        self.size += len(tokens)
        for end in range(self.lo, len(tokens)):
            for n in range(self.lo, min(self.hi, end) + 1):
                self.ends[tuple(tokens[end - n:end])] = (text_id, end)
        while self.size > self.capacity:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        text_id, tokens = self.texts.popitem(last=False)
        self.size -= len(tokens)
        for end in range(self.lo, len(tokens)):
            for n in range(self.lo, min(self.hi, end) + 1):
                key = tuple(tokens[end - n:end])
                if self.ends.get(key, (None,))[0] == text_id:  # not since overwritten by a newer text
                    del self.ends[key]

    def propose(self, tokens: list[int], k: int) -> tuple[int, list[int]]:
        """(n, up to k tokens that followed) for the longest n-gram ending `tokens` found here; n = 0 where none is."""
        for n in range(min(self.hi, len(tokens)), self.lo - 1, -1):
            found = self.ends.get(tuple(tokens[-n:]))
            if found is not None:
                text_id, end = found
                return n, self.texts[text_id][end:end + k]
        return 0, []
