"""
The cluster-wide queue in Redis.

Every change that touches more than one key is one Lua script in this
folder, so a node that dies between two commands leaves nothing half-done;
the scripts' headers state their keys, arguments and invariant. Times are
passed in from the node's clock (milliseconds), never read inside Redis, so
the same code runs under a test's ``Clock``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from importlib.resources import files
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from relayx.interfaces import (
    IDeliveryQueue,
    IMessageStore,
    IncomingMessage,
    Lease,
    Outcome,
    StaleLease,
    StoredMessage,
    StoreUnavailable,
)
from relayx.reply import Reply

log = Logger()


def _script(name: str) -> bytes:
    return files("relayx.queue").joinpath(name).read_bytes()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _failures(entries: tuple[tuple[str, Reply], ...]) -> str:
    return json.dumps([[rcpt, r.code, r.status, r.text] for rcpt, r in entries])


class RedisConnection:
    """
    A txredisapi connection pool that fails fast: a command while no
    connection is up, or one Redis does not answer in time, raises
    ``StoreUnavailable`` instead of waiting for a reconnection.
    """

    def __init__(self, pool: Any, clock: IReactorTime, timeout: float, where: str) -> None:
        self._pool = pool
        self._clock = clock
        self._timeout = timeout
        self.where = where

    @property
    def connected(self) -> bool:
        # txredisapi keeps the live connection count on the handler's factory
        return bool(getattr(getattr(self._pool, "_factory", None), "size", 0))

    async def call(self, method: str, *args: Any) -> Any:
        from txredisapi import ResponseError

        if not self.connected:
            raise StoreUnavailable(f"not connected to Redis at {self.where}")
        d: Deferred[Any] = getattr(self._pool, method)(*args)
        d.addTimeout(self._timeout, self._clock)
        try:
            return await d
        except ResponseError as e:
            text = str(e)
            if text.startswith("STALE"):
                raise StaleLease(text) from None
            raise StoreUnavailable(f"Redis at {self.where} refused {method}: {text}") from None
        except Exception as e:
            raise StoreUnavailable(f"Redis at {self.where}: {type(e).__name__}: {e}") from None

    async def wait_connected(self, timeout: float) -> bool:
        """
        Whether a connection comes up within ``timeout`` seconds.
        """
        waited = 0.0
        while not self.connected and waited < timeout:
            await deferLater(self._clock, 0.05, lambda: None)
            waited += 0.05
        return self.connected

    async def disconnect(self) -> None:
        await self._pool.disconnect()


async def connect(
    host: str, port: int, db: int, password: str | None, clock: IReactorTime, timeout: float, poolsize: int = 8
) -> RedisConnection:
    """
    A pool to ``host:port`` that reconnects by itself after an outage.
    """
    import txredisapi

    pool = txredisapi.lazyConnectionPool(
        host=host,
        port=port,
        dbid=db,
        poolsize=poolsize,
        reconnect=True,
        charset=None,
        password=password,
        connectTimeout=timeout,
        replyTimeout=timeout,
        convertNumbers=False,
    )
    return RedisConnection(pool, clock, timeout, f"{host}:{port}")


@implementer(IMessageStore, IDeliveryQueue)
class RedisQueue:
    """
    Messages, jobs and leases under ``prefix`` in one Redis database.
    """

    _ENQUEUE = _script("enqueue.lua")
    _CLAIM = _script("claim.lua")
    _RENEW = _script("renew.lua")
    _SETTLE = _script("settle.lua")

    def __init__(
        self,
        redis: RedisConnection,
        prefix: str,
        *,
        lease: float,
        retention: float,
        retry_schedule: tuple[float, ...],
        randrange: Callable[[int], int],
        batch: int = 100,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease = lease
        self.retention = retention
        self.retry_schedule = retry_schedule
        self._randrange = randrange
        self._batch = batch

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def enqueue(self, message: IncomingMessage) -> None:
        args: list[object] = [
            self.prefix,
            message.queue_id,
            _ms(message.received_at),
            message.sender,
            message.body,
        ]
        for domain, rcpts in message.by_domain().items():
            args += [domain, json.dumps(list(rcpts))]
        keys = [self.key("seq"), self.key("domains"), self.key("msg", message.queue_id)]
        await self.redis.call("eval", self._ENQUEUE, keys, args)

    async def claim(
        self,
        owner: str,
        now: float,
        limit: int,
        concurrency: Mapping[str, int],
        default_concurrency: int,
    ) -> list[Lease]:
        keys = [self.key("domains"), self.key("deferred"), self.key("leased"), self.key("fence")]
        args = [
            self.prefix,
            _ms(now),
            _ms(self.lease),
            owner,
            limit,
            default_concurrency,
            json.dumps(dict(concurrency)) if concurrency else "{}",
            self._randrange(1 << 30),
            self._batch,
        ]
        rows = await self.redis.call("eval", self._CLAIM, keys, args)
        return [
            Lease(
                job_id=_text(jid),
                token=int(token),
                expires=int(expires) / 1000,
                queue_id=_text(qid),
                domain=_text(domain),
                recipients=tuple(json.loads(owed)),
                attempts=int(attempts),
                created=int(created) / 1000,
            )
            for jid, token, expires, qid, domain, owed, attempts, created in rows
        ]

    async def renew(self, lease: Lease, now: float) -> Lease:
        expires = now + self.lease
        keys = [self.key("job", lease.job_id), self.key("leased"), self.key("inflight", lease.domain)]
        await self.redis.call("eval", self._RENEW, keys, [lease.job_id, lease.token, _ms(expires)])
        return lease.renewed(_ms(expires) / 1000)

    async def load(self, lease: Lease) -> StoredMessage:
        sender, body = await self.redis.call("hmget", self.key("msg", lease.queue_id), ["sender", "body"])
        if body is None:
            raise StoreUnavailable(f"message {lease.queue_id} has no body in Redis")
        return StoredMessage(sender=_text(sender), body=bytes(body))

    async def settle(self, lease: Lease, outcome: Outcome, now: float) -> str:
        keys = [
            self.key("job", lease.job_id),
            self.key("leased"),
            self.key("inflight", lease.domain),
            self.key("deferred"),
            self.key("failed"),
            self.key("ready", lease.domain),
            self.key("domains"),
            self.key("dom", lease.domain),
            self.key("msg", lease.queue_id),
        ]
        args = [
            lease.job_id,
            lease.token,
            _ms(now),
            json.dumps(list(outcome.delivered)),
            _failures(outcome.failed),
            _failures(outcome.deferred),
            outcome.unreachable or "",
            _ms(self.retention),
            ",".join(str(_ms(s)) for s in self.retry_schedule),
            self.prefix,
        ]
        return _text(await self.redis.call("eval", self._SETTLE, keys, args))
