"""
Where a domain's mail goes: fixed smart hosts, or the domain's MX hosts.

MX selection follows RFC 5321 section 5.1 for a backup MX: lowest preference
first, equal preferences in random order, and never a host whose preference
is equal to or higher than this node's own for the domain, so that two
backups never hand mail back and forth.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread

from relayx.config import MXRoute, Route, parse_route

MXRecords = Sequence[tuple[int, str]]
#: a domain's MX records and how long they may be kept (their TTL), in seconds
LookupMX = Callable[[str], Awaitable[tuple[MXRecords, float]]]

#: how long "no MX records" is kept
NEGATIVE_TTL = 60.0
LookupAddresses = Callable[[str], Awaitable[Sequence[str]]]


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
        self._mx_cache: dict[str, tuple[float, MXRecords]] = {}

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
            except NoRoute:
                continue
            targets += [target(address, self._mx_port, host) for address in addresses]
        if not targets:
            raise NoRoute(f"no address for the MX hosts of {domain}: {', '.join(hosts)}")
        return targets

    async def routes(self, domain: str) -> tuple[Route, ...]:
        """
        The routes set at run time (a tenant cutover), else the configured
        ones, else the domain's MX hosts. Read at each delivery, so a change
        applies to mail already queued.
        """
        if self._overrides is not None:
            override = await self._overrides(domain)
            if override:
                return tuple(parse_route(r) for r in override)
        return self._routes.get(domain, (MXRoute(),))

    async def _mx_records(self, domain: str) -> MXRecords:
        """
        The domain's MX records, from the cache while their TTL lasts.
        """
        now = self._clock.seconds() if self._clock is not None else None
        cached = self._mx_cache.get(domain)
        if cached is not None and now is not None and now < cached[0]:
            return cached[1]
        records, ttl = await self._lookup_mx(domain)
        if now is not None:
            self._mx_cache[domain] = (now + ttl, records)
        return records

    async def mx_hosts(self, domain: str) -> list[str]:
        records = [(pref, host.lower().rstrip(".")) for pref, host in await self._mx_records(domain)]
        if not records:
            return [domain]  # the implicit MX: the domain's own address records
        if any(host == "" for _, host in records):
            raise NoRoute(f"{domain} publishes a null MX (RFC 7505)")
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
            raise NoRoute(f"this node is the most preferred MX of {domain}")
        return hosts


def dns_lookup_mx(nameservers: tuple[tuple[str, int], ...], timeout: float) -> LookupMX:
    """
    MX records through dnspython's resolver, in a thread so the reactor
    never waits; an empty answer or a missing name gives no records.
    """
    import dns.exception
    import dns.resolver

    resolver = make_resolver(nameservers, timeout)

    def lookup(domain: str) -> tuple[MXRecords, float]:
        try:
            answer = resolver.resolve(domain, "MX")
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return [], NEGATIVE_TTL
        except dns.exception.DNSException as e:
            raise NoRoute(f"MX lookup for {domain} failed: {e}") from None
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        return records, float(answer.rrset.ttl if answer.rrset is not None else NEGATIVE_TTL)

    async def lookup_async(domain: str) -> tuple[MXRecords, float]:
        return await deferToThread(lookup, domain)

    return lookup_async


def dns_lookup_addresses(nameservers: tuple[tuple[str, int], ...], timeout: float) -> LookupAddresses:
    """
    A host's IPv4 and IPv6 addresses through dnspython, in a thread.
    """
    import ipaddress

    import dns.exception
    import dns.resolver

    resolver = make_resolver(nameservers, timeout)

    def lookup(host: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            pass
        found: list[str] = []
        for kind in ("A", "AAAA"):
            try:
                found += [r.to_text() for r in resolver.resolve(host, kind)]
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as e:
                raise NoRoute(f"address lookup for {host} failed: {e}") from None
        return found

    async def lookup_async(host: str) -> list[str]:
        return await deferToThread(lookup, host)

    return lookup_async


def make_resolver(nameservers: tuple[tuple[str, int], ...], timeout: float) -> Any:
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = [host for host, _ in nameservers]
        resolver.port = nameservers[0][1]
    resolver.lifetime = timeout
    return resolver
