"""
The SPF check (RFC 7208) as a filter: evaluated at RCPT, cached per client,
sender and HELO, its result recorded in ``Received-SPF`` and
``Authentication-Results`` for the primary.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayx.address import Mailbox
from relayx.checks import spf
from relayx.checks.chain import AddHeaders, Client, Filter, Verdict
from relayx.dns import Lookup
from relayx.reply import Reply
from relayx.ttlcache import TTLCache

log = Logger()


def spf_reply(action: str, result: spf.Result) -> Reply | None:
    """
    What an SPF result's configured action makes of the recipient: ``None``
    (accept), a refusal (RFC 7372 codes) or a deferral.
    """
    if action == "reject":
        if result is spf.Result.PERMERROR:
            return Reply(550, "5.7.24", "SPF validation error")
        return Reply(550, "5.7.23", "SPF validation failed")
    if action == "tempfail":
        return Reply(451, "4.7.24", "SPF validation error, try again later")
    return None


@attrs.define
class SPFCache:
    """
    SPF results by (client, sender, HELO), for ``keep`` seconds: every
    recipient of a transaction, and of each domain's chain, asks the same.
    """

    lookup: Lookup
    clock: IReactorTime
    keep: float = 60.0
    _results: TTLCache[tuple[str, str, str], spf.Verdict] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._results = TTLCache(self.clock)

    async def check(self, client: Client, sender: str) -> spf.Verdict:
        key = (client.ip, sender.lower(), client.helo.lower())
        cached = self._results.get(key)
        if cached is not None:
            return cached
        verdict = await spf.check(self.lookup, client.ip, sender, client.helo)
        if verdict.result is not spf.Result.TEMPERROR:
            self._results.put(key, verdict, self.keep)
        return verdict


@attrs.define
class SPF(Filter):
    """
    The client checked against the sender domain's SPF record (the HELO
    name's for the null sender), at RCPT so that each domain applies its
    own ``actions``: ``{"fail": "reject", ...}`` (results not named pass).
    The result is recorded in ``Received-SPF`` and ``Authentication-Results``.
    """

    cache: SPFCache
    receiver: str
    actions: Mapping[str, str]
    name = "spf"

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        verdict = await self.cache.check(client, sender)
        reply = spf_reply(self.actions.get(verdict.result.value, "accept"), verdict.result)
        if reply is not None:
            log.info(
                "SPF {result} for {sender} from {client}: {code}",
                result=verdict.result.value,
                sender=verdict.sender,
                client=client.ip,
                code=reply.code,
            )
            return reply
        return AddHeaders((verdict.received_spf(self.receiver), verdict.authentication_results(self.receiver)))
