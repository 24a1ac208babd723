"""Aborts that arrived before the request did."""
from __future__ import annotations

from collections import OrderedDict


class Tombstones:
    """Request ids aborted while not held here.

    An abort may overtake its request (a preempted sequence on its way back to
    prefill, a hand-off on its way to decode); the id is remembered so the
    request is ended on arrival. Bounded: ids whose request had already
    finished would otherwise pile up.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._ids: OrderedDict[str, str | None] = OrderedDict()
        self._capacity = capacity

    def add(self, request_id: str, error: str | None) -> None:
        self._ids[request_id] = error
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def take(self, request_id: str, keep: bool = False) -> tuple[bool, str | None]:
        """Whether request_id was aborted (and its error). keep: more samples of it may still arrive."""
        if request_id in self._ids:
            return True, self._ids[request_id] if keep else self._ids.pop(request_id)
        return False, None
