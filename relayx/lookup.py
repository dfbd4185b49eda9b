"""
DNS look-ups for the filters (DNS lists, SPF): one asynchronous call that
tells an empty answer (the name or the type does not exist) from a failure
(no answer in time, SERVFAIL), because SPF and DNS lists treat them apart.

dnspython's resolver blocks, so it runs in the reactor's thread pool; the
filters take the look-up as a parameter, so tests give them a real DNS
server on loopback or a table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.threads import deferToThread

from relayx.delivery.routes import make_resolver


class LookupFailed(Exception):
    """
    DNS did not answer (timeout, SERVFAIL): the answer is unknown, not empty.
    """


#: ``await lookup(name, "A" | "AAAA" | "MX" | "TXT" | "PTR")``: the records as
#: text (addresses, MX host names by preference, TXT strings joined, PTR
#: names), ``[]`` when there are none; raises ``LookupFailed``
Lookup = Callable[[str, str], Awaitable[list[str]]]


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
