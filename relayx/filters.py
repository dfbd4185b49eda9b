"""
Filtering before the queue: what a client may send is decided while it is
connected, so that spam the primary would refuse is never queued, let alone
replayed when it comes back.

Filters answer at three points of the session (connection, MAIL, RCPT) with
a reply to send instead of the normal one, ``None`` to pass, or ``ALLOW`` to
end the chain (a whitelisted client). Their shared state (greylisting, rate
counters) lives in Redis, so every node of the cluster decides the same.
A filter that fails (DNS timeout, Redis hiccup) is logged and skipped: it
never blocks mail.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from relayx.address import Mailbox
from relayx.queue.redis import load_script
from relayx.reply import Reply

_RATE_SCRIPT = load_script("ratelimit.lua")

log = Logger()


class _Allow:
    def __repr__(self) -> str:
        return "ALLOW"


#: a verdict that ends the chain: the client is trusted
ALLOW = _Allow()

Verdict = Reply | _Allow | None


class Filter:
    """
    A filter answers at any of the three points; the default passes.
    """

    name = "filter"

    async def connection(self, client: str) -> Verdict:
        return None

    async def mail(self, client: str, sender: str) -> Verdict:
        return None

    async def recipient(self, client: str, sender: str, recipient: Mailbox) -> Verdict:
        return None


class FilterChain:
    """
    Runs the filters in order; the first reply or ``ALLOW`` decides.
    """

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = list(filters)

    async def _run(self, point: str, call: Callable[[Filter], Awaitable[Verdict]]) -> Reply | None:
        for f in self.filters:
            try:
                verdict = await call(f)
            except Exception as e:
                log.warn("filter {filter} skipped at {point}: {why}", filter=f.name, point=point, why=repr(e))
                continue
            if verdict is ALLOW:
                return None
            if isinstance(verdict, Reply):
                return verdict
        return None

    async def connection(self, client: str) -> Reply | None:
        return await self._run("connection", lambda f: f.connection(client))

    async def mail(self, client: str, sender: str) -> Reply | None:
        return await self._run("MAIL", lambda f: f.mail(client, sender))

    async def recipient(self, client: str, sender: str, recipient: Mailbox) -> Reply | None:
        return await self._run("RCPT", lambda f: f.recipient(client, sender, recipient))


def reversed_ip(client: str) -> str | None:
    """
    The DNSBL query name of an address: ``4.3.2.1`` for 1.2.3.4, nibbles for IPv6.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return None
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


LookupA = Callable[[str], Awaitable[list[str] | None]]


def dns_lookup_a(nameservers: tuple[tuple[str, int], ...], timeout: float) -> LookupA:
    """
    A records of a name via dnspython in a thread: the addresses, ``[]``
    when the name does not exist, ``None`` when DNS did not answer.
    """
    import dns.exception
    import dns.resolver

    from relayx.delivery.routes import make_resolver

    resolver = make_resolver(nameservers, timeout)

    def lookup(name: str) -> list[str] | None:
        try:
            return [r.to_text() for r in resolver.resolve(name, "A")]
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except dns.exception.DNSException:
            return None

    async def lookup_async(name: str) -> list[str] | None:
        return await deferToThread(lookup, name)

    return lookup_async


@attrs.define
class DNSLists(Filter):
    """
    DNSWL zones first (a listed client is trusted), then DNSBL zones (a
    listed client's recipients get 554 5.7.1 naming the zone). Answers are
    remembered per client for ``cache_for`` seconds.
    """

    blocklists: Sequence[str]
    allowlists: Sequence[str]
    lookup: LookupA
    clock: IReactorTime
    cache_for: float = 300.0
    name = "dnsbl"
    _cache: dict[str, tuple[float, Verdict]] = attrs.field(factory=dict)

    async def recipient(self, client: str, sender: str, recipient: Mailbox) -> Verdict:
        now = self.clock.seconds()
        cached = self._cache.get(client)
        if cached is not None and cached[0] > now:
            return cached[1]
        verdict = await self._check(client)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[client] = (now + self.cache_for, verdict)
        return verdict

    async def _check(self, client: str) -> Verdict:
        query = reversed_ip(client)
        if query is None:
            return None
        for zone in self.allowlists:
            if await self.lookup(f"{query}.{zone}"):
                return ALLOW
        for zone in self.blocklists:
            answer = await self.lookup(f"{query}.{zone}")
            if answer is None:
                log.warn("DNSBL {zone} did not answer for {client}; not used", zone=zone, client=client)
            elif answer:
                log.info("client {client} listed in {zone} ({answer})", client=client, zone=zone, answer=answer[0])
                return Reply(554, "5.7.1", f"Service unavailable; client host [{client}] blocked using {zone}")
        return None


def _network(client: str) -> str:
    """
    The client's network for greylisting: senders retry from pools of hosts.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@attrs.define
class Greylist(Filter):
    """
    The first attempt of a (client network, sender, recipient) triplet is
    deferred; a retry after ``delay`` passes, from any node of the cluster,
    and the triplet stays known for ``expiry``.
    """

    redis: Any
    prefix: str
    delay: float
    expiry: float
    clock: IReactorTime
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
    domains: frozenset[str] = frozenset()
    name = "greylist"

    async def recipient(self, client: str, sender: str, recipient: Mailbox) -> Verdict:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return None
        if any(address in network for network in self.networks):
            return None
        if sender and sender.rpartition("@")[2].lower() in self.domains:
            return None
        key = f"{self.prefix}:grey:{_network(client)}:{sender.lower()}:{recipient.canonical}"
        now_ms = int(self.clock.seconds() * 1000)
        expiry_ms = int(self.expiry * 1000)
        first = await self.redis.call("set", key, now_ms, None, expiry_ms, True)
        if first:
            return self._wait(self.delay)
        seen = int(await self.redis.call("get", key) or now_ms)
        waited = (now_ms - seen) / 1000
        if waited < self.delay:
            return self._wait(self.delay - waited)
        await self.redis.call("pexpire", key, expiry_ms)
        return None

    @staticmethod
    def _wait(seconds: float) -> Reply:
        return Reply(450, "4.2.0", f"Greylisted, please try again in {int(seconds) + 1} seconds")


RATE_WINDOW = 60.0


@attrs.define
class RateLimit(Filter):
    """
    Connections and messages per client address in the last minute (a
    sliding window, so no burst at a minute's turn), counted across the
    cluster; past the limit, ``421`` for a connection and ``450`` for a message.
    """

    redis: Any
    prefix: str
    clock: IReactorTime
    connections_per_minute: int = 0
    messages_per_minute: int = 0
    name = "ratelimit"
    _events: int = 0

    async def _count(self, kind: str, client: str) -> int:
        self._events += 1
        now_ms = int(self.clock.seconds() * 1000)
        keys = [f"{self.prefix}:rate:{kind}:{client}"]
        args = [now_ms, int(RATE_WINDOW * 1000), f"{now_ms}:{id(self)}:{self._events}"]
        return int(await self.redis.script(_RATE_SCRIPT, keys, args))

    async def connection(self, client: str) -> Verdict:
        if self.connections_per_minute and await self._count("conn", client) > self.connections_per_minute:
            return Reply(421, "4.7.0", f"Error: too many connections from {client}, try again later")
        return None

    async def mail(self, client: str, sender: str) -> Verdict:
        if self.messages_per_minute and await self._count("msg", client) > self.messages_per_minute:
            return Reply(450, "4.7.1", f"Error: too much mail from {client}, try again later")
        return None
