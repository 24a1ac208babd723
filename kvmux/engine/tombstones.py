"""Aborts that arrived before the request did."""
from __future__ import annotations

from collections import OrderedDict


class Tombstones:
    """Serials of requests aborted while not held here.

    An abort may overtake its request (a preempted sequence on its way back to
    prefill, a hand-off on its way to decode); the serial is remembered so the
    request is ended on arrival. Serials are never reused, so a tombstone left
    by a request that was held elsewhere can never end a later request that
    reuses its id. Bounded: tombstones of requests that had already been ended
    elsewhere would otherwise pile up.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._serials: OrderedDict[int, str | None] = OrderedDict()
        self._capacity = capacity

    def add(self, serial: int, error: str | None) -> None:
        self._serials[serial] = error
        if len(self._serials) > self._capacity:
            self._serials.popitem(last=False)

    def take(self, serial: int, keep: bool = False) -> tuple[bool, str | None]:
        """Whether the request was aborted (and its error). keep: more samples of it may still arrive."""
        if serial in self._serials:
            return True, self._serials[serial] if keep else self._serials.pop(serial)
        return False, None
