"""
The Redis queue and its Lua scripts, against a real ``redis-server``.

Times are passed in explicitly, so leases and retries are exercised without
waiting for them.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from relayx.address import Mailbox
from relayx.interfaces import (
    IDeliveryQueue,
    IMessageStore,
    IncomingMessage,
    Outcome,
    StaleLease,
    StoreUnavailable,
)
from relayx.queue.redis import RedisConnection, RedisQueue, connect
from relayx.redis_server import free_port
from relayx.reply import Reply
from tests.fakes import MemoryStore
from tests.helpers import shared_redis, unique_prefix

T0 = 1_800_000_000.0
NO_LIMIT: dict[str, int] = {}


def message(qid: str, *rcpts: str, sender: str = "bob@sender.test", at: float = T0) -> IncomingMessage:
    return IncomingMessage(
        queue_id=qid,
        sender=sender,
        recipients=tuple(Mailbox.parse(r) for r in rcpts),
        received_at=at,
        body=b"Subject: " + qid.encode() + b"\r\n\r\nbody\r\n",
    )


def deferred_test(f: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Deferred[None]]:
    def run(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(f(self))  # type: ignore[arg-type]

    run.__name__ = f.__name__
    run.__doc__ = f.__doc__
    return run


class RedisQueueTests(TestCase):
    async def make_queue(self, **kw: Any) -> RedisQueue:
        server = shared_redis()
        redis = await connect("127.0.0.1", server.port, 0, None, reactor, 5.0, poolsize=2)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        options: dict[str, Any] = {
            "lease": 60.0,
            "retention": 5 * 86400.0,
            "retry_schedule": (60.0, 300.0),
            "randrange": random.Random(7).randrange,
        }
        options.update(kw)
        return RedisQueue(redis, unique_prefix(), **options)

    @deferred_test
    async def test_provides_interfaces(self) -> None:
        """When the Redis queue is built, it provides both the store and the queue interface."""
        q = await self.make_queue()
        assert verifyObject(IMessageStore, q)
        assert verifyObject(IDeliveryQueue, q)

    @deferred_test
    async def test_one_job_per_domain_and_fifo(self) -> None:
        """When messages are enqueued, each domain gets one job per message, claimed in acceptance order."""
        q = await self.make_queue()
        for n in range(5):
            await q.enqueue(message(f"M{n}", "a@one.test", "b@one.test", "c@two.test"))
        leases = await q.claim("node-a", T0, 100, NO_LIMIT, 1)
        # concurrency 1: only the head of each domain
        assert sorted((lease.domain, lease.queue_id) for lease in leases) == [("one.test", "M0"), ("two.test", "M0")]
        order = []
        for _ in range(5):
            [lease] = [x for x in leases if x.domain == "one.test"]
            assert lease.recipients == ("a@one.test", "b@one.test")
            order.append(lease.queue_id)
            assert await q.settle(lease, Outcome(delivered=lease.recipients), T0) == "done"
            leases = await q.claim("node-a", T0, 100, NO_LIMIT, 1)
        assert order == ["M0", "M1", "M2", "M3", "M4"]

    @deferred_test
    async def test_concurrency_per_domain(self) -> None:
        """When a domain allows 3 deliveries at once, a claim leases its first 3 jobs in order."""
        q = await self.make_queue()
        for n in range(5):
            await q.enqueue(message(f"M{n}", "a@one.test"))
        leases = await q.claim("node-a", T0, 100, {"one.test": 3}, 1)
        assert [lease.queue_id for lease in leases] == ["M0", "M1", "M2"]
        assert await q.claim("node-b", T0, 100, {"one.test": 3}, 1) == []

    @deferred_test
    async def test_duplicate_queue_id_refused(self) -> None:
        """When a queue id is enqueued twice, the second commit fails and nothing is overwritten."""
        q = await self.make_queue()
        await q.enqueue(message("DUP", "a@one.test"))
        with self.assertRaises(StoreUnavailable):
            await q.enqueue(message("DUP", "b@one.test"))
        [lease] = await q.claim("n", T0, 10, NO_LIMIT, 1)
        assert lease.recipients == ("a@one.test",)

    @deferred_test
    async def test_message_removed_when_all_jobs_done(self) -> None:
        """When every job of a message is delivered, the message and its jobs are gone from Redis."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test", "b@two.test"))
        for lease in await q.claim("n", T0, 10, NO_LIMIT, 1):
            stored = await q.load(lease)
            assert stored.sender == "bob@sender.test"
            await q.settle(lease, Outcome(delivered=lease.recipients), T0)
        keys = await q.redis.call("keys", q.prefix + ":*")
        names = sorted(k.decode().split(":", 1)[1] for k in keys)
        assert names == ["fence", "seq"]

    @deferred_test
    async def test_stale_token_refused(self) -> None:
        """When a lease expired and another node re-claimed the job, the first node's settle and renew are refused."""
        q = await self.make_queue(lease=10.0)
        await q.enqueue(message("M", "a@one.test"))
        [old] = await q.claim("node-a", T0, 10, NO_LIMIT, 1)
        assert await q.claim("node-b", T0 + 5, 10, NO_LIMIT, 1) == []
        [new] = await q.claim("node-b", T0 + 11, 10, NO_LIMIT, 1)
        assert new.job_id == old.job_id and new.token > old.token
        with self.assertRaises(StaleLease):
            await q.settle(old, Outcome(delivered=old.recipients), T0 + 12)
        with self.assertRaises(StaleLease):
            await q.renew(old, T0 + 12)
        assert await q.settle(new, Outcome(delivered=new.recipients), T0 + 12) == "done"
        with self.assertRaises(StaleLease):
            await q.settle(new, Outcome(delivered=new.recipients), T0 + 13)

    @deferred_test
    async def test_renewal_keeps_slow_delivery(self) -> None:
        """When a lease is renewed in time, no other node can claim the job past its first expiry."""
        q = await self.make_queue(lease=10.0)
        await q.enqueue(message("M", "a@one.test"))
        [lease] = await q.claim("node-a", T0, 10, NO_LIMIT, 1)
        for t in (5, 10, 15, 20):
            lease = await q.renew(lease, T0 + t)
            assert lease.expires == T0 + t + 10
            assert await q.claim("node-b", T0 + t + 1, 10, NO_LIMIT, 1) == []
        assert await q.settle(lease, Outcome(delivered=lease.recipients), T0 + 25) == "done"

    @deferred_test
    async def test_partial_outcome_retries_only_owed(self) -> None:
        """When one recipient is accepted, one deferred and one refused, the retry goes to the deferred one only."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test", "b@one.test", "c@one.test"))
        [lease] = await q.claim("n", T0, 10, NO_LIMIT, 1)
        outcome = Outcome(
            delivered=("a@one.test",),
            deferred=(("b@one.test", Reply(452, "4.2.2", "mailbox full")),),
            failed=(("c@one.test", Reply(550, "5.1.1", "no such user")),),
        )
        assert await q.settle(lease, outcome, T0) == "deferred"
        assert await q.claim("n", T0 + 59, 10, NO_LIMIT, 1) == []
        [retry] = await q.claim("n", T0 + 60, 10, NO_LIMIT, 1)
        assert retry.recipients == ("b@one.test",)
        assert retry.attempts == 2
        assert await q.settle(retry, Outcome(delivered=retry.recipients), T0 + 61) == "failed"
        failed = await q.redis.call("zrange", q.key("failed"), 0, -1)
        assert failed == [retry.job_id.encode()]
        entries = await q.redis.call("hget", q.key("job", retry.job_id), "failed")
        assert b"no such user" in entries

    @deferred_test
    async def test_unreachable_pauses_domain_and_keeps_order(self) -> None:
        """When the destination is unreachable, its domain pauses and the same job is first after the pause."""
        q = await self.make_queue()
        for n in range(3):
            await q.enqueue(message(f"M{n}", "a@one.test"))
        await q.enqueue(message("OTHER", "a@two.test"))
        leases = await q.claim("n", T0, 10, NO_LIMIT, 1)
        head = next(lease for lease in leases if lease.domain == "one.test")
        assert await q.settle(head, Outcome(unreachable="connection refused"), T0) == "paused"
        # another domain is not held up
        other = next(lease for lease in leases if lease.domain == "two.test")
        assert await q.settle(other, Outcome(delivered=other.recipients), T0) == "done"
        assert await q.claim("n", T0 + 59, 10, NO_LIMIT, 1) == []
        [again] = await q.claim("n", T0 + 60, 10, NO_LIMIT, 1)
        assert again.queue_id == "M0"
        # the second failure waits the second step of the schedule
        assert await q.settle(again, Outcome(unreachable="connection refused"), T0 + 60) == "paused"
        assert await q.claim("n", T0 + 359, 10, NO_LIMIT, 1) == []
        [third] = await q.claim("n", T0 + 360, 10, NO_LIMIT, 1)
        assert third.queue_id == "M0"

    @deferred_test
    async def test_retention_expiry_fails_old_jobs(self) -> None:
        """When a destination stays down past the retention, the jobs at the head that are too old fail."""
        q = await self.make_queue(retention=3600.0)
        await q.enqueue(message("OLD1", "a@one.test", at=T0))
        await q.enqueue(message("OLD2", "a@one.test", at=T0 + 10))
        await q.enqueue(message("NEW", "a@one.test", at=T0 + 3000))
        [lease] = await q.claim("n", T0 + 3700, 10, NO_LIMIT, 1)
        assert lease.queue_id == "OLD1"
        assert await q.settle(lease, Outcome(unreachable="refused"), T0 + 3700) == "failed"
        failed = await q.redis.call("zrange", q.key("failed"), 0, -1)
        assert sorted(f.decode().split(".")[0] for f in failed) == ["OLD1", "OLD2"]
        [left] = await q.claim("n", T0 + 3760, 10, NO_LIMIT, 1)
        assert left.queue_id == "NEW"

    @deferred_test
    async def test_unreachable_redis_raises_store_unavailable(self) -> None:
        """When Redis cannot be reached, enqueue raises StoreUnavailable at once instead of waiting."""
        redis = await connect("127.0.0.1", free_port(), 0, None, reactor, 1.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        q = RedisQueue(redis, "x", lease=60, retention=60, retry_schedule=(60,), randrange=random.Random(1).randrange)
        with self.assertRaises(StoreUnavailable) as caught:
            await q.enqueue(message("M", "a@one.test"))
        assert "not connected to Redis" in str(caught.exception)


class MessageStoreContract(TestCase):
    """
    Every IMessageStore: commits whole messages and refuses a second commit
    of the same queue id.
    """

    async def stores(self) -> list[Any]:
        server = shared_redis()
        redis: RedisConnection = await connect("127.0.0.1", server.port, 0, None, reactor, 5.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        rq = RedisQueue(
            redis, unique_prefix(), lease=60, retention=60, retry_schedule=(60,), randrange=random.randrange
        )
        return [MemoryStore(), rq]

    @deferred_test
    async def test_contract(self) -> None:
        """When any store commits a message, a second commit of the same queue id is refused."""
        for store in await self.stores():
            assert verifyObject(IMessageStore, store)
            await store.enqueue(message("SAME", "a@one.test"))
            with self.assertRaises(StoreUnavailable):
                await store.enqueue(message("SAME", "a@one.test"))
