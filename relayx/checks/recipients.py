"""
Recipient policy: which recipients this node accepts mail for.

A backup MX that accepts anything is an open relay; one that accepts every
local part of its domains sends backscatter later. The verdict is a reply,
so the SMTP layer only sends it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relayx.address import Mailbox
from relayx.config import AnyRecipient, DomainConfig, RecipientList, RecipientPattern, RecipientVerify
from relayx.interfaces import IRecipientCache, IRecipientPolicy, StoreUnavailable
from relayx.reply import Reply

log = Logger()

#: Ask the primary whether ``address`` of ``domain`` exists, within ``timeout``
#: seconds: ``True``, ``False`` (a 5xx to RCPT), or ``None`` when it could not say.
Callout = Callable[[str, str, float], Awaitable[bool | None]]

#: how long a callout answer is kept to fall back on while the primary is down
ANSWER_KEPT = 30 * 86400.0

ACCEPT = Reply(250, "2.1.5", "Recipient ok")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
#: Postfix's answer under ``allow_untrusted_routing = no``
ROUTING_DENIED = Reply(550, "5.7.1", "Relaying denied: sender-specified routing (%, ! or @ in the local part)")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
UNVERIFIED = Reply(451, "4.4.3", "Recipient address cannot be verified now, try again later")


@implementer(IRecipientPolicy)
class RecipientPolicy:
    """
    Accepts recipients of the configured domains under each domain's rule.
    """

    def __init__(
        self,
        domains: Iterable[DomainConfig],
        *,
        cache: IRecipientCache | None = None,
        callout: Callout | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self._domains = {d.name: d for d in domains}
        self._cache = cache
        self._callout = callout
        self._clock = clock

    async def check(self, recipient: Mailbox) -> Reply:
        domain = self._domains.get(recipient.domain)
        if domain is None:
            return RELAY_DENIED
        if recipient.routed:
            return ROUTING_DENIED
        rule = domain.recipients
        if isinstance(rule, AnyRecipient):
            return ACCEPT
        if isinstance(rule, RecipientList):
            return ACCEPT if recipient.canonical in rule.addresses else UNKNOWN_USER
        if isinstance(rule, RecipientPattern):
            return ACCEPT if rule.pattern.fullmatch(recipient.canonical) else UNKNOWN_USER
        return await self._verify(rule, recipient)

    async def _verify(self, rule: RecipientVerify, recipient: Mailbox) -> Reply:
        """
        The cached answer while fresh, else the primary's, else the last
        answer it ever gave, else the configured default.
        """
        assert self._cache is not None and self._callout is not None and self._clock is not None
        address = recipient.canonical
        now = self._clock.seconds()
        try:
            known = await self._cache.recall(address)
        except StoreUnavailable:
            known = None
        if known is not None:
            exists, when = known
            if now - when < (rule.positive_ttl if exists else rule.negative_ttl):
                return ACCEPT if exists else UNKNOWN_USER
        answer = await self._callout(recipient.domain, str(recipient), rule.timeout)
        if answer is not None:
            try:
                await self._cache.remember(address, answer, now, ANSWER_KEPT)
            except StoreUnavailable as e:
                log.warn("callout answer for {rcpt} not cached: {why}", rcpt=address, why=str(e))
            return ACCEPT if answer else UNKNOWN_USER
        if known is not None:
            return ACCEPT if known[0] else UNKNOWN_USER
        return {"accept": ACCEPT, "reject": UNKNOWN_USER}.get(rule.default, UNVERIFIED)
