"""
The bouncer: turns failed jobs into DSNs to their senders, queued and
delivered like any other mail (to the sender's MX), and retires the jobs.

No DSN goes to the null sender, so a DSN that cannot be delivered is never
bounced itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayx.address import AddressError, Mailbox
from relayx.delivery.dsn import FailedRecipient, build_dsn
from relayx.interfaces import (
    FailedJob,
    IFailedJobs,
    IMessageStore,
    IncomingMessage,
    Lease,
    Notify,
    Outcome,
    Ret,
    StoredMessage,
    StoreUnavailable,
)
from relayx.loops import steady_loop
from relayx.message import header_section

log = Logger()


@dataclass
class Bouncer:
    queue: IFailedJobs
    clock: IReactorTime
    hostname: str
    new_queue_id: Callable[[], str]
    interval: float
    batch: int = 20
    #: where "relayed" DSNs are queued (``None``: none are sent)
    store: IMessageStore | None = None
    _loop: LoopingCall | None = None

    def start(self) -> None:
        self._loop = steady_loop("bouncer", self.run_once, self.clock, self.interval)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def run_once(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        try:
            for job in await self.queue.failed(self.batch):
                if not await self._each(self._bounce, job, "DSN"):
                    return
            for job in await self.queue.delayed(self.batch):
                if not await self._each(self._warn, job, "delay warning"):
                    return
        except StoreUnavailable as e:
            log.warn("DSNs not sent now: {why}", why=str(e))

    async def _each(self, send: Callable[[FailedJob], Awaitable[None]], job: FailedJob, what: str) -> bool:
        """
        Send one job's DSN; an odd job is logged and skipped, so it cannot
        stop the others. ``False`` when Redis is unavailable (stop for now).
        """
        try:
            await send(job)
        except StoreUnavailable as e:
            log.warn("DSNs not sent now: {why}", why=str(e))
            return False
        except Exception:
            log.failure(
                "{queue_id}: {what} for job {job} failed; skipped", queue_id=job.queue_id, what=what, job=job.job_id
            )
        return True

    async def _bounce(self, job: FailedJob) -> None:
        now = self.clock.seconds()
        dsn = self.dsn_for(job, now)
        if await self.queue.bounce(job, dsn, now):
            log.info(
                "{queue_id}: {count} recipient(s) failed, {what}",
                queue_id=job.queue_id,
                count=len(job.failures),
                what=f"DSN {dsn.queue_id} to <{job.sender}>" if dsn is not None else "no DSN (null sender, or NOTIFY)",
            )

    async def _warn(self, job: FailedJob) -> None:
        now = self.clock.seconds()
        dsn = self.dsn_for(job, now, delayed=True)
        if await self.queue.warn(job, dsn, now) and dsn is not None:
            log.info(
                "{queue_id}: delay warning {dsn} to <{sender}>",
                queue_id=job.queue_id,
                dsn=dsn.queue_id,
                sender=job.sender,
            )

    async def relayed(self, lease: Lease, stored: StoredMessage, outcome: Outcome) -> None:
        """
        Queue the "relayed" DSN (RFC 3461 6.2.2) for the recipients of a
        settled delivery that asked NOTIFY=SUCCESS of a host without DSN.
        Sent after the delivery is recorded: if queueing it fails, the notice
        is lost (logged), never the message.
        """
        if self.store is None:
            return
        now = self.clock.seconds()
        job = FailedJob(
            job_id=lease.job_id,
            queue_id=lease.queue_id,
            sender=stored.sender,
            arrival=lease.created,
            failures=tuple(
                (r, outcome.accepted.code if outcome.accepted else 250, "2.0.0", _relayed_text(outcome))
                for r in outcome.relayed
            ),
            headers=header_section(stored.body),
            dsn=stored.dsn,
        )
        dsn = self.dsn_for(job, now, relayed=True)
        if dsn is None:
            return
        await self.store.enqueue(dsn)
        log.info(
            "{queue_id}: relayed DSN {dsn} to <{sender}> for {count} recipient(s)",
            queue_id=lease.queue_id,
            dsn=dsn.queue_id,
            sender=stored.sender,
            count=len(outcome.relayed),
        )

    def dsn_for(
        self, job: FailedJob, now: float, delayed: bool = False, relayed: bool = False
    ) -> IncomingMessage | None:
        if not job.sender:
            return None
        try:
            recipient = Mailbox.parse(job.sender)
        except AddressError as e:
            log.warn(
                "{queue_id}: no DSN to unusable sender <{sender}>: {why}",
                queue_id=job.queue_id,
                sender=job.sender,
                why=str(e),
            )
            return None
        # RFC 3461 4.1: only the recipients whose NOTIFY asks for this kind
        wanted = Notify.SUCCESS if relayed else Notify.DELAY if delayed else Notify.FAILURE
        failures = [
            FailedRecipient(*f, orcpt=job.dsn.recipient(f[0]).orcpt)
            for f in job.failures
            if job.dsn.recipient(f[0]).wants(wanted)
        ]
        if not failures:
            return None
        queue_id = self.new_queue_id()
        body = build_dsn(
            reporting_mta=self.hostname,
            message_id=queue_id,
            queue_id=job.queue_id,
            sender=job.sender,
            arrival=job.arrival,
            now=now,
            failures=failures,
            original=job.headers,
            delayed=delayed,
            relayed=relayed,
            envid=job.dsn.envid,
            full=job.full if not (delayed or relayed) and job.dsn.ret is Ret.FULL else None,
        )
        return IncomingMessage(queue_id=queue_id, sender="", recipients=(recipient,), received_at=now, body=body)


def _relayed_text(outcome: Outcome) -> str:
    """
    The Diagnostic-Code text of a relayed recipient: the host and its reply.
    """
    reply = outcome.accepted
    said = reply.text if reply is not None else "accepted"
    return f"relayed to {outcome.destination}, which does not offer DSN: {said}"
