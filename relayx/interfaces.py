"""
The seams of relayx: what the SMTP front door, the queue and the delivery
scheduler expect of each other. Implementations are picked in ``service.py``;
every implementation of an interface passes one shared test suite.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import attrs
from zope.interface import Interface

from relayx.address import Mailbox
from relayx.reply import Reply


class StoreUnavailable(Exception):
    """
    The store could not confirm an operation (Redis unreachable, timed out or
    refused). Always temporary: the SMTP reply is ``451 4.3.0``.
    """


class NotApplied(StoreUnavailable):
    """
    The store certainly did not make the change: the command was never sent
    (no connection) or was answered with an error. Unlike a timeout or a
    lost reply, nothing has to be taken back.
    """


class BodyStoreUnavailable(StoreUnavailable):
    """
    The body store could not confirm an operation (a directory not
    writable, object storage unreachable or refusing our credentials).
    Always temporary: the SMTP reply is ``451 4.3.0``, a delivery is retried.
    """


class BodyNotFound(KeyError):
    """
    No body is stored under the reference (deleted, swept, or never
    written). ``str()`` is a one-line explanation.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such body"


class StaleLease(Exception):
    """
    The lease's fencing token is no longer current: the job was reclaimed
    by another node, which now owns it.
    """


class Notify(enum.Enum):
    """
    One ``NOTIFY=`` keyword of a recipient (RFC 3461 4.1).
    """

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


class Ret(enum.Enum):
    """
    How much of the message a failure DSN returns (``RET=``, RFC 3461 4.3).
    """

    FULL = "FULL"
    HDRS = "HDRS"


@attrs.frozen
class RecipientDsn:
    """
    A recipient's DSN request: ``notify`` as given (``None``: not given, which
    RFC 3461 4.1 lets mean ``FAILURE,DELAY``), and its ``ORCPT`` as
    ``addr-type;address`` with the xtext decoded (``None``: not given).
    """

    notify: frozenset[Notify] | None = None
    orcpt: str | None = None

    def wants(self, what: Notify) -> bool:
        if self.notify is None:
            return what in (Notify.FAILURE, Notify.DELAY)
        return what in self.notify


NO_RECIPIENT_DSN = RecipientDsn()


@attrs.frozen
class MessageDsn:
    """
    The envelope's DSN parameters (RFC 3461): ``RET`` and ``ENVID`` (xtext
    decoded) of the message, and each recipient's that gave any, by address.
    """

    ret: Ret | None = None
    envid: str | None = None
    recipients: tuple[tuple[str, RecipientDsn], ...] = ()

    def recipient(self, address: str) -> RecipientDsn:
        for rcpt, dsn in self.recipients:
            if rcpt == address:
                return dsn
        return NO_RECIPIENT_DSN

    @property
    def empty(self) -> bool:
        return self == NO_DSN


NO_DSN = MessageDsn()


@attrs.frozen
class IncomingMessage:
    """
    One accepted transaction, ready to commit: the body as stored (with our
    ``Received:`` header), the envelope, and its recipients grouped by
    destination domain (one delivery job each).
    """

    queue_id: str
    sender: str
    recipients: tuple[Mailbox, ...]
    received_at: float
    body: bytes = attrs.field(repr=False)
    dsn: MessageDsn = NO_DSN

    def by_domain(self) -> dict[str, tuple[str, ...]]:
        groups: dict[str, list[str]] = {}
        for rcpt in self.recipients:
            owed = groups.setdefault(rcpt.domain, [])
            if str(rcpt) not in owed:
                owed.append(str(rcpt))
        return {domain: tuple(rcpts) for domain, rcpts in groups.items()}


@attrs.frozen
class Lease:
    """
    The right, until ``expires``, to deliver one job. ``token`` is the fencing
    token: the store refuses any change made with an older one. Renewing a
    lease returns a new lease.
    """

    job_id: str
    token: int
    expires: float
    queue_id: str
    domain: str
    recipients: tuple[str, ...]
    attempts: int
    created: float

    def renewed(self, expires: float) -> Lease:
        return attrs.evolve(self, expires=expires)


@attrs.frozen
class Throttle:
    """
    How hard a destination may be driven, across the whole cluster:
    deliveries at once, messages per second (0: no limit), and how long a
    destination that just came back takes to climb back to that pace from
    one session (the adaptive pace's additive step: ``concurrency`` and
    ``rate`` per ``ramp_up``). 0: no ramp over time; a destination back
    from an outage starts at one session and gets one more per delivery
    (doubling with each round of deliveries, as TCP's slow start) until a
    pushback or the ceiling, and the climb after a cut adds one session per
    interval. These are ceilings: the adaptive pace (``Pace``) may run
    below them.
    """

    concurrency: int
    rate: float = 0.0
    ramp_up: float = 0.0


class Pushback(enum.Enum):
    """
    A destination that answered but asked to slow down, and which part of
    the pace that cuts: ``SESSIONS`` (a greeting refused with ``4xx``, or
    a connection refused while other sessions are answered: fewer sessions
    at once), ``RATE`` (``421`` or ``451`` to a transaction: fewer messages
    per second).
    """

    SESSIONS = "sessions"
    RATE = "rate"


@attrs.frozen
class PacePolicy:
    """
    How the adaptive pace reacts (cluster-wide, per destination; settle.lua):
    a destination with no delivery in the last ``idle`` seconds (none yet,
    or after an outage) starts at ``start`` of its configured concurrency
    and rate and doubles both each ``interval`` with a success until a
    pushback or the ceiling (slow start; 1: none); a pushback cuts the
    current concurrency or rate by ``backoff`` (the rate to no more than the
    destination accepted over the last second; at most once per
    ``interval``), never below one session and ``floor_rate`` messages per
    second; each ``interval`` with a success climbs back additively towards
    the configured ceiling. A reply ``slow`` times its recent average (and
    half a second more) cuts both.
    """

    backoff: float = 0.7
    interval: float = 1.0
    floor_rate: float = 1.0
    slow: float = 4.0
    start: float = 0.5
    idle: float = 300.0


@attrs.frozen
class Pace:
    """
    A destination's current adaptive pace, as the queue keeps it: sessions
    and messages per second (``None``: the configured ceiling), the last
    cut or return to the ceiling (``event``: ``cut``/``ceiling``, ``at``
    epoch seconds), what caused it (``why``, ``kind``) and the reply time
    the destination usually has (ms, 0: not known yet).
    """

    concurrency: int | None = None
    rate: float | None = None
    event: str = ""
    at: float | None = None
    why: str = ""
    kind: str = ""
    reply_ms: float = 0.0

    def effective(self, throttle: Throttle) -> tuple[int, float]:
        """
        The concurrency and rate in force: the lower of the ceiling and the
        adaptive pace (rate 0: no limit).
        """
        concurrency = min(throttle.concurrency, self.concurrency or throttle.concurrency)
        rate = throttle.rate
        if self.rate is not None:
            rate = self.rate if rate == 0 else min(rate, self.rate)
        return concurrency, rate

    def describe(self, throttle: Throttle) -> str:
        """
        The pace in words, for the CLI and the panel: ``"3 sessions, 12.5
        msg/s: cut at 12:01:03 after 421 4.7.0 busy from mx1"``.
        """
        concurrency, rate = self.effective(throttle)
        words = f"{concurrency} session{'s' if concurrency != 1 else ''}, "
        words += f"{rate:.3g} msg/s" if rate else "no rate limit"
        if self.concurrency is None and self.rate is None:
            words += " (full pace"
            if self.event == "ceiling" and self.at is not None:
                words += " again since " + time.strftime("%H:%M:%S", time.gmtime(self.at))
            return words + ")"
        if self.at is not None and self.event == "cut":
            words += f": cut ({self.kind}) at {time.strftime('%H:%M:%S', time.gmtime(self.at))} after {self.why}"
        elif self.why:
            words += f": {self.why}"
        return words + ", climbing"


@attrs.frozen
class Claim:
    """
    The leases a claim took, when a rate-limited domain will have room
    again (``None``: no domain is waiting for its rate), and how many
    expired leases of other nodes it took back.
    """

    leases: tuple[Lease, ...]
    wake: float | None = None
    taken_over: int = 0


@attrs.frozen
class StoredMessage:
    sender: str
    body: bytes = attrs.field(repr=False)
    dsn: MessageDsn = NO_DSN


@attrs.frozen
class Outcome:
    """
    What one delivery attempt achieved, recipient by recipient.

    ``unreachable`` is set when no host answered (no connection, a greeting
    or EHLO failing): the job goes back to the head of its domain's queue
    and the whole domain waits, keeping acceptance order, unless other
    attempts are being answered (then it is a pushback, as below).
    ``pushback`` is set when a host answered "not now" (a ``4xx`` greeting,
    ``421``/``451`` to the transaction): the job goes back to its place and
    the destination's pace is cut, the domain is not paused.
    """

    delivered: tuple[str, ...] = ()
    failed: tuple[tuple[str, Reply], ...] = ()
    deferred: tuple[tuple[str, Reply], ...] = ()
    unreachable: str | None = None
    #: the host that answered (``name [address]:port``) and its reply to the
    #: message when it took it: the proof of delivery, with its queue id
    destination: str = ""
    accepted: Reply | None = None
    #: delivered recipients that asked NOTIFY=SUCCESS, taken by a host that does
    #: not offer DSN: they are owed a "relayed" DSN (RFC 3461 6.2.2)
    relayed: tuple[str, ...] = ()
    #: the destination answered but asked to slow down (its reply, from
    #: ``destination``): the job goes back to its place and the pace is cut
    pushback: Pushback | None = None
    pushback_reply: Reply | None = None
    #: how long the destination took to answer the transaction (MAIL to the
    #: reply after the message), for the pace's reply-time baseline; 0: unknown
    reply_seconds: float = 0.0
    #: whether the session with ``destination`` was encrypted (STARTTLS)
    tls: bool = False


@attrs.frozen
class NodeStatus:
    node: str
    last_seen: float
    hostname: str
    leases: tuple[str, ...]


@attrs.frozen
class QueueCounts:
    """
    What one or more delivery queues hold, read from the counters the queue's
    scripts keep: jobs by state (a held domain's ready jobs count as held),
    the bytes of their messages, and the arrival (epoch seconds) of the
    oldest job, if any. ``on_hold``: whether the domain is held now.
    """

    ready: int = 0
    held: int = 0
    deferred: int = 0
    in_flight: int = 0
    failed: int = 0
    bytes: int = 0
    oldest: float | None = None
    on_hold: bool = False

    @property
    def total(self) -> int:
        return self.ready + self.held + self.deferred + self.in_flight + self.failed

    def by_state(self) -> dict[str, int]:
        """
        The counts by state name (``ready``, ``held``, ``deferred``, ``in_flight``, ``failed``).
        """
        return {
            "ready": self.ready,
            "held": self.held,
            "deferred": self.deferred,
            "in_flight": self.in_flight,
            "failed": self.failed,
        }

    def __add__(self, other: QueueCounts) -> QueueCounts:
        oldest = min((t for t in (self.oldest, other.oldest) if t is not None), default=None)
        return QueueCounts(
            ready=self.ready + other.ready,
            held=self.held + other.held,
            deferred=self.deferred + other.deferred,
            in_flight=self.in_flight + other.in_flight,
            failed=self.failed + other.failed,
            bytes=self.bytes + other.bytes,
            oldest=oldest,
            on_hold=self.on_hold or other.on_hold,
        )


@attrs.frozen
class QueueTotals:
    """
    The whole queue: messages (each once, however many jobs), their bytes, and jobs.
    """

    messages: int = 0
    bytes: int = 0
    jobs: int = 0


@attrs.frozen
class DomainState:
    domain: str
    ready: int
    in_flight: int
    held: bool
    hold_start: float | None
    hold_end: float | None
    paused_until: float | None
    last_error: str
    release_rate: float
    pace: Pace = attrs.field(factory=Pace)


@attrs.frozen
class HoldWindow:
    """
    A domain's hold as it was before an operator's change: whether it was in
    force, and its scheduled start and its end (epoch seconds; ``None``: none).
    """

    held: bool
    start: float | None
    end: float | None


@attrs.frozen
class HoldChange:
    """
    What a hold did: ``applied`` is false when it would have replaced a
    scheduled hold (or one in force by a later window) without ``replace``;
    then nothing changed. ``previous`` is the hold before.
    """

    applied: bool
    previous: HoldWindow


class IMessageStore(Interface):
    """
    Where accepted mail is committed before the ``250`` to DATA.
    """

    def enqueue(message: IncomingMessage) -> Awaitable[None]:
        """
        Store the message and one job per destination domain, all or nothing.
        Raises ``StoreUnavailable`` when that cannot be confirmed.
        """


@attrs.frozen
class StoredBody:
    """
    One body found by a listing: its reference, the queue id it was stored
    for, and when it was stored (seconds since the epoch).
    """

    ref: str
    queue_id: str
    stored_at: float


@attrs.frozen
class BodyPage:
    """
    One page of a listing, and the cursor to the next (``None``: the end).
    A page may hold fewer bodies than asked, even none, and still go on.
    """

    bodies: tuple[StoredBody, ...]
    cursor: str | None


class IBodyStore(Interface):
    """
    Where message bodies live, apart from the queue's metadata: a directory,
    object storage, or Redis itself. A body is written once per queue id
    and read until the last job of its message retires.

    Every method raises ``BodyStoreUnavailable`` when the store cannot
    confirm it; none blocks the reactor.
    """

    def put(queue_id: str, body: bytes) -> Awaitable[str]:
        """
        Store ``body`` for ``queue_id``; the reference to read it with.
        It is durable when this resolves (written and flushed as the store
        allows). A second put of the same queue id replaces it whole.
        """

    def get(ref: str) -> Awaitable[bytes]:
        """
        The body stored under ``ref``; raises ``BodyNotFound`` when there is none.
        """

    def delete(ref: str) -> Awaitable[None]:
        """
        Remove the body; deleting one that is gone is not an error.
        """

    def list_older_than(cutoff: float, cursor: str | None, limit: int) -> Awaitable[BodyPage]:
        """
        A page of the bodies stored before ``cutoff`` (seconds since the
        epoch), from ``cursor`` (``None``: the start), looking at about
        ``limit`` entries (a store walking with Redis's ``SCAN`` may return
        a few more): the orphan sweep's walk, in bounded steps.
        """

    def check() -> Awaitable[None]:
        """
        Whether the store can be written, read and deleted from now (the
        start-up check); raises ``BodyStoreUnavailable`` with one line saying why not.
        """


class IDeliveryQueue(Interface):
    """
    The cluster-wide queue of delivery jobs, leased to one node at a time.
    """

    def claim(
        owner: str, now: float, limit: int, throttles: Mapping[str, Throttle], default: Throttle
    ) -> Awaitable[Claim]:
        """
        Lease up to ``limit`` ready jobs, in each domain's acceptance order,
        within each domain's throttle across the cluster; held and paused
        domains get none. Expired leases and due retries are returned to
        their queues first.
        """

    def renew(lease: Lease, now: float) -> Awaitable[Lease]:
        """
        Extend ``lease``; raises ``StaleLease`` when it was lost.
        """

    def load(lease: Lease) -> Awaitable[StoredMessage]:
        """
        The sender and body of the leased job's message.
        """

    def settle(lease: Lease, outcome: Outcome, now: float, throttle: Throttle | None = None) -> Awaitable[str]:
        """
        Record ``outcome`` and end the lease: delivered and failed recipients
        are done, deferred ones wait for their retry, and an unreachable
        destination pauses its domain; a pushback puts the job back at its
        place and cuts the destination's pace (``throttle``: its ceiling,
        for the climb back). Returns what became of the job (``done``,
        ``failed``, ``deferred``, ``paused`` or ``ready``); raises ``StaleLease``.
        """

    def failing_domains() -> Awaitable[list[str]]:
        """
        The domains whose destination is failing (paused after a failure).
        """

    def take_probe(domain: str, owner: str, interval: float) -> Awaitable[bool]:
        """
        Whether this node is the one to probe ``domain`` now: at most one
        probe per interval across the cluster.
        """

    def resume(domain: str, now: float, throttle: Throttle) -> Awaitable[bool]:
        """
        The domain's destination is up again: end its pause so its queue
        goes at once, at one session climbing over ``throttle``'s ramp-up
        (or, without one, a session more per delivery). Returns whether it
        was paused.
        """


@attrs.frozen
class FailedJob:
    """
    A job whose recipients failed for good, waiting for its DSN.
    """

    job_id: str
    queue_id: str
    sender: str
    arrival: float
    failures: tuple[tuple[str, int, str, str], ...]
    headers: bytes = attrs.field(repr=False)
    dsn: MessageDsn = NO_DSN
    #: the whole message, when the sender asked ``RET=FULL`` and this is a failure
    full: bytes | None = attrs.field(default=None, repr=False)


class IFailedJobs(Interface):
    """
    The jobs that failed, and retiring them with their DSN.
    """

    def failed(limit: int) -> Awaitable[list[FailedJob]]:
        """
        Up to ``limit`` failed jobs, oldest first.
        """

    def bounce(job: FailedJob, dsn: IncomingMessage | None, now: float) -> Awaitable[bool]:
        """
        Queue ``dsn`` (``None``: none is due) and retire ``job``, in one step;
        ``False`` if another node already did.
        """

    def delayed(limit: int) -> Awaitable[list[FailedJob]]:
        """
        Up to ``limit`` jobs due a delay warning, with the recipients still
        owed and the last error.
        """

    def warn(job: FailedJob, dsn: IncomingMessage | None, now: float) -> Awaitable[bool]:
        """
        Queue the delay warning ``dsn`` once; the job goes on being retried.
        """


class IRecipientCache(Interface):
    """
    What the primary said about recipients (RCPT callouts), shared by the
    cluster so that each address is asked once.
    """

    def recall(address: str) -> Awaitable[tuple[bool, float] | None]:
        """
        Whether the address exists and when that was learnt, if known.
        """

    def remember(address: str, exists: bool, now: float, keep: float) -> Awaitable[None]:
        """
        Record an answer, kept for ``keep`` seconds.
        """


class IRecipientPolicy(Interface):
    """
    Decides, at RCPT time, whether a recipient is ours to accept.
    """

    def check(recipient: Mailbox) -> Awaitable[Reply]:
        """
        A positive reply to accept, or the rejection to send.
        """


class IDeliverer(Interface):
    """
    Carries one message to a domain's destination and reports per recipient.
    """

    def deliver(
        domain: str, sender: str, recipients: tuple[str, ...], body: bytes, dsn: MessageDsn = NO_DSN
    ) -> Awaitable[Outcome]:
        """
        Never raises for the destination's failures: they are in the outcome.
        ``dsn``: the envelope's DSN parameters, passed on to a host that offers DSN.
        """

    def probe(domain: str) -> Awaitable[str | None]:
        """
        Whether the domain's destination answers (greeting and EHLO):
        ``None`` if it does, else why not.
        """


class IQueueAdmin(Interface):
    """
    What an operator does to the queue: hold and release domains, see the
    nodes and what a domain's queue holds.
    """

    def hold(
        domain: str,
        now: float,
        start: float | None = None,
        end: float | None = None,
        who: str = "relayx",
        replace: bool = False,
    ) -> Awaitable[HoldChange]:
        """
        Accept and queue mail for ``domain`` but deliver none: from ``start``
        (default: now) until ``end`` (default: until released). Time held does
        not count against the retention of the domain's mail. Audited as
        ``who``, with the hold before. A scheduled hold not yet begun, or a
        hold in force when ``start`` is later, is replaced only with
        ``replace``; otherwise nothing changes (``applied`` false).
        """

    def release(domain: str, now: float, rate: float = 0.0, who: str = "relayx") -> Awaitable[HoldWindow]:
        """
        End or cancel the hold; with ``rate``, drain the backlog at no more
        than that many messages per second. Returns the hold before (a
        ``start`` in it: a scheduled hold was cancelled). Audited with it.
        """

    def flush(queue: str, now: float, who: str) -> Awaitable[int]:
        """
        Deliver the queue now: stop waiting for its failing destination and
        bring its deferred jobs back; returns how many were deferred.
        """

    def drop(queue_id: str, now: float, who: str, bounce: bool, audited: bool = True) -> Awaitable[int]:
        """
        Delete a message, or bounce it (its undelivered recipients fail and
        the sender gets a DSN); returns how many jobs it had (0: none such).
        ``audited=False``: one step of a bulk action, audited at its start.
        """

    def requeue(queue_id: str, now: float, who: str, audited: bool = True) -> Awaitable[int]:
        """
        Try a message's deferred recipients, and failed ones not yet
        bounced, again now; returns how many jobs went back to the queue.
        """

    def page(
        queues: Sequence[str], search: Mapping[str, object], cursor: int, limit: int, now: float, budget: int = 200
    ) -> Awaitable[dict[str, Any]]:
        """
        The jobs of ``queues`` matching ``search`` in acceptance order, after
        ``cursor`` (an acceptance sequence; 0: from the start), examining at
        most ``budget`` jobs: ``jobs`` (at most ``limit``), ``cursor`` to
        continue from and whether there is ``more``. Exact filters:
        ``recipient``, ``message_id`` (from hashed indexes), ``sender``; examined
        one by one: ``sender``, ``sender_has``, ``recipient_has``, ``subject_has``, ``state``,
        ``before`` and ``after`` (ms).
        """

    def counts(queues: Sequence[str], now: float) -> Awaitable[dict[str, Any]]:
        """
        How many jobs ``queues`` hold (``total``, by state in ``states``) and
        the oldest's arrival (``oldest``, ms; 0: none), without walking them:
        ``queue_summary`` added up.
        """

    def traffic(queues: Sequence[str]) -> Awaitable[dict[str, int]]:
        """
        How many jobs of ``queues`` (all queues when none are named) were
        ``accepted`` and ``delivered`` (in full) since the counters began:
        two counters that only grow, read without walking anything.
        """

    def message(queue_id: str, now: float) -> Awaitable[dict[str, Any] | None]:
        """
        One message: envelope, header section, and its jobs with their
        state and last attempts; ``None`` when there is none.
        """

    def heartbeat(node: str, now: float, keep: float, info: Mapping[str, str]) -> Awaitable[None]:
        """
        Record that ``node`` is alive; nodes silent for ``keep`` seconds are dropped.
        """

    def nodes(now: float, keep: float) -> Awaitable[list[NodeStatus]]:
        """
        The live nodes and the jobs each one holds a lease on.
        """

    def domain_state(domain: str, now: float) -> Awaitable[DomainState]:
        """
        The domain's queue: ready and in-flight counts, hold and pause.
        """

    def queue_summary(queues: Sequence[str], now: float) -> Awaitable[dict[str, QueueCounts]]:
        """
        Each delivery queue's counts by state, bytes and oldest job, from
        counters: the cost grows with the number of queues, not their depth.
        """

    def totals() -> Awaitable[QueueTotals]:
        """
        The messages, bytes and jobs of the whole queue, from counters.
        """

    def set_routes(
        domain: str, routes: tuple[str, ...] | None, now: float, who: str
    ) -> Awaitable[tuple[str, ...] | None]:
        """
        Send the domain's mail, queued and to come, to ``routes`` (``None``:
        back to the configured routes), recording who did it, when and the
        routes before. Returns the routes set before (``None``: the configured ones).
        """

    def qshape(queue: str, now: float, edges: Sequence[float], waiting: bool = False) -> Awaitable[list[int]]:
        """
        The queue's jobs by age: ``[total, at most edges[0] old, older than
        edges[0] and at most edges[1], ..., older than edges[-1]]`` (``edges``: ascending ages in
        seconds); ``waiting``: only jobs waiting their turn (ready or held).
        Bounded: a bisection per edge, never a walk of the queue.
        """

    def raw(queue_id: str) -> Awaitable[bytes | None]:
        """
        The message as accepted (our ``Received:`` and the content), from
        Redis or the body store; ``None`` when it is not queued.
        """

    def route_override(domain: str) -> Awaitable[tuple[str, ...] | None]:
        """
        The routes set with ``set_routes``, if any.
        """

    def audit(limit: int) -> Awaitable[list[dict[str, object]]]:
        """
        The newest ``limit`` audit records.
        """

    def events(domain: str, start: str, end: str, count: int) -> Awaitable[list[tuple[str, dict[str, str]]]]:
        """
        The domain's event log (proof of delivery; see common.lua's
        record_event) from entry ID ``start`` to ``end`` (XRANGE bounds:
        ``"<ms>"``, ``"(<id>"`` exclusive, ``"+"``), at most ``count`` entries,
        oldest first, each as its ID and fields.
        """


class IBulkActions(Interface):
    """
    Bulk actions an operator starts (delete, bounce or requeue every message
    matching a filter) and any node runs, a bounded step at a time, under a
    lease; their cursor and progress live in the queue, so that another node
    resumes one whose runner died.
    """

    def bulk_start(
        action: str, queues: Sequence[str], search: Mapping[str, object], now: float, who: str
    ) -> Awaitable[str]:
        """
        Record a running action (audited once, here, with its filter); returns its id.
        """

    def bulk(bulk_id: str) -> Awaitable[dict[str, Any] | None]:
        """
        One action and its progress (``examined``, ``matched``, ``acted``), or ``None``.
        """

    def bulks(limit: int) -> Awaitable[list[dict[str, Any]]]:
        """
        The newest actions, newest first.
        """

    def bulk_running() -> Awaitable[list[str]]:
        """
        The ids of the actions still running.
        """

    def bulk_take(bulk_id: str, owner: str, ttl: float) -> Awaitable[bool]:
        """
        Take or renew the lease on running ``bulk_id`` for ``ttl`` seconds;
        ``False`` when another node holds it.
        """

    def bulk_step(
        bulk_id: str, owner: str, cursor: int, examined: int, matched: int, acted: int, done: bool, now: float
    ) -> Awaitable[str]:
        """
        Record one step's progress as the lease holder; returns the action's
        state (``running``, ``done``, ``cancelled``); raises ``StaleLease`` when the lease was lost.
        """

    def bulk_cancel(bulk_id: str, now: float, who: str) -> Awaitable[bool]:
        """
        Stop a running action (audited); ``False`` when it was not running.
        """
