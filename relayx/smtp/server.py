"""
The inbound SMTP protocol (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
SMTPUTF8 and ENHANCEDSTATUSCODES).

It parses commands and sends replies; whether a recipient is accepted is the
policy's verdict, and the ``250`` to DATA is sent only once the store has
committed the message. Any failure not known to be permanent is answered
``451``: a backup MX that answers ``5xx`` during a Redis hiccup makes senders
bounce mail that could have waited.

DATA is collected in bulk (one ``find`` per network read, not one Python call
per line), which is where an SMTP server spends its time.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import ClassVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayx.address import AddressError, Mailbox, Path, normalize_domain, parse_path
from relayx.checks.chain import Client, FilterChains, add_lines
from relayx.interfaces import IMessageStore, IncomingMessage, IRecipientPolicy, StoreUnavailable
from relayx.metrics import Metrics
from relayx.reply import Reply
from relayx.smtp.tls import ReloadingTLS, describe

log = Logger()

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


@attrs.define
class Session:
    """
    Per connection: who is talking and how it has behaved.
    """

    peer_ip: str
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    errors: int = 0
    started: float = 0.0
    #: the last reply code sent (how the session ended, for its log line)
    code: int = 0
    #: the queue ids of the messages accepted in this session
    queued: list[str] = attrs.field(factory=list)


@attrs.define
class Envelope:
    """
    Per transaction, from MAIL to the end of DATA or RSET.
    """

    sender: Path
    utf8: bool
    recipients: list[Mailbox] = attrs.field(factory=list)
    rejected: int = 0
    #: the message so far when it comes in BDAT chunks (RFC 3030)
    chunks: bytearray | None = None
    overflow: bool = False
    #: header lines the filters asked for (an SPF result, a spam score)
    headers: list[str] = attrs.field(factory=list)

    def add_headers(self, lines: tuple[str, ...]) -> None:
        add_lines(self.headers, lines)


@attrs.define
class _Chunk:
    """
    A BDAT chunk being read: bytes still to come, whether it is the last,
    and the error to answer once it is read, if the command was refused.
    """

    remaining: int
    last: bool
    error: Reply | None


@attrs.define
class _DataCollector:
    """
    The DATA phase: bytes so far (prefixed with CRLF so that the end marker
    and dot-stuffing are found the same way on the first line) and how far
    they have been searched for the end marker.
    """

    limit: int
    buffer: bytearray = attrs.field(factory=lambda: bytearray(b"\r\n"))
    searched: int = 0
    overflow: bool = False


_END = b"\r\n.\r\n"
_LOST = Failure(ConnectionError("connection lost"))
_BARE_LF = re.compile(rb"(?<!\r)\n")
_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


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
        self._closing = False
        self._discarding_line = False
        self._timer: IDelayedCall | None = None

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        self.session = Session(peer_ip=str(getattr(peer, "host", "unknown")), started=self.server.clock.seconds())
        refusal = self.server.admit(self)
        if refusal is not None:
            self._close(refusal)
            return
        if self.server.filters is not None:
            self._wait_for(self._greeting(self.server.filters))
            return
        self._reply(self._banner())
        self._arm_timer(self.server.limits.command_timeout)

    def _banner(self) -> Reply:
        return Reply(220, "", f"{self.server.hostname} ESMTP relayx")

    async def _greeting(self, filters: FilterChains) -> Reply:
        return (await filters.default.connection(self.session.peer_ip)).reply or self._banner()

    def _client(self) -> Client:
        return Client(ip=self.session.peer_ip, helo=self.session.helo or "")

    def connectionLost(self, reason: Failure = _LOST) -> None:
        self._closing = True
        self._cancel_timer()
        self.server.leave(self)
        session = self.session
        log.info(
            "smtp session from {peer} ({helo}{tls}) ended after {seconds:.3f}s: "
            "queued {count} [{queue_ids}], {errors} error(s), last reply {code}",
            peer=session.peer_ip,
            helo=session.helo or "no HELO",
            tls=", TLS" if session.tls else "",
            seconds=self.server.clock.seconds() - session.started,
            count=len(session.queued),
            queue_ids=" ".join(session.queued),
            errors=session.errors,
            code=session.code,
        )

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        if not self._busy:
            self._arm_timer(self._current_timeout())
        self._drain()

    def _current_timeout(self) -> float:
        limits = self.server.limits
        reading = self._data is not None or self._chunk is not None
        return limits.data_timeout if reading else limits.command_timeout

    def _arm_timer(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self.server.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._close(Reply(421, "4.4.2", f"{self.server.hostname} Error: timeout exceeded"))

    def _reply(self, reply: Reply) -> None:
        if not self._closing:
            self.session.code = reply.code
            self.transport.write(reply.encode())  # type: ignore[union-attr]

    def _close(self, reply: Reply) -> None:
        self._reply(reply)
        self._closing = True
        self._cancel_timer()
        self.transport.loseConnection()  # type: ignore[union-attr]

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

    def _wait_for(self, work: Awaitable[Reply]) -> None:
        """
        Hold further input until ``work`` (a coroutine) yields the reply.
        """
        self._busy = True
        self._cancel_timer()

        async def run() -> Reply:
            return await work

        def done(reply: Reply) -> None:
            self._busy = False
            if reply.code == 421:
                self._close(reply)
                return
            if reply.code >= 500 or reply.code == 452:
                self._error(reply)
            else:
                self._reply(reply)
            if not self._closing:
                self._arm_timer(self._current_timeout())
                self._drain()

        def failed(failure: Failure) -> None:
            log.failure("unexpected error in SMTP session from {peer}", failure, peer=self.session.peer_ip)
            done(STORE_FAILED)

        Deferred.fromCoroutine(run()).addCallbacks(done, failed)

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
        self.session.helo = name
        self.session.esmtp = esmtp
        self.envelope = None
        hostname = self.server.hostname
        if not esmtp:
            self._reply(Reply(250, "", hostname))
            return
        limits = self.server.limits
        lines = [
            hostname,
            "PIPELINING",
            f"SIZE {limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        if self.server.tls is not None and not self.session.tls:
            lines.append("STARTTLS")
        self._reply(Reply(250, "", "\n".join(lines)))

    def do_MAIL(self, argument: str) -> Awaitable[Reply] | None:
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
        for name, value in params.items():
            if name == "SIZE":
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
        envelope = Envelope(sender=path, utf8="SMTPUTF8" in params)
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

    def do_RCPT(self, argument: str) -> Awaitable[Reply] | None:
        envelope = self.envelope
        if envelope is None:
            self._error(BAD_SEQUENCE_MAIL)
            return None
        try:
            path = parse_path(argument, "TO:", allow_null=False, utf8=envelope.utf8)
        except AddressError as e:
            self._error(Reply(501, "5.1.3", f"Error: bad recipient address syntax ({e})"))
            return None
        if path.params:
            self._error(Reply(555, "5.5.4", "Error: unsupported RCPT parameter"))
            return None
        if len(envelope.recipients) >= self.server.limits.max_recipients:
            self._error(TOO_MANY_RECIPIENTS)
            return None
        mailbox = path.mailbox
        assert mailbox is not None
        return self._check_recipient(envelope, mailbox)

    async def _check_recipient(self, envelope: Envelope, mailbox: Mailbox) -> Reply:
        verdict = await self.server.policy.check(mailbox)
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
        self._data = _DataCollector(limit=self.server.limits.max_message_size)
        self._reply(START_DATA)
        self._arm_timer(self.server.limits.data_timeout)

    def _collect_data(self) -> bool:
        """
        Move buffered input into the message; at the end marker, hand the
        message on and return ``True`` so the rest is read as commands.
        """
        data = self._data
        assert data is not None
        data.buffer += self._buffer
        self._buffer.clear()
        end = data.buffer.find(_END, data.searched)
        if end < 0:
            data.searched = max(0, len(data.buffer) - len(_END) + 1)
            if len(data.buffer) - 2 > data.limit:
                # too big: keep only what may begin the end marker (not the
                # CRLF prefix, which would make a false one) and scan on
                data.overflow = True
                del data.buffer[: len(data.buffer) - (len(_END) - 1)]
                data.searched = 0
            return False
        self._buffer = data.buffer[end + len(_END) :]
        overflow = data.overflow or end > data.limit
        content = b"" if overflow else bytes(data.buffer[: end + 2]).replace(b"\r\n.", b"\r\n")[2:]
        self._data = None
        self._wait_for(self._end_of_data(content, overflow))
        return True

    async def _end_of_data(self, content: bytes, overflow: bool) -> Reply:
        envelope = self.envelope
        assert envelope is not None
        self.envelope = None
        if overflow:
            return TOO_BIG
        if b"\0" in content:
            return NUL_IN_MESSAGE
        # two C-level counts: a regular expression here cost more than all
        # the rest of accepting a 100 KiB message
        if content.count(b"\n") != content.count(b"\r\n"):
            # RFC 5321 2.3.8: a client must not send a bare LF. Postfix's
            # default is to normalise; refusing is the operator's choice
            if self.server.limits.reject_bare_lf:
                return BARE_LF
            content = _BARE_LF.sub(b"\r\n", content)
        if count_hops(content) >= self.server.limits.max_hops:
            return TOO_MANY_HOPS
        factory = self.server
        now = factory.clock.seconds()
        queue_id = factory.new_queue_id()
        header = self._received_header(envelope, queue_id, now)
        if factory.filters is not None and factory.filters.scans_content:
            refusal = await self._check_message(factory.filters, envelope, header + content)
            if refusal is not None:
                return refusal
        if envelope.headers:
            header += "".join(f"{line}\r\n" for line in envelope.headers).encode()
        message = IncomingMessage(
            queue_id=queue_id,
            sender=str(envelope.sender),
            recipients=tuple(envelope.recipients),
            received_at=now,
            body=header + content,
        )
        try:
            await factory.store.enqueue(message)
        except StoreUnavailable as e:
            log.error("message {queue_id} not stored: {why}", queue_id=queue_id, why=str(e), code=451)
            return STORE_FAILED
        # logged with the session's line: one log event per message costs
        # more than the rest of accepting it
        self.session.queued.append(queue_id)
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
        stamp = format_datetime(datetime.fromtimestamp(now, UTC))
        recipient = f"\r\n\tfor <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
        return (
            f"Received: from {helo} ([{self.session.peer_ip}]){tls}\r\n"
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
        self._arm_timer(self.server.limits.data_timeout)

    def _collect_chunk(self) -> bool:
        """
        Move buffered input into the BDAT chunk; when it is complete, answer
        it and return ``True`` so the rest is read as commands.
        """
        chunk = self._chunk
        assert chunk is not None
        piece = self._buffer[: chunk.remaining]
        del self._buffer[: chunk.remaining]
        chunk.remaining -= len(piece)
        envelope = self.envelope
        if chunk.error is None and envelope is not None:
            if envelope.chunks is None:
                envelope.chunks = bytearray()
            if len(envelope.chunks) + len(piece) > self.server.limits.max_message_size:
                envelope.overflow = True
                envelope.chunks.clear()
            elif not envelope.overflow:
                envelope.chunks += piece
        if chunk.remaining:
            return False
        self._chunk = None
        if chunk.error is not None:
            self._error(chunk.error)
        elif envelope is not None and chunk.last:
            content = bytes(envelope.chunks or b"")
            self._wait_for(self._end_of_data(content, envelope.overflow))
        elif envelope is not None:
            self._reply(Reply(250, "2.0.0", f"{len(envelope.chunks or b'')} octets received"))
        return True

    def do_RSET(self, argument: str) -> None:
        self.envelope = None
        self._reply(OK)

    def do_NOOP(self, argument: str) -> None:
        self._reply(OK)

    def do_QUIT(self, argument: str) -> None:
        self._close(Reply(221, "2.0.0", "Bye"))

    def do_VRFY(self, argument: str) -> None:
        self._reply(Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery"))

    def do_HELP(self, argument: str) -> None:
        self._reply(Reply(214, "2.0.0", "See RFC 5321"))

    def do_not_implemented(self, argument: str) -> None:
        self._error(NOT_IMPLEMENTED)

    _COMMANDS: ClassVar[dict[str, Callable[[SMTPServerProtocol, str], Awaitable[Reply] | None]]] = {
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
    ) -> None:
        self.hostname = normalize_domain(hostname) if "." in hostname else hostname
        self.limits = limits
        self.policy = policy
        self.store = store
        self.clock = clock
        self.new_queue_id = new_queue_id
        self.tls = tls
        self.filters = filters
        self.metrics = metrics or Metrics()
        self.sessions: set[SMTPServerProtocol] = set()
        self.per_ip: dict[str, int] = {}
        self.stopping = False

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
        if len(self.sessions) >= self.limits.max_connections:
            return Reply(421, "4.7.0", f"{self.hostname} Error: too many connections")
        if self.per_ip.get(ip, 0) >= self.limits.max_connections_per_ip:
            return Reply(421, "4.7.0", f"{self.hostname} Error: too many connections from {ip}")
        self.sessions.add(session)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.metrics.sessions.inc()
        return None

    def leave(self, session: SMTPServerProtocol) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            ip = session.session.peer_ip
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]

    def shut_down(self) -> list[SMTPServerProtocol]:
        """
        Refuse new sessions and close idle ones; returns those still busy
        with a message, which the caller gives a grace period.
        """
        self.stopping = True
        return [session for session in list(self.sessions) if not session.shut_down()]
