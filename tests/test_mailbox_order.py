"""
Acceptance order per recipient mailbox (claim.lua and the busy recipients
kept by common.lua's move()), against a real ``redis-server`` with the time
passed in; and a whole node delivering in parallel to a loopback sink.
"""

from __future__ import annotations

from bench.sink import recipient_order_violations
from relayx.interfaces import Lease, Outcome, Throttle
from relayx.queue.redis import RedisQueue
from relayx.reply import Reply
from tests.helpers import LoopbackSink, NodeCase, send, wait_for
from tests.test_queue_redis import T0, QueueCase, deferred_test, message

FIVE = {"one.test": Throttle(concurrency=5)}


def ids(leases: list[Lease] | tuple[Lease, ...]) -> list[str]:
    return [lease.queue_id for lease in leases]


class MailboxOrderTests(QueueCase):
    async def claim(self, q: RedisQueue, now: float, throttles: dict[str, Throttle] = FIVE) -> list[Lease]:
        return list((await q.claim("node", now, 100, throttles, Throttle(concurrency=1))).leases)

    @deferred_test
    async def test_jobs_to_one_mailbox_never_in_flight_together(self) -> None:
        """When two jobs share a recipient, the second is leased only once the first is delivered; others go ahead."""
        q = await self.make_queue()
        for qid, rcpt in (("M0", "a@one.test"), ("M1", "A@one.test"), ("M2", "b@one.test")):
            await q.enqueue(message(qid, rcpt))
        first = await self.claim(q, T0)
        assert ids(first) == ["M0", "M2"]
        assert await self.claim(q, T0) == []
        await q.settle(first[0], Outcome(delivered=first[0].recipients), T0)
        assert ids(await self.claim(q, T0)) == ["M1"]

    @deferred_test
    async def test_job_to_two_waits_for_a_job_in_flight_to_one(self) -> None:
        """When a job to {a, b} waits for an in-flight job to b, a later job to a waits behind it too."""
        q = await self.make_queue()
        await q.enqueue(message("TO-B", "b@one.test"))
        await q.enqueue(message("TO-AB", "a@one.test", "b@one.test"))
        await q.enqueue(message("TO-A", "a@one.test"))
        await q.enqueue(message("TO-C", "c@one.test"))
        [b, c] = await self.claim(q, T0)
        assert ids([b, c]) == ["TO-B", "TO-C"]
        await q.settle(b, Outcome(delivered=b.recipients), T0)
        [ab] = await self.claim(q, T0)
        assert ab.queue_id == "TO-AB" and ab.recipients == ("a@one.test", "b@one.test")
        assert await self.claim(q, T0) == []
        await q.settle(ab, Outcome(delivered=ab.recipients), T0)
        assert ids(await self.claim(q, T0)) == ["TO-A"]

    @deferred_test
    async def test_different_mailboxes_in_parallel_up_to_the_concurrency(self) -> None:
        """When ten jobs go to ten mailboxes, a claim leases the first five in order: the domain's concurrency."""
        q = await self.make_queue()
        for n in range(10):
            await q.enqueue(message(f"M{n}", f"u{n}@one.test"))
        assert ids(await self.claim(q, T0)) == ["M0", "M1", "M2", "M3", "M4"]
        assert await self.claim(q, T0) == []

    @deferred_test
    async def test_a_busy_mailbox_is_passed_over(self) -> None:
        """When the head of a queue is ten jobs to one mailbox, the job to another mailbox behind them is leased."""
        q = await self.make_queue()
        for n in range(10):
            await q.enqueue(message(f"A{n}", "a@one.test"))
        await q.enqueue(message("B", "b@one.test"))
        assert ids(await self.claim(q, T0)) == ["A0", "B"]

    @deferred_test
    async def test_deferred_job_holds_its_mailbox_back_until_its_retry(self) -> None:
        """When a job is deferred (a 4xx for its recipient), later mail to that mailbox waits for its retry."""
        q = await self.make_queue()
        await q.enqueue(message("A0", "a@one.test"))
        await q.enqueue(message("A1", "a@one.test"))
        await q.enqueue(message("B0", "b@one.test"))
        await q.enqueue(message("B1", "b@one.test"))
        a0, b0 = await self.claim(q, T0)
        full = Reply(452, "4.2.2", "mailbox full")
        assert await q.settle(a0, Outcome(deferred=(("a@one.test", full),)), T0) == "deferred"
        assert await q.settle(b0, Outcome(delivered=b0.recipients), T0) == "done"
        # the retry is due at T0 + 60: until then A1 waits, B1 does not
        [b1] = await self.claim(q, T0 + 1)
        assert b1.queue_id == "B1"
        await q.settle(b1, Outcome(delivered=b1.recipients), T0 + 1)
        [retry] = await self.claim(q, T0 + 60)
        assert retry.queue_id == "A0" and retry.attempts == 2
        assert await self.claim(q, T0 + 60) == []
        await q.settle(retry, Outcome(delivered=retry.recipients), T0 + 61)
        assert ids(await self.claim(q, T0 + 61)) == ["A1"]

    @deferred_test
    async def test_an_expired_lease_frees_its_mailbox(self) -> None:
        """When a lease runs out, its job is leased again in its place, before later mail to the same mailbox."""
        q = await self.make_queue(lease=10.0)
        await q.enqueue(message("A0", "a@one.test"))
        await q.enqueue(message("A1", "a@one.test"))
        [first] = await self.claim(q, T0)
        assert await self.claim(q, T0 + 5) == []
        [again] = await self.claim(q, T0 + 11)
        assert again.queue_id == "A0" and again.token > first.token
        assert await q.redis.call("hgetall", q.key("busy", "one.test")) == {b"a@one.test": b"1"}
        await q.settle(again, Outcome(delivered=again.recipients), T0 + 12)
        assert await q.redis.call("exists", q.key("busy", "one.test")) == 0
        assert ids(await self.claim(q, T0 + 12)) == ["A1"]

    @deferred_test
    async def test_tokens_are_not_spent_on_busy_mailboxes(self) -> None:
        """When a rate-limited domain's ready jobs all wait for busy mailboxes, its tokens stay for later."""
        q = await self.make_queue()
        throttle = {"one.test": Throttle(concurrency=5, rate=10.0)}  # a burst of one token
        await q.enqueue(message("A0", "a@one.test"))
        await q.enqueue(message("A1", "a@one.test"))
        [a0] = await self.claim(q, T0, throttle)
        assert await self.claim(q, T0 + 0.1, throttle) == []  # the token that came back is kept
        await q.settle(a0, Outcome(delivered=a0.recipients), T0 + 0.1)
        assert ids(await self.claim(q, T0 + 0.1, throttle)) == ["A1"]


def numbered(n: int, rcpts: list[str]) -> bytes:
    return f"From: s@sender.test\r\nTo: {', '.join(rcpts)}\r\nSubject: order {n}\r\n\r\nbody {n}\r\n".encode()


class ParallelDeliveryTests(NodeCase):
    @deferred_test
    async def test_parallel_replay_keeps_each_mailbox_in_order(self) -> None:
        """When 60 messages to 6 mailboxes (some to two) replay at concurrency 6, each mailbox gets them in order."""
        sink = LoopbackSink()
        await self.start_node(sink, concurrency=6, workers=6)
        sent: list[tuple[int, list[str]]] = []
        for n in range(60):
            rcpts = [f"m{n % 6}@example.com"] + ([f"m{(n + 2) % 6}@example.com"] if n % 5 == 0 else [])
            assert await send(self.smtp_port, "s@sender.test", rcpts, numbered(n, rcpts)) == {}
            sent.append((n, rcpts))
        sink.start()
        await wait_for(lambda: len(sink.messages) >= 60, 60, "60 deliveries")
        got = [(int(m.body.split(b"Subject: order ")[1].split(b"\r\n")[0]), m.recipients) for m in sink.messages]
        assert sorted((n, sorted(r)) for n, r in got) == sorted((n, sorted(r)) for n, r in sent)
        assert recipient_order_violations(got) == 0
        # and the mailboxes went in parallel: more than one session to the primary
        assert sink.sink.connections > 1, sink.sink.connections


class MailboxRateTests(QueueCase):
    @deferred_test
    async def test_rate_holds_with_mailboxes_shared(self) -> None:
        """When 900 messages to 50 mailboxes drain at 200 msg/s, 20 at once, 800 (+ the burst) are leased in 4 s."""
        q = await self.make_queue()
        for n in range(900):
            await q.enqueue(message(f"M{n:03}", f"m{n % 50}@one.test"))
        throttle = {"one.test": Throttle(concurrency=20, rate=200.0)}
        now, leased = T0, 0
        while now < T0 + 4.0:
            claim = await q.claim("node", now, 100, throttle, Throttle(concurrency=1))
            leased += len(claim.leases)
            for lease in claim.leases:
                await q.settle(lease, Outcome(delivered=lease.recipients), now)
            now = claim.wake if claim.wake is not None else now + 0.001
        print(f"\n{leased} leased in 4 s at 200 msg/s")
        assert 792 <= leased <= 811, leased
