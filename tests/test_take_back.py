"""
A 451 never leaves a deliverable copy: an enqueue whose outcome is unknown
(no reply in time, a lost connection, too few replicas) is taken back before
the client hears 451, and an enqueue that lands after that is refused.
Against a real redis-server.
"""

from __future__ import annotations

from typing import Any

import pytest

from relayx.interfaces import NotApplied, Outcome, StoreUnavailable
from relayx.queue.redis import RedisQueue
from tests.test_queue_redis import T0, QueueCase, deferred_test, message, take


class TakeBackTests(QueueCase):
    async def lost_reply(self, q: RedisQueue) -> None:
        """
        Make the next enqueue write for real, then fail as if its reply was lost.
        """
        real = q._write

        async def write_then_fail(*args: Any, **kw: Any) -> Any:
            q._write = real  # type: ignore[method-assign]
            await real(*args, **kw)
            raise StoreUnavailable("Redis at test: TimeoutError: the reply was lost")

        q._write = write_then_fail  # type: ignore[method-assign]

    @deferred_test
    async def test_lost_reply_is_taken_back(self) -> None:
        """When an enqueue's reply is lost, the message is taken back, the client gets 451 and nothing is left."""
        q = await self.make_queue()
        await q.enqueue(message("KEEP", "a@one.test"))
        await self.lost_reply(q)
        try:
            await q.enqueue(message("LOST", "a@one.test", "b@two.test"))
        except StoreUnavailable:
            pass
        else:
            raise AssertionError("the client must hear 451")
        assert await q.message("LOST", T0 + 1) is None
        totals = await q.totals()
        assert (totals.messages, totals.jobs) == (1, 1)
        report = await q.check_queue(["one.test", "two.test"])
        assert report.consistent, report
        [lease] = await take(q, "node-a", T0 + 1, 10)
        assert lease.queue_id == "KEEP"

    @deferred_test
    async def test_late_enqueue_is_refused(self) -> None:
        """When an enqueue arrives after its node took it back, Redis refuses it, so a stalled write never lands."""
        q = await self.make_queue()
        assert not await q._take_back("LATE", "the reply never came")
        with pytest.raises(NotApplied, match="ABORTED"):
            await q.enqueue(message("LATE", "a@one.test"))
        assert await q.message("LATE", T0 + 1) is None

    @deferred_test
    async def test_delivery_begun_means_250(self) -> None:
        """When a job of the message was leased before the take-back, it stays queued and the sender gets 250."""
        q = await self.make_queue()
        await q.enqueue(message("BUSY", "a@one.test"))
        [lease] = await take(q, "node-a", T0 + 1, 10)
        assert await q._take_back("BUSY", "the reply was lost")
        assert (await q.message("BUSY", T0 + 1)) is not None
        assert lease.queue_id == "BUSY"

    @deferred_test
    async def test_delivery_finished_means_250(self) -> None:
        """When the message was delivered and left the queue before the take-back ran, the sender gets 250."""
        q = await self.make_queue()
        await q.enqueue(message("DONE", "a@one.test"))
        [lease] = await take(q, "node-a", T0 + 1, 10)
        await q.settle(lease, Outcome(delivered=lease.recipients), T0 + 2)
        assert await q.message("DONE", T0 + 3) is None
        assert await q._take_back("DONE", "the reply was lost")

    @deferred_test
    async def test_take_back_retried_stays_aborted(self) -> None:
        """When a take-back runs again (its first reply was lost), it still says the message was taken back."""
        q = await self.make_queue()
        await q.enqueue(message("TWICE", "a@one.test"))
        assert not await q._take_back("TWICE", "the reply was lost")
        assert not await q._take_back("TWICE", "the reply to the take-back was lost")
        assert await q.message("TWICE", T0 + 1) is None

    @deferred_test
    async def test_enqueue_past_its_deadline_is_refused(self) -> None:
        """When an enqueue runs after its deadline (stuck in a stalled Redis), Redis refuses it: its node said 451."""
        from twisted.internet.task import Clock

        q = await self.make_queue()
        q.redis._clock = Clock()  # the node's clock says 1970: every deadline has passed by Redis's
        with pytest.raises(NotApplied, match="LATE"):
            await q.enqueue(message("STUCK", "a@one.test"))
        assert await q.message("STUCK", T0 + 1) is None
