"""
A real DNS server on loopback (twisted.names) answering from records the
test gives it: MX and A records for delivery tests, or a table of any names
(``Table``: NXDOMAIN, empty answers, SERVFAIL, CNAME chains) for the SPF
test suite and the DNS lists.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.names import authority, common, dns, error, server
from twisted.python.failure import Failure

from relayx.redis.embedded import free_port


class MemoryAuthority(authority.FileAuthority):
    def __init__(self, zone: str, records: dict[str, list[Any]]) -> None:
        # FileAuthority loads from a file; these records are given instead
        soa = dns.Record_SOA(mname=b"ns." + zone.encode(), rname=b"hostmaster." + zone.encode())
        table = {name.lower().encode(): values for name, values in records.items()}
        table.setdefault(zone.encode(), []).append(soa)
        self._given: Any = ((zone.encode(), soa), table)
        authority.FileAuthority.__init__(self, None)

    def loadFile(self, filename: object) -> None:
        self.soa, self.records = self._given


class ServerFailure(Exception):
    """
    The table says this name fails: the server answers SERVFAIL.
    """


class Table(common.ResolverBase):
    """
    Authoritative for every name: ``records[name][type]`` (types as in
    ``twisted.names.dns``: ``dns.A``...), NXDOMAIN for a name not in
    ``records``, an empty answer for a type it lacks, SERVFAIL for a name in
    ``failing`` (or a ``(name, type)`` there). A CNAME is followed through
    the table, 8 steps at most (a loop ends there). Tests may replace
    ``records`` and ``failing`` between queries.
    """

    def __init__(
        self,
        records: dict[str, dict[int, list[Any]]] | None = None,
        failing: set[str | tuple[str, int]] | None = None,
    ) -> None:
        common.ResolverBase.__init__(self)
        self.records = records or {}
        self.failing = failing or set()

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        answers: list[dns.RRHeader] = []
        current = name.decode("utf-8", "replace").lower().rstrip(".")
        for _ in range(8):
            if current in self.failing or (current, type) in self.failing:
                return fail(ServerFailure(f"{current} {dns.QUERY_TYPES.get(type, type)}"))
            table = self.records.get(current)
            if table is None:
                if answers:
                    break
                return fail(error.AuthoritativeDomainError(current))
            found = table.get(type, [])
            cname = table.get(dns.CNAME, [])
            answers += [dns.RRHeader(current.encode(), r.TYPE, dns.IN, 60, r, auth=True) for r in found]
            if found or not cname or type == dns.CNAME:
                break
            answers.append(dns.RRHeader(current.encode(), dns.CNAME, dns.IN, 60, cname[0], auth=True))
            current = cname[0].name.name.decode().lower().rstrip(".")
        return succeed((answers, [], []))


class _Factory(server.DNSServerFactory):
    def gotResolverError(self, failure: Failure, protocol: Any, message: Any, address: Any) -> None:
        if failure.check(ServerFailure):
            self.sendReply(protocol, self._responseFromMessage(message=message, rCode=dns.ESERVER), address)
            return
        server.DNSServerFactory.gotResolverError(self, failure, protocol, message, address)


class LoopbackDNS:
    """
    Authoritative for the zones given, or answering from a ``Table``, on
    127.0.0.1 over UDP.
    """

    def __init__(self, zones: dict[str, dict[str, list[Any]]], table: Table | None = None) -> None:
        self.port = free_port()
        authorities: list[Any] = [MemoryAuthority(z, r) for z, r in zones.items()]
        if table is not None:
            authorities.append(table)
        factory = _Factory(authorities=authorities)
        factory.noisy = False
        protocol = dns.DNSDatagramProtocol(factory)
        protocol.noisy = False
        self.listening: IListeningPort = reactor.listenUDP(  # type: ignore[attr-defined]
            self.port, protocol, interface="127.0.0.1"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await maybeDeferred(self.listening.stopListening)


def mx(preference: int, host: str) -> Any:
    return dns.Record_MX(preference, host.encode())


def a(address: str) -> Any:
    return dns.Record_A(address)


def txt(*strings: str) -> Any:
    return dns.Record_TXT(*(s.encode() for s in strings))
