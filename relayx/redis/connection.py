"""
Connections to Redis: a txredisapi pool to one server or to the master the
Sentinels name, that fails fast (``StoreUnavailable``) instead of waiting
for a reconnection, and reports each command's latency.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from relayx.config import RedisConfig
from relayx.interfaces import StaleLease, StoreUnavailable
from relayx.redis.scripts import Script

log = Logger()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisConnection:
    """
    A txredisapi connection pool that fails fast: a command while no
    connection is up, or one Redis does not answer in time, raises
    ``StoreUnavailable`` instead of waiting for a reconnection.
    """

    def __init__(self, pool: Any, clock: IReactorTime, timeout: float, where: str, sentinel: Any = None) -> None:
        self._pool = pool
        self._clock = clock
        self._timeout = timeout
        self.where = where
        self._sentinel = sentinel
        #: told each command's latency in seconds (the node's metrics)
        self.observe: Callable[[float], None] = lambda seconds: None

    @property
    def connected(self) -> bool:
        # txredisapi keeps the live connection count on the handler's factory
        return bool(getattr(getattr(self._pool, "_factory", None), "size", 0))

    async def script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """
        Run a Lua script by its hash, loading it first when Redis does not
        have it (a restart, a failover to a replica that never saw it).
        """
        try:
            return await self.call("evalsha", script.sha, keys, args)
        except StoreUnavailable as e:
            if "NOSCRIPT" not in str(e) and "No script matching" not in str(e):
                raise
        return await self.call("eval", script.source, keys, args)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from txredisapi import ResponseError

        if not self.connected:
            raise StoreUnavailable(f"not connected to Redis at {self.where}")
        started = self._clock.seconds()
        d: Deferred[Any] = getattr(self._pool, method)(*args, **kwargs)
        d.addTimeout(self._timeout, self._clock)
        d.addBoth(self._observed, started)
        try:
            return await d
        except ResponseError as e:
            text = str(e)
            if text.startswith("STALE"):
                raise StaleLease(text) from None
            raise StoreUnavailable(f"Redis at {self.where} refused {method}: {text}") from None
        except Exception as e:
            raise StoreUnavailable(f"Redis at {self.where}: {type(e).__name__}: {e}") from None

    async def script_then_wait(
        self, script: Script, keys: list[str], args: list[Any], replicas: int, timeout: float
    ) -> tuple[Any, int]:
        """
        Run a script and ``WAIT`` for ``replicas`` replicas on the same
        connection, so the wait covers that write; the script's result and
        how many replicas confirmed it.
        """
        from twisted.internet.defer import FirstError
        from txredisapi import ResponseError

        if not self.connected:
            raise StoreUnavailable(f"not connected to Redis at {self.where}")
        try:
            taken: Deferred[Any] = self._pool.pipeline()
            taken.addTimeout(self._timeout, self._clock)
            pipe = await taken
            pipe.execute_command("EVAL", script.source, len(keys), *keys, *args)
            pipe.execute_command("WAIT", replicas, _ms(timeout))
            done: Deferred[Any] = pipe.execute_pipeline()
            done.addTimeout(self._timeout + timeout, self._clock)
            result, acked = await done
        except FirstError as e:
            error = e.subFailure.value
            if isinstance(error, ResponseError) and str(error).startswith("STALE"):
                raise StaleLease(str(error)) from None
            raise StoreUnavailable(f"Redis at {self.where}: {error}") from None
        except Exception as e:
            raise StoreUnavailable(f"Redis at {self.where}: {type(e).__name__}: {e}") from None
        return result, int(acked)

    def _observed(self, result: Any, started: float) -> Any:
        self.observe(self._clock.seconds() - started)
        return result

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
        if self._sentinel is not None:
            await self._sentinel.disconnect()


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
    # after an outage, reconnect within two seconds of Redis being back
    pool._factory.maxDelay = 2
    return RedisConnection(pool, clock, timeout, f"{host}:{port}")


async def connect_sentinel(
    sentinels: tuple[tuple[str, int], ...],
    master_name: str,
    db: int,
    password: str | None,
    clock: IReactorTime,
    timeout: float,
    poolsize: int = 8,
) -> RedisConnection:
    """
    A pool to the master that the Sentinels name; after a failover it
    reconnects to the new master by itself.
    """
    import txredisapi

    class BytesSentinelProtocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
        """
        txredisapi checks a master's ROLE as text; with ``charset=None`` it
        is bytes, and every connection would be dropped as "not a master".
        """

        def connectionMade(self) -> Any:
            def check_role(role: list[Any]) -> Any:
                if self.factory.is_master and _text(role[0]) != "master":
                    self.transport.loseConnection()
                    return None
                return txredisapi.RedisProtocol.connectionMade(self)

            if self.password is not None:
                self.auth(self.password, self.username)
            return self.role().addCallback(check_role)

    class BytesSentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
        protocol = BytesSentinelProtocol
        noisy = False
        # look for the new master often: a failover takes a second or two
        maxDelay = 2

    sentinel = txredisapi.Sentinel(list(sentinels), connectTimeout=timeout, replyTimeout=timeout)
    # while the old master is down the Sentinels name none; ask again soon
    sentinel.discovery_timeout = 1
    pool = sentinel.master_for(
        master_name,
        factory_class=BytesSentinelFactory,
        dbid=db,
        poolsize=poolsize,
        charset=None,
        password=password,
        replyTimeout=timeout,
        convertNumbers=False,
    )
    where = f"master {master_name!r} of Sentinels " + ",".join(f"{h}:{p}" for h, p in sentinels)
    return RedisConnection(pool, clock, timeout, where, sentinel)


async def open_redis(
    config: RedisConfig, clock: IReactorTime, embedded_port: int | None = None, poolsize: int = 8
) -> RedisConnection:
    """
    The connection ``[redis]`` describes: the embedded Redis on
    ``embedded_port``, the Sentinels' master, or the URL.
    """
    r = config
    if r.embedded:
        assert embedded_port is not None
        return await connect("127.0.0.1", embedded_port, 0, None, clock, r.timeout, poolsize)
    if r.sentinels:
        return await connect_sentinel(r.sentinels, r.master_name, r.db, r.password, clock, r.timeout, poolsize)
    return await connect(r.host, r.port, r.db, r.password, clock, r.timeout, poolsize)
