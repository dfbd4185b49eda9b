"""
DNS look-ups for the filters (DNS lists, SPF): one asynchronous call that
tells an empty answer (the name or the type does not exist) from a failure
(no answer in time, SERVFAIL), because SPF and DNS lists treat them apart.

dnspython's resolver blocks, so it runs in the reactor's thread pool; the
filters take the look-up as a parameter, so tests give them a real DNS
server on loopback or a table.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.threads import deferToThread


def reversed_labels(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """
    An address as reversed DNS labels: ``4.3.2.1`` for 1.2.3.4, 32 nibbles
    for IPv6. DNS lists query under their zone, PTR under ``in-addr.arpa``.
    """
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


def ptr_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """
    The name whose PTR records name ``address`` (RFC 1035 3.5, RFC 3596).
    """
    return reversed_labels(address) + (".in-addr.arpa" if address.version == 4 else ".ip6.arpa")


class LookupFailed(Exception):
    """
    DNS did not answer (timeout, SERVFAIL): the answer is unknown, not empty.
    """


#: ``await lookup(name, "A" | "AAAA" | "MX" | "TXT" | "PTR")``: the records as
#: text (addresses, MX host names by preference, TXT strings joined, PTR
#: names), ``[]`` when there are none; raises ``LookupFailed``
Lookup = Callable[[str, str], Awaitable[list[str]]]

MXRecords = Sequence[tuple[int, str]]
#: a domain's MX records and how long they may be kept (their TTL), in seconds
LookupMX = Callable[[str], Awaitable[tuple[MXRecords, float]]]
#: a host's addresses
LookupAddresses = Callable[[str], Awaitable[Sequence[str]]]

#: how long "no MX records" is kept
NEGATIVE_TTL = 60.0


def dns_lookup(nameservers: tuple[tuple[str, int], ...], timeout: float) -> Lookup:
    """
    A ``Lookup`` through dnspython with the given servers (none: the
    system's) and a timeout for each query.
    """
    import dns.exception
    import dns.resolver

    resolver = make_resolver(nameservers, timeout)

    def resolve(name: str, rdtype: str) -> list[str]:
        try:
            answer = resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except dns.exception.DNSException as e:
            raise LookupFailed(f"{rdtype} {name}: {e.__class__.__name__}") from None
        if rdtype == "TXT":
            return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        if rdtype == "MX":
            ordered = sorted(answer, key=lambda r: r.preference)
            return [r.exchange.to_text(omit_final_dot=True) for r in ordered]
        if rdtype == "PTR":
            return [r.target.to_text(omit_final_dot=True) for r in answer]
        return [r.to_text() for r in answer]

    async def lookup(name: str, rdtype: str) -> list[str]:
        return await deferToThread(resolve, name, rdtype)

    return lookup


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
            raise LookupFailed(f"MX lookup for {domain} failed: {e}") from None
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
                raise LookupFailed(f"address lookup for {host} failed: {e}") from None
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


_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
#: names of one address tried for forward confirmation (Postfix: all; a bound here)
MAX_PTR_NAMES = 10


class ReverseNames:
    """
    A client's forward-confirmed reverse DNS name (FCrDNS): a PTR name of
    the address whose A/AAAA records lead back to it, as Postfix shows in
    ``Received:``; ``None`` when there is none, it does not confirm, or DNS
    does not answer within ``timeout``. Answers are kept for ``keep``
    seconds (failures for a minute), bounded like any ``TTLCache``.
    Loopback and link-local clients are not looked up.
    """

    def __init__(self, lookup: Lookup, clock: Any, timeout: float, keep: float = 3600.0) -> None:
        from relayx.ttlcache import TTLCache

        self._lookup = lookup
        self._clock = clock
        self._timeout = timeout
        self._keep = keep
        self._names: TTLCache[str, tuple[str | None]] = TTLCache(clock)

    def known(self, ip: str) -> tuple[str | None] | None:
        """
        What ``name`` answers without looking anything up, as a 1-tuple
        (for an address it never looks up, and one whose answer is kept),
        or ``None`` when only a look-up can tell. The SMTP server asks this
        first, so that a known answer costs a session no Deferred.
        """
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return (None,)
        if address.is_loopback or address.is_link_local or address.is_unspecified:
            return (None,)
        return self._names.get(str(address))

    async def name(self, ip: str) -> str | None:
        known = self.known(ip)
        if known is not None:
            return known[0]
        address = ipaddress.ip_address(ip)
        from twisted.internet.defer import Deferred

        work = Deferred.fromCoroutine(self._confirmed(address))
        work.addTimeout(self._timeout, self._clock)
        try:
            name = await work
        except Exception:
            self._names.put(str(address), (None,), NEGATIVE_TTL)
            return None
        self._names.put(str(address), (name,), self._keep if name else NEGATIVE_TTL)
        return name

    async def _confirmed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        kind = "A" if address.version == 4 else "AAAA"
        for name in (await self._lookup(ptr_name(address), "PTR"))[:MAX_PTR_NAMES]:
            name = name.rstrip(".").lower()
            if not _HOSTNAME.fullmatch(name):
                continue  # it goes into Received: as is
            forward = await self._lookup(name, kind)
            if any(_same(found, address) for found in forward):
                return name
        return None


def _same(text: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False
