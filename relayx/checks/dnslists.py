"""
DNS block and allow lists (RFC 5782): a listed client is refused at RCPT, an
allowed one skips the rest of the chain. A list's error answers (127.255.255.x)
never list anyone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayx.address import Mailbox
from relayx.checks.chain import ALLOW, Client, Filter, Verdict
from relayx.config import DNSList
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


#: a DNS list's answers that may mean "listed"; in 127.255.255.0/24 they are
#: error codes (Spamhaus: 127.255.255.254 "queried through a public resolver",
#: 127.255.255.255 "over the free quota"), which would list every client
LISTED_ANSWERS = ipaddress.IPv4Network("127.0.0.0/8")
LIST_ERROR_ANSWERS = ipaddress.IPv4Network("127.255.255.0/24")
#: an allow list's refusal (list.dnswl.org: 127.0.0.255 "query refused"): counting
#: it as "allowed" would trust every client, so it never counts
ALLOWLIST_REFUSED = ipaddress.IPv4Address("127.0.0.255")


@attrs.define
class DNSLists(Filter):
    """
    DNSWL zones first (a listed client is trusted), then DNSBL zones (a
    listed client's recipients get 554 5.7.1 naming the zone). Only an
    answer in 127.0.0.0/8, outside the error codes of 127.255.255.0/24 and
    matching the list's pattern if it has one, is a listing; any other is
    not, with a warning naming the list at most once per ``warn_every``
    seconds for each list. Answers are remembered per client for ``cache_for`` seconds.
    """

    blocklists: Sequence[DNSList]
    allowlists: Sequence[DNSList]
    lookup: Lookup
    clock: IReactorTime
    cache_for: float = 300.0
    warn_every: float = 3600.0
    name = "dnsbl"
    _cache: dict[str, tuple[float, Verdict]] = attrs.field(factory=dict)
    _warned: dict[str, float] = attrs.field(factory=dict)

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

    async def _listed(self, dnslist: DNSList, client: str, query: str, allow: bool = False) -> str | None:
        """
        The answer that lists the client, or ``None``.
        """
        try:
            answers = await self.lookup(f"{query}.{dnslist.zone}", "A")
        except LookupFailed:
            log.warn("DNS list {zone} did not answer for {client}; not used", zone=dnslist.zone, client=client)
            return None
        for answer in answers:
            try:
                address = ipaddress.IPv4Address(answer)
            except ValueError:
                continue
            refused = address in LIST_ERROR_ANSWERS or (allow and address == ALLOWLIST_REFUSED)
            if address in LISTED_ANSWERS and not refused:
                if dnslist.counts(answer):
                    return answer
            else:
                self._warn(dnslist.zone, answer)
        return None

    def _warn(self, zone: str, answer: str) -> None:
        now = self.clock.seconds()
        if now < self._warned.get(zone, float("-inf")) + self.warn_every:
            return
        self._warned[zone] = now
        address = ipaddress.IPv4Address(answer)
        meaning = (
            "an error code: the list refuses this resolver (a public one?) or its query quota is used up"
            if address in LIST_ERROR_ANSWERS or address == ALLOWLIST_REFUSED
            else "not a listing code (a resolver that rewrites unknown names?)"
        )
        log.warn(
            "DNS list {zone} answered {answer}, {meaning}; taken as not listed",
            zone=zone,
            answer=answer,
            meaning=meaning,
        )

    async def _check(self, client: str) -> Verdict:
        query = reversed_ip(client)
        if query is None:
            return None
        for dnslist in self.allowlists:
            if await self._listed(dnslist, client, query, allow=True) is not None:
                return ALLOW
        for dnslist in self.blocklists:
            answer = await self._listed(dnslist, client, query)
            if answer is not None:
                log.info("client {client} listed in {zone} ({answer})", client=client, zone=dnslist.zone, answer=answer)
                zone = dnslist.zone
                return Reply(554, "5.7.1", f"Service unavailable; client host [{client}] blocked using {zone}")
        return None
