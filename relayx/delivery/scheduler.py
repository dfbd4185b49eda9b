"""
The delivery scheduler: leases ready jobs from the shared queue, delivers
them, and settles each outcome with the lease's fencing token.

Any node runs one; together they drain the same queue. A node that dies
simply stops renewing, its leases run out, and another node's next claim
takes the jobs back (``claim.lua``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayx.interfaces import (
    IDeliverer,
    IDeliveryQueue,
    Lease,
    Outcome,
    StaleLease,
    StoredMessage,
    StoreUnavailable,
    Throttle,
)
from relayx.loops import logged, steady_loop
from relayx.metrics import Metrics

log = Logger()


class LeaseKeeper(Protocol):
    """
    Keeps one lease alive while its delivery runs: renews it every third of
    its duration, and notices when it was lost.
    """

    def start(self) -> None:
        "Begin renewing."

    def tick(self) -> None:
        "The renewal timer fired."

    def renewed(self, lease: Lease) -> None:
        "The store extended the lease."

    def lost(self) -> None:
        "The store refused the renewal: the token is stale, the job is another node's."

    def unanswered(self) -> None:
        "The store did not answer; the lease may still hold, try again."

    def stop(self) -> Lease | None:
        "Stop renewing; the current lease, or ``None`` if it was lost."


@dataclass
class _LeaseCore:
    clock: IReactorTime
    queue: IDeliveryQueue
    lease: Lease
    every: float
    timer: IDelayedCall | None = None

    def arm(self, keeper: LeaseKeeper) -> None:
        self.timer = self.clock.callLater(self.every, keeper.tick)

    def disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


def _build_lease_keeper() -> TypeMachine[LeaseKeeper, _LeaseCore]:
    builder = TypeMachineBuilder(LeaseKeeper, _LeaseCore)
    idle = builder.state("idle")
    holding = builder.state("holding")
    renewing = builder.state("renewing")
    lost = builder.state("lost")
    stopped = builder.state("stopped")

    @idle.upon(LeaseKeeper.start).to(holding)
    def _start(keeper: LeaseKeeper, core: _LeaseCore) -> None:
        core.arm(keeper)

    @holding.upon(LeaseKeeper.tick).to(renewing)
    def _renew(keeper: LeaseKeeper, core: _LeaseCore) -> None:
        core.timer = None

        async def renew() -> None:
            try:
                lease = await core.queue.renew(core.lease, core.clock.seconds())
            except StaleLease:
                keeper.lost()
            except StoreUnavailable as e:
                log.warn("lease {job} not renewed: {why}", job=core.lease.job_id, why=str(e))
                keeper.unanswered()
            except Exception:
                log.failure("lease {job} not renewed: unexpected error", job=core.lease.job_id)
                keeper.unanswered()
            else:
                keeper.renewed(lease)

        logged(Deferred.fromCoroutine(renew()), f"renewal of lease {core.lease.job_id}")

    @renewing.upon(LeaseKeeper.renewed).to(holding)
    def _renewed(keeper: LeaseKeeper, core: _LeaseCore, lease: Lease) -> None:
        core.lease = lease
        core.arm(keeper)

    @renewing.upon(LeaseKeeper.unanswered).to(holding)
    def _retry(keeper: LeaseKeeper, core: _LeaseCore) -> None:
        core.arm(keeper)

    @renewing.upon(LeaseKeeper.lost).to(lost)
    def _lost(keeper: LeaseKeeper, core: _LeaseCore) -> None:
        log.warn("lease {job} lost to another node", job=core.lease.job_id)

    @holding.upon(LeaseKeeper.stop).to(stopped)
    def _stop_holding(keeper: LeaseKeeper, core: _LeaseCore) -> Lease | None:
        core.disarm()
        return core.lease

    @renewing.upon(LeaseKeeper.stop).to(stopped)
    def _stop_renewing(keeper: LeaseKeeper, core: _LeaseCore) -> Lease | None:
        return core.lease

    @lost.upon(LeaseKeeper.stop).to(stopped)
    def _stop_lost(keeper: LeaseKeeper, core: _LeaseCore) -> Lease | None:
        return None

    # a renewal still in flight when the delivery ended
    stopped.upon(LeaseKeeper.renewed).loop().returns(None)
    stopped.upon(LeaseKeeper.lost).loop().returns(None)
    stopped.upon(LeaseKeeper.unanswered).loop().returns(None)
    return builder.build()


lease_keeper = _build_lease_keeper()


@dataclass
class Scheduler:
    """
    Keeps up to ``workers`` deliveries running on this node, claiming more
    from the queue every ``poll_interval`` and whenever one ends.
    """

    owner: str
    queue: IDeliveryQueue
    deliverer: IDeliverer
    clock: IReactorTime
    workers: int
    poll_interval: float
    lease_duration: float
    default: Throttle
    throttles: Mapping[str, Throttle] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    #: sends the "relayed" DSNs an outcome owes (RFC 3461 6.2.2), once it is settled
    relayed: Callable[[Lease, StoredMessage, Outcome], Awaitable[None]] | None = None
    _active: dict[str, Deferred[None]] = field(default_factory=dict)
    _loop: LoopingCall | None = None
    _wake: IDelayedCall | None = None
    _claiming: bool = False
    _stopping: bool = False

    def start(self) -> None:
        self._stopping = False
        self._loop = steady_loop("delivery scheduler", self.poll, self.clock, self.poll_interval, now=True)

    async def stop(self) -> None:
        """
        Claim nothing more and wait for the deliveries under way.
        """
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        await DeferredList(list(self._active.values()))

    def throttle_of(self, domain: str) -> Throttle:
        return self.throttles.get(domain, self.default)

    @property
    def active(self) -> int:
        return len(self._active)

    def poll(self) -> None:
        """
        Claim work if there is room; safe to call at any time.
        """
        if self._claiming or self._stopping or self.active >= self.workers:
            return
        self._claiming = True
        Deferred.fromCoroutine(self._claim()).addBoth(self._claimed)

    def _claimed(self, full: object) -> None:
        self._claiming = False
        if isinstance(full, Failure):
            log.failure("cannot claim deliveries: unexpected error", full)
            return
        if full is True:
            self.poll()

    async def _claim(self) -> bool:
        room = self.workers - self.active
        now = self.clock.seconds()
        try:
            claim = await self.queue.claim(self.owner, now, room, self.throttles, self.default)
        except StoreUnavailable as e:
            log.warn("cannot claim deliveries: {why}", why=str(e))
            return False
        self.metrics.lease_takeovers.inc(claim.taken_over)
        for lease in claim.leases:
            d = Deferred.fromCoroutine(self._attempt(lease))
            self._active[lease.job_id] = d
            d.addBoth(self._ended, lease.job_id)
        if claim.wake is not None:
            self.metrics.throttle_waits.inc()
            self._wake_at(claim.wake)
        return len(claim.leases) == room

    def _wake_at(self, when: float) -> None:
        """
        Claim again when a rate-limited domain has its next token, rather
        than at the next poll.
        """
        delay = max(0.001, when - self.clock.seconds())
        if self._wake is not None and self._wake.active():
            if self._wake.getTime() <= self.clock.seconds() + delay:
                return
            self._wake.cancel()
        self._wake = self.clock.callLater(delay, self.poll)

    def _ended(self, result: object, job_id: str) -> None:
        if isinstance(result, Failure):
            log.failure("job {job}: unexpected error after its delivery", result, job=job_id)
        del self._active[job_id]
        if not self._stopping:
            self.poll()

    async def _attempt(self, lease: Lease) -> None:
        keeper = lease_keeper(_LeaseCore(self.clock, self.queue, lease, self.lease_duration / 3))
        keeper.start()
        started = self.clock.seconds()
        try:
            stored = await self.queue.load(lease)
            outcome = await self.deliverer.deliver(
                lease.domain, stored.sender, lease.recipients, stored.body, dsn=stored.dsn
            )
        except StoreUnavailable as e:
            keeper.stop()
            log.warn("job {job} not attempted: {why}", job=lease.job_id, why=str(e), queue_id=lease.queue_id)
            return
        except Exception:
            keeper.stop()
            log.failure("job {job} failed unexpectedly", job=lease.job_id, queue_id=lease.queue_id)
            return
        current = keeper.stop()
        if current is None:
            self.metrics.leases_lost.inc()
            log.warn("job {job}: lease lost during delivery, outcome dropped", job=lease.job_id)
            return
        m = self.metrics
        m.delivery_seconds.observe(self.clock.seconds() - started)
        m.deliveries.labels(result="delivered").inc(len(outcome.delivered))
        m.deliveries.labels(result="failed").inc(len(outcome.failed))
        m.deliveries.labels(result="deferred").inc(len(outcome.deferred))
        if outcome.unreachable:
            m.deliveries.labels(result="unreachable").inc(len(lease.recipients))
        if outcome.pushback is not None:
            m.pushbacks.labels(kind=outcome.pushback.value).inc()
        if await self._settle(current, outcome) and outcome.relayed and self.relayed is not None:
            try:
                await self.relayed(current, stored, outcome)
            except Exception:
                log.failure("job {job}: relayed DSN not sent", job=lease.job_id, queue_id=lease.queue_id)
        replies = [reply for _, reply in (*outcome.failed, *outcome.deferred)]
        reply = outcome.accepted if outcome.accepted is not None else replies[0] if replies else None
        log.info(
            "job {job} of {queue_id} ({message_id}) to {domain} via {mx}{tls}: {delivered} delivered, {failed} failed, "
            "{deferred} deferred{unreachable} in {seconds:.3f}s; {rcpt}: {reply}",
            job=lease.job_id,
            queue_id=lease.queue_id,
            message_id=message_id(stored.body),
            code=0 if outcome.unreachable else reply.code if reply is not None else 250,
            reply=str(reply) if reply is not None else outcome.unreachable or "",
            mx=outcome.destination or "-",
            tls=" with TLS" if outcome.tls else "",
            rcpt=",".join(lease.recipients),
            domain=lease.domain,
            delivered=len(outcome.delivered),
            failed=len(outcome.failed),
            deferred=len(outcome.deferred),
            unreachable=f", unreachable: {outcome.unreachable}" if outcome.unreachable else "",
            seconds=self.clock.seconds() - started,
        )

    async def _settle(self, lease: Lease, outcome: Outcome) -> bool:
        """
        Record the outcome, retrying while the lease holds: a settle lost
        to a Redis hiccup would send the message again. ``True`` once recorded.
        """
        while True:
            try:
                await self.queue.settle(lease, outcome, self.clock.seconds(), self.throttle_of(lease.domain))
                return True
            except StaleLease:
                log.warn("job {job}: lease taken over before settling", job=lease.job_id)
                return False
            except StoreUnavailable as e:
                if self.clock.seconds() + 1 >= lease.expires:
                    log.error("job {job} not settled: {why}", job=lease.job_id, why=str(e))
                    return False
                await deferLater(self.clock, 1, lambda: None)


#: how often a destination that stays down is logged by the prober
PROBE_LOG_EVERY = 600.0

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]{1,250}>)", re.IGNORECASE | re.MULTILINE)


def message_id(body: bytes) -> str:
    """
    The Message-ID of a stored message (its header section only), or "".
    """
    end = body.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(body, 0, end if end >= 0 else min(len(body), 65536))
    return found.group(1).decode("utf-8", "replace") if found else ""


@dataclass
class Prober:
    """
    Watches failing destinations: every ``interval``, one node of the cluster
    checks each one (greeting and EHLO), and the first success ends the
    domain's pause, so its queue replays at once instead of after its backoff.
    """

    owner: str
    queue: IDeliveryQueue
    deliverer: IDeliverer
    clock: IReactorTime
    interval: float
    resumed: Callable[[str], None]
    #: the destination's throttle: whether it ramps back from one session
    throttle_of: Callable[[str], Throttle]
    _loop: LoopingCall | None = None
    _probing: set[str] = field(default_factory=set)
    #: per failing domain: when "still down" was last logged, and probes since
    _quiet: dict[str, tuple[float, int]] = field(default_factory=dict)

    def start(self) -> None:
        # look often; the cluster-wide lock keeps it to one probe per interval
        self._loop = steady_loop("prober", self.check, self.clock, min(1.0, self.interval))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check())

    def _still_down(self, domain: str, why: str) -> None:
        """
        Log a destination that is still down at its first probe, then once
        every ``PROBE_LOG_EVERY`` seconds with how many probes failed since:
        an outage of a day is not 17,000 log lines.
        """
        now = self.clock.seconds()
        last, failed = self._quiet.get(domain, (float("-inf"), 0))
        if now - last < PROBE_LOG_EVERY:
            self._quiet[domain] = (last, failed + 1)
            return
        self._quiet[domain] = (now, 0)
        log.info(
            "probe of {domain}: still down ({failed} more failed probes since the last line): {why}",
            domain=domain,
            failed=failed,
            why=why,
        )

    async def _check(self) -> None:
        try:
            failing = await self.queue.failing_domains()
        except StoreUnavailable:
            return
        for domain in failing:
            if domain in self._probing:
                continue
            self._probing.add(domain)
            logged(Deferred.fromCoroutine(self._probe(domain)), f"probe of {domain}")

    async def _probe(self, domain: str) -> None:
        try:
            await self._probe_once(domain)
        finally:
            self._probing.discard(domain)

    async def _probe_once(self, domain: str) -> None:
        try:
            if not await self.queue.take_probe(domain, self.owner, self.interval):
                return
            why = await self.deliverer.probe(domain)
            if why is not None:
                self._still_down(domain, why)
                return
            self._quiet.pop(domain, None)
            if await self.queue.resume(domain, self.clock.seconds(), self.throttle_of(domain)):
                log.info("probe of {domain}: destination is back, replaying its queue", domain=domain)
                self.resumed(domain)
        except StoreUnavailable as e:
            log.warn("probe of {domain} not recorded: {why}", domain=domain, why=str(e))
        except Exception:
            log.failure("probe of {domain}: unexpected error", domain=domain)
