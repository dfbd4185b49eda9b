"""
The delivery scheduler and its lease keeper, on a Clock: no reactor runs.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relayx.delivery.scheduler import Prober, Scheduler
from relayx.interfaces import IDeliverer, IDeliveryQueue, Lease, Outcome, Throttle
from relayx.reply import Reply
from tests.fakes import ManualDeliverer, ScriptedQueue, ramped
from tests.helpers import logged_events


def lease(n: int, domain: str = "example.com") -> Lease:
    return Lease(
        job_id=f"Q{n}.1",
        token=100 + n,
        expires=60.0,
        queue_id=f"Q{n}",
        domain=domain,
        recipients=(f"u{n}@{domain}",),
        attempts=1,
        created=0.0,
    )


def setup(workers: int = 2) -> tuple[Clock, ScriptedQueue, ManualDeliverer, Scheduler]:
    clock = Clock()
    queue = ScriptedQueue()
    deliverer = ManualDeliverer()
    scheduler = Scheduler(
        owner="node-a",
        queue=queue,
        deliverer=deliverer,
        clock=clock,
        workers=workers,
        poll_interval=1.0,
        lease_duration=60.0,
        default=Throttle(1),
    )
    return clock, queue, deliverer, scheduler


def test_fakes_provide_interfaces() -> None:
    """When the scheduler's fakes stand in for the queue and deliverer, they provide the interfaces."""
    assert verifyObject(IDeliveryQueue, ScriptedQueue())
    assert verifyObject(IDeliverer, ManualDeliverer())


def test_claims_up_to_workers_and_refills_when_one_ends() -> None:
    """When more jobs are ready than workers, the scheduler runs `workers` at once and claims the next as one ends."""
    _, queue, deliverer, scheduler = setup(workers=2)
    queue.ready = [lease(1), lease(2), lease(3)]
    scheduler.start()
    assert sorted(deliverer.pending) == ["Q1", "Q2"]
    deliverer.finish("Q1", Outcome(delivered=("u1@example.com",)))
    assert [s[0].job_id for s in queue.settled] == ["Q1.1"]
    # the slot was refilled at once, not at the next poll
    assert sorted(deliverer.pending) == ["Q2", "Q3"]


def test_polls_when_idle() -> None:
    """When nothing is ready, the scheduler looks again every poll interval."""
    clock, queue, deliverer, scheduler = setup()
    scheduler.start()
    queue.ready = [lease(1)]
    assert deliverer.pending == {}
    clock.advance(1)
    assert list(deliverer.pending) == ["Q1"]


def test_lease_renewed_during_slow_delivery() -> None:
    """When a delivery takes longer than a third of the lease, the lease is renewed every 20 seconds."""
    clock, queue, deliverer, scheduler = setup()
    queue.ready = [lease(1)]
    scheduler.start()
    for _ in range(5):
        clock.advance(20)
    assert [t for _, t in queue.renewals] == [20, 40, 60, 80, 100]
    deliverer.finish("Q1", Outcome(delivered=("u1@example.com",)))
    clock.advance(60)
    assert len(queue.renewals) == 5
    [(settled, _)] = queue.settled
    assert settled.expires == 160.0  # the renewed lease is the one settled


def test_lost_lease_drops_outcome() -> None:
    """When a renewal finds the token stale, renewing stops and the outcome is not settled."""
    clock, queue, deliverer, scheduler = setup()
    queue.ready = [lease(1)]
    scheduler.start()
    queue.stale.add("Q1.1")
    clock.advance(20)
    clock.advance(20)
    assert queue.renewals == []
    deliverer.finish("Q1", Outcome(delivered=("u1@example.com",)))
    assert queue.settled == []


def test_unanswered_renewal_retried() -> None:
    """When Redis does not answer a renewal, the keeper tries again at the next interval."""
    clock, queue, _, scheduler = setup()
    queue.ready = [lease(1)]
    scheduler.start()
    queue.unavailable = True
    clock.advance(20)
    queue.unavailable = False
    clock.advance(20)
    assert [t for _, t in queue.renewals] == [40]


def test_stop_waits_for_deliveries() -> None:
    """When the scheduler stops, it claims nothing more and its stop ends once running deliveries end."""
    _, queue, deliverer, scheduler = setup(workers=1)
    queue.ready = [lease(1), lease(2)]
    scheduler.start()
    stopped: list[object] = []
    from twisted.internet.defer import Deferred

    Deferred.fromCoroutine(scheduler.stop()).addCallback(stopped.append)
    assert not stopped
    deliverer.finish("Q1", Outcome(delivered=("u1@example.com",)))
    assert stopped
    assert list(deliverer.pending) == []
    assert [lease.job_id for lease in queue.ready] == ["Q2.1"]


def test_rate_limited_claim_wakes_at_next_token() -> None:
    """When a claim reports that a rate-limited domain has room at a given time, the scheduler claims again then."""
    clock, queue, deliverer, scheduler = setup(workers=5)
    queue.wake = 0.25
    scheduler.start()
    queue.wake = None
    queue.ready = [lease(1)]
    clock.advance(0.2)
    assert deliverer.pending == {}
    clock.advance(0.05)
    assert list(deliverer.pending) == ["Q1"]


def test_prober_resumes_a_recovered_domain() -> None:
    """When a failing domain's destination answers the probe, the domain is resumed and the scheduler told at once."""
    clock = Clock()
    queue = ScriptedQueue()
    deliverer = ManualDeliverer()
    resumed: list[str] = []
    prober = Prober("node-a", queue, deliverer, clock, interval=5.0, resumed=resumed.append, throttle_of=ramped)
    queue.failing = {"down.test", "back.test"}
    deliverer.up = {"back.test"}
    prober.start()
    clock.advance(1)
    assert sorted(deliverer.probes) == ["back.test", "down.test"]
    assert resumed == ["back.test"]
    assert queue.failing == {"down.test"}
    prober.stop()


def test_prober_logs_a_long_outage_sparingly() -> None:
    """When a destination stays down for an hour of 1 s probes, "still down" is logged 6 times, not 3,600."""
    clock = Clock()
    queue = ScriptedQueue()
    deliverer = ManualDeliverer()
    prober = Prober("node-a", queue, deliverer, clock, interval=1.0, resumed=lambda d: None, throttle_of=ramped)
    queue.failing = {"down.test"}
    with logged_events() as events:
        prober.start()
        for _ in range(3600):
            clock.advance(1)
        lines = [e for e in events if "still down" in e.get("log_format", "")]
        assert len(deliverer.probes) >= 3590
        assert len(lines) == 6
        assert lines[1]["failed"] >= 590 and lines[1]["domain"] == "down.test"
        prober.stop()


def test_attempt_line_names_recipients_destination_and_reply() -> None:
    """When a delivery ends, its log line carries the recipients, the host and its reply (with its queue id)."""
    _, queue, deliverer, scheduler = setup(workers=1)
    queue.ready = [lease(1)]
    with logged_events() as events:
        scheduler.start()
        accepted = Reply(250, "2.0.0", "Ok: queued as 4XyZ12")
        deliverer.finish(
            "Q1",
            Outcome(delivered=("u1@example.com",), destination="mx1.example.com [192.0.2.1]:25", accepted=accepted),
        )
        [line] = [e for e in events if e.get("job") == "Q1.1"]
        assert line["rcpt"] == "u1@example.com" and line["mx"] == "mx1.example.com [192.0.2.1]:25"
        assert line["code"] == 250 and "queued as 4XyZ12" in line["reply"]
