"""
The seams of relayx: what the SMTP front door, the queue and the delivery
scheduler expect of each other. Implementations are picked in ``service.py``;
every implementation of an interface passes one shared test suite.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

import attrs
from zope.interface import Interface

from relayx.address import Mailbox
from relayx.reply import Reply


class StoreUnavailable(Exception):
    """
    The store could not confirm an operation (Redis unreachable, timed out or
    refused). Always temporary: the SMTP reply is ``451 4.3.0``.
    """


class StaleLease(Exception):
    """
    The lease's fencing token is no longer current: the job was reclaimed
    by another node, which now owns it.
    """


@attrs.frozen
class IncomingMessage:
    """
    One accepted transaction, ready to commit: the body as stored (with our
    ``Received:`` header), the envelope, and its recipients grouped by
    destination domain (one delivery job each).
    """

    queue_id: str
    sender: str
    recipients: tuple[Mailbox, ...]
    received_at: float
    body: bytes = attrs.field(repr=False)

    def by_domain(self) -> dict[str, tuple[str, ...]]:
        groups: dict[str, list[str]] = {}
        for rcpt in self.recipients:
            owed = groups.setdefault(rcpt.domain, [])
            if str(rcpt) not in owed:
                owed.append(str(rcpt))
        return {domain: tuple(rcpts) for domain, rcpts in groups.items()}


@attrs.frozen
class Lease:
    """
    The right, until ``expires``, to deliver one job. ``token`` is the fencing
    token: the store refuses any change made with an older one. Renewing a
    lease returns a new lease.
    """

    job_id: str
    token: int
    expires: float
    queue_id: str
    domain: str
    recipients: tuple[str, ...]
    attempts: int
    created: float

    def renewed(self, expires: float) -> Lease:
        return attrs.evolve(self, expires=expires)


@attrs.frozen
class StoredMessage:
    sender: str
    body: bytes = attrs.field(repr=False)


@attrs.frozen
class Outcome:
    """
    What one delivery attempt achieved, recipient by recipient.

    ``unreachable`` is set when the destination itself failed (no connection,
    a greeting or MAIL refused temporarily): the job goes back to the head of
    its domain's queue and the whole domain waits, keeping acceptance order.
    """

    delivered: tuple[str, ...] = ()
    failed: tuple[tuple[str, Reply], ...] = ()
    deferred: tuple[tuple[str, Reply], ...] = ()
    unreachable: str | None = None


class IMessageStore(Interface):
    """
    Where accepted mail is committed before the ``250`` to DATA.
    """

    def enqueue(message: IncomingMessage) -> Awaitable[None]:
        """
        Store the message and one job per destination domain, all or nothing.
        Raises ``StoreUnavailable`` when that cannot be confirmed.
        """


class IDeliveryQueue(Interface):
    """
    The cluster-wide queue of delivery jobs, leased to one node at a time.
    """

    def claim(
        owner: str, now: float, limit: int, concurrency: Mapping[str, int], default_concurrency: int
    ) -> Awaitable[list[Lease]]:
        """
        Lease up to ``limit`` ready jobs, in each domain's acceptance order,
        without exceeding a domain's concurrency across the cluster.
        Expired leases and due retries are returned to their queues first.
        """

    def renew(lease: Lease, now: float) -> Awaitable[Lease]:
        """
        Extend ``lease``; raises ``StaleLease`` when it was lost.
        """

    def load(lease: Lease) -> Awaitable[StoredMessage]:
        """
        The sender and body of the leased job's message.
        """

    def settle(lease: Lease, outcome: Outcome, now: float) -> Awaitable[str]:
        """
        Record ``outcome`` and end the lease: delivered and failed recipients
        are done, deferred ones wait for their retry, and an unreachable
        destination pauses its domain. Returns what became of the job
        (``done``, ``failed``, ``deferred`` or ``paused``); raises ``StaleLease``.
        """


class IRecipientPolicy(Interface):
    """
    Decides, at RCPT time, whether a recipient is ours to accept.
    """

    def check(recipient: Mailbox) -> Awaitable[Reply]:
        """
        A positive reply to accept, or the rejection to send.
        """


class IDeliverer(Interface):
    """
    Carries one message to a domain's destination and reports per recipient.
    """

    def deliver(domain: str, sender: str, recipients: tuple[str, ...], body: bytes) -> Awaitable[Outcome]:
        """
        Never raises for the destination's failures: they are in the outcome.
        """
