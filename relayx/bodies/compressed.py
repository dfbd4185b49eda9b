"""
zstd compression around any body store.

A compressed body is one zstd frame, which starts with zstd's magic number;
a body that does not is read as it is, so bodies stored before compression
was turned on still read (a message never starts with those bytes: relayx
puts a ``Received:`` line first). A body that would not shrink is stored
as it is, unless it happens to start with the magic number itself.
Compressing runs in the thread pool: zstd releases the GIL, and a 25 MB
message would otherwise hold the reactor for tens of milliseconds.
"""

from __future__ import annotations

import zstandard
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayx.bodies import off_thread
from relayx.interfaces import BodyPage, BodyStoreUnavailable, IBodyStore

MAGIC = b"\x28\xb5\x2f\xfd"


@implementer(IBodyStore)
class CompressedBodyStore:
    """
    ``level`` is zstd's (1 fastest … 19; 3 is zstd's default); ``None``
    stores bodies as they are but still reads compressed ones, for turning
    compression off with compressed bodies queued. A frame announcing more
    than ``max_size`` bytes is refused rather than inflated.
    """

    def __init__(
        self,
        inner: IBodyStore,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        level: int | None = 3,
        max_size: int = 1024**3,
    ) -> None:
        self.inner = inner
        self.level = level
        self.max_size = max_size
        self._reactor = reactor
        self._pool = pool

    def __repr__(self) -> str:
        return f"CompressedBodyStore({self.inner!r}, level={self.level})"

    def _compress(self, body: bytes) -> bytes:
        assert self.level is not None
        packed = zstandard.ZstdCompressor(level=self.level).compress(body)
        return packed if len(packed) < len(body) or body.startswith(MAGIC) else body

    def _decompress(self, data: bytes, ref: str) -> bytes:
        size = zstandard.frame_content_size(data)
        if size < 0 or size > self.max_size:
            raise BodyStoreUnavailable(f"body {ref}: a zstd frame of unknown or excessive size ({size})")
        try:
            return zstandard.ZstdDecompressor().decompress(data)
        except zstandard.ZstdError as e:
            raise BodyStoreUnavailable(f"body {ref}: damaged zstd frame: {e}") from e

    async def put(self, queue_id: str, body: bytes) -> str:
        if self.level is not None:
            body = await off_thread(self._reactor, self._pool, "compressing a body", self._compress, body)
        return await self.inner.put(queue_id, body)

    async def get(self, ref: str) -> bytes:
        data = await self.inner.get(ref)
        if not data.startswith(MAGIC):
            return data
        return await off_thread(self._reactor, self._pool, "decompressing a body", self._decompress, data, ref)

    async def delete(self, ref: str) -> None:
        await self.inner.delete(ref)

    async def list_older_than(self, cutoff: float, cursor: str | None, limit: int) -> BodyPage:
        return await self.inner.list_older_than(cutoff, cursor, limit)

    async def check(self) -> None:
        await self.inner.check()
