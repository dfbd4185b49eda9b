"""
The outbound SMTP client: one connection, replies read one at a time.

It knows the wire (multi-line replies, enhanced status codes, dot-stuffing)
and nothing of queues; ``relayx.delivery.smtp`` decides what replies mean.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from relayx.reply import Reply

_STATUS = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")


_DONE = Failure(ConnectionDone())


class ConversationError(Exception):
    """
    The connection failed, timed out or the peer spoke something that is
    not SMTP.
    """


def parse_reply(lines: list[bytes]) -> Reply:
    """
    A reply from its lines (``250-first``, ..., ``250 last``).
    """
    texts = []
    code = 0
    status = ""
    for line in lines:
        text = line[4:].decode("utf-8", "replace")
        code = int(line[:3])
        match = _STATUS.match(text)
        if match:
            status = match.group(1)
            text = text[match.end() :]
        texts.append(text)
    return Reply(code, status, "\n".join(texts))


#: the longest line sent, CRLF not counted (RFC 5321 4.5.3.1.6; Postfix's smtp_line_length_limit)
LINE_LENGTH_LIMIT = 998


def fold_long_lines(body: bytes, limit: int = LINE_LENGTH_LIMIT) -> bytes:
    """
    The body with every line longer than ``limit`` octets broken by
    inserting CRLF and a space, as Postfix does (``smtp_line_length_limit``),
    so that a header line becomes folded and MIME is least damaged.
    """
    if len(body) <= limit or max(map(len, body.split(b"\r\n"))) <= limit:
        return body
    out = []
    for line in body.split(b"\r\n"):
        if len(line) > limit:
            pieces = [line[:limit]]
            rest = line[limit:]
            while rest:
                pieces.append(b" " + rest[: limit - 1])
                rest = rest[limit - 1 :]
            line = b"\r\n".join(pieces)
        out.append(line)
    return b"\r\n".join(out)


def dot_stuff(body: bytes) -> bytes:
    """
    The body as sent after DATA: leading dots doubled, ending in CRLF, then
    the end marker.
    """
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


class SMTPClientProtocol(LineReceiver):
    """
    Reads replies on request; a reply that arrives before it is asked for is
    kept (pipelining), and a read that takes longer than its timeout aborts
    the connection.
    """

    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._lines: list[bytes] = []
        self._ready: list[Reply] = []
        self._waiting: Deferred[Reply] | None = None
        self._lost: Failure | None = None
        #: whether the session was upgraded with STARTTLS
        self.tls = False
        #: the extensions the server offered, once greeted
        self.extensions: set[str] | None = None
        #: messages delivered in this session, whether it may carry another,
        #: and whether it is kept idle for one
        self.messages = 0
        self.reusable = True
        self.parked = False
        #: whether a transaction was begun and not ended by a reply to its
        #: data: the session needs RSET before it carries another
        self.mid_transaction = False
        #: replies read in this session
        self.replies = 0

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
            self._fail(ConversationError(f"not an SMTP reply: {line[:80]!r}"))
            return
        self._lines.append(line)
        if line[3:4] != b"-":
            reply = parse_reply(self._lines)
            self._lines = []
            if self._waiting is not None:
                waiting, self._waiting = self._waiting, None
                waiting.callback(reply)
            else:
                self._ready.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(ConversationError("reply line too long"))

    def _fail(self, error: Exception) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(error)
        self._lost = Failure(error)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._lost is None:
            self._lost = Failure(ConversationError(f"connection lost: {reason.getErrorMessage()}"))
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(self._lost)

    async def read(self, timeout: float) -> Reply:
        if self._ready:
            self.replies += 1
            return self._ready.pop(0)
        if self._lost is not None:
            self._lost.raiseException()
        waiting: Deferred[Reply] = Deferred()
        self._waiting = waiting
        timer = self._clock.callLater(timeout, self._fail, ConversationError(f"no reply within {timeout:g}s"))
        try:
            reply = await waiting
        finally:
            if timer.active():
                timer.cancel()
        self.replies += 1
        return reply

    def send(self, *lines: str) -> None:
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))  # type: ignore[union-attr]

    def send_raw(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    async def command(self, line: str, timeout: float) -> Reply:
        self.send(line)
        return await self.read(timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()
