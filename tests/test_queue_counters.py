"""
The queue's counters against a recount (hypothesis, stateful), on a real
``redis-server``: random sequences of enqueue (several domains, copy
destinations), claim, settle (delivered, failed, deferred, unreachable),
lease expiry, due retries, delay warnings, bounce, requeue, re-route, hold,
release, delete and flush; after every step the counters, the totals, the
oldest job and each queue's busy recipients equal a recount of every job, no
mailbox has two jobs in flight or deferred, and the consistency check agrees.

The queue runs its real scripts through a small synchronous client (redis-py)
instead of the node's Twisted one, so each rule is a plain call: nothing in
``RedisQueue`` ever waits on the reactor, so its coroutines finish at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime

from relayx.address import Mailbox
from relayx.interfaces import (
    FailedJob,
    IncomingMessage,
    Lease,
    NotApplied,
    Outcome,
    Pushback,
    QueueCounts,
    StaleLease,
    Throttle,
)
from relayx.queue.redis import RedisQueue, job_default, job_qid
from relayx.redis.scripts import Script
from relayx.reply import Reply
from tests.helpers import shared_redis, unique_prefix

T = TypeVar("T")
T0 = 1_800_000_000.0
DOMAINS = ("one.test", "two.test", "three.test")
#: one.test has a copy destination, so its messages have two jobs there
QUEUES = ("one.test", "one.test#1", "two.test", "three.test", "sender.test")
STATES = ("ready", "held", "deferred", "in_flight", "failed")
HOWS = st.sampled_from(["delivered", "failed", "deferred", "unreachable", "mixed", "pushback"])


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def done(coroutine: Coroutine[Any, Any, T]) -> T:
    """
    The result of a coroutine that never suspends (its Redis calls are synchronous).
    """
    try:
        coroutine.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    raise AssertionError("the coroutine waited")


class SyncRedis:
    """
    The part of ``RedisConnection`` the queue uses, over redis-py: the same
    scripts and commands, answered before the call returns.
    """

    where = "test"
    connected = True
    timeout = 5.0
    #: an enqueue's deadline is read on the real clock, as Redis's TIME is
    clock: IReactorTime = cast(IReactorTime, reactor)

    def __init__(self, port: int) -> None:
        self.r = redis.Redis(port=port)

    async def script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            try:
                return self.r.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return self.r.eval(script.source.decode(), len(keys), *keys, *args)
        except redis.exceptions.ResponseError as e:
            if str(e).startswith("STALE"):
                raise StaleLease(str(e)) from None
            raise NotApplied(str(e)) from None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "hscan":
            # txredisapi's answer: the cursor and a flat list of fields and values
            cursor, fields = cast(tuple[int, dict[bytes, bytes]], self.r.hscan(*args, **kwargs))
            return cursor, [x for pair in fields.items() for x in pair]
        return getattr(self.r, method)(*args, **kwargs)


def recount(r: redis.Redis, prefix: str, now: float) -> tuple[dict[str, QueueCounts], tuple[int, int, int]]:
    """
    Every job's state and size, read job by job (fine for a test's few jobs):
    counts per queue, and the totals (messages, bytes, jobs).
    """
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    jobs = 0
    messages = size = 0
    for key in r.scan_iter(f"{prefix}:job:*"):
        jid = key.decode().split(":job:", 1)[1]
        if r.hexists(key, "received"):  # a message's fields, in its first job's hash
            messages += 1
            size += int(r.hget(key, "size") or 0)
        if not r.hexists(key, "domain"):  # the first job retired, its message's fields stay
            continue
        qid = job_qid(jid)
        message = f"{prefix}:msg:{qid}" if r.exists(f"{prefix}:msg:{qid}") else f"{prefix}:job:{qid}.1"
        domain = _str(r.hget(key, "domain"))
        received = cast(bytes, r.hget(message, "received"))
        created = _str(r.hget(key, "created") or job_default(jid, "created", None, received))
        where = [
            name
            for name, zset in (
                ("in_flight", f"{prefix}:leased"),
                ("deferred", f"{prefix}:deferred"),
                ("failed", f"{prefix}:failed"),
                ("ready", f"{prefix}:ready:{domain}"),
            )
            if r.zscore(zset, jid) is not None
        ]
        assert len(where) == 1, f"job {jid} is in {where}"
        state = where[0]
        if state == "in_flight":
            assert r.zscore(f"{prefix}:inflight:{domain}", jid) is not None
        if state == "deferred":
            assert r.zscore(f"{prefix}:deferred:{domain}", jid) is not None
        held = r.hget(f"{prefix}:dom:{domain.split('#')[0]}", "held") == b"1"
        if state == "ready" and held:
            state = "held"
        row = counts.setdefault(domain, dict.fromkeys((*STATES, "bytes"), 0))
        row[state] += 1
        row["bytes"] += int(r.hget(message, "size") or 0)
        oldest[domain] = min(oldest.get(domain, float("inf")), int(created) / 1000)
        jobs += 1
    for key in r.scan_iter(f"{prefix}:msg:*"):
        messages += 1
        size += int(r.hget(key, "size") or 0)
    result = {q: QueueCounts(**row, oldest=oldest.get(q)) for q, row in counts.items()}  # type: ignore[arg-type]
    return result, (messages, size, jobs)


def busy_recount(r: redis.Redis, prefix: str) -> dict[str, dict[str, list[str]]]:
    """
    Per queue, each recipient (lower case) of a job in flight or deferred and
    those jobs, read job by job: what ``<p>:busy:<q>`` counts.
    """
    busy: dict[str, dict[str, list[str]]] = {}
    for where in ("leased", "deferred"):
        for member in r.zrange(f"{prefix}:{where}", 0, -1):
            jid = _str(member)
            domain, rcpts = (_str(v) for v in r.hmget(f"{prefix}:job:{jid}", ["domain", "rcpts"]))
            for rcpt in json.loads(rcpts):
                busy.setdefault(domain, {}).setdefault(rcpt.lower(), []).append(jid)
    return busy


class QueueCounters(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.redis = SyncRedis(shared_redis().port)
        self.q = RedisQueue(
            self.redis,  # type: ignore[arg-type]
            unique_prefix(),
            lease=60.0,
            retention=86400.0,
            retry_schedule=(60.0, 300.0),
            randrange=lambda n: 0,
            copies={"one.test": 1},
            delay_warning=3600.0,
        )
        self.now = T0
        self.n = 0
        self.leases: list[Lease] = []
        self.qids: list[str] = []

    @rule(
        domains=st.lists(st.sampled_from(DOMAINS), min_size=1, max_size=3, unique=True),
        size=st.integers(min_value=0, max_value=3000),
        users=st.lists(st.sampled_from(["u", "v", "W"]), min_size=1, max_size=2, unique=True),
    )
    def enqueue(self, domains: list[str], size: int, users: Sequence[str] = ("u", "v")) -> None:
        self.n += 1
        qid = f"M{self.n}"
        rcpts = tuple(Mailbox.parse(f"{u}@{d}") for d in domains for u in users)
        body = b"Subject: x\r\n\r\n" + b"x" * size
        done(self.q.enqueue(IncomingMessage(qid, "bob@sender.test", rcpts, self.now, body)))
        self.qids.append(qid)

    @rule(limit=st.integers(min_value=1, max_value=5))
    def claim(self, limit: int) -> None:
        claim = done(self.q.claim("node", self.now, limit, {}, Throttle(concurrency=3)))
        self.leases += claim.leases

    @initialize(domains=st.lists(st.lists(st.sampled_from(DOMAINS), min_size=1, max_size=3, unique=True), max_size=4))
    def some_mail(self, domains: list[list[str]]) -> None:
        for to in domains:
            self.enqueue(to, 100)

    @rule(hows=st.lists(HOWS, min_size=1, max_size=4))
    def deliver(self, hows: list[str]) -> None:
        """Claim some jobs and settle each at once (kept leases are for expiry and stale tokens)."""
        claim = done(self.q.claim("node", self.now, len(hows), {}, Throttle(concurrency=3)))
        for lease, how in zip(claim.leases, hows, strict=False):
            self._settle(lease, how)

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(min_value=0), how=HOWS)
    def settle(self, pick: int, how: str) -> None:
        self._settle(self.leases.pop(pick % len(self.leases)), how)

    def _settle(self, lease: Lease, how: str) -> None:
        rcpts = lease.recipients
        soft, hard = Reply(451, "4.3.0", "later"), Reply(550, "5.1.1", "no such user")
        busy = Reply(421, "4.7.0", "too busy")
        outcome = {
            "delivered": Outcome(delivered=rcpts),
            "failed": Outcome(failed=tuple((r, hard) for r in rcpts)),
            "deferred": Outcome(deferred=tuple((r, soft) for r in rcpts)),
            "unreachable": Outcome(unreachable="connection refused"),
            "mixed": Outcome(delivered=rcpts[:1], deferred=tuple((r, soft) for r in rcpts[1:])),
            # "not now": back to its place (ready), or the usual way after many
            "pushback": Outcome(deferred=tuple((r, busy) for r in rcpts), pushback=Pushback.RATE, pushback_reply=busy),
        }[how]
        try:
            done(self.q.settle(lease, outcome, self.now))
        except StaleLease:
            pass  # taken over after its expiry, or dropped by an operator

    @rule(seconds=st.sampled_from([1.0, 61.0, 400.0, 4000.0, 2 * 86400.0]))
    def time_passes(self, seconds: float) -> None:
        """Leases expire, retries come due, warnings and retention come into play."""
        self.now += seconds

    @rule(with_dsn=st.booleans())
    def bounce(self, with_dsn: bool) -> None:
        for job in done(self.q.failed(3)):
            done(self.q.bounce(job, self._dsn(job) if with_dsn else None, self.now))

    @rule()
    def warn(self) -> None:
        for job in done(self.q.delayed(3)):
            done(self.q.warn(job, self._dsn(job), self.now))

    def _dsn(self, job: FailedJob) -> IncomingMessage:
        self.n += 1
        return IncomingMessage(f"D{self.n}", "", (Mailbox.parse("bob@sender.test"),), self.now, b"Subject: dsn\r\n\r\n")

    def _waiting(self, pick: int) -> str | None:
        """A job that is deferred or failed, if any (what requeue and flush act on)."""
        r, p = self.redis.r, self.q.prefix
        waiting = [_str(j) for key in ("deferred", "failed") for j in r.zrange(f"{p}:{key}", 0, -1)]
        return waiting[pick % len(waiting)] if waiting else None

    @precondition(lambda self: self.qids)
    @rule(pick=st.integers(min_value=0), action=st.sampled_from(["requeue", "delete", "bounce"]))
    def operator(self, pick: int, action: str) -> None:
        jid = self._waiting(pick)
        qid = jid.rsplit(".", 1)[0] if jid and action == "requeue" else self.qids[pick % len(self.qids)]
        if action == "requeue":
            done(self.q.requeue(qid, self.now, "test"))
        else:
            done(self.q.drop(qid, self.now, "test", bounce=action == "bounce"))

    @rule(pick=st.integers(min_value=0), queue=st.sampled_from(QUEUES))
    def flush(self, pick: int, queue: str) -> None:
        jid = self._waiting(pick)
        if jid is not None:
            queue = _str(self.redis.r.hget(f"{self.q.prefix}:job:{jid}", "domain") or b"") or queue
        done(self.q.flush(queue, self.now, "test"))

    @rule(domain=st.sampled_from(DOMAINS), hold=st.booleans())
    def hold_or_release(self, domain: str, hold: bool) -> None:
        if hold:
            done(self.q.hold(domain, self.now))
        else:
            done(self.q.release(domain, self.now))

    @rule(domain=st.sampled_from(DOMAINS))
    def reroute(self, domain: str) -> None:
        done(self.q.set_routes(domain, ("smtp://127.0.0.1:2525",), self.now, "test"))

    @invariant()
    def counters_equal_a_recount(self) -> None:
        expected, (messages, size, jobs) = recount(self.redis.r, self.q.prefix, self.now)
        summary = done(self.q.queue_summary(QUEUES, self.now))
        for queue in QUEUES:
            want, got = expected.get(queue, QueueCounts()), summary[queue]
            assert got.by_state() == want.by_state(), queue
            assert got.bytes == want.bytes, queue
            assert got.oldest == want.oldest, queue
        totals = done(self.q.totals())
        assert (totals.messages, totals.bytes, totals.jobs) == (messages, size, jobs)
        report = done(self.q.check_queue(QUEUES, batch=2))
        assert report.consistent, report

    @invariant()
    def busy_equals_a_recount(self) -> None:
        """Each queue's busy recipients are those of its jobs in flight or deferred, each in one job only."""
        r, p = self.redis.r, self.q.prefix
        busy = busy_recount(r, p)
        for queue in QUEUES:
            kept = {_str(k): int(v) for k, v in r.hgetall(f"{p}:busy:{queue}").items()}
            assert kept == {rcpt: len(jobs) for rcpt, jobs in busy.get(queue, {}).items()}, queue
            # claim leases no job with a busy recipient: no mailbox has two jobs out of ready
            assert all(len(jobs) == 1 for jobs in busy.get(queue, {}).values()), busy[queue]

    def teardown(self) -> None:
        keys = list(self.redis.r.scan_iter(f"{self.q.prefix}:*"))
        if keys:
            self.redis.r.delete(*keys)


QueueCounters.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestQueueCounters = QueueCounters.TestCase
TestQueueCounters.__doc__ = "When jobs move at random, the counters always equal a recount."


def test_check_repairs_a_broken_counter() -> None:
    """When a counter and an index are broken, check_queue reports them and --repair mends both."""
    machine = QueueCounters()
    try:
        for n in range(5):
            machine.enqueue(["one.test", "two.test"], n)
        machine.claim(2)
        r, p = machine.redis.r, machine.q.prefix
        assert done(machine.q.check_queue(QUEUES)).consistent
        r.hincrby(f"{p}:count:two.test", "ready", 7)
        r.hincrby(f"{p}:totals", "messages", -1)
        r.zrem(f"{p}:q:one.test", "M3.1")
        report = done(machine.q.check_queue(QUEUES, batch=2))
        [(field, counter, recounted)] = [d[1:] for d in report.differences if d[0] == "two.test"]
        assert field == "ready" and counter - recounted == 7
        assert ("totals", "messages", 4, 5) in report.differences
        assert report.problems == {"unindexed": 1}
        assert r.zscore(f"{p}:q:one.test", "M3.1") is None  # looking changed nothing
        repaired = done(machine.q.check_queue(QUEUES, repair=True, batch=2))
        assert set(repaired.repaired) == {"two.test", "totals"} and not repaired.busy
        assert done(machine.q.check_queue(QUEUES)).consistent
        machine.counters_equal_a_recount()
    finally:
        machine.teardown()


def test_check_repairs_busy_recipients() -> None:
    """When a queue's busy recipients are wrong (one missing, one left over), check_queue reports and mends them."""
    machine = QueueCounters()
    try:
        machine.enqueue(["two.test"], 10, ["u", "W"])
        machine.enqueue(["two.test"], 10, ["x"])
        machine.claim(1)
        r, p = machine.redis.r, machine.q.prefix
        busy = f"{p}:busy:two.test"
        assert r.hgetall(busy) == {b"u@two.test": b"1", b"w@two.test": b"1"}
        r.hdel(busy, "w@two.test")
        r.hset(busy, "x@two.test", 2)
        report = done(machine.q.check_queue(QUEUES))
        assert sorted(d for d in report.differences if d[0] == "two.test") == [
            ("two.test", "busy w@two.test", 0, 1),
            ("two.test", "busy x@two.test", 2, 0),
        ]
        repaired = done(machine.q.check_queue(QUEUES, repair=True))
        assert repaired.repaired == ("two.test",)
        assert r.hgetall(busy) == {b"u@two.test": b"1", b"w@two.test": b"1"}
        assert done(machine.q.check_queue(QUEUES)).consistent
    finally:
        machine.teardown()


def test_repair_skips_a_queue_that_moved() -> None:
    """When a queue changes while it is being counted, the repair leaves its counters alone and says so."""
    machine = QueueCounters()
    try:
        machine.enqueue(["two.test"], 10)
        r, p = machine.redis.r, machine.q.prefix
        r.hincrby(f"{p}:count:two.test", "ready", 5)
        real = machine.redis.script

        async def meanwhile(script: Script, keys: list[str], args: list[Any]) -> Any:
            answer = await real(script, keys, args)
            if args[1:2] == ["ready"] and args[-1] == "two.test":
                machine.enqueue(["two.test"], 10)  # another node accepts mail mid-check
            return answer

        machine.redis.script = meanwhile  # type: ignore[method-assign]
        report = done(machine.q.check_queue(QUEUES, repair=True))
        assert "two.test" in report.busy and "two.test" not in report.repaired
        assert int(r.hget(f"{p}:count:two.test", "ready") or 0) == 7
    finally:
        machine.teardown()


def test_summary_reads_counters() -> None:
    """When a domain is held, its ready jobs count as held, with their bytes and the oldest's arrival."""
    machine = QueueCounters()
    try:
        machine.enqueue(["two.test"], 10)
        machine.now += 5
        machine.enqueue(["two.test", "three.test"], 20)
        q, now = machine.q, machine.now
        counts = done(q.queue_summary(["two.test", "three.test"], now))
        assert counts["two.test"].ready == 2 and counts["two.test"].oldest == T0
        assert counts["three.test"].oldest == T0 + 5
        size = len(b"Subject: x\r\n\r\n")
        assert counts["two.test"].bytes == 2 * size + 30
        done(q.hold("two.test", now))
        held = done(q.queue_summary(["two.test"], now))["two.test"]
        assert (held.ready, held.held, held.on_hold) == (0, 2, True)
        totals = done(q.totals())
        assert (totals.messages, totals.jobs, totals.bytes) == (2, 3, 2 * size + 30)
    finally:
        machine.teardown()


def test_flush_in_batches() -> None:
    """When a queue has more deferred jobs than one flush step moves, flush brings all back, audited once."""
    machine = QueueCounters()
    machine.q.flush_batch = 2
    try:
        for n in range(5):
            machine.enqueue(["two.test"], 1, [f"r{n}"])  # five mailboxes: deferred side by side
        machine.deliver(["deferred"] * 5)  # a concurrency of 3: three now,
        machine.deliver(["deferred"] * 5)  # two then
        assert done(machine.q.queue_summary(["two.test"], machine.now))["two.test"].deferred == 5
        assert done(machine.q.flush("two.test", machine.now, "test")) == 5
        assert done(machine.q.queue_summary(["two.test"], machine.now))["two.test"].ready == 5
        assert [r["action"] for r in done(machine.q.audit(10))] == ["flush"]
        machine.counters_equal_a_recount()
    finally:
        machine.teardown()


def test_check_queue_command(tmp_path: Path) -> None:
    """When `relayx check-queue` finds a wrong counter it exits 1 and names it; with --repair it mends it."""
    machine = QueueCounters()
    try:
        machine.enqueue(["two.test"], 10)
        machine.redis.r.hincrby(f"{machine.q.prefix}:count:two.test", "ready", 3)
        config = tmp_path / "relayx.toml"
        config.write_text(
            f'[redis]\nurl = "redis://127.0.0.1:{shared_redis().port}/0"\nkey_prefix = "{machine.q.prefix}"\n'
            '[[domain]]\nname = "two.test"\nroutes = ["smtp://127.0.0.1:2526"]\nrecipients = "any"\n'
        )

        def relayx(*args: str, verb: str = "check-queue") -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "relayx", verb, "--config", str(config), *args]
            return subprocess.run(command, capture_output=True, text=True, timeout=60)

        found = relayx()
        assert found.returncode == 1, found.stderr
        assert "two.test" in found.stdout and "counter 4, recount 1" in found.stdout
        assert "--repair" in found.stdout
        mended = relayx("--repair")
        assert mended.returncode == 0, mended.stderr
        assert "two.test: counters set to the recount" in mended.stdout
        again = relayx()
        assert again.returncode == 0 and again.stdout.strip().endswith("consistent")
        status = json.loads(relayx("two.test", "--json", verb="status").stdout)
        assert status["jobs"]["ready"] == 1 and status["jobs"]["held"] == 0
        assert status["bytes"] == 24 and status["held"] is False
    finally:
        machine.teardown()


class _Shelf:
    """
    A body store's ``put`` (all enqueue asks of it), keeping nothing.
    """

    async def put(self, queue_id: str, body: bytes) -> str:
        return f"shelf/{queue_id}"


def test_bytes_count_bodies_kept_in_a_body_store() -> None:
    """When bodies go to a body store and Redis keeps a stub, the counters count each body's real size."""
    machine = QueueCounters()
    machine.q.bodies = _Shelf()  # type: ignore[assignment]
    try:
        body = b"Subject: big\r\n\r\n" + b"x" * 100_000
        done(machine.q.enqueue(IncomingMessage("B1", "bob@sender.test", (Mailbox.parse("a@two.test"),), T0, body)))
        assert machine.redis.r.hstrlen(machine.q.message_key("B1"), "body") < 1000
        assert done(machine.q.queue_summary(["two.test"], T0))["two.test"].bytes == len(body)
        assert done(machine.q.totals()).bytes == len(body)
    finally:
        machine.teardown()
