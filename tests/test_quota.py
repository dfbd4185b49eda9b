"""
Queue quotas: 452 4.3.1 (never a 5xx) once the queue, a domain or Redis's
memory is full, at MAIL with SIZE, at RCPT and after DATA; readiness and
warnings from the same numbers.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from twisted.internet.threads import deferToThread

from relayx.queue.quota import QUEUE_FULL, QuotaLimits, Quotas, Usage, memory
from relayx.redis.embedded import free_port
from tests.helpers import LoopbackSink, NodeCase, logged_events, send, wait_for
from tests.test_queue_redis import deferred_test
from tests.test_smtp_server import Harness


def quotas(**limits: Any) -> Quotas:
    return Quotas(QuotaLimits(**limits))


def test_limits_in_messages_bytes_and_per_domain() -> None:
    """When the totals or a domain's queue reach their quota, mail for them gets 452 4.3.1; others still pass."""
    q = quotas(messages=100, bytes=10_000, domain_messages=10, domains={"big.test": (50, 0)})
    q.update(Usage(messages=99, bytes=5_000, queues={"example.com": (10, 100), "big.test": (40, 100)}))
    assert q.refuse(None) is None
    assert q.refuse("example.com") == QUEUE_FULL, "example.com is at its 10"
    assert q.refuse("big.test") is None, "big.test has a quota of its own"
    assert q.refuse("other.test", size=6_000) == QUEUE_FULL, "the bytes would pass the total"
    assert q.full is None
    q.update(Usage(messages=100, bytes=5_000))
    assert q.refuse(None) == QUEUE_FULL and "100 messages queued" in (q.full or "")
    assert QUEUE_FULL.code == 452 and QUEUE_FULL.status == "4.3.1"


def test_memory_headroom_keeps_room_to_drain() -> None:
    """When Redis has less than the headroom free, mail is refused and the node is not ready; below, it is taken."""
    q = quotas(memory_headroom=0.1)
    q.update(Usage(memory_used=899, memory_max=1000))
    assert q.full is None and q.refuse("example.com") is None
    q.update(Usage(memory_used=900, memory_max=1000))
    assert q.refuse("example.com") == QUEUE_FULL and "10% kept free" in (q.full or "")
    q.update(Usage(memory_used=10**12, memory_max=0))
    assert q.full is None, "no maxmemory: no memory limit"
    assert memory("# Memory\r\nused_memory:1234\r\nmaxmemory:5678\r\n") == (1234, 5678)


def test_warns_once_as_a_quota_nears() -> None:
    """When a quota passes its warning share it is logged once, again only after it fell back well below."""
    q = quotas(messages=100, warn_at=0.8)
    with logged_events() as events:
        for used in (79, 80, 85, 90, 60, 85):
            q.update(Usage(messages=used))
    warnings = [e for e in events if "quota" in e.get("log_format", "")]
    assert [w["scope"] for w in warnings] == ["messages", "messages"]
    assert q.ratios() == {"messages": 0.85}


def full_harness() -> Harness:
    h = Harness()
    state = quotas(domain_messages=1)
    state.update(Usage(queues={"example.com": (1, 10)}))
    h.factory.room = state.refuse
    return h


def test_smtp_452_at_rcpt_for_a_full_domain() -> None:
    """When the recipient's domain is at its quota, RCPT gets 452 4.3.1 and it does not count as an error."""
    h = full_harness()
    h.send("EHLO client.test\r\n")
    assert h.send("MAIL FROM:<bob@sender.test>\r\n").startswith("250")
    for _ in range(30):
        assert h.send("RCPT TO:<alice@example.com>\r\n").startswith("452 4.3.1")
    assert h.send("NOOP\r\n").startswith("250"), "the session goes on"


def test_smtp_452_at_mail_with_size_and_after_data() -> None:
    """When the queue fills, MAIL with a SIZE past the quota gets 452; a message accepted before gets 452 after DATA."""
    h = Harness()
    state = quotas(bytes=1_000)
    h.factory.room = state.refuse
    h.send("EHLO client.test\r\n")
    assert h.send("MAIL FROM:<bob@sender.test> SIZE=900\r\n").startswith("250")
    assert h.send("RCPT TO:<alice@example.com>\r\n").startswith("250")
    assert h.send("DATA\r\n").startswith("354")
    state.update(Usage(bytes=990))
    assert h.send("Subject: x\r\n\r\nbody\r\n.\r\n").startswith("452 4.3.1")
    assert h.store.messages == []
    assert h.send("MAIL FROM:<bob@sender.test> SIZE=20\r\n").startswith("452 4.3.1")
    state.update(Usage(bytes=0))
    assert h.send("MAIL FROM:<bob@sender.test> SIZE=20\r\n").startswith("250")


class QuotaNodeTests(NodeCase):
    @deferred_test
    async def test_full_queue_gets_452_and_drains(self) -> None:
        """When a node's queue reaches its quota, mail gets 452 4.3.1 and /readyz 503; once it drains, mail is taken."""
        sink = LoopbackSink()
        admin = free_port()
        node = await self.start_node(
            sink, admin_listen=[f"tcp:{admin}:interface=127.0.0.1"], quota_messages=3, quota_warning=0.5
        )
        for n in range(3):
            message = b"Subject: %d\r\n\r\nx\r\n" % n
            assert await send(self.smtp_port, "bob@sender.test", ["a@example.com"], message) == {}
        await wait_for(lambda: node.quotas.full is not None, 10, "the quota loop to see 3 queued")
        refused = await send(self.smtp_port, "bob@sender.test", ["a@example.com"], b"Subject: 4\r\n\r\nx\r\n")
        assert isinstance(refused, Exception) and "452" in str(refused), refused
        ready = await readyz(admin)
        assert ready.startswith("503") and "queue full" in ready
        sink.start()
        await wait_for(lambda: len(sink.messages) == 3, 30, "the queue to drain")
        await wait_for(lambda: node.quotas.full is None, 10, "the quota loop to see the queue empty")
        assert await send(self.smtp_port, "bob@sender.test", ["a@example.com"], b"Subject: 5\r\n\r\nx\r\n") == {}


async def readyz(port: int) -> str:
    def get() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                return f"{answer.status} {answer.read().decode()}"
        except urllib.error.HTTPError as e:
            return f"{e.code} {e.read().decode()}"

    return await deferToThread(get)
