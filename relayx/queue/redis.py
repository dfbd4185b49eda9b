"""
The cluster-wide queue in Redis.

Every change that touches more than one key is one Lua script in this
folder, so a node that dies between two commands leaves nothing half-done;
the scripts' headers state their keys, arguments and invariant. Times are
passed in from the node's clock (milliseconds), never read inside Redis, so
the same code runs under a test's ``Clock``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from relayx.config import Config
from relayx.interfaces import (
    BodyNotFound,
    Claim,
    DomainState,
    FailedJob,
    HoldChange,
    HoldWindow,
    IBodyStore,
    IBulkActions,
    IDeliveryQueue,
    IFailedJobs,
    IMessageStore,
    IncomingMessage,
    IQueueAdmin,
    IRecipientCache,
    Lease,
    MessageDsn,
    NodeStatus,
    NotApplied,
    Notify,
    Outcome,
    Pace,
    PacePolicy,
    QueueCounts,
    QueueTotals,
    RecipientDsn,
    Ret,
    StoredMessage,
    StoreUnavailable,
    Throttle,
)
from relayx.message import header_section, search_fields
from relayx.queue.bodyref import BodyStub, kept_headers, make_stub, read_stub
from relayx.queue.states import held_at
from relayx.redis.connection import RedisConnection
from relayx.redis.scripts import Script, load_script
from relayx.reply import Reply

log = Logger()

DEFAULT_PACE = PacePolicy()

#: audit records kept in Redis
AUDIT_KEPT = 10000
#: jobs one flush.lua call brings back (the rest in further calls)
FLUSH_BATCH = 500
#: old-style queue entries one step of the upgrade moves (migrate.lua: ~7 calls each)
MIGRATE_BATCH = 500
#: chunks of a queue's seqset one step of qshape counts (qshape.lua: ~5 keys each)
QSHAPE_CHUNKS = 200
#: entries one step of the consistency check looks at (tally.lua: ~5 keys each)
CHECK_BATCH = 100
#: the counted fields of a queue's <p>:count:<q>, as common.lua defines them
COUNTED = ("ready", "in_flight", "deferred", "failed", "bytes")
#: most jobs one listing or search call to Redis examines (~10-20 us each: 2-4 ms, well
#: under the 10 ms a Redis call may block others for, on a loaded machine too)
PAGE_BUDGET = 200
#: how far nodes' clocks may disagree (acceptance order is time order within this)
CLOCK_SKEW = 5.0
#: bulk actions kept for operators to read (running ones are always kept)
BULK_KEPT = 100
#: how far Redis's clock may be from the nodes' (NTP); an enqueue's deadline allows for it
CLOCK_SKEW_REDIS = 2.0
#: how long a taken-back queue id stays refused (an enqueue stuck in a stalled Redis)
TOMBSTONE_KEPT = 3600.0
#: how long an enqueue whose outcome is unknown is tried to be taken back while Redis is
#: away, its client waiting for the reply to DATA's end (clients wait 10 minutes)
TAKE_BACK_PATIENCE = 300.0
#: body references remembered from load to settle (a bound in case leases are lost)
REFS_KEPT = 10000
#: message fields kept from a claim until the lease's load (claim.lua sends bodies of at
#: most 64 KiB with their leases: at most 64 MiB here, should leases go unloaded)
PREFETCHED_KEPT = 1000


#: a job hash's fields not written while they have their default, as common.lua's
#: JOB_DEFAULTS (read by job_get there, by ``job_default`` here); "owed" (its
#: "rcpts"), "qid" (from the jid) and "created" (its message's "received") are derived
JOB_DEFAULTS: Mapping[str, bytes] = {"failed": b"[]", "held_base": b"0", "attempts": b"0", "token": b"0"}


def job_qid(job_id: str) -> str:
    """
    The queue id of a job: its id before the last ``.`` (common.lua's job_qid).
    """
    return job_id.rpartition(".")[0] or job_id


def job_default(job_id: str, name: str, rcpts: bytes | None, received: bytes | None) -> bytes | None:
    """
    The value of a job's field ``name`` that its hash does not have (written
    only when it differs from this, as common.lua's job_get reads it): ``rcpts``
    and ``received`` are the job's recipients and its message's reception.
    """
    if name == "qid":
        return job_qid(job_id).encode("utf-8")
    if name == "owed":
        return rcpts
    if name == "created":
        return received
    return JOB_DEFAULTS.get(name)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _event_defaults(domain: str, entry_id: str, fields: dict[str, str]) -> tuple[str, dict[str, str]]:
    """
    An event log entry of ``domain``'s stream with what record_event (common.lua)
    leaves out put back: ``at`` is the entry ID's ms, ``jid`` the message's
    first job ``<qid>.1``, ``queue`` the stream's domain. Entries written before
    (every field given) are read as they are.
    """
    if not fields.get("at"):
        fields["at"] = entry_id.split("-")[0]
    if not fields.get("jid") and fields.get("qid"):
        fields["jid"] = fields["qid"] + ".1"
    if not fields.get("queue"):
        fields["queue"] = domain
    return entry_id, fields


def _lists(job: dict[str, Any]) -> dict[str, Any]:
    """
    A job from a script's JSON answer, with its empty lists as lists: Lua's
    cjson cannot tell an empty array from an empty object.
    """
    for name in ("rcpts", "owed", "failed", "history"):
        if job.get(name) == {}:
            job[name] = []
    return job


def dsn_to_json(dsn: MessageDsn) -> str:
    """
    The message hash's ``dsn`` field: the envelope's DSN parameters as JSON
    (``""`` when none were given, and the field is not written).
    """
    if dsn.empty:
        return ""
    rcpts = {
        rcpt: {
            "notify": None if d.notify is None else sorted(n.value for n in d.notify),
            "orcpt": d.orcpt,
        }
        for rcpt, d in dsn.recipients
    }
    return json.dumps({"ret": None if dsn.ret is None else dsn.ret.value, "envid": dsn.envid, "rcpts": rcpts})


def dsn_from_json(field: bytes | str | None) -> MessageDsn:
    """
    The envelope's DSN parameters from a message hash's ``dsn`` field
    (absent: none were given); a field that cannot be read is logged and
    taken as none, so that it never stops a delivery.
    """
    if not field:
        return MessageDsn()
    try:
        return _dsn_from(json.loads(field))
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        log.error("unreadable DSN parameters {field!r} ignored: {why}", field=field, why=repr(e))
        return MessageDsn()


def _dsn_from(data: Any) -> MessageDsn:
    ret = data.get("ret")
    return MessageDsn(
        ret=None if ret is None else Ret(ret),
        envid=data.get("envid"),
        recipients=tuple(
            (
                str(rcpt),
                RecipientDsn(
                    notify=None if d.get("notify") is None else frozenset(Notify(n) for n in d["notify"]),
                    orcpt=d.get("orcpt"),
                ),
            )
            for rcpt, d in data.get("rcpts", {}).items()
        ),
    )


def _window(fields: Sequence[Any]) -> HoldWindow:
    """
    A hold as hold.lua and release.lua return it: held (1/0), start and end (ms, 0: none).
    """
    held, start, end = (int(f) for f in fields)
    return HoldWindow(held=bool(held), start=start / 1000 or None, end=end / 1000 or None)


def _throttle(t: Throttle) -> str:
    return json.dumps({"c": t.concurrency, "r": t.rate, "u": _ms(t.ramp_up)})


def pace_of(state: Mapping[str, str]) -> Pace:
    """
    A destination's adaptive pace from its domain hash (common.lua).
    """
    at = state.get("pace_cut_at") if state.get("pace_event") == "cut" else state.get("pace_at")
    return Pace(
        concurrency=int(state["pace_c"]) if "pace_c" in state else None,
        rate=float(state["pace_r"]) if "pace_r" in state else None,
        event=state.get("pace_event", ""),
        at=int(at) / 1000 if at else None,
        why=state.get("pace_why", ""),
        kind=state.get("pace_kind", ""),
        reply_ms=round(float(state.get("rt_avg", 0)), 1),
    )


def _pace(policy: PacePolicy, throttle: Throttle | None) -> str:
    """
    settle.lua's ARGV[14]: the ceiling (0: unknown) and how the pace reacts.
    """
    t = throttle or Throttle(concurrency=0)
    return json.dumps(
        {
            "c": t.concurrency,
            "r": t.rate,
            "u": _ms(t.ramp_up),
            "b": policy.backoff,
            "i": _ms(policy.interval),
            "f": policy.floor_rate,
            "s": policy.slow,
            "t": policy.start,
            "w": _ms(policy.idle),
        }
    )


def _pushback_text(outcome: Outcome) -> str:
    if outcome.pushback is None:
        return ""
    reply = str(outcome.pushback_reply) if outcome.pushback_reply is not None else outcome.pushback.value
    return f"{reply} from {outcome.destination}" if outcome.destination else reply


def _log_pace(domain: str, outcome: Outcome, change: str, sessions: str, rate: str) -> None:
    """
    One event per slow start of a destination's pace, per cut and per return to its ceiling.
    """
    fields = {
        "domain": domain,
        "mx": outcome.destination or "-",
        "code": outcome.pushback_reply.code if outcome.pushback_reply is not None else 0,
        "pace": change,
    }
    if change == "ceiling":
        log.info("pace of {domain}: back at full pace", **fields)
        return
    fields.update(sessions=sessions or "all", rate=f"{float(rate):.3g}" if rate else "unlimited")
    if change == "start":
        log.info("pace of {domain} starts at {sessions} session(s), {rate} msg/s: no delivery lately", **fields)
        return
    why = _pushback_text(outcome) or outcome.unreachable or "slow replies"
    log.warn("pace of {domain} cut to {sessions} session(s), {rate} msg/s after {why}", why=why, **fields)


def _reply_text(reply: Reply | None) -> str:
    if reply is None:
        return ""
    return " ".join(str(p) for p in (reply.code, reply.status, reply.text.replace("\n", " ")) if p)


def _failures(entries: tuple[tuple[str, Reply], ...]) -> str:
    return json.dumps([[rcpt, r.code, r.status, r.text] for rcpt, r in entries])


@attrs.frozen
class Replication:
    """
    The ``replicated`` durability: a write counts once this many replicas
    have it, within ``timeout`` seconds.
    """

    replicas: int
    timeout: float


@attrs.frozen
class CheckReport:
    """
    What a consistency check found: each counter that differs from its
    recount (queue or ``totals``, field, counter, recount; a busy recipient's
    count is the field ``"busy <recipient>"``), problems in the
    locations and indexes by kind (see tally.lua), and with repair, what was
    set and what changed while it was counted (``busy``: not set).
    """

    queues: int
    walked: int
    differences: tuple[tuple[str, str, int, int], ...]
    problems: Mapping[str, int]
    repaired: tuple[str, ...] = ()
    busy: tuple[str, ...] = ()

    @property
    def consistent(self) -> bool:
        return not self.differences and not self.problems


@implementer(IMessageStore, IDeliveryQueue, IQueueAdmin, IBulkActions, IRecipientCache, IFailedJobs)
class RedisQueue:
    """
    Messages, jobs and leases under ``prefix`` in one Redis database.
    """

    _ENQUEUE = load_script("relayx.queue", "enqueue.lua", prelude=True)
    _ABORT = load_script("relayx.queue", "abort.lua", prelude=True)
    _CLAIM = load_script("relayx.queue", "claim.lua", prelude=True)
    _RENEW = load_script("relayx.queue", "renew.lua")
    _SETTLE = load_script("relayx.queue", "settle.lua", prelude=True)
    _HOLD = load_script("relayx.queue", "hold.lua", prelude=True)
    _RELEASE = load_script("relayx.queue", "release.lua", prelude=True)
    _RESUME = load_script("relayx.queue", "resume.lua")
    _HEARTBEAT = load_script("relayx.queue", "heartbeat.lua")
    _BOUNCE = load_script("relayx.queue", "bounce.lua", prelude=True)
    _REROUTE = load_script("relayx.queue", "reroute.lua")
    _WARN = load_script("relayx.queue", "warn.lua", prelude=True)
    _FLUSH = load_script("relayx.queue", "flush.lua", prelude=True)
    _DROP = load_script("relayx.queue", "drop.lua", prelude=True)
    _REQUEUE = load_script("relayx.queue", "requeue.lua", prelude=True)
    _PAGE = load_script("relayx.queue", "page.lua", prelude=True)
    _BULK_START = load_script("relayx.queue", "bulk_start.lua", prelude=True)
    _BULK_STEP = load_script("relayx.queue", "bulk_step.lua")
    _BULK_CANCEL = load_script("relayx.queue", "bulk_cancel.lua", prelude=True)
    _MESSAGE = load_script("relayx.queue", "message.lua", prelude=True)
    _TRAFFIC = load_script("relayx.queue", "traffic.lua")
    _QSHAPE = load_script("relayx.queue", "qshape.lua", prelude=True)
    _SUMMARY = load_script("relayx.queue", "summary.lua", prelude=True)
    _TALLY = load_script("relayx.queue", "tally.lua", prelude=True)
    _RECOUNT = load_script("relayx.queue", "recount.lua")
    _MIGRATE = load_script("relayx.queue", "migrate.lua", prelude=True)

    def __init__(
        self,
        redis: RedisConnection,
        prefix: str,
        *,
        lease: float,
        retention: float,
        retry_schedule: tuple[float, ...],
        randrange: Callable[[int], int],
        batch: int = 100,
        replication: Replication | None = None,
        copies: Mapping[str, int] | None = None,
        delay_warning: float = 0.0,
        flush_batch: int = FLUSH_BATCH,
        bodies: IBodyStore | None = None,
        pace: PacePolicy = DEFAULT_PACE,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease = lease
        self.retention = retention
        self.retry_schedule = retry_schedule
        self._randrange = randrange
        self._batch = batch
        self.replication = replication
        self.copies = dict(copies or {})
        #: jobs accepted and delivered here and not yet added to the counters in Redis
        self._traffic: dict[tuple[str, str], int] = {}
        self.delay_warning = delay_warning
        self.flush_batch = flush_batch
        #: where bodies go (``None``: in the message hashes, as before body stores)
        self.bodies = bodies
        #: the body reference of each job loaded and not yet settled
        self._refs: dict[str, str] = {}
        #: per leased job: the message's sender, body (or stub) and DSN fields, as its claim returned them
        self._prefetched: dict[str, list[Any]] = {}
        #: how destinations' adaptive pace reacts (settle.lua)
        self.pace = pace

    @classmethod
    def configured(cls, redis: RedisConnection, config: Config, bodies: IBodyStore | None = None) -> RedisQueue:
        """
        The queue as ``[redis]`` and ``[queue]`` describe it.
        """
        q, r = config.queue, config.redis
        return cls(
            redis,
            r.key_prefix,
            lease=q.lease,
            retention=q.retention,
            retry_schedule=q.retry_schedule,
            randrange=random.randrange,
            replication=Replication(r.replicas, r.replication_timeout) if r.durability == "replicated" else None,
            copies={d.name: len(d.copy_to) for d in config.domains if d.copy_to},
            delay_warning=q.delay_warning,
            bodies=bodies,
            pace=config.delivery.pace,
        )

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def message_key(self, queue_id: str) -> str:
        """
        The hash of a message: its first job's (common.lua's msg_key, where a
        script resolves the upgrade path below for itself).
        """
        return self.key("job", f"{queue_id}.1")

    async def message_fields(self, queue_id: str, names: Sequence[str]) -> list[Any]:
        """
        The fields ``names`` of a message's hash (``None`` for each when it is
        not queued). Upgrade path: a message written by the previous version has
        a hash of its own, ``<p>:msg:<qid>``, read when its first job's hash has
        none of them (as common.lua's msg_key, but without an EXISTS first: the
        message's fields are never in both).
        """
        values: list[Any] = await self.redis.call("hmget", self.message_key(queue_id), list(names))
        if all(v is None for v in values):
            values = await self.redis.call("hmget", self.key("msg", queue_id), list(names))
        return values

    async def job_fields(self, job_id: str, names: Sequence[str]) -> list[Any] | None:
        """
        A job's fields ``names``, its defaults applied (``job_default``), or
        ``None`` when the job does not exist (its hash has no domain).
        """
        domain, rcpts, *values = await self.redis.call("hmget", self.key("job", job_id), ["domain", "rcpts", *names])
        if domain is None:
            return None
        received = None
        if "created" in names and values[list(names).index("created")] is None:
            [received] = await self.message_fields(job_qid(job_id), ["received"])
        pairs = zip(names, values, strict=True)
        return [job_default(job_id, name, rcpts, received) if v is None else v for name, v in pairs]

    async def enqueue(self, message: IncomingMessage) -> None:
        body = message.body
        if self.bodies is not None:
            # the body is durable before its message can be: a failure after
            # this leaves an orphan for the sweep, never a message without a body
            body = make_stub(await self.bodies.put(message.queue_id, body), body)
        args: list[object] = [
            self.prefix,
            message.queue_id,
            _ms(message.received_at),
            message.sender,
            body,
            *search_fields(message.body),
            _ms(self.redis.clock.seconds() + self.redis.timeout + 1 + CLOCK_SKEW_REDIS),
            dsn_to_json(message.dsn),
        ]
        queues: list[str] = []
        for domain, rcpts in message.by_domain().items():
            owed = json.dumps(list(rcpts))
            args += [domain, owed]
            queues.append(domain)
            # dual delivery: each copy destination has a job of its own
            for n in range(1, self.copies.get(domain, 0) + 1):
                args += [f"{domain}#{n}", owed]
                queues.append(f"{domain}#{n}")
        keys = [self.key("seq"), self.key("domains"), self.message_key(message.queue_id)]
        try:
            await self._write(self._ENQUEUE, keys, args, f"message {message.queue_id}", strict=True)
        except NotApplied:
            raise
        except StoreUnavailable as e:
            # the write may have happened: take it back before the client hears 451
            if not await self._take_back(message.queue_id, str(e)):
                raise
            log.warn(
                "message {queue_id} confirmed after all ({why}): a delivery had begun",
                queue_id=message.queue_id,
                why=str(e),
            )
        self._count("accepted", queues)

    async def _take_back(self, queue_id: str, why: str) -> bool:
        """
        Undo an enqueue whose outcome is unknown (abort.lua). ``True``: the
        message is already being delivered, so it stays and its sender gets
        250. ``False``: no copy remains, and the enqueue, should it still
        arrive, is refused (by the tombstone, or by its deadline), so the 451
        is true. While Redis does not answer, the abort is tried again, and
        the client waits: the enqueue may have run before its reply was lost
        (Redis shut down or killed after writing it, its connection cut), and
        only Redis can say whether it did. Its deadline covers only a write
        still stuck in a stalled Redis, not one that ran. After
        ``TAKE_BACK_PATIENCE`` (less than the 10 minutes a client waits for
        the reply, RFC 5321 4.5.3.2.6) the node gives up and answers 451, and
        logs that the message may land.
        """
        keys = [self.message_key(queue_id), self.key("aborted", queue_id)]
        args = [self.prefix, queue_id, _ms(TOMBSTONE_KEPT)]
        clock = self.redis.clock
        give_up = clock.seconds() + TAKE_BACK_PATIENCE
        while True:
            try:
                answer = _text(await self._write(self._ABORT, keys, args, f"abort of {queue_id}", strict=False))
            except StoreUnavailable as e:
                if clock.seconds() >= give_up:
                    log.warn(
                        "message {queue_id} not taken back after {patience:g}s ({why}; first: {first}): "
                        "it lands if its enqueue ran before its reply was lost, and would be delivered after a 451",
                        queue_id=queue_id,
                        patience=TAKE_BACK_PATIENCE,
                        why=str(e),
                        first=why,
                        code=451,
                    )
                    return False
                await deferLater(clock, 0.5, lambda: None)
                continue
            return answer == "taken"

    async def _write(self, script: Script, keys: list[str], args: list[Any], what: str, strict: bool) -> Any:
        """
        Run a script that changes the queue; under replicated durability, wait
        for the replicas too. ``strict``: a write they did not confirm counts
        as failed (a 451, or leases not used); otherwise it is only logged.
        """
        r = self.replication
        if r is None:
            return await self.redis.script(script, keys, args)
        result, acked = await self.redis.script_then_wait(script, keys, args, r.replicas, r.timeout)
        if acked < r.replicas:
            why = f"{what} reached {acked} of {r.replicas} replica(s) within {r.timeout:g}s"
            if strict:
                raise StoreUnavailable(why)
            log.warn("{why}", why=why)
        return result

    async def claim(
        self,
        owner: str,
        now: float,
        limit: int,
        throttles: Mapping[str, Throttle],
        default: Throttle,
    ) -> Claim:
        keys = [self.key("domains"), self.key("deferred"), self.key("leased"), self.key("fence")]
        args = [
            self.prefix,
            _ms(now),
            _ms(self.lease),
            owner,
            limit,
            _throttle(default),
            "{" + ",".join(f"{json.dumps(d)}:{_throttle(t)}" for d, t in throttles.items()) + "}",
            self._randrange(1 << 30),
            self._batch,
        ]
        # replicated: a failover must not hand out the same fencing token twice
        rows, wake, taken_over = await self._write(self._CLAIM, keys, args, "claim", strict=True)
        leases = []
        for jid, token, expires, qid, domain, owed, attempts, created, *fields in rows:
            lease = Lease(
                job_id=_text(jid),
                token=int(token),
                expires=int(expires) / 1000,
                queue_id=_text(qid),
                domain=_text(domain),
                recipients=tuple(json.loads(owed)),
                attempts=int(attempts),
                created=int(created) / 1000,
            )
            if fields[1] is not None:  # the message's fields came with it (claim.lua)
                if len(self._prefetched) >= PREFETCHED_KEPT:
                    self._prefetched.pop(next(iter(self._prefetched)))
                self._prefetched[lease.job_id] = fields
            leases.append(lease)
        return Claim(tuple(leases), int(wake) / 1000 if int(wake) else None, int(taken_over))

    async def renew(self, lease: Lease, now: float) -> Lease:
        expires = now + self.lease
        keys = [self.key("job", lease.job_id), self.key("leased"), self.key("inflight", lease.domain)]
        await self._write(
            self._RENEW, keys, [lease.job_id, lease.token, _ms(expires)], f"renewal of {lease.job_id}", False
        )
        return lease.renewed(_ms(expires) / 1000)

    async def load(self, lease: Lease) -> StoredMessage:
        prefetched = self._prefetched.pop(lease.job_id, None)
        sender, body, dsn_field = prefetched or await self.message_fields(lease.queue_id, ["sender", "body", "dsn"])
        if body is None:
            raise StoreUnavailable(f"message {lease.queue_id} has no body in Redis")
        dsn = dsn_from_json(dsn_field)
        stub = read_stub(bytes(body))
        if stub is None:
            return StoredMessage(sender=_text(sender), body=bytes(body), dsn=dsn)
        if self.bodies is None:
            raise StoreUnavailable(f"message {lease.queue_id}: its body is in a body store ({stub.ref}), none is set")
        try:
            content = await self.bodies.get(stub.ref)
        except BodyNotFound as e:
            raise StoreUnavailable(f"message {lease.queue_id}: {e}") from None
        if len(self._refs) >= REFS_KEPT:
            self._refs.pop(next(iter(self._refs)))
        self._refs[lease.job_id] = stub.ref
        return StoredMessage(sender=_text(sender), body=content, dsn=dsn)

    async def _delete_body(self, bodies: IBodyStore, queue_id: str, ref: str) -> None:
        """
        Delete the body of a message whose last job just retired (settle.lua
        says so); a failure leaves it to the orphan sweep.
        """
        try:
            await bodies.delete(ref)
        except StoreUnavailable as e:
            log.warn("body of {queue_id} left for the sweep: {why}", queue_id=queue_id, why=str(e))

    async def message_exists(self, queue_id: str) -> bool:
        """
        Whether ``queue_id`` is queued (the orphan sweep's question).
        """
        keys = (self.message_key(queue_id), self.key("msg", queue_id))  # the second: the upgrade path
        return bool(int(await self.redis.call("execute_command", "EXISTS", *keys)))

    async def settle(self, lease: Lease, outcome: Outcome, now: float, throttle: Throttle | None = None) -> str:
        keys = [
            self.key("job", lease.job_id),
            self.key("leased"),
            self.key("inflight", lease.domain),
            self.key("deferred"),
            self.key("failed"),
            self.key("rq", lease.domain),
            self.key("domains"),
            self.key("dom", lease.domain),
            self.message_key(lease.queue_id),
            self.key("paused"),
            self.key("delayed"),
        ]
        args = [
            lease.job_id,
            lease.token,
            _ms(now),
            json.dumps(list(outcome.delivered)),
            _failures(outcome.failed),
            _failures(outcome.deferred),
            outcome.unreachable or "",
            _ms(self.retention),
            ",".join(str(_ms(s)) for s in self.retry_schedule),
            self.prefix,
            _ms(self.delay_warning),
            outcome.destination,
            _reply_text(outcome.accepted),
            _pace(self.pace, throttle),
            outcome.pushback.value if outcome.pushback is not None else "",
            _pushback_text(outcome),
            round(outcome.reply_seconds * 1000),
        ]
        ref = self._refs.pop(lease.job_id, None)
        # replicated too, so that a failover does not forget a delivery and send it again
        answer = await self._write(self._SETTLE, keys, args, f"settling {lease.job_id}", strict=False)
        fate, change, sessions, rate, gone = (_text(a) for a in answer)
        if change:
            _log_pace(lease.domain, outcome, change, sessions, rate)
        if fate == "done":
            self._count("delivered", [lease.domain])
            if gone and ref is not None and self.bodies is not None:
                await self._delete_body(self.bodies, lease.queue_id, ref)
        return fate

    def _count(self, what: str, queues: Sequence[str]) -> None:
        """
        Count jobs ``accepted`` or ``delivered`` once the change itself is
        committed: in memory, added to the counters in Redis by
        ``flush_traffic`` (each second from the node's wiring, and before
        ``traffic`` reads them), so the mail's path gains no Redis call.
        """
        for queue in queues:
            self._traffic[what, queue] = self._traffic.get((what, queue), 0) + 1

    async def flush_traffic(self) -> None:
        """
        Add the jobs counted here since the last flush to the counters in
        Redis (traffic.lua, one call); on failure they are kept for the next
        one, and the failure is logged, never raised.
        """
        pending, self._traffic = self._traffic, {}
        if not pending:
            return
        args: list[object] = []
        # accepted first: a queue's deliveries count once it has accepted mail
        for (what, queue), n in sorted(pending.items()):
            args += [what, queue, n]
        try:
            await self.redis.script(self._TRAFFIC, [self.key("accepted"), self.key("delivered")], args)
        except StoreUnavailable as e:
            for key, n in pending.items():
                self._traffic[key] = self._traffic.get(key, 0) + n
            log.warn("jobs accepted and delivered not counted yet: {why}", why=str(e))

    async def traffic(self, queues: Sequence[str]) -> dict[str, int]:
        """
        Jobs ``accepted`` and ``delivered`` (in full) so far in ``queues``
        (all of them when none are named): two ``HMGET`` of ``len(queues)``
        fields, after this process's own counts are flushed.
        """
        await self.flush_traffic()
        fields = list(queues) or ["*"]
        accepted = await self.redis.call("hmget", self.key("accepted"), fields)
        delivered = await self.redis.call("hmget", self.key("delivered"), fields)
        return {
            "accepted": sum(int(n or 0) for n in accepted),
            "delivered": sum(int(n or 0) for n in delivered),
        }

    async def persistence_warnings(self) -> list[str]:
        """
        What in Redis's configuration breaks the promise of a ``250``.
        """
        warnings = []
        try:
            config = await self.redis.call("execute_command", "CONFIG", "GET", "append*")
        except StoreUnavailable as e:
            return [f"cannot read Redis's persistence settings ({e}); check appendonly and appendfsync by hand"]
        settings = {_text(k): _text(v) for k, v in zip(config[::2], config[1::2], strict=True)}
        if settings.get("appendonly") != "yes":
            warnings.append(
                f"Redis at {self.redis.where} has appendonly {settings.get('appendonly')}: "
                "accepted mail is lost if it restarts"
            )
        elif settings.get("appendfsync") != "always":
            warnings.append(
                f"Redis at {self.redis.where} has appendfsync {settings.get('appendfsync')}: "
                "a crash can lose the last second of accepted mail (use appendfsync always)"
            )
        if self.replication is not None:
            info = _text(await self.redis.call("execute_command", "INFO", "replication"))
            connected = next(
                (int(line.split(":")[1]) for line in info.splitlines() if line.startswith("connected_slaves:")), 0
            )
            if connected < self.replication.replicas:
                warnings.append(
                    f"durability replicated needs {self.replication.replicas} replica(s), "
                    f"Redis at {self.redis.where} has {connected}: mail gets 451 until they connect"
                )
        return warnings

    async def failing_domains(self) -> list[str]:
        return [_text(d) for d in await self.redis.call("zrange", self.key("paused"), 0, -1)]

    async def take_probe(self, domain: str, owner: str, interval: float) -> bool:
        taken = await self.redis.call("set", self.key("probe", domain), owner, None, _ms(interval), True)
        return bool(taken)

    async def resume(self, domain: str, now: float, throttle: Throttle) -> bool:
        keys = [self.key("dom", domain), self.key("paused")]
        ramp = "1" if throttle.ramp_up > 0 else "0"
        return bool(int(await self.redis.script(self._RESUME, keys, [_ms(now), domain, ramp])))

    # -- operations (IQueueAdmin) ------------------------------------------

    def _audit_record(self, now: float, who: str, action: str, **what: object) -> str:
        return json.dumps({"at": _ms(now), "who": who, "action": action, **what})

    async def hold(
        self,
        domain: str,
        now: float,
        start: float | None = None,
        end: float | None = None,
        who: str = "relayx",
        replace: bool = False,
    ) -> HoldChange:
        keys = [self.key("dom", domain), self.key("held"), self.key("audit")]
        record = self._audit_record(now, who, "hold", domain=domain, start=_ms(start or 0), end=_ms(end or 0))
        args = [_ms(now), _ms(start or 0), _ms(end or 0), domain, record, AUDIT_KEPT, "1" if replace else "0"]
        applied, *before = await self._write(self._HOLD, keys, args, f"hold of {domain}", strict=True)
        return HoldChange(applied=bool(int(applied)), previous=_window(before))

    async def release(self, domain: str, now: float, rate: float = 0.0, who: str = "relayx") -> HoldWindow:
        keys = [self.key("dom", domain), self.key("held"), self.key("audit")]
        record = self._audit_record(now, who, "release", domain=domain, rate=rate)
        args = [_ms(now), rate, domain, record, AUDIT_KEPT]
        return _window(await self._write(self._RELEASE, keys, args, f"release of {domain}", strict=True))

    async def flush(self, queue: str, now: float, who: str) -> int:
        keys = [
            self.key("dom", queue),
            self.key("paused"),
            self.key("deferred", queue),
            self.key("rq", queue),
            self.key("domains"),
            self.key("audit"),
        ]
        # in bounded batches, each its own script; audited once, with the first
        record = self._audit_record(now, who, "flush", domain=queue)
        total = 0
        while True:
            args = [self.prefix, queue, record, AUDIT_KEPT, self.flush_batch]
            moved, left = await self._write(self._FLUSH, keys, args, f"flush of {queue}", strict=True)
            total += int(moved)
            record = ""
            if not int(left) or not int(moved):
                return total

    async def drop(self, queue_id: str, now: float, who: str, bounce: bool, audited: bool = True) -> int:
        action = "bounce" if bounce else "delete"
        keys = [
            self.message_key(queue_id),
            self.key("leased"),
            self.key("deferred"),
            self.key("failed"),
            self.key("delayed"),
            self.key("audit"),
        ]
        record = self._audit_record(now, who, action, queue_id=queue_id) if audited else ""
        args = [self.prefix, queue_id, _ms(now), action, record, AUDIT_KEPT]
        return int(await self._write(self._DROP, keys, args, f"{action} of {queue_id}", strict=True))

    async def requeue(self, queue_id: str, now: float, who: str, audited: bool = True) -> int:
        keys = [
            self.message_key(queue_id),
            self.key("deferred"),
            self.key("failed"),
            self.key("domains"),
            self.key("audit"),
        ]
        record = self._audit_record(now, who, "requeue", queue_id=queue_id) if audited else ""
        args = [self.prefix, queue_id, record, AUDIT_KEPT]
        return int(await self._write(self._REQUEUE, keys, args, f"requeue of {queue_id}", strict=True))

    async def page(
        self,
        queues: Sequence[str],
        search: Mapping[str, object],
        cursor: int,
        limit: int,
        now: float,
        budget: int = PAGE_BUDGET,
    ) -> dict[str, Any]:
        keys = [self.key("leased"), self.key("deferred"), self.key("failed")]
        args = [
            self.prefix,
            json.dumps(list(queues)),
            json.dumps(dict(search)),
            cursor,
            limit,
            budget,
            _ms(now),
            _ms(CLOCK_SKEW),
        ]
        answer: dict[str, Any] = json.loads(_text(await self.redis.script(self._PAGE, keys, args)))
        answer["jobs"] = [_lists(job) for job in answer["jobs"] or []]
        return answer

    async def counts(self, queues: Sequence[str], now: float) -> dict[str, Any]:
        """
        The queues' counts added up (from the counters, as ``queue_summary``).
        """
        counts = sum((await self.queue_summary(queues, now)).values(), QueueCounts())
        states = {state: n for state, n in counts.by_state().items() if n}
        oldest = _ms(counts.oldest) if counts.oldest is not None else 0
        return {"total": counts.total, "states": states, "oldest": oldest, "exact": True}

    async def message(self, queue_id: str, now: float) -> dict[str, Any] | None:
        keys = [self.message_key(queue_id), self.key("deferred"), self.key("failed"), self.key("leased")]
        answer = _text(await self.redis.script(self._MESSAGE, keys, [self.prefix, queue_id, _ms(now)]))
        if not answer:
            return None
        found: dict[str, Any] = json.loads(answer)
        found["jobs"] = [_lists(job) for job in found["jobs"] or []]
        stub = read_stub(str(found.get("header", "")).encode("utf-8", "surrogateescape"))
        if stub is not None:
            found["header"] = (await self._headers(queue_id, stub, None)).decode("utf-8", "replace")
        return found

    async def _headers(self, queue_id: str, stub: BodyStub, whole: bytes | None) -> bytes:
        """
        The header section of a message whose body is in the body store (``whole``,
        if it was read already): from the stub when an older one carried it, else
        from the body; empty when the body cannot be read (the view and the DSN
        then go without it).
        """
        if stub.headers:
            return stub.headers
        if whole is None and self.bodies is not None:
            try:
                whole = await self.bodies.get(stub.ref)
            except (BodyNotFound, StoreUnavailable) as e:
                log.warn("{queue_id}: header section unreadable ({why})", queue_id=queue_id, why=str(e))
        return b"" if whole is None else kept_headers(whole)

    async def qshape(self, queue: str, now: float, edges: Sequence[float], waiting: bool = False) -> list[int]:
        # in bounded slices of the queue's seqset (qshape.lua), added up here
        key = self.key("rq" if waiting else "aq", queue)
        counts = [0] * (len(edges) + 1)
        cursor = -1
        while True:
            args: list[object] = [self.prefix, _ms(now), cursor, QSHAPE_CHUNKS, *(_ms(e) for e in edges)]
            cursor, *slice_counts = (int(n) for n in await self.redis.script(self._QSHAPE, [key], args))
            counts = [a + b for a, b in zip(counts, slice_counts, strict=True)]
            if cursor < 0:
                return [sum(counts), *counts]

    async def raw(self, queue_id: str) -> bytes | None:
        [stored] = await self.message_fields(queue_id, ["body"])
        if stored is None:
            return None
        stub = read_stub(bytes(stored))
        if stub is None:
            return bytes(stored)
        if self.bodies is None:
            raise StoreUnavailable(f"message {queue_id}: its body is in a body store ({stub.ref}), none is set")
        try:
            return await self.bodies.get(stub.ref)
        except BodyNotFound as e:
            raise StoreUnavailable(f"message {queue_id}: {e}") from None

    async def heartbeat(self, node: str, now: float, keep: float, info: Mapping[str, str]) -> None:
        keys = [self.key("nodes"), self.key("node", node)]
        args: list[object] = [node, _ms(now), _ms(keep)]
        for field, value in info.items():
            args += [field, value]
        await self.redis.script(self._HEARTBEAT, keys, args)

    async def nodes(self, now: float, keep: float) -> list[NodeStatus]:
        """
        The nodes heard from within ``keep`` seconds, with the jobs each holds.
        """
        rows = await self.redis.call("zrangebyscore", self.key("nodes"), _ms(now - keep), "+inf", withscores=True)
        leases: dict[str, list[str]] = {}
        for jid in await self.redis.call("zrange", self.key("leased"), 0, -1):
            owner = await self.redis.call("hget", self.key("job", _text(jid)), "owner")
            if owner:
                leases.setdefault(_text(owner), []).append(_text(jid))
        result = []
        for node, seen in rows:
            info = await self.redis.call("hgetall", self.key("node", _text(node)))
            fields = {_text(k): _text(v) for k, v in (info or {}).items()}
            result.append(
                NodeStatus(
                    node=_text(node),
                    last_seen=float(seen) / 1000,
                    hostname=fields.get("hostname", ""),
                    leases=tuple(leases.get(_text(node), ())),
                )
            )
        return result

    async def domain_state(self, domain: str, now: float) -> DomainState:
        """
        What the queue holds for ``domain`` and why it is not moving, if it is not.
        """
        fields = await self.redis.call("hgetall", self.key("dom", domain))
        state = {_text(k): _text(v) for k, v in (fields or {}).items()}
        ready = await self.redis.call("hget", self.key("count", domain), "ready")
        inflight = await self.redis.call("zcard", self.key("inflight", domain))
        start = float(state.get("hold_start", 0)) / 1000
        return DomainState(
            domain=domain,
            ready=int(ready or 0),
            in_flight=int(inflight),
            held=held_at(state, _ms(now)),
            hold_start=start or None,
            hold_end=float(state.get("hold_end", 0)) / 1000 or None,
            paused_until=float(state.get("paused_until", 0)) / 1000 or None,
            last_error=state.get("last_error", ""),
            release_rate=float(state.get("release_rate", 0)),
            pace=pace_of(state),
        )

    _PACE_FIELDS = ("pace_c", "pace_r", "pace_at", "pace_cut_at", "pace_event", "pace_why", "pace_kind", "rt_avg")

    async def paces(self, queues: Sequence[str]) -> dict[str, Pace]:
        """
        Each delivery queue's adaptive pace: one HMGET per queue (the metrics' scrape).
        """
        result = {}
        for queue in queues:
            values = await self.redis.call("hmget", self.key("dom", queue), list(self._PACE_FIELDS))
            state = {k: _text(v) for k, v in zip(self._PACE_FIELDS, values, strict=True) if v is not None}
            result[queue] = pace_of(state)
        return result

    async def queue_summary(self, queues: Sequence[str], now: float) -> dict[str, QueueCounts]:
        """
        Each queue's counts by state, bytes and oldest job, read from the
        counters in one read-only script: O(queues) keys, whatever the depth.
        """
        answer = json.loads(_text(await self._summary(queues, now)))
        result = {}
        for queue, row in zip(queues, answer["queues"] or [], strict=True):
            ready, deferred, in_flight, failed, size, oldest, held = (int(n) for n in row)
            result[queue] = QueueCounts(
                ready=0 if held else ready,
                held=ready if held else 0,
                deferred=deferred,
                in_flight=in_flight,
                failed=failed,
                bytes=size,
                oldest=oldest / 1000 if oldest else None,
                on_hold=bool(held),
            )
        return result

    async def totals(self) -> QueueTotals:
        messages, size, jobs = (int(n) for n in json.loads(_text(await self._summary([], 0)))["totals"])
        return QueueTotals(messages=messages, bytes=size, jobs=jobs)

    async def _summary(self, queues: Sequence[str], now: float) -> Any:
        args = [self.prefix, json.dumps(list(queues)), _ms(now)]
        return await self.redis.script(self._SUMMARY, [self.key("totals")], args)

    async def upgrade(self) -> int:
        """
        Move queues written by an earlier relayx (their orders as plain zsets
        ``<p>:ready:<q>`` and ``<p>:q:<q>``) into the seqsets (migrate.lua, in
        bounded batches until none is left); a node runs it at start. Returns
        how many queues had old entries. Idempotent: cheap when done.
        """
        names = {_text(q) for q in await self.redis.call("smembers", self.key("queues"))}
        names |= {_text(q) for q in await self.redis.call("smembers", self.key("domains"))}
        upgraded = 0
        for q in sorted(names):
            keys = [self.key("ready", q), self.key("q", q)]
            if not any([int(await self.redis.call("exists", key)) for key in keys]):
                continue
            upgraded += 1
            while int(await self.redis.script(self._MIGRATE, keys, [self.prefix, q, MIGRATE_BATCH])):
                pass
        return upgraded

    async def check_queue(
        self, queues: Sequence[str] = (), repair: bool = False, batch: int = CHECK_BATCH
    ) -> CheckReport:
        """
        Recount the queue in bounded steps (tally.lua, ``batch`` entries per
        call, the cursor kept here) and compare with the counters; with
        ``repair``, mend the locations and indexes and set each counter that
        differs to its recount (a queue's busy recipients with its counters),
        unless its queue changed during the check
        (then it is reported busy: check again, or hold the domain first).
        Read-only without ``repair``.
        """
        batch = max(1, min(batch, 1000))
        known = {_text(q) for q in await self.redis.call("smembers", self.key("queues"))}
        known |= {_text(q) for q in await self.redis.call("smembers", self.key("domains"))}
        names = sorted(known | set(queues))
        before = {q: await self._version(self.key("count", q)) for q in names}
        totals_before = await self._version(self.key("totals"))
        counted: dict[str, dict[str, int]] = {}
        busy_counted: dict[str, dict[str, int]] = {}
        messages = [0, 0]
        problems: dict[str, int] = {}
        walked = 0

        async def walk(kind: str, key: str, queue: str = "", pair: str = "") -> None:
            nonlocal walked
            offset = 0
            while True:
                keys = [key, pair or key]
                args = [self.prefix, kind, offset, batch, "1" if repair else "0", queue]
                step = json.loads(_text(await self.redis.script(self._TALLY, keys, args)))
                for name, n in (step["problems"] or {}).items():
                    problems[name] = problems.get(name, 0) + int(n)
                for q, rcpts in (step["busy"] or {}).items():
                    row_busy = busy_counted.setdefault(q, {})
                    for rcpt, n in (rcpts or {}).items():
                        row_busy[rcpt] = row_busy.get(rcpt, 0) + int(n)
                for q, (jobs, size, msgs, msg_bytes) in (step["queues"] or {}).items():
                    row = counted.setdefault(q, dict.fromkeys(COUNTED, 0))
                    row[kind] += int(jobs)
                    row["bytes"] += int(size)
                    messages[0] += int(msgs)
                    messages[1] += int(msg_bytes)
                seen, removed = int(step["seen"]), int(step["removed"])
                walked += seen
                if seen < batch:
                    return
                # a seqset's cursor is the last sequence seen; a zset's, an index
                offset = int(step["last"]) if kind in ("ready", "index") else offset + seen - removed

        for kind, where in (("in_flight", "leased"), ("deferred", "deferred"), ("failed", "failed")):
            await walk(kind, self.key(where))
        for q in sorted(set(names) | set(counted)):
            await walk("ready", self.key("rq", q), q)
            await walk("index", self.key("aq", q), q)
            await walk("pair", self.key("inflight", q), q, self.key("leased"))
            await walk("pair", self.key("deferred", q), q, self.key("deferred"))

        differences: list[tuple[str, str, int, int]] = []
        repaired: list[str] = []
        busy: list[str] = []
        for q in sorted(set(names) | set(counted)):
            values = await self.redis.call("hmget", self.key("count", q), list(COUNTED))
            recount = counted.get(q, dict.fromkeys(COUNTED, 0))
            wrong = [
                (q, field, int(value or 0), recount[field])
                for field, value in zip(COUNTED, values, strict=True)
                if int(value or 0) != recount[field]
            ]
            recount_busy = busy_counted.get(q, {})
            kept_busy = await self._busy(q)
            wrong += [
                (q, f"busy {rcpt}", kept_busy.get(rcpt, 0), recount_busy.get(rcpt, 0))
                for rcpt in sorted(set(kept_busy) | set(recount_busy))
                if kept_busy.get(rcpt, 0) != recount_busy.get(rcpt, 0)
            ]
            differences += wrong
            if wrong and repair:
                version = before.get(q, "0")
                if await self._recount(self.key("count", q), version, recount, self.key("busy", q), recount_busy):
                    await self.redis.call("sadd", self.key("queues"), q)
                    repaired.append(q)
                else:
                    busy.append(q)
        values = await self.redis.call("hmget", self.key("totals"), ["messages", "bytes", "jobs"])
        recount_totals = {
            "messages": messages[0],
            "bytes": messages[1],
            "jobs": sum(row[k] for row in counted.values() for k in ("ready", "in_flight", "deferred", "failed")),
        }
        wrong_totals = [
            ("totals", field, int(value or 0), recount_totals[field])
            for field, value in zip(recount_totals, values, strict=True)
            if int(value or 0) != recount_totals[field]
        ]
        differences += wrong_totals
        if wrong_totals and repair:
            if await self._recount(self.key("totals"), totals_before, recount_totals):
                repaired.append("totals")
            else:
                busy.append("totals")
        return CheckReport(
            queues=len(set(names) | set(counted)),
            walked=walked,
            differences=tuple(differences),
            problems=dict(sorted(problems.items())),
            repaired=tuple(repaired),
            busy=tuple(busy),
        )

    async def _version(self, key: str) -> str:
        return _text(await self.redis.call("hget", key, "v") or b"0")

    async def _recount(
        self,
        key: str,
        version: str,
        values: Mapping[str, int],
        busy_key: str = "",
        busy: Mapping[str, int] | None = None,
    ) -> bool:
        args: list[object] = [version, json.dumps(dict(busy)) if busy is not None else ""]
        for field, value in values.items():
            args += [field, value]
        keys = [key, busy_key or key]
        return bool(int(await self._write(self._RECOUNT, keys, args, f"repair of {key}", strict=True)))

    async def _busy(self, queue: str) -> dict[str, int]:
        """
        A queue's busy recipients as kept (common.lua), read in bounded HSCAN steps.
        """
        kept: dict[str, int] = {}
        cursor = 0
        while True:
            cursor, flat = await self.redis.call("hscan", self.key("busy", queue), cursor, count=CHECK_BATCH * 10)
            kept.update({_text(k): int(v) for k, v in zip(flat[::2], flat[1::2], strict=True)})
            if int(cursor) == 0:
                return kept

    # -- bulk actions (IBulkActions) ---------------------------------------

    async def bulk_start(
        self, action: str, queues: Sequence[str], search: Mapping[str, object], now: float, who: str
    ) -> str:
        bulk_id = f"{_ms(now):x}{self._randrange(1 << 32):08x}"
        record = self._audit_record(now, who, f"bulk {action}", bulk=bulk_id, filter=dict(search), queues=list(queues))
        keys = [self.key("bulk", bulk_id), self.key("bulks"), self.key("bulk", "active"), self.key("audit")]
        args = [
            bulk_id,
            action,
            json.dumps(list(queues)),
            json.dumps(dict(search)),
            who,
            _ms(now),
            record,
            AUDIT_KEPT,
            BULK_KEPT,
        ]
        await self._write(self._BULK_START, keys, args, f"bulk {action}", strict=True)
        return bulk_id

    async def bulk(self, bulk_id: str) -> dict[str, Any] | None:
        fields = await self.redis.call("hgetall", self.key("bulk", bulk_id))
        if not fields:
            return None
        raw = {_text(k): _text(v) for k, v in fields.items()}
        found: dict[str, Any] = {
            "id": raw["id"],
            "action": raw["action"],
            "queues": json.loads(raw["queues"]),
            "filter": json.loads(raw["filter"]),
            "who": raw["who"],
            "state": raw["state"],
            "created": int(raw["created"]) / 1000,
            "updated": int(raw["updated"]) / 1000,
            "finished": int(raw["finished"]) / 1000 if raw.get("finished") else None,
            "cursor": int(raw["cursor"]),
        }
        for name in ("examined", "matched", "acted"):
            found[name] = int(raw[name])
        return found

    async def bulks(self, limit: int) -> list[dict[str, Any]]:
        ids = await self.redis.call("zrevrange", self.key("bulks"), 0, limit - 1)
        found = [await self.bulk(_text(i)) for i in ids]
        return [b for b in found if b is not None]

    async def bulk_running(self) -> list[str]:
        return sorted(_text(i) for i in await self.redis.call("smembers", self.key("bulk", "active")))

    async def bulk_take(self, bulk_id: str, owner: str, ttl: float) -> bool:
        key = self.key("bulk", "lease", bulk_id)
        if await self.redis.call("set", key, owner, None, _ms(ttl), True):
            return True
        if _text(await self.redis.call("get", key) or b"") != owner:
            return False
        return bool(await self.redis.call("execute_command", "PEXPIRE", key, _ms(ttl)))

    async def bulk_step(
        self, bulk_id: str, owner: str, cursor: int, examined: int, matched: int, acted: int, done: bool, now: float
    ) -> str:
        keys = [self.key("bulk", bulk_id), self.key("bulk", "active"), self.key("bulk", "lease", bulk_id)]
        args = [owner, cursor, examined, matched, acted, "1" if done else "0", _ms(now)]
        return _text(await self._write(self._BULK_STEP, keys, args, f"bulk step of {bulk_id}", strict=True))

    async def bulk_cancel(self, bulk_id: str, now: float, who: str) -> bool:
        keys = [self.key("bulk", bulk_id), self.key("bulk", "active"), self.key("audit")]
        record = self._audit_record(now, who, "bulk cancel", bulk=bulk_id)
        args = [bulk_id, _ms(now), record, AUDIT_KEPT]
        return bool(int(await self._write(self._BULK_CANCEL, keys, args, f"cancel of {bulk_id}", strict=True)))

    # -- recipient callout answers (IRecipientCache) -----------------------

    async def recall(self, address: str) -> tuple[bool, float] | None:
        value = await self.redis.call("get", self.key("rcpt", address))
        if not value:
            return None
        exists, _, when = _text(value).partition(":")
        return exists == "1", int(when) / 1000

    async def remember(self, address: str, exists: bool, now: float, keep: float) -> None:
        value = f"{int(exists)}:{_ms(now)}"
        await self.redis.call("set", self.key("rcpt", address), value, None, _ms(keep))

    # -- failed jobs and their DSNs (IFailedJobs) ---------------------------

    async def failed(self, limit: int) -> list[FailedJob]:
        return await self._jobs_in("failed", limit)

    async def delayed(self, limit: int) -> list[FailedJob]:
        return await self._jobs_in("delayed", limit)

    async def _jobs_in(self, index: str, limit: int) -> list[FailedJob]:
        """
        The jobs of ``failed`` (with their failed recipients) or ``delayed``
        (with the recipients still owed and the last error).
        """
        jobs = []
        for jid in await self.redis.call("zrange", self.key(index), 0, limit - 1):
            job_id = _text(jid)
            job = await self.job_fields(job_id, ["qid", "failed", "owed", "error"])
            if job is None:
                continue
            qid, failed, owed, error = job
            sender, received, body, dsn_field = await self.message_fields(
                _text(qid), ["sender", "received", "body", "dsn"]
            )
            try:
                dsn = dsn_from_json(dsn_field)
                full = None
                stored = bytes(body or b"")
                if index == "failed" and dsn.ret is Ret.FULL and body is not None:
                    full = await self._whole(_text(qid), stored)
                stub = read_stub(stored)
                headers = header_section(stored) if stub is None else await self._headers(_text(qid), stub, full)
                if index == "failed":
                    failures = [tuple(f) for f in json.loads(failed)]
                else:
                    failures = [(r, 0, "4.0.0", _text(error or b"not delivered yet")) for r in json.loads(owed)]
                jobs.append(
                    FailedJob(
                        job_id=job_id,
                        queue_id=_text(qid),
                        sender=_text(sender or b""),
                        arrival=int(received or 0) / 1000,
                        failures=tuple((str(r), int(c), str(s), str(t)) for r, c, s, t in failures),
                        headers=headers,
                        dsn=dsn,
                        full=full,
                    )
                )
            except (TypeError, ValueError, UnicodeDecodeError) as e:
                # one unreadable job must not stop the DSNs of all the others
                log.error("job {job} in {index} cannot be read, skipped: {why}", job=job_id, index=index, why=repr(e))
        return jobs

    async def _whole(self, queue_id: str, stored: bytes) -> bytes | None:
        """
        The whole message of a hash's ``body`` field, from the body store for a
        stub; ``None`` when it is gone (the DSN then returns the headers).
        """
        stub = read_stub(stored)
        if stub is None:
            return stored
        if self.bodies is None:
            return None
        try:
            return await self.bodies.get(stub.ref)
        except BodyNotFound:
            log.warn("{queue_id}: body gone, the DSN returns its headers only", queue_id=queue_id)
            return None

    def _dsn_args(self, job: FailedJob, dsn: IncomingMessage | None, now: float) -> tuple[str, list[object]]:
        """
        The DSN's message key and the arguments bounce.lua and warn.lua share:
        prefix, jid, now, the DSN's queue id, body, recipient and its domain
        (empty when no DSN is due).
        """
        if dsn is None:
            return self.message_key("-"), [self.prefix, job.job_id, _ms(now), "", b"", "", ""]
        [recipient] = dsn.recipients
        args: list[object] = [self.prefix, job.job_id, _ms(now), dsn.queue_id, dsn.body, str(recipient)]
        return self.message_key(dsn.queue_id), [*args, recipient.domain]

    async def warn(self, job: FailedJob, dsn: IncomingMessage | None, now: float) -> bool:
        dsn_key, args = self._dsn_args(job, dsn, now)
        keys = [self.key("delayed"), self.key("seq"), self.key("domains"), dsn_key]
        return bool(int(await self._write(self._WARN, keys, args, f"delay warning for {job.job_id}", strict=True)))

    async def bounce(self, job: FailedJob, dsn: IncomingMessage | None, now: float) -> bool:
        dsn_key, args = self._dsn_args(job, dsn, now)
        keys = [
            self.key("failed"),
            self.key("job", job.job_id),
            self.message_key(job.queue_id),
            self.key("seq"),
            self.key("domains"),
            dsn_key,
        ]
        return bool(int(await self._write(self._BOUNCE, keys, args, f"DSN for {job.job_id}", strict=True)))

    # -- routes changed at run time, and the audit log ----------------------

    async def set_routes(
        self, domain: str, routes: tuple[str, ...] | None, now: float, who: str
    ) -> tuple[str, ...] | None:
        record = {"at": _ms(now), "who": who, "action": "route", "domain": domain, "routes": list(routes or [])}
        keys = [self.key("routes"), self.key("audit")]
        args = [domain, json.dumps(list(routes)) if routes else "", json.dumps(record), AUDIT_KEPT]
        previous = _text(await self._write(self._REROUTE, keys, args, f"new routes of {domain}", strict=True) or b"")
        return tuple(json.loads(previous)) if previous else None

    async def route_override(self, domain: str) -> tuple[str, ...] | None:
        value = await self.redis.call("hget", self.key("routes"), domain)
        return tuple(json.loads(value)) if value else None

    async def events(self, domain: str, start: str, end: str, count: int) -> list[tuple[str, dict[str, str]]]:
        key = self.key("events", domain)
        rows = await self.redis.call("execute_command", "XRANGE", key, start, end, "COUNT", count)
        return [
            _event_defaults(
                domain, _text(entry_id), {_text(k): _text(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}
            )
            for entry_id, fields in rows or []
        ]

    async def audit(self, limit: int) -> list[dict[str, object]]:
        records = await self.redis.call("lrange", self.key("audit"), 0, limit - 1)
        return [json.loads(r) for r in records]
