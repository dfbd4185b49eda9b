"""
Recipient policy: which recipients this node accepts mail for.

A backup MX that accepts anything is an open relay; one that accepts every
local part of its domains sends backscatter later. The verdict is a reply,
so the SMTP layer only sends it.
"""

from __future__ import annotations

from collections.abc import Iterable

from zope.interface import implementer

from relayx.address import Mailbox
from relayx.config import AnyRecipient, DomainConfig
from relayx.interfaces import IRecipientPolicy
from relayx.reply import Reply

ACCEPT = Reply(250, "2.1.5", "Recipient ok")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")


@implementer(IRecipientPolicy)
class RecipientPolicy:
    """
    Accepts recipients of the configured domains under each domain's rule.
    """

    def __init__(self, domains: Iterable[DomainConfig]) -> None:
        self._domains = {d.name: d for d in domains}

    def served(self, domain: str) -> bool:
        return domain in self._domains

    async def check(self, recipient: Mailbox) -> Reply:
        domain = self._domains.get(recipient.domain)
        if domain is None:
            return RELAY_DENIED
        rule = domain.recipients
        if isinstance(rule, AnyRecipient) or recipient.canonical in rule.addresses:
            return ACCEPT
        return UNKNOWN_USER
