"""
A real DNS server on loopback (twisted.names) answering from records the
test gives it: MX and A records for delivery tests.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.names import authority, dns, server

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


class LoopbackDNS:
    """
    Authoritative for the zones given, on 127.0.0.1 over UDP.
    """

    def __init__(self, zones: dict[str, dict[str, list[Any]]]) -> None:
        self.port = free_port()
        factory = server.DNSServerFactory(authorities=[MemoryAuthority(z, r) for z, r in zones.items()])
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
