"""
Connections to Redis: a pool of txredisapi connections to one server (TCP,
TLS or a unix socket) or to the master the Sentinels name, that fails fast
(``StoreUnavailable``) instead of waiting, and never shrinks for good.

- A new connection joins the pool only after its handshake (``AUTH``,
  ``SELECT``, a look at ``maxmemory-policy``) is answered within
  ``timeout``. A handshake that fails or times out drops that connection and
  its slot tries again within two seconds. (txredisapi's own handshake stops
  every slot of the pool for good when one ``SELECT`` or ``AUTH`` fails or
  times out, which is how a Redis stall used to leave a node with no
  connection at all.)
- A call that outlasts ``timeout`` closes its connection (txredisapi's reply
  timeout), and the slot replaces it the same way.
- A watchdog asks Redis every second (``INFO memory``): the node knows when
  Redis last answered (readiness), notices an eviction policy set at run time
  (it then drops every connection, and each reconnection is refused until
  the policy is ``noeviction`` again), and rebuilds the pool if a slot ever
  stopped.

Redis refusing this node for a reason that waiting does not cure (a wrong
password, a user without the rights, an evicting Redis) is ``refused``: one
line, fatal at start-up, shown by ``/readyz`` afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayx.config import RedisConfig
from relayx.interfaces import NotApplied, StaleLease, StoreUnavailable
from relayx.redis.embedded import COMPACT_HASH_VALUE, EmbeddedAddress
from relayx.redis.scripts import Script

log = Logger()

#: the only maxmemory-policy under which Redis never drops queued mail
NO_EVICTION = "noeviction"

#: seconds between two of the watchdog's questions
WATCH_INTERVAL = 1.0

#: the starts of error replies that mean "these credentials or rights will not do"
_REFUSALS = ("WRONGPASS", "NOAUTH", "NOPERM", "ERR invalid password", "ERR AUTH", "ERR Client sent AUTH")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def is_refusal(text: str) -> bool:
    """
    Whether a Redis error reply refuses the credentials or rights.
    """
    return text.startswith(_REFUSALS)


def _passing(text: str) -> bool:
    """
    Whether a Redis error reply is one that waiting cures (busy with a
    script, loading its data, a replica without its master).
    """
    return text.startswith(("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"))


async def compact_hash_problem(redis: RedisConnection) -> str | None:
    """
    Why Redis will hold queued messages in more memory than it needs to: its
    ``hash-max-listpack-value`` (``-ziplist-`` before Redis 7) below
    ``COMPACT_HASH_VALUE``; ``None`` when it is not, or cannot be read (a user
    without CONFIG). A warning, never a refusal: the mail is safe either way.
    """
    try:
        reply = await redis.call("execute_command", "CONFIG", "GET", "hash-max-*-value")
    except StoreUnavailable:
        # CONFIG not allowed (or renamed away), or Redis gone again: nothing to say
        return None
    values = [_text(v) for v in (reply or [])]
    found = dict(zip(values[::2], values[1::2], strict=False))
    value = found.get("hash-max-listpack-value", found.get("hash-max-ziplist-value", ""))
    if not value.isdigit() or int(value) >= COMPACT_HASH_VALUE:
        return None
    return (
        f"Redis at {redis.where} has hash-max-listpack-value {value}: a queued message whose sender, "
        f"Message-ID or Subject is longer takes about 500 bytes more; set hash-max-listpack-value "
        f"{COMPACT_HASH_VALUE} (hash-max-ziplist-value before Redis 7)"
    )


def eviction_problem(policy: str, where: str) -> str | None:
    """
    The one line to show when ``policy`` lets Redis drop keys, else ``None``.
    """
    if policy == NO_EVICTION:
        return None
    return (
        f"Redis at {where} has maxmemory-policy {policy}: it may evict queued mail; set maxmemory-policy {NO_EVICTION}"
    )


class RedisRefused(NotApplied):
    """
    Redis refuses this node for a reason that waiting does not cure (wrong
    credentials, missing rights, an eviction policy); ``str()`` is one line.
    """


@attrs.define
class _Link:
    """
    What the connections of one pool learnt about their server.
    """

    where: str
    #: why Redis refuses this node (credentials, rights, eviction), or None
    refused: str | None = None
    #: the last maxmemory-policy read, or None before the first answer
    policy: str | None = None
    #: whether to log refusals (at start-up, the node shows them as its one line instead)
    loud: bool = False
    #: use an evicting Redis anyway (``relayx check``, which reports it among everything else)
    evicting_ok: bool = False

    def refuse(self, why: str) -> None:
        if why != self.refused and self.loud:
            log.error("{why}", why=why)
        self.refused = why

    def accept(self, policy: str) -> None:
        if self.refused is not None:
            log.info(
                "Redis at {where} accepts relayx again (maxmemory-policy {policy})", where=self.where, policy=policy
            )
        self.refused = None
        self.policy = policy


async def _eviction_policy(protocol: Any, where: str) -> str:
    """
    Redis's ``maxmemory-policy``, read with ``INFO memory`` (or ``CONFIG
    GET`` where INFO is not allowed); ``RedisRefused`` when neither is.
    """
    from txredisapi import ResponseError

    try:
        info = _text(await protocol.execute_command("INFO", "memory"))
        for line in info.splitlines():
            if line.startswith("maxmemory_policy:"):
                return line.split(":", 1)[1].strip()
    except ResponseError as e:
        if _passing(str(e)):
            raise
    try:
        reply = await protocol.execute_command("CONFIG", "GET", "maxmemory-policy")
        if isinstance(reply, list) and len(reply) == 2:
            return _text(reply[1])
    except ResponseError as e:
        if _passing(str(e)):
            raise
    raise RedisRefused(
        f"Redis at {where} does not let relayx read maxmemory-policy: allow its user INFO (or CONFIG GET)"
    )


async def _handshake(protocol: Any, link: _Link | None, want_master: bool = False) -> None:
    """
    Authenticate, check the role (behind Sentinels), select the database and
    check the eviction policy; raises on any failure.
    """
    from txredisapi import ResponseError

    where = link.where if link is not None else "?"
    try:
        if protocol.password is not None:
            await protocol.auth(protocol.password, protocol.username)
        if want_master:
            role = await protocol.role()
            if _text(role[0]) != "master":
                raise StoreUnavailable(f"{where}: not a master")
        if protocol.dbid:
            await protocol.select(protocol.dbid)
        policy = await _eviction_policy(protocol, where)
    except ResponseError as e:
        if link is not None and is_refusal(str(e)):
            link.refuse(f"Redis at {where} refused relayx: {e}")
        raise
    except RedisRefused as e:
        if link is not None:
            link.refuse(str(e))
        raise
    problem = eviction_problem(policy, where)
    if link is not None:
        if problem is not None and not link.evicting_ok:
            link.refuse(problem)
            raise RedisRefused(problem)
        link.accept(policy)


def _usable(protocol: Any) -> None:
    """
    Finish what txredisapi's ``connectionMade`` does once its handshake passed.
    """
    protocol.connected = 1
    protocol._ready = True
    protocol._waiting_for_connect, waiting = [], protocol._waiting_for_connect
    for d in waiting:
        d.callback(protocol)


def _unusable(protocol: Any, failure: Failure) -> None:
    """
    Drop a connection whose handshake failed; its slot tries again.
    """
    from txredisapi import RedisError

    if not failure.check(RedisError, StoreUnavailable, ConnectionError, TimeoutError):
        log.failure("Redis handshake: unexpected error", failure)
    transport = protocol.transport
    if transport is not None:
        transport.abortConnection()


class _OneCopyCommands:
    """
    Commands encoded with one copy of each argument: txredisapi's own
    encoding copies every argument three times, which for a message body
    in an enqueue's arguments was the largest copy of accepting it.
    """

    #: txredisapi's encoding of one argument
    _encode_value: Callable[[Any], bytes]

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        parts = [b"*%d" % len(args)]
        for arg in args:
            value = arg if type(arg) is bytes else self._encode_value(arg)
            parts.append(b"\r\n$%d\r\n" % len(value))
            parts.append(value)
        parts.append(b"\r\n")
        return b"".join(parts)


def _protocol_classes() -> tuple[type, type]:
    import txredisapi

    class HandshakeProtocol(_OneCopyCommands, txredisapi.RedisProtocol):  # type: ignore[misc]
        """
        txredisapi's protocol with our handshake: a failure drops this one
        connection instead of stopping the pool.
        """

        def connectionMade(self) -> None:
            link = getattr(self.factory, "link", None)
            d = Deferred.fromCoroutine(_handshake(self, link))
            d.addCallbacks(lambda _: _usable(self), lambda f: _unusable(self, f))

    class SentinelProtocol(_OneCopyCommands, txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
        """
        The same behind Sentinels, where the server must also be the master
        (checked with ``ROLE``; with ``charset=None`` it is bytes, which
        txredisapi's own check does not expect).
        """

        def connectionMade(self) -> None:
            link = getattr(self.factory, "link", None)
            d = Deferred.fromCoroutine(_handshake(self, link, want_master=self.factory.is_master))
            d.addCallbacks(lambda _: _usable(self), lambda f: _unusable(self, f))

    return HandshakeProtocol, SentinelProtocol


class RedisConnection:
    """
    A txredisapi connection pool that fails fast: a command while no
    connection is up, or one Redis does not answer in time, raises
    ``StoreUnavailable`` instead of waiting for a reconnection.
    """

    def __init__(
        self,
        make_pool: Callable[[], Any],
        clock: IReactorTime,
        timeout: float,
        where: str,
        sentinel: Any = None,
        link: _Link | None = None,
    ) -> None:
        self._make_pool = make_pool
        self._link = link if link is not None else _Link(where)
        self._pool = make_pool()
        self._clock = clock
        self._timeout = timeout
        self.where = where
        self._sentinel = sentinel
        self._closing = False
        #: when Redis last answered the watchdog (the reactor's seconds), or None
        self.answered_at: float | None = None
        self._watching = False
        self._watch = LoopingCall(self._check)
        self._watch.clock = clock
        #: told each command's latency in seconds (the node's metrics)
        self.observe: Callable[[float], None] = lambda seconds: None

    @property
    def _factory(self) -> Any:
        return getattr(self._pool, "_factory", None)

    @property
    def connected(self) -> bool:
        # txredisapi keeps the live connection count on the handler's factory
        return bool(getattr(self._factory, "size", 0))

    @property
    def pool_size(self) -> int:
        """
        How many connections are up (of the pool's ``poolsize``).
        """
        return int(getattr(self._factory, "size", 0))

    @property
    def refused(self) -> str | None:
        """
        Why Redis refuses this node (credentials, rights, eviction policy),
        or ``None``.
        """
        return self._link.refused

    def problem(self) -> str | None:
        """
        Why this node cannot use Redis right now, in one line, or ``None``.
        """
        if self._link.refused is not None:
            return self._link.refused
        if not self.connected:
            return f"Redis at {self.where} not connected"
        now = self._clock.seconds()
        if (
            self._watching
            and self.answered_at is not None
            and now - self.answered_at > self._timeout + 2 * WATCH_INTERVAL
        ):
            return f"Redis at {self.where} has not answered for {now - self.answered_at:.0f}s"
        return None

    def report_refusals(self) -> None:
        """
        From now on, log each new reason Redis refuses this node (before,
        whoever starts the node shows ``refused`` as its one line).
        """
        self._link.loud = True
        if self._link.refused is not None:
            log.error("{why}", why=self._link.refused)

    def watch(self) -> None:
        """
        Start the watchdog (every second: ask Redis, check the pool).
        """
        if not self._watching:
            self._watching = True
            self.answered_at = self._clock.seconds()
            self._watch.start(WATCH_INTERVAL, now=False).addErrback(lambda f: log.failure("Redis watchdog stopped", f))

    def _check(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check_once())

    async def _check_once(self) -> None:
        """
        One look: rebuild a pool with a stopped slot; ask Redis its
        eviction policy, dropping every connection when it may evict.
        """
        try:
            factory = self._factory
            if factory is not None and not self._closing:
                slots = getattr(factory, "slots", [])
                if any(not slot.service.running for slot in slots):
                    log.warn(
                        "Redis at {where}: a pool connection stopped reconnecting; rebuilding the pool",
                        where=self.where,
                    )
                    self._rebuild()
                    return
            if not self.connected:
                return
            try:
                info = _text(await self._call("execute_command", "INFO", "memory"))
            except StoreUnavailable:
                return
            self.answered_at = self._clock.seconds()
            policy = next(
                (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("maxmemory_policy:")),
                None,
            )
            if policy is None:
                return
            problem = eviction_problem(policy, self.where)
            if problem is not None and not self._link.evicting_ok:
                self._link.refuse(problem)
                self._drop_all()
            else:
                self._link.accept(policy)
        except Exception:
            log.failure("Redis watchdog: unexpected error (it keeps watching)")

    def _drop_all(self) -> None:
        """
        Close every pooled connection; the slots reconnect (and handshake).
        """
        for conn in list(getattr(self._factory, "pool", [])):
            if conn.transport is not None:
                conn.transport.abortConnection()

    def _rebuild(self) -> None:
        old = self._pool
        self._pool = self._make_pool()
        Deferred.fromCoroutine(_disconnect(old))

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
        if self._link.refused is not None:
            raise RedisRefused(self._link.refused)
        return await self._call(method, *args, **kwargs)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from txredisapi import ResponseError

        if not self.connected:
            raise NotApplied(f"not connected to Redis at {self.where}")
        started = self._clock.seconds()
        d: Deferred[Any] = getattr(self._pool, method)(*args, **kwargs)
        # a little later than txredisapi's reply timeout, which fires first
        # and closes the connection (a reply that never comes must not pin it)
        d.addTimeout(self._timeout + 1, self._clock)
        d.addBoth(self._observed, started)
        try:
            return await d
        except ResponseError as e:
            text = str(e)
            if text.startswith("STALE"):
                raise StaleLease(text) from None
            if is_refusal(text):
                raise RedisRefused(f"Redis at {self.where} refused {method}: {text}") from None
            raise NotApplied(f"Redis at {self.where} refused {method}: {text}") from None
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

        if self._link.refused is not None:
            raise RedisRefused(self._link.refused)
        if not self.connected:
            raise NotApplied(f"not connected to Redis at {self.where}")
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
            if isinstance(error, ResponseError):
                raise NotApplied(f"Redis at {self.where}: {error}") from None
            raise StoreUnavailable(f"Redis at {self.where}: {error}") from None
        except Exception as e:
            raise StoreUnavailable(f"Redis at {self.where}: {type(e).__name__}: {e}") from None
        return result, int(acked)

    def _observed(self, result: Any, started: float) -> Any:
        self.observe(self._clock.seconds() - started)
        return result

    @property
    def timeout(self) -> float:
        """
        How long a call may take before it counts as failed (seconds).
        """
        return self._timeout

    @property
    def clock(self) -> IReactorTime:
        """
        The clock the connection times its calls with.
        """
        return self._clock

    async def wait_connected(self, timeout: float) -> bool:
        """
        Whether a connection comes up within ``timeout`` seconds (``False``
        at once when Redis refuses this node).
        """
        waited = 0.0
        while not self.connected and self._link.refused is None and waited < timeout:
            await deferLater(self._clock, 0.05, lambda: None)
            waited += 0.05
        return self.connected and self._link.refused is None

    async def disconnect(self) -> None:
        self._closing = True
        if self._watch.running:
            self._watch.stop()
        await _disconnect(self._pool)
        if self._sentinel is not None:
            await self._sentinel.disconnect()


async def _disconnect(pool: Any) -> None:
    try:
        await pool.disconnect()
    except Exception as e:
        log.warn("closing a Redis pool: {why}", why=repr(e))


def _factory_class() -> type:
    import txredisapi

    protocol, _ = _protocol_classes()

    class Factory(txredisapi.RedisFactory):  # type: ignore[misc]
        noisy = False
        # after an outage, reconnect within two seconds of Redis being back
        maxDelay = 2
        link: _Link | None = None

    Factory.protocol = protocol
    return Factory


def _pool_on(
    endpoint: IStreamClientEndpoint,
    name: str,
    db: int,
    username: str | None,
    password: str | None,
    timeout: float,
    poolsize: int,
    link: _Link,
) -> Any:
    import txredisapi

    factory = _factory_class()(
        name,
        db or None,  # database 0 needs no SELECT
        poolsize,
        True,
        txredisapi.ConnectionHandler,
        None,
        password,
        timeout,
        False,
        username,
    )
    factory.link = link
    factory.startConnecting(endpoint)
    return factory.handler


def tls_options(host: str, ca_file: Path | None) -> Any:
    """
    Client TLS that checks the server's certificate for ``host`` against
    ``ca_file`` (PEM, one or more certificates), or the system's CAs.
    """
    from twisted.internet import ssl

    if ca_file is None:
        return ssl.optionsForClientTLS(host, trustRoot=ssl.platformTrust())
    text = ca_file.read_text()
    marker = "-----END CERTIFICATE-----"
    pems = [block + marker for block in text.split(marker) if "-----BEGIN CERTIFICATE-----" in block]
    certificates = [ssl.Certificate.loadPEM(pem.encode()) for pem in pems]
    return ssl.optionsForClientTLS(host, trustRoot=ssl.trustRootFromCertificates(certificates))


async def connect(
    host: str,
    port: int,
    db: int,
    password: str | None,
    clock: IReactorTime,
    timeout: float,
    poolsize: int = 8,
    *,
    username: str | None = None,
    tls: Any = None,
    evicting_ok: bool = False,
) -> RedisConnection:
    """
    A pool to ``host:port`` (over ``tls``, client TLS options, when given)
    that reconnects by itself after an outage.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return _watched(endpoint, f"{host}:{port}", db, username, password, clock, timeout, poolsize, evicting_ok)


async def connect_unix(
    path: Path,
    password: str | None,
    clock: IReactorTime,
    timeout: float,
    poolsize: int = 8,
    evicting_ok: bool = False,
) -> RedisConnection:
    """
    A pool to the Redis listening on the unix socket ``path``.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXClientEndpoint

    endpoint = UNIXClientEndpoint(reactor, str(path), timeout=timeout)
    return _watched(endpoint, f"unix:{path}", 0, None, password, clock, timeout, poolsize, evicting_ok)


def _watched(
    endpoint: IStreamClientEndpoint,
    where: str,
    db: int,
    username: str | None,
    password: str | None,
    clock: IReactorTime,
    timeout: float,
    poolsize: int,
    evicting_ok: bool,
) -> RedisConnection:
    """
    A watched pool of connections to one server through ``endpoint``.
    """
    link = _Link(where, evicting_ok=evicting_ok)

    def make_pool() -> Any:
        return _pool_on(endpoint, where, db, username, password, timeout, poolsize, link)

    redis = RedisConnection(make_pool, clock, timeout, where, link=link)
    redis.watch()
    return redis


async def connect_sentinel(
    sentinels: tuple[tuple[str, int], ...],
    master_name: str,
    db: int,
    password: str | None,
    clock: IReactorTime,
    timeout: float,
    poolsize: int = 8,
    username: str | None = None,
    evicting_ok: bool = False,
) -> RedisConnection:
    """
    A pool to the master that the Sentinels name; after a failover it
    reconnects to the new master by itself.
    """
    import txredisapi

    _, protocol = _protocol_classes()
    where = f"master {master_name!r} of Sentinels " + ",".join(f"{h}:{p}" for h, p in sentinels)
    link = _Link(where, evicting_ok=evicting_ok)

    class SentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
        noisy = False
        # look for the new master often: a failover takes a second or two
        maxDelay = 2

    SentinelFactory.protocol = protocol
    SentinelFactory.link = link

    sentinel = txredisapi.Sentinel(list(sentinels), connectTimeout=timeout, replyTimeout=timeout)
    # while the old master is down the Sentinels name none; ask again soon
    sentinel.discovery_timeout = 1

    def make_pool() -> Any:
        return sentinel.master_for(
            master_name,
            factory_class=SentinelFactory,
            dbid=db or None,
            poolsize=poolsize,
            charset=None,
            password=password,
            username=username,
            replyTimeout=timeout,
            convertNumbers=False,
        )

    redis = RedisConnection(make_pool, clock, timeout, where, sentinel, link)
    redis.watch()
    return redis


async def open_redis(
    config: RedisConfig,
    clock: IReactorTime,
    embedded: EmbeddedAddress | None = None,
    poolsize: int = 8,
    evicting_ok: bool = False,
) -> RedisConnection:
    """
    The connection ``[redis]`` describes: the embedded Redis at
    ``embedded``, the Sentinels' master, or the URL (TLS for ``rediss://``).
    ``evicting_ok`` is for diagnostics only: a node never writes to a Redis
    that may evict.
    """
    r = config
    if r.embedded:
        assert embedded is not None
        return await connect_unix(embedded.socket, embedded.password, clock, r.timeout, poolsize, evicting_ok)
    if r.sentinels:
        return await connect_sentinel(
            r.sentinels, r.master_name, r.db, r.password, clock, r.timeout, poolsize, r.username, evicting_ok
        )
    tls = tls_options(r.host, r.tls_ca_file) if r.tls else None
    return await connect(
        r.host,
        r.port,
        r.db,
        r.password,
        clock,
        r.timeout,
        poolsize,
        username=r.username,
        tls=tls,
        evicting_ok=evicting_ok,
    )
