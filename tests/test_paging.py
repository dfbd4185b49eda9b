"""
Paged listing, search indexes and bulk actions of the Redis queue, against a
real ``redis-server``: pages by cursor in acceptance order, each Redis call
bounded, indexes gone when jobs retire, bulk actions resumed by another node.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relayx.address import Mailbox
from relayx.interfaces import IBulkActions, IncomingMessage, IQueueAdmin, Outcome
from relayx.ops.bulk import BulkRunner
from relayx.queue.redis import RedisQueue
from relayx.reply import Reply
from tests.test_queue_redis import T0, QueueCase, deferred_test, take

BOTH = ["one.test", "two.test"]


def mail(
    qid: str, *rcpts: str, sender: str = "bob@sender.test", at: float = T0, header: bytes = b""
) -> IncomingMessage:
    return IncomingMessage(
        queue_id=qid,
        sender=sender,
        recipients=tuple(Mailbox.parse(r) for r in rcpts),
        received_at=at,
        body=header + b"Subject: about " + qid.encode() + b"\r\n\r\nbody\r\n",
    )


async def all_pages(q: RedisQueue, search: dict[str, Any], limit: int, budget: int) -> tuple[list[str], int]:
    """Every match, following the cursor; and how many calls it took."""
    found: list[str] = []
    cursor, calls = 0, 0
    while True:
        page = await q.page(BOTH, search, cursor, limit, T0 + 100, budget=budget)
        calls += 1
        assert len(page["jobs"]) <= limit and page["examined"] <= budget
        found += [j["jid"] for j in page["jobs"]]
        cursor = page["cursor"]
        if not page["more"]:
            return found, calls


async def index_keys(q: RedisQueue) -> list[str]:
    """The search-index keys under the queue's prefix (a test may SCAN; relayx never does)."""
    found = []
    for pattern in ("aq:*", "rq:*", "ix:*"):
        cursor = 0
        while True:
            cursor, keys = await q.redis.call("scan", cursor, q.key(pattern), 1000)
            found += [k.decode() if isinstance(k, bytes) else k for k in keys]
            if int(cursor) == 0:
                break
    return sorted(found)


class PagingTests(QueueCase):
    @deferred_test
    async def test_pages_follow_acceptance_order_across_queues(self) -> None:
        """When two queues are listed with a small budget, the cursor visits every job once, in acceptance order."""
        q = await self.make_queue()
        expected = []
        for n in range(30):
            domain = "one.test" if n % 3 else "two.test"
            await q.enqueue(mail(f"M{n:02}", f"u{n}@{domain}", at=T0 + n))
            expected.append(f"M{n:02}.1")
        found, calls = await all_pages(q, {}, 7, 4)
        assert found == expected and calls > 5
        odd, _ = await all_pages(q, {"subject_has": "m1"}, 3, 5)
        assert odd == [f"M1{n}.1" for n in range(10)]

    @deferred_test
    async def test_substring_search_reads_the_message_first(self) -> None:
        """When a sender or Subject part is searched with other filters, a job matches only if all do, fields whole."""
        q = await self.make_queue()
        await q.enqueue(mail("A", "x@one.test", "y@two.test", sender="ann@a.test", at=T0))
        await q.enqueue(mail("B", "z@one.test", sender="ann@a.test", at=T0 + 50))
        await q.enqueue(mail("C", "x@two.test", sender="cy@c.test", at=T0 + 60))
        found = (await q.page(BOTH, {"sender_has": "ann", "subject_has": "about"}, 0, 10, T0 + 100))["jobs"]
        assert [(j["jid"], j["domain"], j["sender"], j["subject"]) for j in found] == [
            ("A.1", "one.test", "ann@a.test", "about A"),
            ("A.2", "two.test", "ann@a.test", "about A"),
            ("B.1", "one.test", "ann@a.test", "about B"),
        ]
        assert found[0]["rcpts"] == ["x@one.test"] and found[2]["state"] == "ready"
        only_two = await q.page(["two.test"], {"subject_has": "about", "recipient_has": "x@"}, 0, 10, T0 + 100)
        assert [j["jid"] for j in only_two["jobs"]] == ["C.1"]
        early = await q.page(BOTH, {"sender_has": "ann", "before": int((T0 + 10) * 1000)}, 0, 10, T0 + 100)
        assert [j["jid"] for j in early["jobs"]] == ["A.1", "A.2"] and early["more"] is False
        assert (await q.page(BOTH, {"subject_has": "nothing like it"}, 0, 10, T0 + 100))["jobs"] == []

    @deferred_test
    async def test_exact_indexes_and_message_id(self) -> None:
        """When mail is searched by Message-ID, sender or recipient, the indexes answer; combined, all must match."""
        q = await self.make_queue()
        await q.enqueue(mail("A", "x@one.test", "y@two.test", header=b"Message-ID: <Abc.1@Example.NET>\r\n"))
        await q.enqueue(mail("B", "x@one.test", sender="Eve@Evil.test"))
        by_id = await q.page(BOTH, {"message_id": "abc.1@example.net"}, 0, 10, T0)
        assert [j["jid"] for j in by_id["jobs"]] == ["A.1", "A.2"]
        assert [j["jid"] for j in (await q.page(BOTH, {"sender": "eve@evil.test"}, 0, 10, T0))["jobs"]] == ["B.1"]
        both = await q.page(BOTH, {"sender": "bob@sender.test", "recipient": "x@one.test"}, 0, 10, T0)
        assert [j["jid"] for j in both["jobs"]] == ["A.1"] and both["jobs"][0]["subject"] == "about A"
        assert (await q.page(["two.test"], {"sender": "eve@evil.test"}, 0, 10, T0))["jobs"] == []
        nothing = await q.page(BOTH, {"recipient": "nobody@one.test"}, 0, 10, T0)
        assert nothing["jobs"] == [] and nothing["more"] is False

    @deferred_test
    async def test_indexes_removed_when_jobs_retire(self) -> None:
        """When jobs are delivered, deleted, bounced and their DSN sent, no index entry or index key is left."""
        q = await self.make_queue()
        await q.enqueue(mail("D", "a@one.test", header=b"Message-ID: <d@x>\r\n"))
        await q.enqueue(mail("X", "b@two.test", header=b"Message-ID: <x@x>\r\n"))
        await q.enqueue(mail("B", "c@two.test", sender=""))
        await q.enqueue(mail("F", "d@one.test"))
        assert len(await index_keys(q)) > 6
        leases = {lease.queue_id: lease for lease in await take(q, "n", T0, 10)}
        assert await q.settle(leases["D"], Outcome(delivered=("a@one.test",)), T0 + 1) == "done"
        assert await q.drop("X", T0 + 1, "ops", bounce=False) == 1
        assert await q.drop("B", T0 + 1, "ops", bounce=True) == 1
        [lease] = await take(q, "n", T0 + 2, 10)
        refused = (("d@one.test", Reply(550, "5.1.1", "no such user")),)
        assert await q.settle(lease, Outcome(failed=refused), T0 + 3) == "failed"
        assert [j["state"] for j in (await q.page(BOTH, {}, 0, 10, T0 + 3))["jobs"]] == ["failed", "failed"]
        for job in await q.failed(10):
            assert await q.bounce(job, None, T0 + 4)
        assert await index_keys(q) == []
        assert (await q.counts(BOTH, T0 + 4))["total"] == 0


def bucket(value: str) -> str:
    """The search index bucket of a recipient or Message-ID (common.lua's index_bucket)."""
    return hashlib.sha1(value.lower().encode()).hexdigest()[:4]


class IndexBucketTests(QueueCase):
    @deferred_test
    async def test_values_sharing_a_bucket_are_told_apart(self) -> None:
        """When two recipients or two Message-IDs hash to one bucket, a search returns only the jobs with its own."""
        # found by trying names: the first pair of each kind whose sha1 starts alike
        assert bucket("u45@one.test") == bucket("u129@one.test")
        assert bucket("m174@x.test") == bucket("m227@x.test")
        q = await self.make_queue()
        for n in range(8):
            rcpt = "U45@one.test" if n % 2 else "u129@one.test"
            mid = b"m174@x.test" if n % 4 == 1 else b"m227@x.test"
            await q.enqueue(mail(f"M{n}", rcpt, "z@two.test", at=T0 + n, header=b"Message-ID: <" + mid + b">\r\n"))
        assert q.key("ix", "rcpt", bucket("u45@one.test")) in await index_keys(q)
        assert await q.redis.call("zcard", q.key("ix", "rcpt", bucket("u45@one.test"))) == 8
        found, _ = await all_pages(q, {"recipient": "u45@one.test"}, 2, 3)
        assert found == ["M1.1", "M3.1", "M5.1", "M7.1"]
        found, _ = await all_pages(q, {"message_id": "m174@x.test"}, 10, 3)
        assert found == ["M1.1", "M1.2", "M5.1", "M5.2"]
        both, _ = await all_pages(q, {"message_id": "m227@x.test", "recipient": "u45@one.test"}, 10, 3)
        assert both == ["M3.1", "M7.1"]
        none = await q.page(BOTH, {"recipient": "u46@one.test"}, 0, 10, T0 + 100)
        assert none["jobs"] == [] and none["more"] is False

    @deferred_test
    async def test_sender_is_a_bounded_scan_by_cursor(self) -> None:
        """When mail is searched by exact sender, each call examines at most its budget and the cursor finds all."""
        q = await self.make_queue()
        expected = []
        for n in range(30):
            sender = "Spam@Bad.test" if n % 4 == 0 else f"ok{n}@good.test"
            await q.enqueue(mail(f"M{n:02}", f"u{n}@one.test", sender=sender, at=T0 + n))
            if n % 4 == 0:
                expected.append(f"M{n:02}.1")
        assert not [k for k in await index_keys(q) if ":ix:from:" in k]
        found, calls = await all_pages(q, {"sender": "spam@bad.test"}, 3, 5)
        assert found == expected and calls >= 6
        first = await q.page(["one.test"], {"sender": "spam@bad.test"}, 0, 50, T0 + 100, budget=5)
        assert first["examined"] == 5 and first["more"] is True and len(first["jobs"]) == 2
        null, _ = await all_pages(q, {"sender": ""}, 3, 5)
        assert null == []

    @deferred_test
    async def test_jobs_indexed_by_the_previous_version(self) -> None:
        """When jobs were indexed under a key per value (the previous version), searches still find them and
        their retiring leaves no index key behind."""
        q = await self.make_queue()
        await q.enqueue(mail("OLD", "x@one.test", "y@two.test", sender="Ann@a.test", header=b"Message-ID: <o@x>\r\n"))
        await q.enqueue(mail("NEW", "x@one.test", at=T0 + 1, header=b"Message-ID: <o@x>\r\n"))
        # OLD as the previous version indexed it: no buckets, a key per value
        for jid, rcpt in (("OLD.1", "x@one.test"), ("OLD.2", "y@two.test")):
            seq = await q.redis.call("hget", q.key("job", jid), "seq")
            await q.redis.call("zrem", q.key("ix", "rcpt", bucket(rcpt)), jid)
            await q.redis.call("zrem", q.key("ix", "mid", bucket("o@x")), jid)
            await q.redis.call("execute_command", "ZADD", q.key("ix", "rcpt", rcpt), seq, jid)
            await q.redis.call("execute_command", "ZADD", q.key("ix", "mid", "o@x"), seq, jid)
            await q.redis.call("execute_command", "ZADD", q.key("ix", "from", "ann@a.test"), seq, jid)
        found, _ = await all_pages(q, {"recipient": "x@one.test"}, 1, 2)
        assert found == ["OLD.1", "NEW.1"]
        found, _ = await all_pages(q, {"message_id": "o@x"}, 10, 1)
        assert found == ["OLD.1", "OLD.2", "NEW.1"]
        assert [j["jid"] for j in (await q.page(BOTH, {"sender": "ann@a.test"}, 0, 10, T0 + 100))["jobs"]] == [
            "OLD.1",
            "OLD.2",
        ]
        assert await q.drop("OLD", T0 + 2, "ops", bounce=False) == 2
        assert await q.drop("NEW", T0 + 2, "ops", bounce=False) == 1
        assert await index_keys(q) == []


class BulkTests(QueueCase):
    async def runner(self, q: RedisQueue, owner: str, clock: Clock, **kw: Any) -> BulkRunner:
        return BulkRunner(q, owner, clock, **kw)

    @deferred_test
    async def test_bulk_delete_resumed_by_another_node(self) -> None:
        """When a node dies during a bulk delete, another node takes over at the recorded cursor and finishes it,
        with one audit record for the whole action."""
        q = await self.make_queue()
        assert verifyObject(IBulkActions, q) and verifyObject(IQueueAdmin, q)
        for n in range(40):
            sender = "spam@bad.test" if n % 2 else "ok@good.test"
            await q.enqueue(mail(f"M{n:02}", f"u{n}@one.test", sender=sender, at=T0 + n))
        bulk_id = await q.bulk_start("delete", BOTH, {"sender": "spam@bad.test"}, T0 + 50, "ops (127.0.0.1)")
        clock = Clock()
        clock.advance(T0 + 50)
        first = await self.runner(q, "node-a", clock, batch=5, lease=30.0)
        # node-a takes the lease and runs one step, then dies
        assert await q.bulk_running() == [bulk_id]
        assert await q.bulk_take(bulk_id, "node-a", 30.0)
        page = await q.page(BOTH, {"sender": "spam@bad.test"}, 0, 5, T0 + 50)
        for job in page["jobs"]:
            assert await q.drop(job["qid"], T0 + 50, "ops", bounce=False, audited=False) == 1
        assert await q.bulk_step(bulk_id, "node-a", page["cursor"], page["examined"], 5, 5, False, T0 + 50) == "running"
        del first
        second = await self.runner(q, "node-b", clock, batch=5)
        assert await second.tick() == 0  # node-a's lease has not run out
        await q.redis.call("delete", q.key("bulk", "lease", bulk_id))  # now it has
        assert await second.tick() >= 3
        progress = await q.bulk(bulk_id)
        assert progress is not None and progress["state"] == "done"
        assert progress["matched"] == 20 and progress["acted"] == 20
        left = await q.page(BOTH, {}, 0, 100, T0 + 60)
        assert {j["qid"] for j in left["jobs"]} == {f"M{n:02}" for n in range(0, 40, 2)}
        records = await q.audit(100)
        assert [r["action"] for r in records] == ["bulk delete"]
        assert records[0]["filter"] == {"sender": "spam@bad.test"} and records[0]["bulk"] == bulk_id
        assert await q.bulk_running() == []

    @deferred_test
    async def test_bulk_requeue_and_bounce(self) -> None:
        """When deferred mail is requeued in bulk it is ready again; a bulk bounce fails what is owed."""
        q = await self.make_queue()
        for n in range(6):
            await q.enqueue(mail(f"M{n}", f"u{n}@one.test", at=T0 + n))
        clock = Clock()
        clock.advance(T0 + 10)
        runner = await self.runner(q, "node-a", clock, batch=2)
        for _ in range(6):
            [lease] = await take(q, "n", T0 + 10, 10)
            deferred = ((lease.recipients[0], Reply(451, "4.3.0", "later")),)
            await q.settle(lease, Outcome(deferred=deferred), T0 + 10)
        assert (await q.counts(BOTH, T0 + 10))["states"] == {"deferred": 6}
        bulk_id = await q.bulk_start("requeue", BOTH, {"state": "deferred"}, T0 + 10, "ops")
        await runner.tick()
        assert (await q.bulk(bulk_id) or {})["acted"] == 6
        assert (await q.counts(BOTH, T0 + 10))["states"] == {"ready": 6}
        bulk_id = await q.bulk_start("bounce", ["one.test"], {"before": int((T0 + 3) * 1000)}, T0 + 11, "ops")
        await runner.tick()
        assert (await q.bulk(bulk_id) or {})["acted"] == 3
        assert (await q.counts(BOTH, T0 + 10))["states"] == {"failed": 3, "ready": 3}
        assert [b["action"] for b in await q.bulks(10)] == ["bounce", "requeue"]

    @deferred_test
    async def test_bulk_cancel(self) -> None:
        """When a running bulk action is cancelled, its runner stops at the next step and it stays cancelled."""
        q = await self.make_queue()
        for n in range(4):
            await q.enqueue(mail(f"M{n}", f"u{n}@one.test"))
        bulk_id = await q.bulk_start("delete", BOTH, {}, T0, "ops")
        assert await q.bulk_cancel(bulk_id, T0 + 1, "ops") is True
        assert await q.bulk_cancel(bulk_id, T0 + 1, "ops") is False
        clock = Clock()
        assert await BulkRunner(q, "n", clock).tick() == 0
        assert (await q.bulk(bulk_id) or {})["state"] == "cancelled"
        assert (await q.counts(BOTH, T0))["total"] == 4
