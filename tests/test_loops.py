"""
Background loops keep going after an unexpected error, on a Clock: the
scheduler, the prober, the bouncer and the shared ``steady_loop`` the
node's heartbeat runs on. No reactor runs, nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relayx.delivery.bounce import Bouncer
from relayx.delivery.scheduler import Prober, Scheduler
from relayx.interfaces import Claim, FailedJob, IFailedJobs, IncomingMessage, StoreUnavailable, Throttle
from relayx.loops import logged, steady_loop
from tests.fakes import ManualDeliverer, ScriptedQueue, ramped


@implementer(ILogObserver)
class _Captured:
    """
    The log events emitted while it is open, so a test can see that an
    error was logged (and keep it out of the test's output).
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __enter__(self) -> _Captured:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def failures(self) -> list[str]:
        return [e["log_failure"].getErrorMessage() for e in self.events if "log_failure" in e]


def test_steady_loop_keeps_going_after_an_error() -> None:
    """When a loop's function raises once, the error is logged and the next interval calls it again."""
    clock = Clock()
    calls: list[float] = []

    def beat() -> None:
        calls.append(clock.seconds())
        if len(calls) == 2:
            raise RuntimeError("injected")

    with _Captured() as log:
        loop = steady_loop("heartbeat", beat, clock, 5.0, now=True)
        for _ in range(3):
            clock.advance(5)
    loop.stop()
    assert calls == [0, 5, 10, 15]
    assert log.failures() == ["injected"]


def test_steady_loop_waits_for_an_awaitable_and_survives_its_failure() -> None:
    """When a loop's function returns a failing Deferred, the failure is logged and the loop goes on."""
    clock = Clock()
    calls = []

    def beat() -> Deferred[None]:
        calls.append(clock.seconds())
        return fail(ValueError("odd reply"))

    with _Captured() as log:
        loop = steady_loop("heartbeat", beat, clock, 1.0)
        clock.advance(1)
        clock.advance(1)
    loop.stop()
    assert calls == [1, 2]
    assert log.failures() == ["odd reply", "odd reply"]


def test_logged_reports_a_dropped_failure() -> None:
    """When a Deferred nobody waits for fails, `logged` logs it instead of leaving it for the garbage collector."""
    with _Captured() as log:
        logged(fail(KeyError("x")), "probe of example.com")
    assert len(log.failures()) == 1


class _ClaimOnceBroken(ScriptedQueue):
    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    async def claim(
        self, owner: str, now: float, limit: int, throttles: Mapping[str, Throttle], default: Throttle
    ) -> Claim:
        self.claims += 1
        if self.claims == 1:
            raise RuntimeError("injected into claim")
        return await super().claim(owner, now, limit, throttles, default)


def test_scheduler_keeps_claiming_after_an_unexpected_error() -> None:
    """When a claim raises something other than StoreUnavailable, it is logged and the next poll claims again."""
    clock, queue, deliverer = Clock(), _ClaimOnceBroken(), ManualDeliverer()
    scheduler = Scheduler(
        "node-a", queue, deliverer, clock, workers=2, poll_interval=1.0, lease_duration=60, default=Throttle(1)
    )
    with _Captured() as log:
        scheduler.start()
        assert queue.claims == 1
        clock.advance(1)
    assert queue.claims == 2
    assert "injected into claim" in log.failures()
    scheduler._stopping = True


class _FailingDomainsBroken(ScriptedQueue):
    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def failing_domains(self) -> list[str]:
        self.asked += 1
        if self.asked == 1:
            raise RuntimeError("injected into failing_domains")
        return await super().failing_domains()


def test_prober_keeps_going_after_an_unexpected_error() -> None:
    """When the prober's look-up raises unexpectedly, it is logged and the next round still probes and resumes."""
    clock, queue, deliverer = Clock(), _FailingDomainsBroken(), ManualDeliverer()
    resumed: list[str] = []
    prober = Prober("node-a", queue, deliverer, clock, interval=1.0, resumed=resumed.append, throttle_of=ramped)
    queue.failing = {"example.com"}
    deliverer.up = {"example.com"}
    with _Captured() as log:
        prober.start()
        clock.advance(1)
        clock.advance(1)
    prober.stop()
    assert "injected into failing_domains" in log.failures()
    assert resumed == ["example.com"]


def test_prober_logs_a_probe_that_raises() -> None:
    """When probing one destination raises unexpectedly, it is logged and that destination is probed again later."""
    clock, queue = Clock(), ScriptedQueue()

    class Broken(ManualDeliverer):
        async def probe(self, domain: str) -> str | None:
            self.probes.append(domain)
            raise OSError("injected into probe")

    deliverer = Broken()
    prober = Prober("node-a", queue, deliverer, clock, interval=1.0, resumed=lambda domain: None, throttle_of=ramped)
    queue.failing = {"example.com"}
    with _Captured() as log:
        prober.start()
        clock.advance(1)
        clock.advance(1)
    prober.stop()
    assert deliverer.probes == ["example.com", "example.com"]
    assert log.failures() == ["injected into probe", "injected into probe"]


def _job(n: int, sender: str = "bob@sender.test") -> FailedJob:
    return FailedJob(
        job_id=f"J{n}.1",
        queue_id=f"J{n}",
        sender=sender,
        arrival=0.0,
        failures=((f"u{n}@example.com", 550, "5.1.1", "no such user"),),
        headers=b"Subject: x\r\n",
    )


@implementer(IFailedJobs)
class _FailedJobs:
    """
    Failed jobs in a list; bouncing job ``odd`` raises as a corrupt record would.
    """

    def __init__(self, jobs: list[FailedJob], odd: str) -> None:
        self.jobs = jobs
        self.odd = odd
        self.bounced: list[str] = []
        self.unavailable = False

    async def failed(self, limit: int) -> list[FailedJob]:
        if self.unavailable:
            raise StoreUnavailable("switched off by the test")
        return self.jobs[:limit]

    async def bounce(self, job: FailedJob, dsn: IncomingMessage | None, now: float) -> bool:
        if job.job_id == self.odd:
            raise ValueError("injected: odd job")
        self.jobs.remove(job)
        self.bounced.append(job.job_id)
        return True

    async def delayed(self, limit: int) -> list[FailedJob]:
        return []

    async def warn(self, job: FailedJob, dsn: IncomingMessage | None, now: float) -> bool:
        return False


def test_bouncer_survives_one_odd_failed_job() -> None:
    """When bouncing one failed job raises, it is logged and skipped; the others get their DSNs, every round."""
    clock = Clock()
    queue = _FailedJobs([_job(1), _job(2), _job(3)], odd="J1.1")
    assert verifyObject(IFailedJobs, queue)
    bouncer = Bouncer(queue=queue, clock=clock, hostname="mx2.relayx.test", new_queue_id=lambda: "DSN", interval=1)
    with _Captured() as log:
        bouncer.start()
        clock.advance(1)
        assert queue.bounced == ["J2.1", "J3.1"]
        queue.jobs.append(_job(4))
        clock.advance(1)
    bouncer.stop()
    assert queue.bounced == ["J2.1", "J3.1", "J4.1"]
    assert log.failures() == ["injected: odd job", "injected: odd job"]


def test_bouncer_waits_out_an_unavailable_store() -> None:
    """When the store is unavailable, the bouncer warns and tries again at the next interval."""
    clock = Clock()
    queue = _FailedJobs([_job(1)], odd="")
    queue.unavailable = True
    bouncer = Bouncer(queue=queue, clock=clock, hostname="mx2.relayx.test", new_queue_id=lambda: "DSN", interval=1)
    with _Captured():
        bouncer.start()
        clock.advance(1)
        queue.unavailable = False
        clock.advance(1)
    bouncer.stop()
    assert queue.bounced == ["J1.1"]


def test_bulk_runner_keeps_going_after_an_unexpected_error() -> None:
    """When listing bulk actions raises unexpectedly, it is logged and the next tick asks again."""
    from relayx.ops.bulk import BulkRunner

    class Queue:
        asked = 0

        async def bulk_running(self) -> list[str]:
            Queue.asked += 1
            if Queue.asked == 1:
                raise RuntimeError("injected into bulk_running")
            return []

    # a bare runner: only its tick is under test (the constructor wants a whole queue admin)
    runner = BulkRunner.__new__(BulkRunner)
    runner.queue = Queue()  # type: ignore[assignment]
    runner._busy = False
    runner._stopping = False
    with _Captured() as log:
        Deferred.fromCoroutine(runner.tick())
        Deferred.fromCoroutine(runner.tick())
    assert Queue.asked == 2 and log.failures() == ["injected into bulk_running"]
