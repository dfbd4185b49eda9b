"""
Test doubles for what cannot be observed otherwise; each is checked with
``verifyObject`` and passes the same contract tests as the real thing.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred
from zope.interface import implementer

from relayx.interfaces import (
    NO_DSN,
    Claim,
    IDeliverer,
    IDeliveryQueue,
    IMessageStore,
    IncomingMessage,
    IRecipientCache,
    Lease,
    MessageDsn,
    Outcome,
    StaleLease,
    StoredMessage,
    StoreUnavailable,
    Throttle,
)


@implementer(IMessageStore)
class MemoryStore:
    """
    Keeps committed messages in a list; ``unavailable`` makes every
    commit fail as a Redis outage would.
    """

    def __init__(self) -> None:
        self.messages: list[IncomingMessage] = []
        self.unavailable = False

    async def enqueue(self, message: IncomingMessage) -> None:
        if self.unavailable:
            raise StoreUnavailable("store switched off by the test")
        if any(m.queue_id == message.queue_id for m in self.messages):
            raise StoreUnavailable(f"duplicate queue id {message.queue_id}")
        self.messages.append(message)


@implementer(IDeliveryQueue)
class ScriptedQueue:
    """
    Hands out the leases a test gives it and records renewals and
    settlements; ``stale`` lists jobs whose token the test has voided.
    """

    def __init__(self, lease_duration: float = 60.0) -> None:
        self.ready: list[Lease] = []
        self.renewals: list[tuple[str, float]] = []
        self.settled: list[tuple[Lease, Outcome]] = []
        self.stale: set[str] = set()
        self.unavailable = False
        self.lease_duration = lease_duration
        self.wake: float | None = None
        self.failing: set[str] = set()

    async def claim(
        self, owner: str, now: float, limit: int, throttles: Mapping[str, Throttle], default: Throttle
    ) -> Claim:
        if self.unavailable:
            raise StoreUnavailable("queue switched off by the test")
        taken, self.ready = self.ready[:limit], self.ready[limit:]
        return Claim(tuple(taken), self.wake)

    async def failing_domains(self) -> list[str]:
        return sorted(self.failing)

    async def take_probe(self, domain: str, owner: str, interval: float) -> bool:
        return True

    async def resume(self, domain: str, now: float, throttle: Throttle) -> bool:
        if domain in self.failing:
            self.failing.discard(domain)
            return True
        return False

    async def renew(self, lease: Lease, now: float) -> Lease:
        if lease.job_id in self.stale:
            raise StaleLease(lease.job_id)
        if self.unavailable:
            raise StoreUnavailable("queue switched off by the test")
        self.renewals.append((lease.job_id, now))
        return lease.renewed(now + self.lease_duration)

    async def load(self, lease: Lease) -> StoredMessage:
        return StoredMessage(sender="bob@sender.test", body=b"Subject: " + lease.queue_id.encode() + b"\r\n\r\n")

    async def settle(self, lease: Lease, outcome: Outcome, now: float, throttle: Throttle | None = None) -> str:
        if lease.job_id in self.stale:
            raise StaleLease(lease.job_id)
        self.settled.append((lease, outcome))
        return "done"


@implementer(IDeliverer)
class ManualDeliverer:
    """
    Deliveries that finish when the test says so.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Deferred[Outcome]] = {}
        self.probes: list[str] = []
        self.up: set[str] = set()

    async def deliver(
        self, domain: str, sender: str, recipients: tuple[str, ...], body: bytes, dsn: MessageDsn = NO_DSN
    ) -> Outcome:
        d: Deferred[Outcome] = Deferred()
        self.pending[body.split(b"\r\n")[0][9:].decode()] = d
        return await d

    def finish(self, queue_id: str, outcome: Outcome) -> None:
        self.pending.pop(queue_id).callback(outcome)

    async def probe(self, domain: str) -> str | None:
        self.probes.append(domain)
        return None if domain in self.up else "connection refused"


@implementer(IRecipientCache)
class MemoryRecipientCache:
    """
    Callout answers in a dict; ``unavailable`` fails every call as Redis would.
    """

    def __init__(self) -> None:
        self.answers: dict[str, tuple[bool, float]] = {}
        self.unavailable = False

    async def recall(self, address: str) -> tuple[bool, float] | None:
        if self.unavailable:
            raise StoreUnavailable("cache switched off by the test")
        return self.answers.get(address)

    async def remember(self, address: str, exists: bool, now: float, keep: float) -> None:
        if self.unavailable:
            raise StoreUnavailable("cache switched off by the test")
        self.answers[address] = (exists, now)


def ramped(domain: str) -> Throttle:
    """
    Every destination's throttle where a test does not care: the ``[queue]``
    default (one session, ramping back over 30 s after an outage).
    """
    return Throttle(concurrency=1, ramp_up=30.0)
