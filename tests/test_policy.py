"""
Recipient policy: lists, patterns, and verification by callout with its
cache and fallbacks, on a Clock.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relayx.address import Mailbox
from relayx.checks.recipients import ACCEPT, RELAY_DENIED, UNKNOWN_USER, UNVERIFIED, RecipientPolicy
from relayx.config import DomainConfig, RecipientPattern, RecipientVerify, SMTPRoute
from relayx.interfaces import IRecipientCache, Throttle
from relayx.reply import Reply
from tests.fakes import MemoryRecipientCache

ROUTE = (SMTPRoute("127.0.0.1", 25),)


def check(policy: RecipientPolicy, address: str) -> Reply:
    result: list[Reply] = []
    Deferred.fromCoroutine(policy.check(Mailbox.parse(address))).addCallback(result.append)
    return result[0]


def test_pattern() -> None:
    """When a domain's recipients are a pattern, matching addresses pass and others get 550 5.1.1."""
    rule = RecipientPattern(re.compile(r"[a-z]+\.[a-z]+@example\.com", re.IGNORECASE))
    policy = RecipientPolicy([DomainConfig("example.com", ROUTE, rule, Throttle(1))])
    assert check(policy, "Jane.Doe@example.com") == ACCEPT
    assert check(policy, "root@example.com") == UNKNOWN_USER
    assert check(policy, "jane.doe@other.test") == RELAY_DENIED


class Primary:
    """
    A scripted callout: the answer for each address, and the calls made.
    """

    def __init__(self) -> None:
        self.answers: dict[str, bool | None] = {}
        self.calls: list[str] = []

    async def __call__(self, domain: str, address: str, timeout: float) -> bool | None:
        self.calls.append(address)
        return self.answers.get(address)


def verifying(default: str = "accept") -> tuple[RecipientPolicy, Primary, MemoryRecipientCache, Clock]:
    rule = RecipientVerify(positive_ttl=100, negative_ttl=10, default=default, timeout=5)
    primary, cache, clock = Primary(), MemoryRecipientCache(), Clock()
    policy = RecipientPolicy(
        [DomainConfig("example.com", ROUTE, rule, Throttle(1))], cache=cache, callout=primary, clock=clock
    )
    return policy, primary, cache, clock


def test_cache_fake_provides_interface() -> None:
    """When the in-memory cache stands in for Redis, it provides IRecipientCache."""
    assert verifyObject(IRecipientCache, MemoryRecipientCache())


def test_verify_asks_once_per_ttl() -> None:
    """When an address is verified, the answer is reused for its TTL: positive ones longer than negative ones."""
    policy, primary, _, clock = verifying()
    primary.answers = {"yes@example.com": True, "no@example.com": False}
    assert check(policy, "yes@example.com") == ACCEPT
    assert check(policy, "no@example.com") == UNKNOWN_USER
    clock.advance(50)
    assert check(policy, "yes@example.com") == ACCEPT
    assert check(policy, "no@example.com") == UNKNOWN_USER
    assert primary.calls == ["yes@example.com", "no@example.com", "no@example.com"]


def test_verify_falls_back_to_last_answer_then_default() -> None:
    """When the primary cannot answer, the last answer it gave stands, and for a new address the default."""
    policy, primary, _, clock = verifying(default="tempfail")
    primary.answers = {"yes@example.com": True, "no@example.com": False}
    check(policy, "yes@example.com")
    check(policy, "no@example.com")
    clock.advance(1000)
    primary.answers = {}
    assert check(policy, "yes@example.com") == ACCEPT
    assert check(policy, "no@example.com") == UNKNOWN_USER
    assert check(policy, "new@example.com") == UNVERIFIED
    assert UNVERIFIED.transient


def test_verify_default_accept_and_cache_outage() -> None:
    """When neither the primary nor the cache can answer, the default 'accept' lets mail in (the primary is down)."""
    policy, _, cache, _ = verifying()
    cache.unavailable = True
    assert check(policy, "anyone@example.com") == ACCEPT
