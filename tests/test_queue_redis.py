"""
The Redis queue and its Lua scripts, against a real ``redis-server``.

Times are passed in explicitly, so leases and retries are exercised without
waiting for them.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
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
    IRecipientCache,
    Lease,
    Outcome,
    StaleLease,
    StoreUnavailable,
    Throttle,
)
from relayx.queue.redis import RedisQueue
from relayx.redis.connection import RedisConnection, connect
from relayx.redis.embedded import free_port
from relayx.reply import Reply
from tests.fakes import MemoryRecipientCache, MemoryStore
from tests.helpers import shared_redis, unique_prefix

T0 = 1_800_000_000.0
ONE_AT_A_TIME = Throttle(concurrency=1)


async def take(
    q: RedisQueue, owner: str, now: float, limit: int, throttles: dict[str, Throttle] | None = None
) -> list[Lease]:
    claim = await q.claim(owner, now, limit, throttles or {}, ONE_AT_A_TIME)
    return list(claim.leases)


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


class QueueCase(TestCase):
    """
    Each test gets a queue of its own (a fresh key prefix) on the shared Redis.
    """

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


class RedisQueueTests(QueueCase):
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
        leases = await take(q, "node-a", T0, 100)
        # concurrency 1: only the head of each domain
        assert sorted((lease.domain, lease.queue_id) for lease in leases) == [("one.test", "M0"), ("two.test", "M0")]
        order = []
        for _ in range(5):
            [lease] = [x for x in leases if x.domain == "one.test"]
            assert lease.recipients == ("a@one.test", "b@one.test")
            order.append(lease.queue_id)
            assert await q.settle(lease, Outcome(delivered=lease.recipients), T0) == "done"
            leases = await take(q, "node-a", T0, 100)
        assert order == ["M0", "M1", "M2", "M3", "M4"]

    @deferred_test
    async def test_rate_is_exact_on_the_clock(self) -> None:
        """When two nodes claim a 50 msg/s domain each time it has room again, they lease 50 a second, no more."""
        q = await self.make_queue()
        for n in range(260):
            await q.enqueue(message(f"R{n}", f"r{n}@one.test"))
        throttle = {"one.test": Throttle(concurrency=1000, rate=50.0)}
        now, taken, claims = T0, 0, 0
        while now < T0 + 4.0:
            claim = await q.claim("node-a" if claims % 2 else "node-b", now, 1000, throttle, ONE_AT_A_TIME)
            taken += len(claim.leases)
            claims += 1
            assert claim.wake is not None and claim.wake > now
            now = claim.wake
        print(f"\n{taken} leased in 4 s by {claims} claims")
        assert 198 <= taken <= 203
        # the throttle's achieved rate on a real reactor is measured in bench/ (python -m bench replay)

    @deferred_test
    async def test_concurrency_per_domain(self) -> None:
        """When a domain allows 3 deliveries at once, a claim leases its first 3 jobs (three mailboxes) in order."""
        q = await self.make_queue()
        for n in range(5):
            await q.enqueue(message(f"M{n}", f"r{n}@one.test"))
        leases = await take(q, "node-a", T0, 100, {"one.test": Throttle(3)})
        assert [lease.queue_id for lease in leases] == ["M0", "M1", "M2"]
        assert await take(q, "node-b", T0, 100, {"one.test": Throttle(3)}) == []

    @deferred_test
    async def test_duplicate_queue_id_refused(self) -> None:
        """When a queue id is enqueued twice, the second commit fails and nothing is overwritten."""
        q = await self.make_queue()
        await q.enqueue(message("DUP", "a@one.test"))
        with self.assertRaises(StoreUnavailable):
            await q.enqueue(message("DUP", "b@one.test"))
        [lease] = await take(q, "n", T0, 10)
        assert lease.recipients == ("a@one.test",)

    @deferred_test
    async def test_message_removed_when_all_jobs_done(self) -> None:
        """When every job of a message is delivered, the message and its jobs are gone from Redis."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test", "b@two.test"))
        for lease in await take(q, "n", T0, 10):
            stored = await q.load(lease)
            assert stored.sender == "bob@sender.test"
            await q.settle(lease, Outcome(delivered=lease.recipients), T0)
        keys = await q.redis.call("keys", q.prefix + ":*")
        names = sorted(k.decode().split(":", 1)[1] for k in keys)
        # what stays: the sequences, the counters (at zero) of the queues that had jobs,
        # the report's event log (bounded by the retention), each destination's state
        # (its adaptive pace's success count and reply time: one hash per domain), and
        # for a few minutes the message's done marker, for a take-back that lost the
        # race with the delivery
        assert names == [
            "count:one.test",
            "count:two.test",
            "dom:one.test",
            "dom:two.test",
            "done:M",
            "events:keep",
            "events:one.test",
            "events:two.test",
            "fence",
            "queues",
            "seq",
            "totals",
        ]
        assert (await q.totals()).messages == 0 and (await q.totals()).bytes == 0
        assert (await q.queue_summary(["one.test", "two.test"], T0))["two.test"].total == 0

    @deferred_test
    async def test_one_hash_per_message(self) -> None:
        """When a message is queued, its fields share its first job's hash, which keeps no default; it goes last."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test", "b@two.test"))
        first = {k.decode(): v for k, v in (await q.redis.call("hgetall", q.key("job", "M.1"))).items()}
        assert sorted(first) == sorted(
            ["sender", "body", "received", "jobs", "njobs", "size", "subject", "domain", "rcpts", "seq"]
        )
        assert await q.redis.call("keys", q.key("msg", "*")) == []
        assert await q.job_fields("M.1", ["qid", "owed", "failed", "created", "attempts"]) == [
            b"M",
            b'["a@one.test"]',
            b"[]",
            first["received"],
            b"0",
        ]
        [one, two] = sorted(await take(q, "n", T0, 10), key=lambda lease: lease.job_id)
        assert (one.queue_id, one.recipients, one.created) == ("M", ("a@one.test",), T0)
        await q.settle(one, Outcome(delivered=one.recipients), T0)
        # the first job is gone, its message's fields stay for the second
        left = await q.redis.call("hgetall", q.key("job", "M.1"))
        assert sorted(k.decode() for k in left) == ["body", "jobs", "njobs", "received", "sender", "size", "subject"]
        assert await q.job_fields("M.1", ["qid"]) is None and await q.message_exists("M")
        view = await q.message("M", T0)
        assert view is not None and [j["jid"] for j in view["jobs"]] == ["M.2"]
        assert (await q.load(two)).sender == "bob@sender.test"
        await q.settle(two, Outcome(delivered=two.recipients), T0)
        assert await q.redis.call("keys", q.key("job", "*")) == [] and not await q.message_exists("M")
        assert (await q.totals()).messages == 0

    @deferred_test
    async def test_message_of_the_previous_version(self) -> None:
        """When the previous version queued a message (its own hash, all job fields), it is listed, sent, retired."""
        q = await self.make_queue()
        await q.enqueue(message("OLD", "a@one.test", "b@one.test"))
        # its hashes as the previous version wrote them: the message apart, every job field
        mine, job = q.message_key("OLD"), q.key("job", "OLD.1")
        fields = await q.redis.call("hgetall", mine)
        kept = {k: v for k, v in fields.items() if k in (b"sender", b"body", b"received", b"jobs", b"size")}
        await q.redis.call("delete", mine)
        await q.redis.call("hmset", q.key("msg", "OLD"), {**kept, b"njobs": b"1"})
        rcpts = fields[b"rcpts"]
        await q.redis.call(
            "hmset",
            job,
            {
                "qid": "OLD",
                "domain": "one.test",
                "rcpts": rcpts,
                "owed": rcpts,
                "failed": "[]",
                "seq": fields[b"seq"],
                "created": fields[b"received"],
                "held_base": 0,
                "attempts": 0,
                "token": 0,
            },
        )
        with self.assertRaises(StoreUnavailable):
            await q.enqueue(message("OLD", "c@one.test"))
        page = await q.page(["one.test"], {"sender_has": "bob@"}, 0, 10, T0)
        assert [(j["qid"], j["sender"], j["owed"]) for j in page["jobs"]] == [
            ("OLD", "bob@sender.test", ["a@one.test", "b@one.test"])
        ]
        view = await q.message("OLD", T0)
        assert (
            view is not None and view["sender"] == "bob@sender.test" and [j["jid"] for j in view["jobs"]] == ["OLD.1"]
        )
        assert await q.message_exists("OLD") and await q.raw("OLD") == message("OLD").body
        [lease] = await take(q, "n", T0, 10)
        assert (lease.queue_id, lease.created) == ("OLD", T0)
        assert (await q.load(lease)).sender == "bob@sender.test"
        assert await q.settle(lease, Outcome(delivered=lease.recipients), T0 + 1) == "done"
        assert await q.redis.call("keys", q.key("job", "*")) == []
        assert await q.redis.call("keys", q.key("msg", "*")) == []
        assert not await q.message_exists("OLD")
        totals = await q.totals()
        assert (totals.messages, totals.bytes, totals.jobs) == (0, 0, 0)

    @deferred_test
    async def test_stale_token_refused(self) -> None:
        """When a lease expired and another node re-claimed the job, the first node's settle and renew are refused."""
        q = await self.make_queue(lease=10.0)
        await q.enqueue(message("M", "a@one.test"))
        [old] = await take(q, "node-a", T0, 10)
        assert await take(q, "node-b", T0 + 5, 10) == []
        [new] = await take(q, "node-b", T0 + 11, 10)
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
        [lease] = await take(q, "node-a", T0, 10)
        for t in (5, 10, 15, 20):
            lease = await q.renew(lease, T0 + t)
            assert lease.expires == T0 + t + 10
            assert await take(q, "node-b", T0 + t + 1, 10) == []
        assert await q.settle(lease, Outcome(delivered=lease.recipients), T0 + 25) == "done"

    @deferred_test
    async def test_partial_outcome_retries_only_owed(self) -> None:
        """When one recipient is accepted, one deferred and one refused, the retry goes to the deferred one only."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test", "b@one.test", "c@one.test"))
        [lease] = await take(q, "n", T0, 10)
        outcome = Outcome(
            delivered=("a@one.test",),
            deferred=(("b@one.test", Reply(452, "4.2.2", "mailbox full")),),
            failed=(("c@one.test", Reply(550, "5.1.1", "no such user")),),
        )
        assert await q.settle(lease, outcome, T0) == "deferred"
        assert await take(q, "n", T0 + 59, 10) == []
        [retry] = await take(q, "n", T0 + 60, 10)
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
        leases = await take(q, "n", T0, 10)
        head = next(lease for lease in leases if lease.domain == "one.test")
        assert await q.settle(head, Outcome(unreachable="connection refused"), T0) == "paused"
        # another domain is not held up
        other = next(lease for lease in leases if lease.domain == "two.test")
        assert await q.settle(other, Outcome(delivered=other.recipients), T0) == "done"
        assert await take(q, "n", T0 + 59, 10) == []
        [again] = await take(q, "n", T0 + 60, 10)
        assert again.queue_id == "M0"
        # the second failure waits the second step of the schedule
        assert await q.settle(again, Outcome(unreachable="connection refused"), T0 + 60) == "paused"
        assert await take(q, "n", T0 + 359, 10) == []
        [third] = await take(q, "n", T0 + 360, 10)
        assert third.queue_id == "M0"

    @deferred_test
    async def test_retention_expiry_fails_old_jobs(self) -> None:
        """When a destination stays down past the retention, the jobs at the head that are too old fail."""
        q = await self.make_queue(retention=3600.0)
        await q.enqueue(message("OLD1", "a@one.test", at=T0))
        await q.enqueue(message("OLD2", "a@one.test", at=T0 + 10))
        await q.enqueue(message("NEW", "a@one.test", at=T0 + 3000))
        [lease] = await take(q, "n", T0 + 3700, 10)
        assert lease.queue_id == "OLD1"
        assert await q.settle(lease, Outcome(unreachable="refused"), T0 + 3700) == "failed"
        failed = await q.redis.call("zrange", q.key("failed"), 0, -1)
        assert sorted(f.decode().split(".")[0] for f in failed) == ["OLD1", "OLD2"]
        [left] = await take(q, "n", T0 + 3760, 10)
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


class ClusterQueueTests(QueueCase):
    """
    Hold and release, throttles, ramp-up, recovery and heartbeats, at
    explicit times against a real Redis.
    """

    @deferred_test
    async def test_hold_and_release(self) -> None:
        """When a domain is held, mail is queued but not leased; on release it flows in order."""
        q = await self.make_queue()
        await q.hold("one.test", T0)
        for n in range(3):
            await q.enqueue(message(f"M{n}", "a@one.test", at=T0 + n))
        await q.enqueue(message("X", "a@two.test", at=T0))
        assert [lease.domain for lease in await take(q, "n", T0 + 10, 10)] == ["two.test"]
        state = await q.domain_state("one.test", T0 + 10)
        assert state.held and state.ready == 3
        assert (await q.release("one.test", T0 + 20)).held is True
        [lease] = await take(q, "n", T0 + 20, 10)
        assert lease.queue_id == "M0"

    @deferred_test
    async def test_scheduled_hold_window(self) -> None:
        """When a hold is scheduled, mail flows before it, waits during it, and flows after its end by itself."""
        q = await self.make_queue()
        await q.hold("one.test", T0, start=T0 + 100, end=T0 + 200)
        await q.enqueue(message("BEFORE", "a@one.test", at=T0))
        [before] = await take(q, "n", T0 + 1, 10)
        await q.settle(before, Outcome(delivered=before.recipients), T0 + 2)
        await q.enqueue(message("DURING", "a@one.test", at=T0 + 150))
        assert await take(q, "n", T0 + 150, 10) == []
        assert (await q.domain_state("one.test", T0 + 150)).held
        [after] = await take(q, "n", T0 + 200, 10)
        assert after.queue_id == "DURING"
        assert not (await q.domain_state("one.test", T0 + 200)).held

    @deferred_test
    async def test_time_held_does_not_count_against_retention(self) -> None:
        """When mail sits in a hold longer than its retention, it is not expired on release."""
        q = await self.make_queue(retention=3600.0)
        await q.enqueue(message("OLD", "a@one.test", at=T0))
        await q.hold("one.test", T0 + 600)
        await q.release("one.test", T0 + 600 + 7200)
        [lease] = await take(q, "n", T0 + 7800, 10)
        # 7800 s in the queue, 7200 of them held: 600 s old, well within an hour
        assert await q.settle(lease, Outcome(unreachable="still down"), T0 + 7800) == "paused"
        [again] = await take(q, "n", T0 + 7860, 10)
        assert again.queue_id == "OLD"
        # past an hour of time not held, it expires
        assert await q.settle(again, Outcome(unreachable="still down"), T0 + 7200 + 3601) == "failed"

    @deferred_test
    async def test_rate_limit_token_bucket(self) -> None:
        """When a domain is limited to 50 msg/s and claimed every 10 ms for 2 s, about 100 are leased, no burst."""
        q = await self.make_queue()
        for n in range(300):
            await q.enqueue(message(f"M{n:03}", f"r{n}@one.test"))
        throttles = {"one.test": Throttle(concurrency=1000, rate=50)}
        taken_at: list[float] = []
        wake = None
        for step in range(200):
            now = T0 + step / 100
            claim = await q.claim("n", now, 100, throttles, ONE_AT_A_TIME)
            taken_at += [now] * len(claim.leases)
            wake = claim.wake
        assert 98 <= len(taken_at) <= 103
        for start in range(0, 100):
            window = [t for t in taken_at if T0 + start / 100 <= t < T0 + start / 100 + 1]
            assert len(window) <= 55
        assert wake is not None and T0 + 1.99 < wake <= T0 + 2.03

    @deferred_test
    async def test_release_at_a_rate(self) -> None:
        """When a held domain is released at 10 msg/s, its backlog drains at that rate, then the limit ends."""
        q = await self.make_queue()
        await q.hold("one.test", T0)
        for n in range(40):
            await q.enqueue(message(f"M{n:02}", f"r{n}@one.test"))
        await q.release("one.test", T0 + 1, rate=10)
        throttles = {"one.test": Throttle(concurrency=1000)}
        taken = 0
        for step in range(100):
            claim = await q.claim("n", T0 + 1 + step / 100, 100, throttles, ONE_AT_A_TIME)
            taken += len(claim.leases)
        assert 9 <= taken <= 11
        assert (await q.domain_state("one.test", T0 + 2)).release_rate == 10

    @deferred_test
    async def test_claim_brings_the_message_with_its_lease(self) -> None:
        """
        When jobs are claimed, each one's sender, body and DSN come with its lease and the load reads nothing
        more, except a body over 64 KiB: that one is read at load, so one claim's reply stays small.
        """
        q = await self.make_queue()
        small = message("SMALL", "a@one.test")
        big = IncomingMessage(
            queue_id="BIG",
            sender="",
            recipients=(Mailbox.parse("b@two.test"),),
            received_at=T0,
            body=b"Subject: big\r\n\r\n" + b"x" * 70000 + b"\r\n",
        )
        await q.enqueue(small)
        await q.enqueue(big)
        reads: list[str] = []
        read_fields = q.message_fields

        async def counted(queue_id: str, names: Sequence[str]) -> list[Any]:
            reads.append(queue_id)
            return await read_fields(queue_id, names)

        q.message_fields = counted  # type: ignore[method-assign]
        loaded = {lease.queue_id: await q.load(lease) for lease in await take(q, "n", T0, 10)}
        assert reads == ["BIG"]
        assert (loaded["SMALL"].sender, loaded["SMALL"].body) == (small.sender, small.body)
        assert (loaded["BIG"].sender, loaded["BIG"].body) == ("", big.body)

    @deferred_test
    async def test_recovery_ramps_up(self) -> None:
        """
        When a destination comes back after failing, it starts at one session and climbs one per interval with
        a delivery.
        """
        q = await self.make_queue(lease=1000.0)
        for n in range(30):
            await q.enqueue(message(f"M{n:02}", f"r{n}@one.test"))
        throttle = Throttle(concurrency=10, ramp_up=100)
        throttles = {"one.test": throttle}
        leased = (await q.claim("n", T0, 100, throttles, ONE_AT_A_TIME)).leases
        assert len(leased) == 10
        for lease in leased:
            await q.settle(lease, Outcome(unreachable="down"), T0, throttle)
        assert await q.failing_domains() == ["one.test"]
        assert await q.take_probe("one.test", "node-a", 5) is True
        assert await q.take_probe("one.test", "node-b", 5) is False
        assert await q.resume("one.test", T0 + 10, throttle) is True
        assert await q.failing_domains() == []
        now = T0 + 10
        for sessions in (1, 2, 3, 4):
            leased = (await q.claim("n", now, 100, throttles, ONE_AT_A_TIME)).leases
            assert len(leased) == sessions
            now += 1
            for lease in leased:
                await q.settle(lease, Outcome(delivered=lease.recipients), now, throttle)
        assert (await q.domain_state("one.test", now)).pace.concurrency == 5

    @deferred_test
    async def test_heartbeats_list_nodes_and_leases(self) -> None:
        """When nodes heartbeat, the live ones are listed with the jobs they hold; a silent one drops out."""
        q = await self.make_queue()
        await q.heartbeat("node-a", T0, 15, {"hostname": "a.test"})
        await q.heartbeat("node-b", T0 - 20, 15, {"hostname": "b.test"})
        await q.enqueue(message("M", "a@one.test"))
        [lease] = await take(q, "node-a", T0, 10)
        [status] = await q.nodes(T0 + 1, 15)
        assert (status.node, status.hostname, status.leases) == ("node-a", "a.test", (lease.job_id,))


class RecipientCacheContract(QueueCase):
    """
    Every IRecipientCache: an answer is recalled with the time it was learnt.
    """

    @deferred_test
    async def test_contract(self) -> None:
        """When any cache remembers an answer, it recalls it with its time, and knows nothing of other addresses."""
        for cache in [MemoryRecipientCache(), await self.make_queue()]:
            assert verifyObject(IRecipientCache, cache)
            assert await cache.recall("a@one.test") is None
            await cache.remember("a@one.test", False, T0, 3600)
            await cache.remember("b@one.test", True, T0 + 1, 3600)
            assert await cache.recall("a@one.test") == (False, T0)
            assert await cache.recall("b@one.test") == (True, T0 + 1)


class OperatorTests(QueueCase):
    """
    What an operator does through the admin API, at the queue: search,
    one message's view, flush, requeue, delete, bounce, and the audit log.
    """

    @deferred_test
    async def test_search_and_message_view(self) -> None:
        """When jobs are searched, they come by state, sender, recipient and age, a page at a time, oldest first."""
        q = await self.make_queue()
        await q.hold("one.test", T0)
        for n in range(5):
            await q.enqueue(message(f"M{n}", f"u{n}@one.test", sender=f"s{n % 2}@sender.test", at=T0 + n))
        await q.enqueue(message("T", "a@two.test", at=T0 + 10))
        both = ["one.test", "two.test"]
        counts = await q.counts(both, T0 + 20)
        assert counts["total"] == 6 and counts["states"] == {"held": 5, "ready": 1} and counts["oldest"] == T0 * 1000
        page = await q.page(both, {}, 0, 2, T0 + 20)
        assert [j["qid"] for j in page["jobs"]] == ["M0", "M1"] and page["more"] is True
        rest = await q.page(both, {}, page["cursor"], 10, T0 + 20)
        assert [j["qid"] for j in rest["jobs"]] == ["M2", "M3", "M4", "T"] and rest["more"] is False
        by_sender = await q.page(["one.test"], {"sender_has": "s1@"}, 0, 10, T0 + 20)
        assert [j["qid"] for j in by_sender["jobs"]] == ["M1", "M3"]
        exact = await q.page(["one.test"], {"sender": "s1@sender.test"}, 0, 10, T0 + 20)
        assert [j["qid"] for j in exact["jobs"]] == ["M1", "M3"]
        assert [j["qid"] for j in (await q.page(["one.test"], {"recipient_has": "u4@"}, 0, 10, T0))["jobs"]] == ["M4"]
        assert [j["qid"] for j in (await q.page(both, {"recipient": "u4@one.test"}, 0, 10, T0))["jobs"]] == ["M4"]
        assert [j["qid"] for j in (await q.page(both, {"subject_has": "m2"}, 0, 10, T0))["jobs"]] == ["M2"]
        old = await q.page(["one.test"], {"before": int((T0 + 2) * 1000)}, 0, 10, T0 + 20)
        assert [j["qid"] for j in old["jobs"]] == ["M0", "M1"]
        new = await q.page(both, {"after": int((T0 + 3) * 1000)}, 0, 10, T0 + 20)
        assert [j["qid"] for j in new["jobs"]] == ["M3", "M4", "T"]
        assert (await q.page(["one.test"], {"state": "ready"}, 0, 10, T0))["jobs"] == []
        assert [j["state"] for j in (await q.page(both, {"state": "ready"}, 0, 10, T0))["jobs"]] == ["ready"]
        view = await q.message("M2", T0 + 1)
        assert view is not None and view["sender"] == "s0@sender.test"
        assert view["header"].startswith("Subject:") and view["jobs"][0]["state"] == "held"
        assert view["jobs"][0]["owed"] == ["u2@one.test"] and view["jobs"][0]["history"] == []
        assert await q.message("NOPE", T0 + 1) is None

    @deferred_test
    async def test_flush_and_requeue(self) -> None:
        """When a domain waits for its failing destination, flush ends the wait; requeue retries a deferred job now."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test", "b@one.test"))
        [lease] = await take(q, "n", T0, 10)
        deferred = (("b@one.test", Reply(452, "4.2.2", "mailbox full")),)
        await q.settle(lease, Outcome(delivered=("a@one.test",), deferred=deferred), T0 + 1)
        assert await take(q, "n", T0 + 2, 10) == []
        view = await q.message("M", T0 + 1)
        assert view is not None and view["jobs"][0]["state"] == "deferred"
        assert view["jobs"][0]["history"][0][1] == "452 4.2.2 mailbox full"
        assert await q.requeue("M", T0 + 2, "ops") == 1
        [again] = await take(q, "n", T0 + 2, 10)
        assert again.recipients == ("b@one.test",)
        await q.settle(again, Outcome(unreachable="connection refused"), T0 + 3)
        assert await take(q, "n", T0 + 4, 10) == []
        assert await q.flush("one.test", T0 + 4, "ops") == 0
        [flushed] = await take(q, "n", T0 + 4, 10)
        assert flushed.queue_id == "M"
        actions = [(r["action"], r["who"]) for r in await q.audit(10)]
        assert actions == [("flush", "ops"), ("requeue", "ops")]

    @deferred_test
    async def test_delete_and_bounce(self) -> None:
        """When a message is deleted it is gone; when bounced, its owed recipients wait for their DSN as failed."""
        q = await self.make_queue()
        await q.hold("one.test", T0, who="ops")
        await q.enqueue(message("D", "a@one.test"))
        await q.enqueue(message("B", "b@one.test", "c@two.test"))
        assert await q.drop("D", T0 + 1, "ops", bounce=False) == 1
        assert await q.message("D", T0 + 1) is None and await q.drop("D", T0 + 1, "ops", bounce=False) == 0
        assert await q.drop("B", T0 + 2, "ops", bounce=True) == 2
        [failed] = [j for j in await q.failed(10) if j.job_id == "B.1"]
        assert failed.failures[0][:3] == ("b@one.test", 0, "5.0.0")
        assert (await q.counts(["one.test", "two.test"], T0 + 3))["states"] == {"failed": 2}
        assert (await q.release("one.test", T0 + 3, who="ops")).held is True
        assert await take(q, "n", T0 + 4, 10) == []
        actions = [r["action"] for r in await q.audit(10)]
        assert actions == ["release", "bounce", "delete", "hold"]

    @deferred_test
    async def test_dropped_job_refuses_its_old_lease(self) -> None:
        """When a message is deleted or bounced while a node delivers it, that node's renew and settle are refused."""
        q = await self.make_queue()
        for qid, bounce in (("D", False), ("B", True)):
            await q.enqueue(message(qid, "a@one.test"))
            [lease] = await take(q, "n", T0, 10)
            assert await q.drop(qid, T0 + 1, "ops", bounce=bounce) == 1
            with self.assertRaises(StaleLease):
                await q.renew(lease, T0 + 2)
            with self.assertRaises(StaleLease):
                await q.settle(lease, Outcome(delivered=lease.recipients), T0 + 2)
        assert [j.job_id for j in await q.failed(10)] == ["B.1"]
