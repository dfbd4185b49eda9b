"""
Bodies in Redis itself, as before body stores existed: for small setups,
where one Redis holding everything is simplest. Every byte of every queued
message is then in Redis's memory (and its AOF).

One hash per body, ``<prefix>:body:<queue id>``, with the body (``body``)
and when it was stored (``at``, milliseconds): one key, one command each.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from relayx.bodies import check_queue_id
from relayx.interfaces import BodyNotFound, BodyPage, BodyStoreUnavailable, IBodyStore, StoredBody, StoreUnavailable

KIND = "redis"

#: which of the keys a SCAN step found were stored before a cutoff; a
#: read-only script so that a page costs one round trip
#
# KEYS     body hashes <p>:body:<qid> (at most the page's limit)
# ARGV[1]  cutoff, milliseconds since the epoch
# Invariant: reads only. Cost: one HGET per key, at most the page's limit.
OLDER = b"""
local found = {}
for i, key in ipairs(KEYS) do
  local at = redis.call('HGET', key, 'at')
  if at and tonumber(at) < tonumber(ARGV[1]) then
    found[#found + 1] = key
    found[#found + 1] = at
  end
end
return found
"""


class RedisCalls(Protocol):
    """
    What the store needs of a Redis connection (``RedisConnection``): one
    command at a time, raising ``StoreUnavailable`` when Redis cannot answer.
    """

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@implementer(IBodyStore)
class RedisBodyStore:
    def __init__(self, redis: RedisCalls, prefix: str, clock: IReactorTime) -> None:
        self._redis = redis
        self.prefix = prefix
        self._clock = clock

    def __repr__(self) -> str:
        return f"RedisBodyStore(prefix={self.prefix!r})"

    def _key(self, queue_id: str) -> str:
        return f"{self.prefix}:body:{queue_id}"

    def _queue_id(self, ref: str) -> str:
        scheme, _, queue_id = ref.partition(":")
        try:
            if scheme != KIND:
                raise ValueError(ref)
            return check_queue_id(queue_id)
        except ValueError:
            raise BodyNotFound(f"not a reference to a body of a {KIND} store: {ref!r}") from None

    async def _call(self, what: str, method: str, *args: Any) -> Any:
        try:
            return await self._redis.call(method, *args)
        except StoreUnavailable as e:
            raise BodyStoreUnavailable(f"body in Redis: {what}: {e}") from e

    async def put(self, queue_id: str, body: bytes) -> str:
        check_queue_id(queue_id)
        at = round(self._clock.seconds() * 1000)
        await self._call(f"cannot store {queue_id}", "hmset", self._key(queue_id), {"body": body, "at": at})
        return f"{KIND}:{queue_id}"

    async def get(self, ref: str) -> bytes:
        queue_id = self._queue_id(ref)
        body = await self._call(f"cannot read {queue_id}", "hget", self._key(queue_id), "body")
        if body is None:
            raise BodyNotFound(f"body in Redis: no body {queue_id}")
        return bytes(body)

    async def delete(self, ref: str) -> None:
        queue_id = self._queue_id(ref)
        await self._call(f"cannot delete {queue_id}", "delete", self._key(queue_id))

    async def list_older_than(self, cutoff: float, cursor: str | None, limit: int) -> BodyPage:
        """
        One ``SCAN`` step (``COUNT limit``) over the body keys, then their
        ages in one read-only script.
        """
        match = f"{self.prefix}:body:*"
        start = int(cursor) if cursor and cursor.isdigit() else 0
        following, keys = await self._call("cannot list", "scan", start, match, max(1, limit))
        found: list[StoredBody] = []
        if keys:
            answer = await self._call("cannot list", "eval", OLDER, [_text(k) for k in keys], [round(cutoff * 1000)])
            head = len(self._key(""))
            for key, at in zip(answer[::2], answer[1::2], strict=True):
                queue_id = _text(key)[head:]
                found.append(StoredBody(f"{KIND}:{queue_id}", queue_id, int(at) / 1000))
        following = int(following)
        return BodyPage(tuple(found), str(following) if following else None)

    async def check(self) -> None:
        await self._call("not usable", "exists", self._key("check"))
