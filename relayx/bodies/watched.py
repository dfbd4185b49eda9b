"""
A body store that remembers whether its last operation failed, for the
node's readiness: ``/readyz`` answers 503 while the store is failing, and
ready again after the next operation that succeeds (mail, deliveries, or
the orphan sweep's next step).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from zope.interface import implementer

from relayx.interfaces import BodyPage, BodyStoreUnavailable, IBodyStore

T = TypeVar("T")


@implementer(IBodyStore)
class WatchedBodyStore:
    def __init__(self, inner: IBodyStore) -> None:
        self.inner = inner
        #: why the last operation failed, or ``None`` when it succeeded
        self.failing: str | None = None

    def __repr__(self) -> str:
        return repr(self.inner)

    async def _watch(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await call()
        except BodyStoreUnavailable as e:
            self.failing = str(e)
            raise
        self.failing = None
        return result

    async def put(self, queue_id: str, body: bytes) -> str:
        return await self._watch(lambda: self.inner.put(queue_id, body))

    async def get(self, ref: str) -> bytes:
        return await self._watch(lambda: self.inner.get(ref))

    async def delete(self, ref: str) -> None:
        await self._watch(lambda: self.inner.delete(ref))

    async def list_older_than(self, cutoff: float, cursor: str | None, limit: int) -> BodyPage:
        return await self._watch(lambda: self.inner.list_older_than(cutoff, cursor, limit))

    async def check(self) -> None:
        await self._watch(self.inner.check)
