"""
A small in-memory cache whose entries expire on the node's clock: MX records
for their TTL, SPF results for a minute. Bounded, so a flood of distinct keys
costs memory up to ``max_entries`` and no more.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """
    ``get`` answers while the entry's time lasts; past ``max_entries`` the
    oldest entries make room (insertion order).
    """

    def __init__(self, clock: IReactorTime, max_entries: int = 10000) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock.seconds():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V, ttl: float) -> None:
        self._entries.pop(key, None)
        while len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (self._clock.seconds() + ttl, value)
