"""
The queue's history (relayx/ops/history.py): the accepted and delivered
counters, one sample a minute for the whole cluster, bounded streams and
reads, the rates and a drain's progress, on a ``Clock`` with a real
``redis-server``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from relayx.address import Mailbox
from relayx.interfaces import IncomingMessage, Outcome
from relayx.ops.history import History, delivery_rate, replay, with_rates
from relayx.queue.redis import RedisQueue
from tests.fakes import ramped
from tests.helpers import eventually
from tests.test_queue_redis import T0, QueueCase, deferred_test, message, take

DOMAINS = {"one.test": ["one.test"], "two.test": ["two.test"]}


def history(q: RedisQueue, owner: str, clock: Clock, **kw: Any) -> History:
    return History(q, q.redis, q.prefix, DOMAINS, owner, clock, **kw)


def at(clock: Clock, when: float) -> Clock:
    clock.advance(when - clock.seconds())
    return clock


async def deliver(q: RedisQueue, now: float, n: int) -> int:
    """
    Claim and deliver up to ``n`` jobs of one.test at ``now``.
    """
    done = 0
    while done < n:
        leases = [lease for lease in await take(q, "node-a", now, n - done) if lease.domain == "one.test"]
        if not leases:
            break
        for lease in leases:
            assert await q.settle(lease, Outcome(delivered=lease.recipients), now) == "done"
            done += 1
    return done


class TrafficTests(QueueCase):
    @deferred_test
    async def test_accepted_and_delivered_counted(self) -> None:
        """When messages are accepted and delivered, the counters count their jobs per queue and in all; a job
        delivered to a domain that never took mail (a DSN's) is not counted, nor one not delivered in full."""
        q = await self.make_queue(copies={"two.test": 1})
        await q.enqueue(message("A", "a@one.test", "b@two.test"))
        await q.enqueue(message("B", "c@one.test"))
        assert await q.traffic(["one.test"]) == {"accepted": 2, "delivered": 0}
        assert await q.traffic(["two.test", "two.test#1"]) == {"accepted": 2, "delivered": 0}
        assert await q.traffic([]) == {"accepted": 4, "delivered": 0}
        leases = {(x.queue_id, x.domain): x for x in await take(q, "node-a", T0, 10)}
        await q.settle(leases["A", "one.test"], Outcome(delivered=("a@one.test",)), T0)
        await q.settle(leases["A", "two.test"], Outcome(deferred=(("b@two.test", _reply()),)), T0)
        assert await q.traffic(["one.test"]) == {"accepted": 2, "delivered": 1}
        assert await q.traffic([]) == {"accepted": 4, "delivered": 1}
        # a DSN's job to the sender's domain is delivered but not counted
        dsn_body = b"Subject: dsn\r\n\r\nx\r\n"
        recipients = (Mailbox.parse("bob@sender.test"),)
        await q.enqueue(IncomingMessage(queue_id="C", sender="", recipients=recipients, received_at=T0, body=dsn_body))
        await q.redis.call("hdel", q.key("accepted"), "sender.test")
        [dsn] = [x for x in await take(q, "node-a", T0, 10) if x.domain == "sender.test"]
        assert await q.settle(dsn, Outcome(delivered=dsn.recipients), T0) == "done"
        delivered = await q.redis.call("hgetall", q.key("delivered"))
        assert {k.decode(): int(v) for k, v in delivered.items()} == {"one.test": 1, "*": 1}

    @deferred_test
    async def test_counted_in_memory_then_flushed_once(self) -> None:
        """When mail is accepted, the count waits in memory (no Redis call on mail's path) until a flush adds it,
        once."""
        q = await self.make_queue()
        await q.enqueue(message("A", "a@one.test"))
        assert await q.redis.call("exists", q.key("accepted")) == 0
        await q.flush_traffic()
        await q.flush_traffic()
        assert int(await q.redis.call("hget", q.key("accepted"), "one.test")) == 1


def _reply() -> Any:
    from relayx.reply import Reply

    return Reply(451, "4.7.1", "later")


class SamplerTests(QueueCase):
    @deferred_test
    async def test_one_sample_a_minute_for_the_cluster(self) -> None:
        """When two nodes sample in the same minute, one records it (SET NX) and the other does not; each domain's
        stream and the cluster's get one entry with the counts by state and the counters."""
        q = await self.make_queue()
        clock = at(Clock(), T0 + 5)
        a, b = history(q, "node-a", clock), history(q, "node-b", clock)
        await q.hold("two.test", T0)
        for n in range(3):
            await q.enqueue(message(f"M{n}", f"u{n}@one.test", "x@two.test"))
        assert await a.sample() is True
        assert await b.sample() is False
        assert await a.sample() is False
        [one] = await a.read("one.test", 0, 100)
        assert one["at"] == T0 // 60 * 60
        assert (one["ready"], one["held"], one["total"], one["hold"], one["accepted"]) == (3, 0, 3, 0, 3)
        [two] = await b.read("two.test", 0, 100)
        assert (two["ready"], two["held"], two["hold"]) == (0, 3, 1)
        [cluster] = await b.read(None, 0, 100)
        assert (cluster["total"], cluster["hold"], cluster["accepted"], cluster["delivered"]) == (6, 1, 6, 0)
        assert one["accepted_per_minute"] is None
        at(clock, T0 + 65)
        assert await b.sample() is True
        assert len(await a.read("one.test", 0, 100)) == 2

    @deferred_test
    async def test_loop_on_the_clock(self) -> None:
        """When the loop runs, it samples once each interval, not at start; stopped, it samples no more."""
        q = await self.make_queue()
        clock = at(Clock(), T0)
        h = history(q, "node-a", clock)
        h.start()
        self.addCleanup(h.stop)
        assert await h.read(None, 0, 10) == []
        clock.advance(60)

        async def samples() -> list[dict[str, Any]] | None:
            found = await h.read(None, 0, 10)
            return found if len(found) == 1 else None

        await eventually(samples, 5, "the first sample")
        clock.advance(60)
        await eventually(lambda: _count(h, 2), 5, "the second sample")
        h.stop()
        clock.advance(60)
        assert len(await h.read(None, 0, 10)) == 2

    @deferred_test
    async def test_rates_and_a_replay(self) -> None:
        """When a held domain is released and drains, the samples give accepted and delivered per minute, and the
        replay its progress (delivered since the hold over that plus what is left) and estimated end."""
        q = await self.make_queue()
        clock = at(Clock(), T0)
        h = history(q, "node-a", clock)
        await q.hold("one.test", T0)
        for n in range(10):
            await q.enqueue(message(f"M{n}", f"u{n}@one.test"))
        assert await h.sample()
        await q.release("one.test", T0 + 30)
        assert await deliver(q, T0 + 60, 4) == 4
        assert await h.sample(T0 + 60)
        assert await deliver(q, T0 + 120, 2) == 2
        await q.enqueue(message("N", "late@one.test"))
        assert await h.sample(T0 + 120)
        samples = await h.read("one.test", 0, 100)
        assert [s["delivered_per_minute"] for s in samples] == [None, 4.0, 2.0]
        assert [s["accepted_per_minute"] for s in samples] == [None, 0.0, 1.0]
        assert [s["total"] for s in samples] == [10, 6, 5]
        # read from the second sample on: its rate still comes from the one before
        assert [s["delivered_per_minute"] for s in await h.read("one.test", T0 + 60, 100)] == [4.0, 2.0]
        recent = await h.recent("one.test")
        rate = delivery_rate(recent)
        assert rate == 3.0
        progress = replay(recent[-1], rate, 5, held=False)
        assert progress["began"] == T0 // 60 * 60
        assert (progress["delivered"], progress["remaining"], progress["progress"], progress["eta"]) == (
            6,
            5,
            round(6 / 11, 4),
            100,
        )
        assert replay(recent[-1], rate, 5, held=True)["eta"] is None
        # emptied, the drain is done; the next backlog is a new drain
        assert await deliver(q, T0 + 180, 5) == 5
        assert await h.sample(T0 + 180)
        recent = await h.recent("one.test")
        assert replay(recent[-1], delivery_rate(recent), 0, held=False)["delivered"] == 11
        await q.enqueue(message("O", "later@one.test"))
        assert await h.sample(T0 + 240)
        [last] = await h.read("one.test", T0 + 240, 10)
        assert (last["base"], last["began"]) == (11, T0 + 180)

    @deferred_test
    async def test_a_drain_begins_after_an_outage(self) -> None:
        """When a domain's destination was failing, the drain after it counts the deliveries since the last sample
        taken while it failed, not those before."""
        q = await self.make_queue()
        h = history(q, "node-a", at(Clock(), T0))
        for n in range(6):
            await q.enqueue(message(f"M{n}", f"u{n}@one.test"))
        assert await deliver(q, T0, 2) == 2
        assert await h.sample(T0)
        assert await deliver(q, T0 + 60, 1) == 1
        assert await h.sample(T0 + 60)
        [lease] = await take(q, "node-a", T0 + 100, 1)
        assert await q.settle(lease, Outcome(unreachable="connection refused"), T0 + 100) == "paused"
        assert await h.sample(T0 + 120)
        assert await q.resume("one.test", T0 + 170, ramped("one.test"))
        assert await deliver(q, T0 + 180, 2) == 2
        assert await h.sample(T0 + 180)
        [paused, after] = await h.read("one.test", T0 + 120, 10)
        assert (paused["base"], paused["began"]) == (3, T0 + 120)
        assert replay(after, None, after["total"], held=False)["delivered"] == 2

    @deferred_test
    async def test_streams_and_reads_are_bounded(self) -> None:
        """When more samples are taken than a stream keeps, the oldest are trimmed; a read returns at most its
        limit from `since` on."""
        q = await self.make_queue()
        h = history(q, "node-a", at(Clock(), T0), kept=5)
        for n in range(8):
            assert await h.sample(T0 + 60 * n)
        assert await q.redis.call("execute_command", "XLEN", h.stream("one.test")) == 5
        assert await q.redis.call("execute_command", "XLEN", h.stream(None)) == 5
        samples = await h.read("one.test", 0, 3)
        assert [s["at"] for s in samples] == [T0 // 60 * 60 + 60 * n for n in (3, 4, 5)]
        assert [s["at"] for s in await h.read("one.test", T0 + 400, 100)] == [T0 // 60 * 60 + 420]
        # a clock behind the newest sample records nothing, even with the minute's lock
        assert await h.sample(T0 + 60 * 8 + 1) is True
        await q.redis.call("delete", f"{q.prefix}:history:lock:{int(T0 // 60) + 6}")
        assert await h.sample(T0 + 60 * 6) is False
        assert [s["at"] - T0 for s in await h.read("one.test", T0 + 60 * 5, 100)] == [300, 360, 420, 480]


async def _count(h: History, n: int) -> bool | None:
    return True if len(await h.read(None, 0, 10)) == n else None


def test_rates_when_a_counter_goes_down() -> None:
    """When a counter is lower than in the sample before (its key was lost), that rate is unknown, not negative."""
    samples: list[dict[str, Any]] = [
        {"at": 60.0, "accepted": 10, "delivered": 5},
        {"at": 120.0, "accepted": 2, "delivered": 7},
    ]
    with_rates(samples, None)
    assert [(s["accepted_per_minute"], s["delivered_per_minute"]) for s in samples] == [(None, None), (None, 2.0)]
    assert delivery_rate(samples[:1]) is None
    assert replay(None, None, 0, held=False) == {
        "began": None,
        "delivered": 0,
        "remaining": 0,
        "progress": None,
        "delivered_per_minute": None,
        "eta": None,
        "held": False,
    }
