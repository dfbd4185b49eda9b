"""
DNS block and allow lists (RFC 5782): a listed client is refused at RCPT, an
allowed one skips the rest of the chain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayx.address import Mailbox
from relayx.checks.chain import ALLOW, Client, Filter, Verdict
from relayx.dns import Lookup, LookupFailed, reversed_labels
from relayx.reply import Reply

log = Logger()


def reversed_ip(client: str) -> str | None:
    """
    The DNSBL query name of an address: ``4.3.2.1`` for 1.2.3.4, nibbles for IPv6.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return None
    return reversed_labels(address)


@attrs.define
class DNSLists(Filter):
    """
    DNSWL zones first (a listed client is trusted), then DNSBL zones (a
    listed client's recipients get 554 5.7.1 naming the zone). Answers are
    remembered per client for ``cache_for`` seconds.
    """

    blocklists: Sequence[str]
    allowlists: Sequence[str]
    lookup: Lookup
    clock: IReactorTime
    cache_for: float = 300.0
    name = "dnsbl"
    _cache: dict[str, tuple[float, Verdict]] = attrs.field(factory=dict)

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        now = self.clock.seconds()
        cached = self._cache.get(client.ip)
        if cached is not None and cached[0] > now:
            return cached[1]
        verdict = await self._check(client.ip)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[client.ip] = (now + self.cache_for, verdict)
        return verdict

    async def _listed(self, name: str) -> list[str] | None:
        try:
            return await self.lookup(name, "A")
        except LookupFailed:
            return None

    async def _check(self, client: str) -> Verdict:
        query = reversed_ip(client)
        if query is None:
            return None
        for zone in self.allowlists:
            if await self._listed(f"{query}.{zone}"):
                return ALLOW
        for zone in self.blocklists:
            answer = await self._listed(f"{query}.{zone}")
            if answer is None:
                log.warn("DNSBL {zone} did not answer for {client}; not used", zone=zone, client=client)
            elif answer:
                log.info("client {client} listed in {zone} ({answer})", client=client, zone=zone, answer=answer[0])
                return Reply(554, "5.7.1", f"Service unavailable; client host [{client}] blocked using {zone}")
        return None
