"""
Bulk actions: delete, bounce or requeue every message matching a filter, run
by whichever node holds the action's lease, one bounded step at a time.

An operator starts one through the admin API (``POST /api/v1/bulk``), which
records it in the queue (``IBulkActions.bulk_start``, audited once with its
filter). Every node's ``BulkRunner`` looks for running actions each
``interval``; the node that takes an action's lease runs it step by step:
one page of matching jobs from the action's cursor (``IQueueAdmin.page``,
at most ``budget`` jobs examined), the action on each of their messages
(each one bounded Lua script, not audited one by one), then the new cursor
and the progress recorded under the lease (``bulk_step``). A node that dies
mid-step leaves its lease to expire; the next node redoes that step from the
recorded cursor, which changes nothing twice (a deleted or bounced message
is gone from the filter's matches; requeueing again is harmless).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayx.interfaces import IBulkActions, IQueueAdmin, StaleLease, StoreUnavailable

log = Logger()

ACTIONS = ("delete", "bounce", "requeue")


class BulkRunner:
    """
    Runs the cluster's bulk actions on this node when it holds their lease.
    """

    def __init__(
        self,
        queue: Any,
        owner: str,
        clock: IReactorTime,
        *,
        interval: float = 1.0,
        batch: int = 200,
        budget: int = 200,
        lease: float = 30.0,
    ) -> None:
        assert IQueueAdmin.providedBy(queue) and IBulkActions.providedBy(queue)
        self.queue = queue
        self.owner = owner
        self.clock = clock
        self.batch = batch
        self.budget = budget
        self.lease = lease
        self.interval = interval
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.tick()))
        self._loop.clock = clock
        self._busy = False
        self._stopping = False

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        self._stopping = True
        if self._loop.running:
            self._loop.stop()

    async def tick(self) -> int:
        """
        Run every running action whose lease this node can take, to its end
        (or until the node stops); returns how many steps were run.
        """
        if self._busy:
            return 0
        self._busy = True
        steps = 0
        try:
            for bulk_id in await self.queue.bulk_running():
                if self._stopping:
                    break
                if await self.queue.bulk_take(bulk_id, self.owner, self.lease):
                    steps += await self._run(bulk_id)
        except StoreUnavailable as e:
            log.warn("bulk actions: queue unavailable: {why}", why=str(e))
        except Exception:
            # logged, and the next tick tries again (a LoopingCall would stop for good)
            log.failure("bulk actions: unexpected error")
        finally:
            self._busy = False
        return steps

    async def _run(self, bulk_id: str) -> int:
        action = await self.queue.bulk(bulk_id)
        if action is None:
            return 0
        log.info(
            "bulk {action} {bulk} running from cursor {cursor}",
            action=action["action"],
            bulk=bulk_id,
            cursor=action["cursor"],
        )
        cursor, steps = int(action["cursor"]), 0
        while not self._stopping:
            if steps and not await self.queue.bulk_take(bulk_id, self.owner, self.lease):
                return steps
            now = self.clock.seconds()
            page = await self.queue.page(
                action["queues"], action["filter"], cursor, self.batch, now, budget=self.budget
            )
            acted = 0
            for queue_id in dict.fromkeys(job["qid"] for job in page["jobs"]):
                acted += 1 if await self._act(action, queue_id, now) else 0
            done = not page["more"]
            cursor = int(page["cursor"])
            try:
                state = await self.queue.bulk_step(
                    bulk_id, self.owner, cursor, int(page["examined"]), len(page["jobs"]), acted, done, now
                )
            except StaleLease:
                log.warn("bulk {bulk}: another node took over", bulk=bulk_id)
                return steps
            steps += 1
            if state != "running":
                log.info("bulk {action} {bulk} {state}", action=action["action"], bulk=bulk_id, state=state)
                return steps
        return steps

    async def _act(self, action: dict[str, Any], queue_id: str, now: float) -> int:
        who, kind = str(action["who"]), action["action"]
        if kind == "requeue":
            return int(await self.queue.requeue(queue_id, now, who, audited=False))
        return int(await self.queue.drop(queue_id, now, who, bounce=kind == "bounce", audited=False))
