"""
Wiring: the one place that picks implementations, the reactor and the
sources of time and randomness, and connects them.
"""

from __future__ import annotations

import enum
import gc
import ipaddress
import os
import random
import secrets
import socket
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent

from relayx import __version__
from relayx.bodies.compressed import CompressedBodyStore
from relayx.bodies.directory import DirectoryBodyStore
from relayx.bodies.s3 import S3BodyStore
from relayx.bodies.sweep import OrphanSweep
from relayx.bodies.watched import WatchedBodyStore
from relayx.checks.chain import Filter, FilterChain, FilterChains
from relayx.checks.dnslists import DNSLists
from relayx.checks.greylist import Greylist
from relayx.checks.ratelimit import RateLimit
from relayx.checks.recipients import RecipientPolicy
from relayx.checks.rspamd import Rspamd
from relayx.checks.spf_filter import SPF, SPFCache
from relayx.config import Config, FilterConfig
from relayx.delivery.bounce import Bouncer
from relayx.delivery.routes import RouteTable, TLSPolicy
from relayx.delivery.scheduler import Prober, Scheduler
from relayx.delivery.smtp import SMTPDeliverer, Timeouts
from relayx.dns import ReverseNames, dns_lookup, dns_lookup_addresses, dns_lookup_mx
from relayx.interfaces import IBodyStore, StoreUnavailable
from relayx.loops import steady_loop
from relayx.metrics import Metrics
from relayx.ops.api import AdminAPI, Cluster
from relayx.ops.bulk import BulkRunner
from relayx.ops.history import INTERVAL as HISTORY_INTERVAL
from relayx.ops.history import History
from relayx.ops.http import admin_http, admin_site
from relayx.ops.panel import Panel
from relayx.queue.quota import QuotaLimits, Quotas, Usage, memory
from relayx.queue.redis import RedisQueue
from relayx.redis.connection import RedisConnection, RedisRefused, compact_hash_problem, open_redis
from relayx.redis.embedded import EmbeddedRedis
from relayx.reuseport import listen_shared, parse_tcp
from relayx.smtp.client import SMTPClientProtocol
from relayx.smtp.server import Limits, SMTPServerFactory
from relayx.smtp.tls import ReloadingTLS, TLSFilesError, client_tls_factory
from relayx.spool import Spool
from relayx.workers import WorkerSupervisor, worker_command

log = Logger()

#: seconds between two additions of a process's counts of jobs accepted and delivered to Redis
TRAFFIC_FLUSH = 1.0
#: heartbeats a node may miss before it is no longer listed as live
NODE_SILENCE = 3


def new_queue_id() -> str:
    """
    A queue id: 16 hex digits, random so that nodes never collide.
    """
    return secrets.token_hex(8).upper()


def body_store(config: Config, reactor: Any, pool: ThreadPool) -> WatchedBodyStore | None:
    """
    The body store ``[bodies]`` names; ``None`` for ``redis``: bodies stay
    whole in the message hashes. Always read through the zstd wrapper, so
    that bodies stored compressed still read after compression is turned
    off, and watched for the node's readiness.
    """
    b = config.bodies
    store: IBodyStore
    if b.backend == "directory":
        store = DirectoryBodyStore(b.directory, reactor, pool)
    elif b.backend == "s3":
        s3 = b.s3
        assert s3.bucket is not None
        store = S3BodyStore(
            s3.bucket,
            reactor,
            pool,
            prefix=s3.prefix,
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            addressing_style=s3.addressing_style,
            timeout=s3.timeout,
            attempts=s3.attempts,
            ca_file=s3.ca_file,
        )
    else:
        return None
    level = b.compression_level if b.compression == "zstd" else None
    max_size = 2 * config.smtp.max_message_size + 1024**2
    return WatchedBodyStore(CompressedBodyStore(store, reactor, pool, level, max_size=max_size))


class _Quiet(Factory):
    """
    A client factory that does not log every connection it makes.
    """

    noisy = False


def build_routes(config: Config, reactor: Any, queue: RedisQueue, fqdn: str) -> RouteTable:
    """
    Where each domain's mail goes: configured routes, run-time overrides
    from the queue, or MX records through the configured DNS.
    """
    d = config.delivery
    return RouteTable(
        {domain.name: domain.routes for domain in config.domains},
        lookup_mx=dns_lookup_mx(d.nameservers, d.connect_timeout),
        lookup_addresses=dns_lookup_addresses(d.nameservers, d.connect_timeout),
        own_names=frozenset({config.node.hostname, fqdn}),
        shuffle=random.shuffle,
        mx_port=d.mx_port,
        tls={
            domain.name: TLSPolicy(domain.tls or d.tls, domain.tls_name)
            for domain in config.domains
            if domain.tls or domain.tls_name
        },
        default_tls=TLSPolicy(d.tls),
        overrides=queue.route_override,
        copies={domain.name: domain.copy_to for domain in config.domains if domain.copy_to},
        clock=reactor,
    )


def build_deliverer(config: Config, reactor: Any, routes: RouteTable) -> SMTPDeliverer:
    """
    The SMTP client side: connects to a route's hosts in order.
    """
    d = config.delivery

    async def connect_smtp(host: str, port: int) -> SMTPClientProtocol:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=d.connect_timeout)
        protocol = SMTPClientProtocol(reactor)
        await endpoint.connect(_Quiet.forProtocol(lambda: protocol))
        return protocol

    return SMTPDeliverer(
        helo_name=d.helo_name,
        targets=routes.targets,
        connect=connect_smtp,
        timeouts=Timeouts(command=d.command_timeout, data=d.data_timeout),
        clock=reactor,
        client_tls=client_tls_factory(d.tls_ca_file),
        # one idle session per delivery the node runs at once: parallel mailboxes reuse theirs
        idle_sessions=config.queue.workers,
    )


def build_smtp_factory(
    config: Config,
    reactor: Any,
    metrics: Metrics,
    queue: RedisQueue,
    deliverer: SMTPDeliverer,
    filters: FilterChains | None,
    quotas: Quotas | None = None,
) -> SMTPServerFactory:
    """
    The front door: limits, TLS, the recipient policy (with callouts
    through the deliverer), the queue as the store and its quotas.
    """
    s = config.smtp
    tls = None
    if s.tls_certificate is not None and s.tls_key is not None:
        try:
            tls = ReloadingTLS(s.tls_certificate, s.tls_key)
        except TLSFilesError as e:
            raise StartupError(f"{config.source}: smtp.tls_certificate: {e}") from None
    names = ReverseNames(
        dns_lookup(config.delivery.nameservers, config.filter.dns_timeout), reactor, config.filter.dns_timeout
    )
    spool = Spool(config.node.data_dir / "spool", threshold=s.spool_threshold)
    try:
        spool.prepare()
    except OSError as e:
        raise StartupError(f"{config.source}: node.data_dir: no SMTP spool at {spool.directory}: {e}") from None
    return SMTPServerFactory(
        spool=spool,
        room=quotas.refuse if quotas is not None else None,
        metrics=metrics,
        filters=filters,
        hostname=config.node.hostname,
        limits=Limits(
            max_message_size=s.max_message_size,
            max_recipients=s.max_recipients,
            max_line_length=s.max_line_length,
            max_errors=s.max_errors,
            max_hops=s.max_hops,
            command_timeout=s.command_timeout,
            data_timeout=s.data_timeout,
            max_connections=s.max_connections,
            max_connections_per_ip=s.max_connections_per_ip,
            reject_bare_lf=s.bare_lf == "reject",
            min_data_rate=s.min_data_rate,
            data_rate_grace=s.data_rate_grace,
        ),
        tls=tls,
        policy=RecipientPolicy(config.domains, cache=queue, callout=deliverer.verify, clock=reactor),
        store=queue,
        clock=reactor,
        new_queue_id=new_queue_id,
        # RFC 5321 4.5.1: <Postmaster> without a domain is the first domain's
        postmaster_domain=config.domains[0].name if config.domains else None,
        reverse_names=names.name,
        known_names=names.known,
    )


def build_quotas(config: Config) -> Quotas:
    """
    The queue's quotas as ``[queue]`` and the domains set them.
    """
    q = config.queue
    return Quotas(
        QuotaLimits(
            messages=q.quota_messages,
            bytes=q.quota_bytes,
            domain_messages=q.domain_quota_messages,
            domain_bytes=q.domain_quota_bytes,
            domains={d.name: (d.quota_messages, d.quota_bytes) for d in config.domains},
            memory_headroom=q.memory_headroom,
            warn_at=q.quota_warning,
        )
    )


def build_delivery_loops(
    config: Config, reactor: Any, queue: RedisQueue, deliverer: SMTPDeliverer, metrics: Metrics
) -> tuple[Scheduler, Prober, Bouncer]:
    """
    The loops that move the queue: the scheduler (claims and delivers),
    the prober (finds a failing destination back) and the bouncer (DSNs).
    """
    q = config.queue
    scheduler = Scheduler(
        owner=config.node.id,
        queue=queue,
        deliverer=deliverer,
        clock=reactor,
        workers=q.workers,
        poll_interval=q.poll_interval,
        lease_duration=q.lease,
        default=q.throttle,
        throttles={name: domain.throttle for domain in config.domains for name in domain.queues()},
        metrics=metrics,
    )
    prober = Prober(
        owner=config.node.id,
        queue=queue,
        deliverer=deliverer,
        clock=reactor,
        interval=q.probe_interval,
        resumed=lambda domain: scheduler.poll(),
        throttle_of=scheduler.throttle_of,
    )
    bouncer = Bouncer(
        queue=queue,
        clock=reactor,
        hostname=config.node.hostname,
        new_queue_id=new_queue_id,
        interval=max(1.0, 2 * q.poll_interval),
        store=queue,
    )
    scheduler.relayed = bouncer.relayed
    return scheduler, prober, bouncer


class _V6OnlyPort(tcp.Port):
    """
    A TCP port whose IPv6 socket takes IPv6 only (``IPV6_V6ONLY``), as
    Postfix's are: ``tcp:25`` and ``tcp6:25:interface=\\:\\:`` then listen side
    by side instead of the second failing with "address in use", whatever
    the system's ``net.ipv6.bindv6only`` says.
    """

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = super().createInternetSocket()
        if self.addressFamily == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return sock


class _ListeningReactor:
    """
    The reactor as the endpoint parser sees it: TCP listeners are
    ``_V6OnlyPort``; everything else is the reactor's own.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> IListeningPort:
        listening = _V6OnlyPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening


#: the listen queue of a TCP listener whose description sets none (Twisted's own is 50;
#: the kernel caps it at net.core.somaxconn): senders falling through to a backup MX
#: all at once overflowed 50 and hung until their own timeout
LISTEN_BACKLOG = 1024


async def listen(reactor: Any, description: str, factory: Any) -> IListeningPort:
    """
    Listen as an endpoint description says (``tcp:25``, ``tcp6:25:interface=\\:\\:``),
    IPv6 sockets taking IPv6 only: a dual-stack node lists both.
    """
    if description.split(":", 1)[0] in ("tcp", "tcp6") and "backlog=" not in description:
        description += f":backlog={LISTEN_BACKLOG}"
    port: IListeningPort = await serverFromString(_ListeningReactor(reactor), description).listen(factory)
    return port


#: how often each process reads the queue's usage for its quotas (seconds)
QUOTA_READ_EVERY = 1.0


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NodeRole(enum.Enum):
    """
    What a process of a node does: everything (the first, or the only one),
    or take SMTP on the node's shared ports.
    """

    NODE = "node"
    SMTP_WORKER = "smtp-worker"


class StartupError(Exception):
    """
    The node cannot start; ``str()`` is the one line to show.
    """


class RelayNode(Service):
    """
    One relayx node: the SMTP listeners, the delivery scheduler and the
    Redis connection (and the embedded Redis when none is configured).
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        role: NodeRole = NodeRole.NODE,
        worker_args: Sequence[str] | None = None,
        freeze_startup: bool = False,
    ) -> None:
        self.config = config
        #: move what start-up built out of the garbage collector's sight once
        #: the node is up (a process of its own; not a test sharing its process)
        self.freeze_startup = freeze_startup
        self.reactor = reactor
        self.role = role
        #: the configuration arguments for SMTP workers; ``None``: this process
        #: takes SMTP alone whatever ``[node] processes`` says (``twistd -n relayx``)
        self.worker_args = worker_args
        self.supervisor: WorkerSupervisor | None = None
        self.embedded: EmbeddedRedis | None = None
        self.redis: RedisConnection | None = None
        self.queue: RedisQueue | None = None
        self.smtp: SMTPServerFactory | None = None
        self.scheduler: Scheduler | None = None
        self.prober: Prober | None = None
        self.deliverer: SMTPDeliverer | None = None
        self.bouncer: Bouncer | None = None
        self.heartbeat: LoopingCall | None = None
        self.quotas = build_quotas(config)
        self.quota_loop: LoopingCall | None = None
        self.bulk: BulkRunner | None = None
        self.history: History | None = None
        self.traffic: LoopingCall | None = None
        self.bodies: WatchedBodyStore | None = None
        self.body_threads: ThreadPool | None = None
        self.sweep: OrphanSweep | None = None
        self.ports: list[IListeningPort] = []
        #: the TCP ports bound with SO_REUSEPORT, as descriptions for the workers
        self.shared: list[str] = []
        self.metrics = Metrics()
        self._stopped = False
        #: set when start-up failed, so that ``relayx`` exits with status 1
        self.failed_to_start = False

    def startService(self) -> None:
        super().startService()

        def failed(failure: Failure) -> None:
            error = failure.value
            text = str(error) if isinstance(error, StartupError) else failure.getErrorMessage()
            log.critical("relayx cannot start: {why}", why=text)
            self.failed_to_start = True
            if self.reactor.running:
                self.reactor.stop()

        Deferred.fromCoroutine(self.start()).addErrback(failed)

    async def start(self) -> None:
        """
        Build the node bottom-up (Redis, queue, delivery, front door),
        then open its ports and start its loops.
        """
        config, reactor = self.config, self.reactor
        await self._open_bodies()
        self.redis = await self._connect_redis()
        self.queue = RedisQueue.configured(self.redis, config, self.bodies)
        # the counts of jobs accepted and delivered (the history's rates) reach Redis once a second
        queue = self.queue
        self.traffic = LoopingCall(lambda: Deferred.fromCoroutine(queue.flush_traffic()))
        self.traffic.clock = reactor
        if self.role is NodeRole.SMTP_WORKER:
            # takes mail, nothing more: delivery, the admin listener, the
            # heartbeat and the orphan sweep are the first process's
            fqdn = await self._fqdn()
            self.deliverer = build_deliverer(config, reactor, build_routes(config, reactor, self.queue, fqdn))
            self.smtp = build_smtp_factory(
                config, reactor, self.metrics, self.queue, self.deliverer, self._filters(), self.quotas
            )
            self.quota_loop = steady_loop("quota", self._read_usage, reactor, QUOTA_READ_EVERY, now=True)
            await self._listen_smtp()
            self.traffic.start(TRAFFIC_FLUSH, now=False)
            self._freeze_startup()
            log.info("relayx node {node}: SMTP worker ready", node=config.node.id)
            return
        if self.redis.connected:
            for warning in await self.queue.persistence_warnings():
                log.warn("{warning}", warning=warning)
            try:
                # the first heartbeat is a real write: missing rights show now, not as 451s
                await self._beat()
            except RedisRefused as e:
                await self.redis.disconnect()
                raise StartupError(str(e)) from None
            # queues written by an earlier relayx move to the compact orders before
            # this node claims or lists (migrate.lua, bounded batches; a no-op when done)
            upgraded = await self.queue.upgrade()
            if upgraded:
                log.info("relayx node {node}: {queues} queues upgraded", node=config.node.id, queues=upgraded)
        fqdn = await self._fqdn()
        self.deliverer = build_deliverer(config, reactor, build_routes(config, reactor, self.queue, fqdn))
        self.smtp = build_smtp_factory(
            config, reactor, self.metrics, self.queue, self.deliverer, self._filters(), self.quotas
        )
        self.quota_loop = steady_loop("quota", self._read_usage, reactor, QUOTA_READ_EVERY, now=True)
        self.scheduler, self.prober, self.bouncer = build_delivery_loops(
            config, reactor, self.queue, self.deliverer, self.metrics
        )
        self.bulk = BulkRunner(self.queue, config.node.id, reactor)
        if config.admin.history:
            # the charts' samples, one a minute, taken by one node of the cluster
            self.history = History(
                self.queue,
                self.redis,
                self.queue.prefix,
                {d.name: d.queues() for d in config.domains},
                config.node.id,
                reactor,
                kept=int(config.admin.history // HISTORY_INTERVAL),
            )
        await self._listen_smtp()
        await self._listen_admin()
        self._start_workers()
        self.heartbeat = steady_loop("heartbeat", self._heartbeat, reactor, config.queue.heartbeat, now=True)
        self.scheduler.start()
        self.prober.start()
        self.bouncer.start()
        self.bulk.start()
        self.traffic.start(TRAFFIC_FLUSH, now=False)
        if self.history is not None:
            self.history.start()
        if self.bodies is not None:
            b = config.bodies
            self.sweep = OrphanSweep(
                self.bodies, self.queue.message_exists, reactor, b.orphan_age, b.sweep_interval, b.sweep_batch
            )
            self.sweep.start()
        self._freeze_startup()
        log.info("relayx node {node} started", node=config.node.id)

    def _freeze_startup(self) -> None:
        """
        Collect start-up's garbage, then freeze what is left (modules,
        configuration, the wiring: tens of thousands of objects that live as
        long as the process). Each full collection walked all of them again,
        and every SMTP session allocates enough to set collections off: with
        a connection per message that was 4 % of the node's CPU, 1.7 % once
        frozen. Frozen objects are still freed by reference counting; only
        cycles among them are never collected, and they live for good anyway.
        """
        if self.freeze_startup:
            gc.collect()
            gc.freeze()

    async def _open_bodies(self) -> None:
        """
        The body store, checked: storage that cannot be written now stops the node.
        """
        pool = ThreadPool(minthreads=0, maxthreads=self.config.bodies.threads, name="relayx-bodies")
        pool.start()
        self.body_threads = pool
        self.bodies = body_store(self.config, self.reactor, pool)
        if self.bodies is None:
            return
        try:
            await self.bodies.check()
        except StoreUnavailable as e:
            pool.stop()
            self.body_threads = None
            raise StartupError(f"{self.config.source}: bodies: {e}") from None
        log.info("message bodies in {store}", store=repr(self.bodies))

    async def _connect_redis(self) -> RedisConnection:
        """
        The configured Redis, or the embedded one started first; a Redis
        that does not answer yet is not fatal (mail gets 451 until it does).
        """
        config, reactor = self.config, self.reactor
        address = None
        if config.redis.embedded and self.role is NodeRole.SMTP_WORKER:
            address = EmbeddedRedis.recorded(config.node.data_dir)
            if address is None:
                raise StartupError(f"no embedded Redis running under {config.node.data_dir}")
        elif config.redis.embedded:
            self.embedded = EmbeddedRedis(reactor, reactor, config.node.data_dir)
            try:
                await self.embedded.start()
            except Exception as e:
                raise StartupError(f"embedded Redis: {e}") from None
            address = self.embedded.address
        redis = await open_redis(config.redis, reactor, address)
        redis.observe = self.metrics.redis_seconds.observe
        if await redis.wait_connected(config.redis.timeout):
            log.info("connected to Redis at {where}", where=redis.where)
        elif redis.refused is not None:
            # wrong credentials, missing rights, an evicting Redis: waiting will not help
            why = redis.refused
            await redis.disconnect()
            if self.embedded is not None:
                await self.embedded.stop()
            raise StartupError(why)
        else:
            log.warn("Redis at {where} is not answering; mail gets 451 until it does", where=redis.where)
        redis.report_refusals()
        if redis.connected and (problem := await compact_hash_problem(redis)) is not None:
            log.warn("{why}", why=problem)
        return redis

    @property
    def _shares_ports(self) -> bool:
        return self.role is NodeRole.SMTP_WORKER or (self.worker_args is not None and self.config.node.processes > 1)

    async def _listen_smtp(self) -> None:
        """
        Listen on ``[smtp] listen``; with several processes, the TCP ports
        are bound with SO_REUSEPORT by each of them (``self.shared``).
        """
        config = self.config
        for description in config.smtp.listen:
            shared = parse_tcp(description) if self._shares_ports else None
            try:
                if shared is not None:
                    port = listen_shared(self.reactor, shared, self.smtp)  # type: ignore[arg-type]
                    self.shared.append(shared.description(port.getHost().port))  # type: ignore[attr-defined]
                elif self.role is NodeRole.SMTP_WORKER:
                    continue  # a unix socket or TLS port stays with the first process
                else:
                    port = await listen(self.reactor, description, self.smtp)
            except Exception as e:
                raise StartupError(f"{config.source}: smtp.listen: cannot listen on {description!r}: {e}") from None
            self.ports.append(port)
            log.info("SMTP listening on {address}", address=str(port.getHost()))

    def _start_workers(self) -> None:
        """
        The node's other SMTP processes, on the ports just bound.
        """
        count = self.config.node.processes - 1
        if self.worker_args is None or count < 1 or not self.shared:
            return
        self.supervisor = WorkerSupervisor(
            self.reactor,
            self.reactor,
            worker_command(self.config.source, self.worker_args, self.shared),
            count,
            on_exit=_process_ended,
        )
        self.supervisor.start()

    async def _listen_admin(self) -> None:
        config, queue, redis = self.config, self.queue, self.redis
        assert queue is not None and redis is not None

        def ready() -> str | None:
            if self._stopped:
                return "shutting down"
            why = redis.problem()
            if why is not None:
                return why
            if not self.ports:
                return "not listening for SMTP"
            if self.bodies is not None and self.bodies.failing:
                return f"body store failing: {self.bodies.failing}"
            return self.quotas.full

        throttles = {name: d.throttle for d in config.domains for name in d.queues()}
        site = admin_http(
            admin_site(
                self.metrics,
                ready=ready,
                domains=[q for d in config.domains for q in d.queues()],
                queue_summary=lambda queues: queue.queue_summary(queues, self.reactor.seconds()),
                paces=queue.paces,
                throttle=lambda name: throttles.get(name, config.queue.throttle),
                clock=self.reactor,
                redis_connected=lambda: redis.problem() is None,
                api=AdminAPI(
                    queue=queue,
                    bulk=queue,
                    domains=config.domains,
                    tokens=config.admin.tokens,
                    clock=self.reactor,
                    history=self.history,
                    cluster=Cluster(
                        node_id=config.node.id,
                        durability=config.redis.durability,
                        redis_where=redis.where,
                        redis_connected=lambda: redis.connected,
                        node_silence=NODE_SILENCE * config.queue.heartbeat,
                    ),
                ),
                panel=Panel(),
                metrics_tokens=config.admin.tokens if config.admin.metrics_token_required else None,
            )
        )
        for description in config.admin.listen:
            try:
                port = await listen(self.reactor, description, site)
            except Exception as e:
                raise StartupError(f"{config.source}: admin.listen: cannot listen on {description!r}: {e}") from None
            self.ports.append(port)
            log.info("admin API, panel, metrics and health on {address}", address=str(port.getHost()))

    def _filters(self) -> FilterChains | None:
        """
        The filter chains [filter] and the domains' [domain.filter] ask
        for, or ``None`` when they ask for none.
        """
        config = self.config
        own = {d.name: d.filter for d in config.domains if d.filter is not None}
        if not config.filter.active and not any(f.active for f in own.values()):
            return None
        spf_cache = SPFCache(dns_lookup(config.delivery.nameservers, config.filter.dns_timeout), self.reactor)
        agent = Agent(self.reactor)
        return FilterChains(
            default=self._chain(config.filter, spf_cache, agent),
            domains={name: self._chain(f, spf_cache, agent) for name, f in own.items()},
        )

    def _chain(self, f: FilterConfig, spf_cache: SPFCache, agent: Agent) -> FilterChain:
        reactor = self.reactor
        assert self.queue is not None
        chain: list[Filter] = []
        if f.connections_per_minute or f.messages_per_minute:
            chain.append(
                RateLimit(
                    self.queue.redis,
                    self.queue.prefix,
                    reactor,
                    connections_per_minute=f.connections_per_minute,
                    messages_per_minute=f.messages_per_minute,
                )
            )
        if f.dnsbl or f.dnswl:
            lookup = dns_lookup(self.config.delivery.nameservers, f.dns_timeout)
            chain.append(DNSLists(f.dnsbl, f.dnswl, lookup, reactor))
        if f.spf:
            chain.append(SPF(spf_cache, self.config.node.hostname, dict(f.spf_actions)))
        if f.greylist_delay:
            chain.append(
                Greylist(
                    self.queue.redis,
                    self.queue.prefix,
                    f.greylist_delay,
                    f.greylist_expiry,
                    reactor,
                    networks=[ipaddress.ip_network(n, strict=False) for n in f.greylist_networks],
                    domains=frozenset(f.greylist_domains),
                )
            )
        if f.rspamd_url:
            chain.append(
                Rspamd(
                    f.rspamd_url,
                    f.rspamd_timeout,
                    f.rspamd_fail_open,
                    reactor,
                    agent,
                    self.config.node.hostname,
                )
            )
        return FilterChain(chain)

    async def _fqdn(self) -> str:
        """
        This host's fully qualified name (a DNS look-up, so in a thread), or
        ``[node] hostname`` when the look-up fails or takes over 5 seconds.
        """
        reactor = self.reactor
        try:
            d: Deferred[str] = deferToThreadPool(reactor, reactor.getThreadPool(), socket.getfqdn)
            d.addTimeout(5, reactor)
            return await d
        except Exception as e:
            log.warn(
                "cannot look up this host's name ({why}); using {name}", why=repr(e), name=self.config.node.hostname
            )
            return self.config.node.hostname

    async def _beat(self) -> None:
        assert self.queue is not None
        await self.queue.heartbeat(
            self.config.node.id,
            self.reactor.seconds(),
            NODE_SILENCE * self.config.queue.heartbeat,
            {"hostname": self.config.node.hostname, "pid": str(os.getpid()), "version": __version__},
        )

    async def _read_usage(self) -> None:
        """
        What the quotas compare against: the queue's totals and its queues'
        counts (counters: a few keys whatever the depth) and Redis's memory.
        """
        queue, redis = self.queue, self.redis
        assert queue is not None and redis is not None
        try:
            totals = await queue.totals()
            names = [q for d in self.config.domains for q in d.queues()]
            summary = await queue.queue_summary(names, self.reactor.seconds())
            used, maximum = memory(_text(await redis.call("execute_command", "INFO", "memory")))
        except StoreUnavailable:
            return  # Redis itself says no to mail meanwhile; keep the last reading
        self.quotas.update(
            Usage(
                messages=totals.messages,
                bytes=totals.bytes,
                queues={name: (counts.total, counts.bytes) for name, counts in summary.items()},
                memory_used=used,
                memory_max=maximum,
            )
        )
        for scope, ratio in self.quotas.ratios().items():
            self.metrics.quota.labels(scope=scope).set(ratio)

    async def _heartbeat(self) -> None:
        try:
            await self._beat()
        except StoreUnavailable as e:
            log.warn("heartbeat not recorded: {why}", why=str(e))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.stop())

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        workers_ended = None
        if self.supervisor is not None:
            # the workers shut down (421, grace) alongside this process
            workers_ended = Deferred.fromCoroutine(self.supervisor.stop(self.config.smtp.shutdown_grace + 10))
        await DeferredList([Deferred.fromCoroutine(_stop_listening(p)) for p in self.ports])
        self.ports = []
        if self.smtp is not None:
            busy = self.smtp.shut_down()
            waited = 0.0
            while busy and waited < self.config.smtp.shutdown_grace:
                await deferLater(self.reactor, 0.1, lambda: None)
                waited += 0.1
                busy = [session for session in busy if not session.shut_down()]
            for session in busy:
                # the grace period is over: no 250 was sent, so the client keeps the message
                session.shut_down(force=True)
        if workers_ended is not None:
            await workers_ended
        if self.quota_loop is not None and self.quota_loop.running:
            self.quota_loop.stop()
        if self.heartbeat is not None and self.heartbeat.running:
            self.heartbeat.stop()
        if self.bulk is not None:
            self.bulk.stop()
        if self.history is not None:
            self.history.stop()
        if self.prober is not None:
            self.prober.stop()
        if self.bouncer is not None:
            self.bouncer.stop()
        if self.sweep is not None:
            self.sweep.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.deliverer is not None:
            self.deliverer.close_idle()
        if self.body_threads is not None:
            self.body_threads.stop()
        if self.traffic is not None and self.traffic.running:
            self.traffic.stop()
        if self.queue is not None and self.redis is not None and self.redis.connected:
            await self.queue.flush_traffic()
        if self.redis is not None:
            await self.redis.disconnect()
        if self.embedded is not None:
            await self.embedded.stop()


def _process_ended(pid: int) -> None:
    """
    A worker ended: its live gauges no longer count (multi-process metrics).
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


async def _stop_listening(port: IListeningPort) -> None:
    await maybeDeferred(port.stopListening)


class OperatorAPI:
    """
    The admin API over a configuration's Redis and body store, without a
    node or HTTP: what ``relayx VERB --config FILE`` runs its verbs through,
    so that they work whichever nodes are up.
    """

    def __init__(self, api: AdminAPI, redis: RedisConnection, pool: ThreadPool | None) -> None:
        self.api = api
        self.redis = redis
        self.pool = pool

    async def close(self) -> None:
        await self.redis.disconnect()
        if self.pool is not None:
            self.pool.stop()


async def operator_api(config: Config, reactor: Any) -> OperatorAPI:
    """
    Connect to the cluster's Redis (for an embedded one, the port its node
    recorded) and open the body store; ``StartupError`` in one line when
    either cannot be reached.
    """
    embedded = None
    if config.redis.embedded:
        embedded = EmbeddedRedis.recorded(config.node.data_dir)
        if embedded is None:
            raise StartupError(
                f"{config.source}: no [redis] url and no embedded Redis running under {config.node.data_dir}"
            )
    pool: ThreadPool | None = None
    bodies = None
    if config.bodies.backend != "redis":
        pool = ThreadPool(minthreads=0, maxthreads=config.bodies.threads, name="relayx-bodies")
        pool.start()
        bodies = body_store(config, reactor, pool)
    redis = await open_redis(config.redis, reactor, embedded, poolsize=1)
    if not await redis.wait_connected(config.redis.timeout):
        why = redis.refused or f"Redis at {redis.where} is not answering"
        await redis.disconnect()
        if pool is not None:
            pool.stop()
        raise StartupError(f"{config.source}: {why}")
    queue = RedisQueue.configured(redis, config, bodies)
    api = AdminAPI(
        queue=queue,
        bulk=queue,
        domains=config.domains,
        tokens=(),
        clock=reactor,
        cluster=Cluster(
            node_id=f"{config.node.id} (direct)",
            durability=config.redis.durability,
            redis_where=redis.where,
            redis_connected=lambda: redis.connected,
            node_silence=NODE_SILENCE * config.queue.heartbeat,
        ),
    )
    return OperatorAPI(api, redis, pool)
