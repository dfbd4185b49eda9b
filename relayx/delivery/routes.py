"""
Where a domain's mail goes: fixed smart hosts, or the domain's MX hosts.

MX selection follows RFC 5321 section 5.1 for a backup MX: lowest preference
first, equal preferences in random order, and never a host whose preference
is equal to or higher than this node's own for the domain, so that two
backups never hand mail back and forth.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import attrs
from twisted.internet.interfaces import IReactorTime

from relayx.config import MXRoute, Route, parse_route
from relayx.dns import LookupAddresses, LookupFailed, LookupMX, MXRecords
from relayx.reply import Reply
from relayx.ttlcache import TTLCache


@attrs.frozen
class Target:
    """
    One host to try: the address to connect to, its port, the name its
    certificate must bear, and the TLS policy (``none``, ``opportunistic``,
    ``required`` or ``verify``).
    """

    address: str
    port: int
    name: str
    tls: str = "opportunistic"


@attrs.frozen
class TLSPolicy:
    mode: str = "opportunistic"
    #: the name to verify instead of the host's (``verify`` only)
    name: str | None = None


class NoRoute(Exception):
    """
    No host can take the domain's mail now (temporary, from our side).
    """


class Undeliverable(NoRoute):
    """
    The domain's DNS says its mail can never be delivered from here: a null
    MX (RFC 7505) or no MX host left below this node's own preference (RFC
    5321 5.1: "the message MUST be returned as undeliverable"). The
    recipients fail at once with ``reply``, and their senders get a DSN.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


#: how long a run-time route (``relayctl route``) is used as read: a re-route
#: applies to deliveries that start at most this long after it (a delivery
#: under way keeps its destination anyway)
OVERRIDE_FRESH = 1.0


class RouteTable:
    """
    Resolves a domain to the ``(host, port)`` list to try, in order.
    """

    def __init__(
        self,
        routes: Mapping[str, tuple[Route, ...]],
        *,
        lookup_mx: LookupMX,
        lookup_addresses: LookupAddresses | None = None,
        own_names: frozenset[str],
        shuffle: Callable[[list[str]], None],
        mx_port: int = 25,
        tls: Mapping[str, TLSPolicy] | None = None,
        default_tls: TLSPolicy = TLSPolicy(),
        overrides: Callable[[str], Awaitable[tuple[str, ...] | None]] | None = None,
        copies: Mapping[str, tuple[Route, ...]] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self._routes = dict(routes)
        self._lookup_mx = lookup_mx
        self._lookup_addresses = lookup_addresses
        self._own = frozenset(n.lower().rstrip(".") for n in own_names)
        self._shuffle = shuffle
        self._mx_port = mx_port
        self._tls = dict(tls or {})
        self._default_tls = default_tls
        self._overrides = overrides
        self._copies = dict(copies or {})
        self._clock = clock
        self._mx_cache: TTLCache[str, MXRecords] | None = TTLCache(clock) if clock is not None else None
        #: run-time routes as last read (``()``: none set)
        self._override_cache: TTLCache[str, tuple[Route, ...]] | None = TTLCache(clock) if clock is not None else None

    async def targets(self, domain: str) -> list[Target]:
        """
        The hosts of a delivery queue: a domain's, or one of its copy
        destinations' (``example.org#1``).
        """
        base, _, copy = domain.partition("#")
        policy = self._tls.get(base, self._default_tls)

        def target(address: str, port: int, host: str) -> Target:
            return Target(address, port, policy.name or host, policy.mode)

        routes = (self._copies[base][int(copy) - 1],) if copy else await self.routes(domain)
        if not isinstance(routes[0], MXRoute):
            return [target(r.host, r.port, r.host) for r in routes if not isinstance(r, MXRoute)]
        hosts = await self.mx_hosts(domain)
        if self._lookup_addresses is None:
            return [target(host, self._mx_port, host) for host in hosts]
        # resolved here, with the same DNS as the MX records, not by the system
        targets = []
        for host in hosts:
            try:
                addresses = await self._lookup_addresses(host)
            except (NoRoute, LookupFailed):
                continue
            targets += [target(address, self._mx_port, host) for address in addresses]
        if not targets:
            raise NoRoute(f"no address for the MX hosts of {domain}: {', '.join(hosts)}")
        return targets

    async def routes(self, domain: str) -> tuple[Route, ...]:
        """
        The routes set at run time (a tenant cutover), else the configured
        ones, else the domain's MX hosts. Read again at most
        ``OVERRIDE_FRESH`` seconds after the last read, so a change applies to
        mail already queued, and a busy domain costs one Redis read a second,
        not one per delivery.
        """
        if self._overrides is not None:
            cache = self._override_cache
            override = cache.get(domain) if cache is not None else None
            if override is None:
                override = tuple(parse_route(r) for r in await self._overrides(domain) or ())
                if cache is not None:
                    cache.put(domain, override, OVERRIDE_FRESH)
            if override:
                return override
        return self._routes.get(domain, (MXRoute(),))

    async def _mx_records(self, domain: str) -> MXRecords:
        """
        The domain's MX records, from the cache while their TTL lasts.
        """
        cached = self._mx_cache.get(domain) if self._mx_cache is not None else None
        if cached is not None:
            return cached
        try:
            records, ttl = await self._lookup_mx(domain)
        except LookupFailed as e:
            raise NoRoute(str(e)) from None
        if self._mx_cache is not None:
            self._mx_cache.put(domain, records, ttl)
        return records

    async def mx_hosts(self, domain: str) -> list[str]:
        records = [(pref, host.lower().rstrip(".")) for pref, host in await self._mx_records(domain)]
        if not records:
            return [domain]  # the implicit MX: the domain's own address records
        if any(host == "" for _, host in records):
            raise Undeliverable(Reply(550, "5.1.10", f"{domain} accepts no mail: it publishes a null MX (RFC 7505)"))
        ours = [pref for pref, host in records if host in self._own]
        ceiling = min(ours) if ours else None
        hosts: list[str] = []
        for pref in sorted({pref for pref, _ in records}):
            if ceiling is not None and pref >= ceiling:
                break
            same = [host for p, host in records if p == pref]
            self._shuffle(same)
            hosts += same
        if not hosts:
            raise Undeliverable(
                Reply(550, "5.4.4", f"unable to route: this host is the best MX left for {domain} (RFC 5321 5.1)")
            )
        return hosts
