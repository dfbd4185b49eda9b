"""
The orphan sweep: removes bodies whose message is not queued, once they are
older than ``orphan_age``: a node that died between writing a body and
queueing its message, an enqueue Redis refused, a message deleted or
bounced by an operator. It walks the store a bounded page per step, so a
store of a million bodies costs the same per step as one of ten.

A body is removed only when the queue says for certain that its message is
not there; any doubt (Redis unreachable) keeps it for the next pass.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayx.interfaces import IBodyStore, StoreUnavailable

log = Logger()


@dataclass
class OrphanSweep:
    store: IBodyStore
    #: whether a queue id's message is queued; raises ``StoreUnavailable`` when unsure
    queued: Callable[[str], Awaitable[bool]]
    clock: IReactorTime
    orphan_age: float
    interval: float
    batch: int = 500
    #: bodies removed since start
    removed: int = 0
    _cursor: str | None = None
    _loop: LoopingCall | None = field(default=None, repr=False)

    def start(self) -> None:
        self._loop = LoopingCall(self.step)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(lambda f: log.failure("the orphan sweep stopped", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def step(self) -> Deferred[int]:
        """
        Look at the next page of bodies; how many were removed. Never fails:
        a failure is logged and the next step tries again.
        """
        return Deferred.fromCoroutine(self._step())

    async def _step(self) -> int:
        removed = 0
        try:
            page = await self.store.list_older_than(self.clock.seconds() - self.orphan_age, self._cursor, self.batch)
            for body in page.bodies:
                if not await self.queued(body.queue_id):
                    await self.store.delete(body.ref)
                    removed += 1
            self._cursor = page.cursor
        except StoreUnavailable as e:
            log.warn("orphan sweep paused: {why}", why=str(e))
        except Exception:
            log.failure("orphan sweep step failed")
        if removed:
            self.removed += removed
            log.info("orphan sweep removed {count} bodies with no message", count=removed)
        return removed
