"""
Queue quotas: how much mail the cluster takes before it says "full" with a
``452 4.3.1`` (never a ``5xx``: the sender keeps the message and tries again,
or tries another MX), in messages and bytes, in total and per domain, and
before Redis itself runs out of memory.

The check runs against the queue's counters as last read (every second, a
few keys whatever the depth), so accepting mail costs no Redis call for it;
the cluster may take about a second's worth of mail past a quota. Redis's
``maxmemory`` is watched the same way, and mail is refused while less than
``memory_headroom`` of it is free: that headroom is what delivery, settling
and bouncing need, so a full queue always drains.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from twisted.logger import Logger

from relayx.reply import Reply

log = Logger()

#: RFC 3463 4.3.1 "mail system full"
QUEUE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")


@attrs.frozen
class QuotaLimits:
    """
    The configured limits; 0 is "no limit".
    """

    messages: int = 0
    bytes: int = 0
    #: per delivery queue (domain), unless the domain sets its own
    domain_messages: int = 0
    domain_bytes: int = 0
    #: the domains' own limits: domain -> (messages, bytes)
    domains: Mapping[str, tuple[int, int]] = attrs.field(factory=dict)
    #: the share of Redis's maxmemory kept free for delivery and bounces
    memory_headroom: float = 0.1
    #: log a warning (once) when a quota is this full
    warn_at: float = 0.8

    def for_domain(self, domain: str) -> tuple[int, int]:
        return self.domains.get(domain, (self.domain_messages, self.domain_bytes))


@attrs.frozen
class Usage:
    """
    What the queue holds, as last read: totals, per queue (messages, bytes),
    and Redis's memory (used, maxmemory; maxmemory 0 is "no limit").
    """

    messages: int = 0
    bytes: int = 0
    queues: Mapping[str, tuple[int, int]] = attrs.field(factory=dict)
    memory_used: int = 0
    memory_max: int = 0


class Quotas:
    """
    The limits and the latest usage: ``refuse`` answers the SMTP front door
    at once, ``full`` says why the node takes no mail at all (readiness).
    """

    def __init__(self, limits: QuotaLimits) -> None:
        self.limits = limits
        self.usage = Usage()
        self._warned: set[str] = set()

    def update(self, usage: Usage) -> None:
        self.usage = usage
        for scope, ratio in self.ratios().items():
            if ratio >= self.limits.warn_at and scope not in self._warned:
                self._warned.add(scope)
                log.warn("queue quota {scope} is {percent:.0f}% used", scope=scope, percent=100 * ratio)
            elif ratio < self.limits.warn_at * 0.9:
                self._warned.discard(scope)

    def ratios(self) -> dict[str, float]:
        """
        How full each limited scope is (1.0: at its limit): ``messages``,
        ``bytes``, ``memory``, and ``messages:<domain>``/``bytes:<domain>``.
        """
        u, q = self.usage, self.limits
        found: dict[str, float] = {}
        if q.messages:
            found["messages"] = u.messages / q.messages
        if q.bytes:
            found["bytes"] = u.bytes / q.bytes
        if u.memory_max:
            found["memory"] = u.memory_used / (u.memory_max * (1 - q.memory_headroom))
        for queue, (messages, size) in u.queues.items():
            limit_messages, limit_bytes = q.for_domain(queue.partition("#")[0])
            if limit_messages:
                found[f"messages:{queue}"] = messages / limit_messages
            if limit_bytes:
                found[f"bytes:{queue}"] = size / limit_bytes
        return found

    @property
    def full(self) -> str | None:
        """
        Why no mail can be taken now (a cluster-wide quota or Redis's
        memory), or ``None``.
        """
        u, q = self.usage, self.limits
        if q.messages and u.messages >= q.messages:
            return f"queue full: {u.messages} messages queued, quota {q.messages}"
        if q.bytes and u.bytes >= q.bytes:
            return f"queue full: {u.bytes} bytes queued, quota {q.bytes}"
        if u.memory_max and u.memory_used >= u.memory_max * (1 - q.memory_headroom):
            return (
                f"Redis memory: {u.memory_used} of {u.memory_max} bytes used, "
                f"{q.memory_headroom:.0%} kept free for delivery"
            )
        return None

    def refuse(self, domain: str | None, size: int = 0) -> Reply | None:
        """
        ``452 4.3.1`` when a message of ``size`` bytes (0: not known yet)
        for ``domain`` (``None``: any) would go past a quota.
        """
        if self.full is not None:
            return QUEUE_FULL
        u, q = self.usage, self.limits
        if size and q.bytes and u.bytes + size > q.bytes:
            return QUEUE_FULL
        if domain is None:
            return None
        limit_messages, limit_bytes = q.for_domain(domain)
        messages, queued = u.queues.get(domain, (0, 0))
        if limit_messages and messages >= limit_messages:
            return QUEUE_FULL
        if limit_bytes and queued + size > limit_bytes:
            return QUEUE_FULL
        return None


def memory(info: str) -> tuple[int, int]:
    """
    ``used_memory`` and ``maxmemory`` from Redis's ``INFO memory``.
    """
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return int(fields.get("used_memory", "0") or 0), int(fields.get("maxmemory", "0") or 0)
