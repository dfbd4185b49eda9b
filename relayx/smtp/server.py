"""
The inbound SMTP protocol (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
SMTPUTF8 and ENHANCEDSTATUSCODES).

It parses commands and sends replies; whether a recipient is accepted is the
policy's verdict, and the ``250`` to DATA is sent only once the store has
committed the message. Any failure not known to be permanent is answered
``451``: a backup MX that answers ``5xx`` during a Redis hiccup makes senders
bounce mail that could have waited.

DATA is collected in bulk (one ``find`` per network read, not one Python call
per line), which is where an SMTP server spends its time. It is checked and
unstuffed as it comes and written to a ``SpooledMessage``: in memory while it
is small, in a file of the spool directory once it grows, so that memory does
not grow with the size of the messages. While a session waits for the store
or the filters, the server stops reading from its client once it sends more.

No trickle keeps a session: each command line has ``command_timeout`` from
the previous reply to its end, a message ``data_timeout`` from its first byte
to its last, and after ``data_rate_grace`` it must have come at
``min_data_rate`` bytes/s on average; bytes arriving do not reset these.
When every connection slot is taken, a client from an address holding fewer
sessions than the busiest address takes one of that address's slots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, ClassVar, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayx.address import AddressError, Mailbox, Path, client_ip, normalize_domain, parse_path, xtext_decode
from relayx.checks.chain import Client, FilterChains, add_lines
from relayx.interfaces import (
    NO_DSN,
    IMessageStore,
    IncomingMessage,
    IRecipientPolicy,
    MessageDsn,
    Notify,
    RecipientDsn,
    Ret,
    StoreUnavailable,
)
from relayx.message import strip_authentication_results
from relayx.metrics import Metrics
from relayx.reply import Reply
from relayx.sending import send_now
from relayx.smtp.tls import ReloadingTLS, describe
from relayx.spool import Spool, SpooledMessage

log = Logger()
_T = TypeVar("_T")

OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
BAD_SEQUENCE_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_NESTED = Reply(503, "5.5.1", "Error: nested MAIL command")
BAD_SEQUENCE_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Error: invalid characters in command")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops, mail loop suspected")
NUL_IN_MESSAGE = Reply(554, "5.6.0", "Error: message contains NUL characters")
BARE_LF = Reply(550, "5.5.2", "Error: bare <LF> received, lines must end in <CR><LF>")
BARE_LF_COMMAND = Reply(500, "5.5.2", "Error: bare <LF> received, lines must end in <CR><LF>")
POSTMASTER_OK = Reply(250, "2.1.5", "Ok")
#: 452s past max_recipients before they count as errors (Postfix's smtpd_recipient_overshoot_limit)
RECIPIENT_OVERSHOOT = 1000
SOURCE_ROUTE = Reply(550, "5.7.1", "Relaying denied: source routes are not accepted")
STORE_FAILED = Reply(451, "4.3.0", "Error: temporary queue failure, try again later")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")


@attrs.frozen
class Limits:
    """
    What one SMTP session may use; from ``[smtp]``.
    """

    max_message_size: int
    max_recipients: int
    max_line_length: int
    max_errors: int
    max_hops: int
    command_timeout: float
    data_timeout: float
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    reject_bare_lf: bool = False
    #: after data_rate_grace seconds, a message must have come at least this fast (bytes/s; 0: no minimum)
    min_data_rate: int = 500
    data_rate_grace: float = 30.0


@attrs.define
class Session:
    """
    Per connection: who is talking and how it has behaved.
    """

    peer_ip: str
    helo: str | None = None
    #: the client's forward-confirmed reverse DNS name, once looked up
    rdns: str | None = None
    esmtp: bool = False
    tls: bool = False
    errors: int = 0
    started: float = 0.0
    #: the last reply code sent (how the session ended, for its log line)
    code: int = 0
    #: the queue ids of the messages accepted in this session and not yet logged
    queued: list[str] = attrs.field(factory=list)
    #: how many messages this session queued in all
    queued_count: int = 0


@attrs.define
class Envelope:
    """
    Per transaction, from MAIL to the end of DATA or RSET.
    """

    sender: Path
    utf8: bool
    recipients: list[Mailbox] = attrs.field(factory=list)
    rejected: int = 0
    #: RCPTs refused with 452 4.5.3 beyond max_recipients (not errors: the
    #: sender retries them in another transaction)
    overshoot: int = 0
    #: the message so far when it comes in BDAT chunks (RFC 3030)
    chunks: _Content | None = None
    #: header lines the filters asked for (an SPF result, a spam score)
    headers: list[str] = attrs.field(factory=list)
    #: the DSN parameters of MAIL (RET, ENVID) and of each recipient that gave any
    dsn: MessageDsn = NO_DSN
    rcpt_dsn: dict[Mailbox, RecipientDsn] = attrs.field(factory=dict)

    def message_dsn(self) -> MessageDsn:
        if not self.rcpt_dsn:
            # the common case, without an evolve per message
            return self.dsn
        return attrs.evolve(
            self.dsn, recipients=tuple((str(m), d) for m, d in self.rcpt_dsn.items() if m in self.recipients)
        )

    def add_headers(self, lines: tuple[str, ...]) -> None:
        add_lines(self.headers, lines)

    def discard(self) -> None:
        """
        Drop the message read so far (its spool file with it).
        """
        if self.chunks is not None:
            self.chunks.discard()
            self.chunks = None


@attrs.define
class _Chunk:
    """
    A BDAT chunk being read: bytes still to come, whether it is the last,
    and the error to answer once it is read, if the command was refused.
    """

    remaining: int
    last: bool
    error: Reply | None


class _Content:
    """
    A message as it comes in (after dot-stuffing is undone): its size checked
    against the limit, NUL and bare LF looked for (bare LFs made CRLF unless
    they are refused), and the rest written to a ``SpooledMessage``. A
    trailing CR waits for the next piece, so that no check sees half a CRLF.
    Once the message cannot be accepted, nothing more is written.
    """

    def __init__(self, message: SpooledMessage, limit: int, normalize: bool) -> None:
        self.message = message
        self.limit = limit
        self.normalize = normalize
        #: bytes as received (before bare LFs are made CRLF)
        self.octets = 0
        self.overflow = False
        self.nul = False
        self.bare_lf = False
        self._carry = b""

    @property
    def refused(self) -> bool:
        return self.overflow or self.nul or (self.bare_lf and not self.normalize)

    def feed(self, piece: bytes) -> None:
        self.octets += len(piece)
        if self.refused:
            return
        if self.octets > self.limit:
            self.overflow = True
            self.message.discard()
            return
        if self._carry:
            piece = self._carry + piece
            self._carry = b""
        if piece.endswith(b"\r"):
            self._carry = b"\r"
            piece = piece[:-1]
        self._write(piece)

    def _write(self, piece: bytes) -> None:
        if not piece:
            return
        if b"\0" in piece:
            self.nul = True
        # two C-level counts: a regular expression here cost more than all
        # the rest of accepting a 100 KiB message
        if piece.count(b"\n") != piece.count(b"\r\n"):
            # RFC 5321 2.3.8: a client must not send a bare LF. Postfix's
            # default is to normalise; refusing is the operator's choice
            self.bare_lf = True
            if self.normalize:
                piece = _BARE_LF.sub(b"\r\n", piece)
        if self.refused:
            self.message.discard()
        else:
            self.message.write(piece)

    def finish(self) -> None:
        carry, self._carry = self._carry, b""
        if not self.refused:
            self._write(carry)
            self.message.finish()

    def discard(self) -> None:
        self.message.discard()


@attrs.define
class _DataCollector:
    """
    The DATA phase: the bytes not yet taken into the message (at first a
    CRLF, so that the end marker and dot-stuffing are found the same way on
    the first line), and where the message goes.
    """

    content: _Content
    pending: bytearray = attrs.field(factory=lambda: bytearray(b"\r\n"))
    first: bool = True

    def take(self, count: int) -> None:
        """
        Move ``count`` pending bytes (which end neither inside a CRLF nor
        between a CRLF and a dot) into the message, unstuffed.
        """
        piece = bytes(self.pending[:count]).replace(b"\r\n.", b"\r\n")
        del self.pending[:count]
        if self.first:
            piece = piece[2:]
            self.first = False
        self.content.feed(piece)

    def safe_cut(self) -> int:
        """
        How many pending bytes may be taken before the end marker is found:
        all but the last four (which may begin the marker), less one or two
        so that the cut splits no CRLF and leaves no dot after a CRLF behind.
        """
        pending = self.pending
        cut = len(pending) - (len(_END) - 1)
        while cut > 0 and (
            pending[cut - 1 : cut + 1] == b"\r\n"
            or (pending[cut] == ord(".") and pending[max(0, cut - 2) : cut] == b"\r\n")
        ):
            cut -= 1
        return cut


_END = b"\r\n.\r\n"
_LOST = Failure(ConnectionError("connection lost"))
_BARE_LF = re.compile(rb"(?<!\r)\n")
_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
#: how much of a message's beginning is searched for Received: headers
HOP_SCAN = 64 * 1024
#: how much of a message is looked at first for its header section
HEAD_GUESS = 4096
#: input held while a session waits for the store (the client is paused meanwhile)
MAX_INPUT_WHILE_BUSY = 1024 * 1024
#: queue ids in one log line of a session: a longer session logs them as it goes
QUEUE_IDS_PER_LINE = 100


_POSTMASTER = re.compile(r"^TO: *<postmaster>( .*)?$", re.IGNORECASE)


def _bare_postmaster(argument: str) -> str | None:
    """
    The parameters of ``TO:<Postmaster>`` (no domain, any case), else ``None``.
    """
    match = _POSTMASTER.match(argument)
    return None if match is None else (match.group(1) or "").strip()


_TRACE = ("received-spf:", "authentication-results:")


def _is_trace(line: str) -> bool:
    """
    Whether a filter's header line is a trace field of this hop.
    """
    return line[:24].lower().startswith(_TRACE)


def printable(text: str, replacement: str = "?") -> str:
    """
    ``text`` with control and other non-printable characters replaced, as
    Postfix's ``printable()`` does to a HELO name.
    """
    return "".join(c if c.isprintable() else replacement for c in text)


class DateStamps:
    """
    The RFC 5322 date of a ``Received:`` header for a time, formatted once
    per second: ``format_datetime`` for every message was a visible part of
    accepting one, and every message of the same second has the same date.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, now: float) -> str:
        second = math.floor(now)
        if second != self._second:
            self._text = format_datetime(datetime.fromtimestamp(second, UTC))
            self._second = second
        return self._text


def head_of(message: SpooledMessage) -> bytes:
    """
    The beginning of a message that holds its header section, up to
    ``HOP_SCAN`` bytes: a few KiB where the header is short, so that a large
    message is not copied to find it.
    """
    head = message.peek(HEAD_GUESS)
    if b"\r\n\r\n" in head or len(head) >= message.size:
        return head
    return message.peek(HOP_SCAN)


def has_own_results(head: bytes, size: int) -> bool:
    """
    Whether the header section at the beginning ``head`` of a message of
    ``size`` bytes may hold an ``Authentication-Results`` field (any, or a
    header section too long to tell), which must then be looked at whole.
    """
    end = head.find(b"\r\n\r\n")
    if end < 0 and len(head) < size:
        return True
    return b"authentication-results" in (head if end < 0 else head[:end]).lower()


def count_hops(content: bytes) -> int:
    """
    The number of ``Received:`` headers in the message's header section.
    """
    end = content.find(b"\r\n\r\n")
    header = content if end < 0 else content[: end + 2]
    return len(_RECEIVED.findall(header))


class SMTPServerProtocol(Protocol):
    """
    One inbound SMTP connection.
    """

    def __init__(self, server: SMTPServerFactory) -> None:
        self.server = server
        self.session = Session(peer_ip="")
        self.envelope: Envelope | None = None
        self._buffer = bytearray()
        self._data: _DataCollector | None = None
        self._chunk: _Chunk | None = None
        self._busy = False
        self._paused = False
        #: the connection ended while the session waited: its line is logged with the answer
        self._log_at_answer = False
        self._closing = False
        self._discarding_line = False
        self._timer: IDelayedCall | None = None
        self._reverse: Deferred[None] | None = None
        #: when the command line being read must be complete
        self._line_deadline: float | None = None
        #: when the message being read (DATA, or a BDAT transaction) began, and its bytes so far
        self._data_started: float | None = None
        self._data_bytes = 0
        #: replies held while input is handled, sent together when it runs out
        #: (RFC 2920: one write for a pipelined group); None: send each at once
        self._held: list[bytes] | None = None

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        host = client_ip(str(getattr(peer, "host", "unknown")))
        self.session = Session(peer_ip=host, started=self.server.clock.seconds())
        refusal = self.server.admit(self)
        if refusal is not None:
            self._close(refusal)
            return
        if self.server.reverse_names is not None:
            known = self.server.known_names(host) if self.server.known_names is not None else None
            if known is not None:
                self.session.rdns = known[0]
            else:
                self._reverse = Deferred.fromCoroutine(self._look_up_name(self.server.reverse_names))
        if self.server.filters is not None:
            self._wait_for(self._greeting(self.server.filters))
            return
        self._reply(self.server.banner, self.server.banner_bytes)
        self._expect_line()

    async def _look_up_name(self, reverse_names: Callable[[str], Awaitable[str | None]]) -> None:
        """
        The client's name for ``Received:``, looked up while it talks (the
        look-up has its own timeout and never fails).
        """
        try:
            self.session.rdns = await reverse_names(self.session.peer_ip)
        except Exception as e:
            log.debug("no reverse name for {peer}: {why}", peer=self.session.peer_ip, why=repr(e))

    def _banner(self) -> Reply:
        return self.server.banner

    async def _greeting(self, filters: FilterChains) -> Reply:
        return (await filters.default.connection(self.session.peer_ip)).reply or self._banner()

    def _client(self) -> Client:
        return Client(ip=self.session.peer_ip, helo=self.session.helo or "")

    def connectionLost(self, reason: Failure = _LOST) -> None:
        # the client left while its session waited (a session is read until
        # input comes): a commit under way still ends with its queue id, so
        # the session's line comes with the answer
        left_while_waiting = self._busy and not self._closing
        self._closing = True
        self._cancel_timer()
        self._discard_message()
        self.server.leave(self)
        if left_while_waiting:
            self._log_at_answer = True
            return
        self._log_end()

    def _queued(self, queue_id: str) -> None:
        """
        Note a message accepted, for the session's log line; a session that
        goes on and on logs its queue ids every ``QUEUE_IDS_PER_LINE``, so
        neither its memory nor a line grows without bound.
        """
        session = self.session
        session.queued.append(queue_id)
        session.queued_count += 1
        if len(session.queued) >= QUEUE_IDS_PER_LINE:
            log.info(
                "smtp session from {peer} ({helo}{tls}) goes on: queued {count} more [{queue_ids}]",
                **self._who(),
                count=len(session.queued),
                queue_ids=" ".join(session.queued),
            )
            session.queued = []

    def _who(self) -> dict[str, str]:
        """
        The fields that name a session in its log lines.
        """
        session = self.session
        return {"peer": session.peer_ip, "helo": session.helo or "no HELO", "tls": ", TLS" if session.tls else ""}

    def _log_end(self) -> None:
        session = self.session
        earlier = ""
        if session.queued_count > len(session.queued):
            earlier = "the earlier ones logged before" + ("; " if session.queued else "")
        log.info(
            "smtp session from {peer} ({helo}{tls}) ended after {seconds:.3f}s: "
            "queued {count} [{earlier}{queue_ids}], {errors} error(s), last reply {code}",
            **self._who(),
            seconds=self.server.clock.seconds() - session.started,
            count=session.queued_count,
            earlier=earlier,
            queue_ids=" ".join(session.queued),
            errors=session.errors,
            code=session.code,
        )

    def dataReceived(self, data: bytes) -> None:
        self._holding(self._receive, data)

    def _holding(self, handle: Callable[[_T], None], value: _T) -> None:
        """
        ``handle(value)`` with the replies it makes held and sent together
        after it (by the outermost such call, when they nest).
        """
        if self._held is not None:
            handle(value)
            return
        self._held = []
        try:
            handle(value)
        finally:
            self._flush()
            self._held = None

    def _receive(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        if self._busy:
            # input while the session waits: read no more until the answer
            self._pause()
            if len(self._buffer) > MAX_INPUT_WHILE_BUSY:
                self._close(Reply(421, "4.7.0", f"{self.server.hostname} Error: too much input while busy"))
            return
        self._drain()

    def _discard_message(self) -> None:
        """
        Drop a message being read (its spool file with it).
        """
        if self._data is not None:
            self._data.content.discard()
            self._data = None
        if self.envelope is not None:
            self.envelope.discard()

    # -- time limits ----------------------------------------------------------

    def _expect_line(self) -> None:
        """
        The next command line has ``command_timeout`` from now to arrive whole.
        """
        self._line_deadline = self.server.clock.seconds() + self.server.limits.command_timeout
        self._schedule()

    def _start_data_clock(self) -> None:
        if self._data_started is None:
            self._data_started = self.server.clock.seconds()
            self._data_bytes = 0
        self._schedule()

    def _stop_data_clock(self) -> None:
        self._data_started = None

    def _due(self) -> tuple[float, str] | None:
        """
        The earliest deadline that applies now, and what passing it means.
        """
        if self._busy or self._closing:
            return None
        limits = self.server.limits
        due: list[tuple[float, str]] = []
        if self._data is None and self._chunk is None and self._line_deadline is not None:
            due.append((self._line_deadline, "timeout exceeded"))
        started = self._data_started
        if started is not None:
            due.append((started + limits.data_timeout, "timeout exceeded"))
            if limits.min_data_rate > 0:
                earned = max(limits.data_rate_grace, self._data_bytes / limits.min_data_rate)
                due.append((started + earned, "data transfer too slow"))
        return min(due) if due else None

    def _schedule(self) -> None:
        """
        Have the timer go off at the earliest deadline (or before it: a
        deadline that moved later is found when the timer goes off).
        """
        due = self._due()
        if due is None:
            self._cancel_timer()
            return
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= due[0]:
                return
            timer.cancel()
        self._timer = self.server.clock.callLater(max(0.0, due[0] - self.server.clock.seconds()), self._check_time)

    def _check_time(self) -> None:
        self._timer = None
        due = self._due()
        if due is None:
            return
        if self.server.clock.seconds() >= due[0]:
            self._close(Reply(421, "4.4.2", f"{self.server.hostname} Error: {due[1]}"))
            return
        self._schedule()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _reply(self, reply: Reply, data: bytes | None = None) -> None:
        """
        Send ``reply`` (``data``: its bytes, when they are at hand), or hold
        it to be sent with the others of a pipelined group.
        """
        if not self._closing:
            self.session.code = reply.code
            if data is None:
                data = reply.encode()
            if self._held is None:
                send_now(self.transport, data)
            else:
                self._held.append(data)

    def _flush(self) -> None:
        """
        Send the replies held so far.
        """
        held = self._held
        if held:
            data = b"".join(held)
            held.clear()
            send_now(self.transport, data)

    def _close(self, reply: Reply) -> None:
        self._reply(reply)
        self._closing = True
        self._cancel_timer()
        self._discard_message()
        self._flush()
        self.transport.loseConnection()  # type: ignore[union-attr]

    @property
    def waiting(self) -> bool:
        """
        Whether the session waits for the store or the filters.
        """
        return self._busy

    def evict(self) -> None:
        """
        Give up this session's slot to a client from a less busy address.
        """
        self.server.leave(self)
        self._close(
            Reply(421, "4.7.0", f"{self.server.hostname} Error: too many connections from your address, try later")
        )

    def shut_down(self, force: bool = False) -> bool:
        """
        Close the session with ``421`` unless a message is in flight (or
        ``force``, once the grace period is over). Returns whether it closed.
        """
        if not force and (self._data is not None or self._chunk is not None or self._busy):
            return False
        self._close(Reply(421, "4.3.2", f"{self.server.hostname} Service shutting down"))
        return True

    # -- input --------------------------------------------------------------

    def _drain(self) -> None:
        """
        Handle buffered input until it runs out or a command waits for an
        answer (policy or store); pipelined commands stay buffered meanwhile.
        """
        max_line = self.server.limits.max_line_length
        while not self._busy and not self._closing:
            if self._data is not None:
                if not self._collect_data():
                    return
                continue
            if self._chunk is not None:
                if not self._collect_chunk():
                    return
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > max_line:
                    self._buffer.clear()
                    if not self._discarding_line:
                        self._discarding_line = True
                        self._error(LINE_TOO_LONG)
                return
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            # the next line's time starts now (the timer, set for an earlier
            # deadline, finds this one when it goes off)
            self._line_deadline = self.server.clock.seconds() + self.server.limits.command_timeout
            if self._discarding_line:
                self._discarding_line = False
                continue
            if len(line) > max_line:
                self._error(LINE_TOO_LONG)
                continue
            if self.server.limits.reject_bare_lf and not line.endswith(b"\r\n"):
                self._error(BARE_LF_COMMAND)
                continue
            self._line(line.rstrip(b"\r\n"))

    def _line(self, raw: bytes) -> None:
        if b"\0" in raw or b"\r" in raw:
            self._error(BAD_CHARACTERS)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(BAD_CHARACTERS)
            return
        verb, _, argument = line.partition(" ")
        handler = self._COMMANDS.get(verb.upper())
        if handler is None:
            self._error(UNRECOGNIZED)
            return
        result = handler(self, argument.strip(" "))
        if result is not None:
            self._wait_for(result)

    def _wait_for(self, work: Coroutine[Any, Any, Reply]) -> None:
        """
        Hold further input until ``work`` (a coroutine) yields the reply.

        The client is paused (read no more) when input is already waiting or
        once more arrives, not at once: most clients wait for the reply, most
        waits end within milliseconds, and pausing and resuming the transport
        around each (two ``epoll_ctl`` calls and the reactor's bookkeeping)
        cost more than the wait's own work.

        The time limit's timer is left as it is: while busy no deadline
        applies (``_due``), so if it goes off meanwhile it does nothing, and
        the next line's deadline is set once the reply is sent. Most waits
        end within milliseconds, and cancelling and setting a timer around
        each was a visible part of a session's cost.
        """
        self._busy = True

        def done(reply: Reply) -> None:
            self._holding(answered, reply)
            if self._log_at_answer and not self._busy:
                self._log_at_answer = False
                self._log_end()

        def answered(reply: Reply) -> None:
            self._busy = False
            if self._paused and not self._closing:
                self._paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            if reply.code == 421:
                self._close(reply)
                return
            if reply.code >= 500 or reply.code == 452:
                self._error(reply)
            else:
                self._reply(reply)
            if not self._closing:
                self._expect_line()
                self._drain()

        def failed(failure: Failure) -> None:
            log.failure("unexpected error in SMTP session from {peer}", failure, peer=self.session.peer_ip)
            done(STORE_FAILED)

        Deferred.fromCoroutine(work).addCallbacks(done, failed)
        if self._busy and self._buffer:
            # still waiting, with pipelined input: read nothing more until the answer
            self._pause()

    def _pause(self) -> None:
        if not self._paused and not self._closing:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _error(self, reply: Reply) -> None:
        """
        Send an error reply, and end a session that has made too many.
        """
        self.session.errors += 1
        self._reply(reply)
        if self.session.errors >= self.server.limits.max_errors:
            self._close(Reply(421, "4.7.0", f"{self.server.hostname} Error: too many errors"))

    # -- commands -----------------------------------------------------------

    def do_HELO(self, argument: str) -> None:
        self._greet(argument, esmtp=False)

    def do_EHLO(self, argument: str) -> None:
        self._greet(argument, esmtp=True)

    def _greet(self, argument: str, esmtp: bool) -> None:
        name = argument.split(" ")[0]
        if not name:
            self._error(Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
            return
        # as Postfix does: control characters never reach Received: or the logs
        self.session.helo = printable(name)
        self.session.esmtp = esmtp
        self._drop_envelope()
        if not esmtp:
            self._reply(Reply(250, "", self.server.hostname))
            return
        self._reply(*self.server.ehlo_reply(starttls=self.server.tls is not None and not self.session.tls))

    def do_MAIL(self, argument: str) -> Coroutine[Any, Any, Reply] | None:
        if self.session.helo is None:
            self._error(BAD_SEQUENCE_HELO)
            return None
        if self.envelope is not None:
            self._error(BAD_SEQUENCE_NESTED)
            return None
        try:
            path = parse_path(argument, "FROM:", allow_null=True)
        except AddressError as e:
            self._error(Reply(501, "5.1.7", f"Error: bad sender address syntax ({e})"))
            return None
        params = path.params if self.session.esmtp else {}
        if path.params and not self.session.esmtp:
            self._error(Reply(555, "5.5.4", "Error: parameters need EHLO"))
            return None
        dsn = NO_DSN
        for name, value in params.items():
            if name in ("RET", "ENVID"):
                try:
                    dsn = _mail_dsn(dsn, name, value)
                except ValueError as e:
                    self._error(Reply(501, "5.5.4", f"Error: {e}"))
                    return None
            elif name == "SIZE":
                if value is None or not value.isdigit():
                    self._error(Reply(501, "5.5.4", "Error: bad SIZE parameter"))
                    return None
                if int(value) > self.server.limits.max_message_size:
                    self._error(TOO_BIG)
                    return None
            elif name == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self._error(Reply(501, "5.5.4", "Error: bad BODY parameter"))
                    return None
            elif name == "SMTPUTF8":
                if value is not None:
                    self._error(Reply(501, "5.5.4", "Error: SMTPUTF8 takes no value"))
                    return None
            else:
                self._error(Reply(555, "5.5.4", f"Error: unsupported parameter {name}"))
                return None
        room = self.server.room(None, int(params.get("SIZE") or 0)) if self.server.room is not None else None
        if room is not None:
            self._reply(room)  # the queue is full: temporary, and not the client's error
            return None
        envelope = Envelope(sender=path, utf8="SMTPUTF8" in params, dsn=dsn)
        if self.server.filters is not None:
            return self._mail_checked(self.server.filters, envelope)
        self.envelope = envelope
        self._reply(MAIL_OK)
        return None

    async def _mail_checked(self, filters: FilterChains, envelope: Envelope) -> Reply:
        decision = await filters.default.mail(self._client(), str(envelope.sender))
        if decision.reply is not None:
            return decision.reply
        envelope.add_headers(decision.headers)
        self.envelope = envelope
        return MAIL_OK

    def do_RCPT(self, argument: str) -> Coroutine[Any, Any, Reply] | None:
        envelope = self.envelope
        if envelope is None:
            self._error(BAD_SEQUENCE_MAIL)
            return None
        postmaster = _bare_postmaster(argument)
        if postmaster is not None:
            return self._postmaster(envelope, postmaster)
        try:
            path = parse_path(argument, "TO:", allow_null=False, utf8=envelope.utf8)
        except AddressError as e:
            self._error(Reply(501, "5.1.3", f"Error: bad recipient address syntax ({e})"))
            return None
        if path.params and not self.session.esmtp:
            self._error(Reply(555, "5.5.4", "Error: parameters need EHLO"))
            return None
        try:
            rcpt_dsn = _rcpt_dsn(path.params)
        except ValueError as e:
            self._error(Reply(501, "5.5.4", f"Error: {e}"))
            return None
        except KeyError as e:
            self._error(Reply(555, "5.5.4", f"Error: unsupported RCPT parameter {e.args[0]}"))
            return None
        if path.route:
            # RFC 5321 3.6.1 lets a server decline source routes; a primary
            # that honoured one would relay to a host the sender chose
            envelope.rejected += 1
            self._error(SOURCE_ROUTE)
            return None
        if self._too_many(envelope):
            return None
        mailbox = path.mailbox
        assert mailbox is not None
        room = self.server.room(mailbox.domain, 0) if self.server.room is not None else None
        if room is not None:
            self._reply(room)
            return None
        if rcpt_dsn is not None:
            # kept for the recipient only if it is accepted (message_dsn)
            envelope.rcpt_dsn.setdefault(mailbox, rcpt_dsn)
        return self._check_recipient(envelope, mailbox)

    def _too_many(self, envelope: Envelope) -> bool:
        """
        Answer ``452 4.5.3`` past ``max_recipients``; like Postfix, not an
        error (the sender retries the rest later) until the overshoot is absurd.
        """
        if len(envelope.recipients) < self.server.limits.max_recipients:
            return False
        envelope.overshoot += 1
        if envelope.overshoot > RECIPIENT_OVERSHOOT:
            self._error(TOO_MANY_RECIPIENTS)
        else:
            self._reply(TOO_MANY_RECIPIENTS)
        return True

    def _postmaster(self, envelope: Envelope, params: str) -> Coroutine[Any, Any, Reply] | None:
        """
        ``RCPT TO:<Postmaster>`` without a domain, which RFC 5321 4.5.1 says
        MUST be accepted: postmaster of the primary domain (the first one
        configured), accepted whatever that domain's recipient rule says.
        """
        if params:
            self._error(Reply(555, "5.5.4", "Error: unsupported RCPT parameter"))
            return None
        domain = self.server.postmaster_domain
        if domain is None:
            self._error(Reply(550, "5.1.1", "Error: no postmaster here"))
            return None
        if self._too_many(envelope):
            return None
        return self._check_recipient(envelope, Mailbox("postmaster", domain), postmaster=True)

    async def _check_recipient(self, envelope: Envelope, mailbox: Mailbox, postmaster: bool = False) -> Reply:
        verdict = POSTMASTER_OK if postmaster else await self.server.policy.check(mailbox)
        filters = self.server.filters
        if verdict.positive and filters is not None:
            chain = filters.for_recipient(mailbox)
            decision = await chain.recipient(self._client(), str(envelope.sender), mailbox)
            if decision.reply is None:
                envelope.add_headers(decision.headers)
            verdict = decision.reply or verdict
        if verdict.positive:
            if mailbox not in envelope.recipients:
                envelope.recipients.append(mailbox)
        else:
            envelope.rejected += 1
            self.server.metrics.refuse(verdict.code)
            log.info(
                "recipient {rcpt} from {peer} rejected: {code} {reply}",
                rcpt=str(mailbox),
                peer=self.session.peer_ip,
                code=verdict.code,
                reply=verdict.text,
            )
        return verdict

    def do_DATA(self, argument: str) -> None:
        envelope = self.envelope
        if envelope is None:
            self._error(BAD_SEQUENCE_MAIL)
            return
        if not envelope.recipients:
            self._error(NO_VALID_RECIPIENTS if envelope.rejected else BAD_SEQUENCE_RCPT)
            return
        if argument:
            self._error(Reply(501, "5.5.4", "Error: DATA takes no argument"))
            return
        if envelope.chunks is not None:
            self._error(Reply(503, "5.5.1", "Error: DATA after BDAT"))
            return
        self._data = _DataCollector(self._new_content())
        self._reply(START_DATA)
        self._start_data_clock()

    def _new_content(self) -> _Content:
        limits = self.server.limits
        return _Content(self.server.spool.new(), limits.max_message_size, normalize=not limits.reject_bare_lf)

    def _collect_data(self) -> bool:
        """
        Move buffered input into the message; at the end marker, hand the
        message on and return ``True`` so the rest is read as commands.
        """
        data = self._data
        assert data is not None
        data.pending += self._buffer
        self._data_bytes += len(self._buffer)
        self._buffer.clear()
        end = data.pending.find(_END)
        if end < 0:
            cut = data.safe_cut()
            if cut > 0:
                data.take(cut)
            return False
        self._buffer = data.pending[end + len(_END) :]
        data.take(end + 2)
        self._data = None
        self._stop_data_clock()
        self._wait_for(self._end_of_data(data.content))
        return True

    async def _end_of_data(self, content: _Content) -> Reply:
        envelope = self.envelope
        assert envelope is not None
        self.envelope = None
        message = content.message
        try:
            content.finish()
            if content.overflow:
                return TOO_BIG
            if content.nul:
                return NUL_IN_MESSAGE
            if content.bare_lf and not content.normalize:
                return BARE_LF
            head = head_of(message)
            if count_hops(head) >= self.server.limits.max_hops:
                return TOO_MANY_HOPS
            if not message.spooled:
                return await self._commit(envelope, message, head)
            # a spooled message is read back whole for the store: a few at a time
            async with self.server.spool.read_back(message.size):
                return await self._commit(envelope, message, head)
        finally:
            message.discard()

    async def _commit(self, envelope: Envelope, message: SpooledMessage, head: bytes) -> Reply:
        """
        Filter and store the message (``head``: its beginning, with the
        header section); the reply to its end.

        The body stored is the message after our header lines, copied once
        from where it was received (a 100 KiB message is not copied again on
        its way to the store), unless a content filter wants it or its header
        claims Authentication-Results, which is then edited.
        """
        if self._closing:
            # the client is gone (or timed out) while the message waited: it
            # never sees a 250, so it sends again; storing this copy would
            # deliver the message twice
            return STORE_FAILED
        factory = self.server
        content: bytes | None = None
        if has_own_results(head, message.size):
            # RFC 8601 5: results claiming our authserv-id are forgeries
            content = strip_authentication_results(message.read(), factory.hostname)
        if self._reverse is not None:
            reverse, self._reverse = self._reverse, None
            await reverse
        now = factory.clock.seconds()
        queue_id = factory.new_queue_id()
        header = self._received_header(envelope, queue_id, now)
        if factory.filters is not None and factory.filters.scans_content:
            if content is None:
                content = message.read()
            refusal = await self._check_message(factory.filters, envelope, header + content)
            if refusal is not None:
                return refusal
        if envelope.headers:
            # trace fields of this hop above its Received: (RFC 7208 9.1), as
            # Postfix places a policy service's PREPEND; others (a spam score) below
            trace = [line for line in envelope.headers if _is_trace(line)]
            other = [line for line in envelope.headers if not _is_trace(line)]
            header = "".join(f"{line}\r\n" for line in trace).encode() + header
            header += "".join(f"{line}\r\n" for line in other).encode()
        incoming = IncomingMessage(
            queue_id=queue_id,
            sender=str(envelope.sender),
            recipients=tuple(envelope.recipients),
            received_at=now,
            body=message.after(header) if content is None else header + content,
            dsn=envelope.message_dsn(),
        )
        del content
        if factory.room is not None:
            for domain in incoming.by_domain():
                room = factory.room(domain, len(incoming.body))
                if room is not None:
                    return room
        try:
            await factory.store.enqueue(incoming)
        except StoreUnavailable as e:
            log.error("message {queue_id} not stored: {why}", queue_id=queue_id, why=str(e), code=451)
            return STORE_FAILED
        # logged with the session's line: one log event per message costs
        # more than the rest of accepting it
        self._queued(queue_id)
        self.server.metrics.accepted.inc()
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    async def _check_message(self, filters: FilterChains, envelope: Envelope, content: bytes) -> Reply | None:
        """
        The end-of-DATA filters (a content scanner): a refusal, or ``None``
        with their header lines added to the envelope's.
        """
        decision = await filters.message(self._client(), str(envelope.sender), envelope.recipients, content)
        if decision.reply is None:
            envelope.add_headers(decision.headers)
            return None
        self.server.metrics.refuse(decision.reply.code)
        log.info(
            "message from {peer} refused after DATA: {code} {reply}",
            peer=self.session.peer_ip,
            code=decision.reply.code,
            reply=decision.reply.text,
        )
        return decision.reply

    def _received_header(self, envelope: Envelope, queue_id: str, now: float) -> bytes:
        protocol = ("UTF8SMTP" if envelope.utf8 else "ESMTP") if self.session.esmtp else "SMTP"
        tls = ""
        if self.session.tls:
            protocol += "S"
            handle = self.transport.getHandle()  # type: ignore[union-attr]
            version, _, cipher = (describe(handle) or "TLS:unknown").partition(":")
            tls = f"\r\n\t(using {version} with cipher {cipher})"
        helo = self.session.helo or "unknown"
        rdns = f"{self.session.rdns} " if self.session.rdns else ""
        stamp = self.server.date_stamp(now)
        recipient = f"\r\n\tfor <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
        return (
            f"Received: from {helo} ({rdns}[{self.session.peer_ip}]){tls}\r\n"
            f"\tby {self.server.hostname} (relayx) with {protocol} id {queue_id}"
            f"{recipient}; {stamp}\r\n"
        ).encode()

    def do_STARTTLS(self, argument: str) -> None:
        tls = self.server.tls
        if tls is None:
            self._error(NOT_IMPLEMENTED)
        elif self.session.tls:
            self._error(Reply(503, "5.5.1", "Error: TLS already active"))
        elif argument:
            self._error(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        elif self.envelope is not None:
            self._error(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
        else:
            self._reply(Reply(220, "2.0.0", "Ready to start TLS"))
            self._flush()  # in the clear, before the handshake
            # anything pipelined after STARTTLS was sent in the clear: drop it
            self._buffer.clear()
            self.transport.startTLS(tls.options())  # type: ignore[union-attr]
            self.session.tls = True
            self.session.helo = None
            self.session.esmtp = False

    def do_BDAT(self, argument: str) -> None:
        words = argument.split(" ")
        if not (words[0].isdigit() and (words[1:] == [] or [w.upper() for w in words[1:]] == ["LAST"])):
            # the size is unknown, so the chunk cannot be skipped: end the session
            self._close(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
            return
        envelope = self.envelope
        error = None
        if envelope is None:
            error = BAD_SEQUENCE_MAIL
        elif not envelope.recipients:
            error = NO_VALID_RECIPIENTS if envelope.rejected else BAD_SEQUENCE_RCPT
        self._chunk = _Chunk(remaining=int(words[0]), last=len(words) == 2, error=error)
        # the transaction's chunks share one clock, from the first to the last
        self._start_data_clock()

    def _collect_chunk(self) -> bool:
        """
        Move buffered input into the BDAT chunk; when it is complete, answer
        it and return ``True`` so the rest is read as commands.
        """
        chunk = self._chunk
        assert chunk is not None
        piece = bytes(self._buffer[: chunk.remaining])
        del self._buffer[: chunk.remaining]
        chunk.remaining -= len(piece)
        self._data_bytes += len(piece)
        envelope = self.envelope
        if chunk.error is None and envelope is not None:
            if envelope.chunks is None:
                envelope.chunks = self._new_content()
            envelope.chunks.feed(piece)
        if chunk.remaining:
            return False
        self._chunk = None
        if chunk.error is not None:
            self._stop_data_clock()
            self._error(chunk.error)
        elif envelope is not None and chunk.last:
            content = envelope.chunks or self._new_content()
            envelope.chunks = None
            self._stop_data_clock()
            self._wait_for(self._end_of_data(content))
            return True
        elif envelope is not None:
            self._reply(Reply(250, "2.0.0", f"{envelope.chunks.octets if envelope.chunks else 0} octets received"))
        if not self._closing:
            self._expect_line()
        return True

    def do_RSET(self, argument: str) -> None:
        if argument:
            self._error(Reply(501, "5.5.4", "Syntax: RSET"))
            return
        self._drop_envelope()
        self._reply(OK)

    def _drop_envelope(self) -> None:
        if self.envelope is not None:
            self.envelope.discard()
            self.envelope = None
        self._stop_data_clock()

    def do_NOOP(self, argument: str) -> None:
        self._reply(OK)

    def do_QUIT(self, argument: str) -> None:
        self._close(Reply(221, "2.0.0", "Bye"))

    def do_VRFY(self, argument: str) -> None:
        if not argument:
            self._error(Reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        self._reply(Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery"))

    def do_HELP(self, argument: str) -> None:
        self._reply(Reply(214, "2.0.0", "See RFC 5321"))

    def do_not_implemented(self, argument: str) -> None:
        self._error(NOT_IMPLEMENTED)

    _COMMANDS: ClassVar[dict[str, Callable[[SMTPServerProtocol, str], Coroutine[Any, Any, Reply] | None]]] = {
        "HELO": do_HELO,
        "EHLO": do_EHLO,
        "MAIL": do_MAIL,
        "RCPT": do_RCPT,
        "DATA": do_DATA,
        "RSET": do_RSET,
        "NOOP": do_NOOP,
        "QUIT": do_QUIT,
        "VRFY": do_VRFY,
        "HELP": do_HELP,
        "EXPN": do_not_implemented,
        "STARTTLS": do_STARTTLS,
        "AUTH": do_not_implemented,
        "BDAT": do_BDAT,
        "TURN": do_not_implemented,
        "ETRN": do_not_implemented,
    }


class SMTPServerFactory(ServerFactory):
    """
    Builds one ``SMTPServerProtocol`` per connection, sharing the policy,
    the store and the clock.
    """

    noisy = False

    def __init__(
        self,
        *,
        hostname: str,
        limits: Limits,
        policy: IRecipientPolicy,
        store: IMessageStore,
        clock: IReactorTime,
        new_queue_id: Callable[[], str],
        tls: ReloadingTLS | None = None,
        filters: FilterChains | None = None,
        metrics: Metrics | None = None,
        postmaster_domain: str | None = None,
        reverse_names: Callable[[str], Awaitable[str | None]] | None = None,
        known_names: Callable[[str], tuple[str | None] | None] | None = None,
        spool: Spool | None = None,
        room: Callable[[str | None, int], Reply | None] | None = None,
    ) -> None:
        self.hostname = normalize_domain(hostname) if "." in hostname else hostname
        #: the queue's quotas: a refusal (452 4.3.1) for a domain (None: any) and size, or None
        self.room = room
        self.limits = limits
        self.policy = policy
        self.store = store
        self.clock = clock
        self.new_queue_id = new_queue_id
        self.tls = tls
        self.filters = filters
        #: where ``RCPT TO:<Postmaster>`` (no domain) goes: the primary domain
        self.postmaster_domain = postmaster_domain
        #: the client's forward-confirmed reverse name, for Received:
        self.reverse_names = reverse_names
        #: the name already known for an address (a 1-tuple), or None when it must be looked up
        self.known_names = known_names
        self.metrics = metrics or Metrics()
        #: where messages too big to hold in memory go while they come in
        self.spool = spool or Spool(None)
        #: the dates of Received: headers, formatted once a second
        self.date_stamp = DateStamps()
        self.banner = Reply(220, "", f"{self.hostname} ESMTP relayx")
        self.banner_bytes = self.banner.encode()
        self._ehlo: dict[tuple[str, int, bool], tuple[Reply, bytes]] = {}
        self.sessions: set[SMTPServerProtocol] = set()
        self.per_ip: dict[str, set[SMTPServerProtocol]] = {}
        self.stopping = False

    def ehlo_reply(self, starttls: bool) -> tuple[Reply, bytes]:
        """
        The reply to EHLO, listing STARTTLS if ``starttls``, and its bytes:
        built once (for the hostname and size limit of the time), not for
        every session.
        """
        key = (self.hostname, self.limits.max_message_size, starttls)
        found = self._ehlo.get(key)
        if found is None:
            lines = [
                self.hostname,
                "PIPELINING",
                f"SIZE {self.limits.max_message_size}",
                "8BITMIME",
                "SMTPUTF8",
                "ENHANCEDSTATUSCODES",
                "CHUNKING",
                "DSN",
            ]
            if starttls:
                lines.append("STARTTLS")
            reply = Reply(250, "", "\n".join(lines))
            found = self._ehlo[key] = (reply, reply.encode())
        return found

    def buildProtocol(self, addr: IAddress | None) -> SMTPServerProtocol:
        protocol = SMTPServerProtocol(self)
        protocol.factory = self
        return protocol

    def admit(self, session: SMTPServerProtocol) -> Reply | None:
        """
        Count a new session in, or say why it is refused.
        """
        ip = session.session.peer_ip
        if self.stopping:
            return Reply(421, "4.3.2", f"{self.hostname} Service shutting down")
        mine = len(self.per_ip.get(ip, ()))
        if mine >= self.limits.max_connections_per_ip:
            return Reply(421, "4.7.0", f"{self.hostname} Error: too many connections from {ip}")
        if len(self.sessions) >= self.limits.max_connections:
            victim = self._crowding(mine)
            if victim is None:
                return Reply(421, "4.7.0", f"{self.hostname} Error: too many connections")
            log.info(
                "smtp session from {victim} closed to let {peer} in: all {count} slots taken",
                victim=victim.session.peer_ip,
                peer=ip,
                count=len(self.sessions),
            )
            victim.evict()
        self.sessions.add(session)
        self.per_ip.setdefault(ip, set()).add(session)
        self.metrics.sessions.inc()
        return None

    def _crowding(self, mine: int) -> SMTPServerProtocol | None:
        """
        When every slot is taken: the oldest idle session of the address
        holding the most, if it holds at least two more than the newcomer's
        address (so that a few addresses cannot keep all others out).
        """
        busiest = max(self.per_ip.values(), key=len, default=set())
        if len(busiest) < mine + 2:
            return None
        idle = [s for s in busiest if not s.waiting]
        return min(idle, key=lambda s: s.session.started, default=None)

    def leave(self, session: SMTPServerProtocol) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            ip = session.session.peer_ip
            held = self.per_ip[ip]
            held.discard(session)
            if not held:
                del self.per_ip[ip]

    def shut_down(self) -> list[SMTPServerProtocol]:
        """
        Refuse new sessions and close idle ones; returns those still busy
        with a message, which the caller gives a grace period.
        """
        self.stopping = True
        return [session for session in list(self.sessions) if not session.shut_down()]


_NOTIFY_KEYWORDS = {n.value: n for n in Notify}
_ENVID_MAX = 100  # RFC 3461 4.4: at most 100 characters, counting xtext


def _mail_dsn(dsn: MessageDsn, name: str, value: str | None) -> MessageDsn:
    """
    ``dsn`` with MAIL's ``RET=`` or ``ENVID=`` (RFC 3461 4.3, 4.4) added;
    ``ValueError`` naming the fault for a malformed value.
    """
    if name == "RET":
        try:
            return attrs.evolve(dsn, ret=Ret((value or "").upper()))
        except ValueError:
            raise ValueError("RET must be FULL or HDRS") from None
    if not value or len(value) > _ENVID_MAX:
        raise ValueError(f"ENVID must be 1 to {_ENVID_MAX} characters of xtext")
    try:
        envid = xtext_decode(value)
    except AddressError as e:
        raise ValueError(f"bad ENVID ({e})") from None
    if not envid.isprintable():
        raise ValueError("bad ENVID (control characters)")
    return attrs.evolve(dsn, envid=envid)


def _rcpt_dsn(params: dict[str, str | None]) -> RecipientDsn | None:
    """
    RCPT's ``NOTIFY=`` and ``ORCPT=`` (RFC 3461 4.1, 4.2), ``None`` when
    neither is given. ``ValueError`` for a malformed value, ``KeyError``
    (the name) for any other parameter.
    """
    if not params:
        return None
    notify: frozenset[Notify] | None = None
    orcpt: str | None = None
    for name, value in params.items():
        if name == "NOTIFY":
            words = (value or "").upper().split(",")
            if not all(w in _NOTIFY_KEYWORDS for w in words):
                raise ValueError("NOTIFY must be NEVER, or SUCCESS, FAILURE and DELAY separated by commas")
            notify = frozenset(_NOTIFY_KEYWORDS[w] for w in words)
            if (Notify.NEVER in notify and len(notify) > 1) or len(words) != len(notify):
                raise ValueError("NOTIFY=NEVER stands alone, and each keyword once")
        elif name == "ORCPT":
            addr_type, semicolon, encoded = (value or "").partition(";")
            if not semicolon or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", addr_type) or not encoded:
                raise ValueError("ORCPT must be addr-type;xtext, such as rfc822;user@example.org")
            if len(value or "") > 500:
                raise ValueError("ORCPT is too long")
            try:
                original = xtext_decode(encoded)
            except AddressError as e:
                raise ValueError(f"bad ORCPT ({e})") from None
            if not original.isprintable():
                raise ValueError("bad ORCPT (control characters)")
            orcpt = f"{addr_type.lower()};{original}"
        else:
            raise KeyError(name)
    return RecipientDsn(notify=notify, orcpt=orcpt)
