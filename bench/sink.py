"""
A recording SMTP sink standing in for a primary mail server.

``python -m bench.sink --port 2526`` accepts every message and prints one
line per message (sender, recipients, subject), for the README's tour; the
tests and the replay benchmark use ``Sink`` to record what arrives and to
script the replies (a ``550`` to some recipients, a ``451`` after DATA).
With ``--capacity-rate``/``--capacity-sessions`` it is a primary with a
capacity (``Capacity``): ``421`` to the greeting above its sessions and to
MAIL above its rate, optionally slowed down for a while.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver


@attrs.define
class Received:
    sender: str
    recipients: list[str]
    body: bytes
    at: float
    tls: bool = False
    #: MAIL's parameters and each recipient's RCPT parameters, as sent
    mail_params: str = ""
    rcpt_params: dict[str, str] = attrs.field(factory=dict)


@attrs.define
class Sink:
    """
    What the sink has received, and how it answers.
    """

    messages: list[Received] = attrs.field(factory=list)
    rcpt_reply: Callable[[str], bytes] = lambda rcpt: b"250 2.1.5 ok"
    data_reply: Callable[[list[str]], bytes] = lambda rcpts: b"250 2.0.0 queued"
    on_message: Callable[[Received], None] = lambda message: None
    clock: Callable[[], float] = time.time
    #: seconds between taking a message and answering 250: a slow primary, and the
    #: window in which a lost connection loses the 250 but not the message
    delay: float = 0.0
    #: server TLS options: offer STARTTLS with them
    tls: Any = None
    #: SMTP sessions opened so far
    connections: int = 0
    #: offer DSN (RFC 3461); MAIL and RCPT parameters are recorded either way
    dsn: bool = False
    #: the greeting of each new session (a 4xx one closes it)
    greeting: Callable[[], bytes] = lambda: b"220 sink ESMTP"
    #: the reply to MAIL (a 421 closes the session)
    mail_reply: Callable[[], bytes] = lambda: b"250 2.1.0 ok"
    #: SMTP sessions open now
    open_sessions: int = 0

    def factory(self) -> SinkFactory:
        return SinkFactory(self)


def recipient_order_violations(arrivals: Iterable[tuple[int, Sequence[str]]]) -> int:
    """
    Messages as they arrived (their number in acceptance order, their
    recipients): how many times a mailbox got a message numbered lower than
    the one it got before (a copy of one it already had does not count).
    """
    last: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    violations = 0
    for n, recipients in arrivals:
        for mailbox in {r.lower() for r in recipients}:
            if (mailbox, n) in seen:
                continue
            seen.add((mailbox, n))
            if n < last.get(mailbox, n):
                violations += 1
            last[mailbox] = n
    return violations


class SinkProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.sender = ""
        self.recipients: list[str] = []
        self.mail_params = ""
        self.rcpt_params: dict[str, str] = {}
        self.lines: list[bytes] | None = None
        self.secure = False

    def connectionMade(self) -> None:
        self.sink.connections += 1
        self.sink.open_sessions += 1
        greeting = self.sink.greeting()
        self.sendLine(greeting)
        if not greeting.startswith(b"2"):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        self.sink.open_sessions -= 1

    def lineReceived(self, line: bytes) -> None:
        if self.lines is not None:
            if line == b".":
                body = b"".join((x[1:] if x.startswith(b".") else x) + b"\r\n" for x in self.lines)
                self.lines = None
                reply = self.sink.data_reply(self.recipients)
                if reply.startswith(b"250"):
                    message = Received(
                        self.sender,
                        self.recipients,
                        body,
                        self.sink.clock(),
                        self.secure,
                        self.mail_params,
                        {r: p for r, p in self.rcpt_params.items() if r in self.recipients},
                    )
                    self.sink.messages.append(message)
                    self.sink.on_message(message)
                self.recipients = []
                if self.sink.delay:
                    from twisted.internet import reactor

                    reactor.callLater(self.sink.delay, self._answer, reply)
                else:
                    self.sendLine(reply)
            else:
                self.lines.append(line)
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            starttls = b"250-STARTTLS\r\n" if self.sink.tls is not None and not self.secure else b""
            dsn = b"250-DSN\r\n" if self.sink.dsn else b""
            self.sendLine(
                b"250-sink\r\n"
                + starttls
                + dsn
                + b"250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000"
            )
        elif verb == b"STAR" and self.sink.tls is not None:
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.startTLS(self.sink.tls)  # type: ignore[union-attr]
            self.secure = True
        elif verb == b"HELO":
            self.sendLine(b"250 sink")
        elif verb == b"MAIL":
            self.sender = line[10:].split(b">")[0].lstrip(b" <").decode("utf-8", "replace")
            self.mail_params = line.partition(b">")[2].strip().decode("utf-8", "replace")
            self.recipients = []
            self.rcpt_params = {}
            reply = self.sink.mail_reply()
            self.sendLine(reply)
            if reply.startswith(b"421"):
                self.transport.loseConnection()  # type: ignore[union-attr]
        elif verb == b"RCPT":
            rcpt = line[8:].split(b">")[0].lstrip(b" <").decode("utf-8", "replace")
            reply = self.sink.rcpt_reply(rcpt)
            if reply.startswith(b"250"):
                self.recipients.append(rcpt)
                self.rcpt_params[rcpt] = line.partition(b">")[2].strip().decode("utf-8", "replace")
            self.sendLine(reply)
        elif verb == b"DATA":
            if self.recipients:
                self.lines = []
                self.sendLine(b"354 go ahead")
            else:
                self.sendLine(b"554 5.5.1 no valid recipients")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.sendLine(b"250 2.0.0 ok")

    def _answer(self, reply: bytes) -> None:
        if self.transport is not None and self.connected:
            self.sendLine(reply)


@attrs.define
class Capacity:
    """
    A primary's capacity: ``rate`` messages per second (a token bucket of
    one second's burst) and ``sessions`` at once; above either it
    answers ``421`` (to the greeting, to MAIL). Between ``slow_from`` and
    ``slow_until`` (seconds after ``start``) both are ``slow_factor`` of it.
    It counts the attempts (``asked``: greetings refused and MAILs) and the
    refusals (``refusals``: time, where), and tells ``on_attempt`` of each.
    """

    sink: Sink
    rate: float = 30.0
    sessions: int = 10
    slow_from: float = 0.0
    slow_until: float = 0.0
    slow_factor: float = 1.0
    start: float = attrs.field(factory=time.time)
    tokens: float = 0.0
    tokens_at: float = 0.0
    refusals: list[tuple[float, str]] = attrs.field(factory=list)
    asked: int = 0
    #: called at each attempt: when, "ok" or where it was refused, the share in force
    on_attempt: Callable[[float, str, float], None] = lambda at, what, share: None

    def share(self, now: float) -> float:
        """
        The capacity in force at ``now``, as a share of the full one.
        """
        return self.slow_factor if self.slow_from <= now - self.start < self.slow_until else 1.0

    def greeting(self) -> bytes:
        now = self.sink.clock()
        if self.sink.open_sessions > max(1, round(self.sessions * self.share(now))):
            self.refused(now, "greeting")
            return b"421 4.7.0 too many sessions, try later"
        return b"220 sink ESMTP"  # the attempt is counted at MAIL: one per message

    def mail_reply(self) -> bytes:
        now = self.sink.clock()
        rate = self.rate * self.share(now)
        burst = max(1.0, rate)
        self.tokens = min(burst, self.tokens + (now - self.tokens_at) * rate) if self.tokens_at else burst
        self.tokens_at = now
        if self.tokens < 1:
            self.refused(now, "mail")
            return b"421 4.7.0 rate limit exceeded, try later"
        self.tokens -= 1
        self.asked += 1
        self.on_attempt(now, "ok", self.share(now))
        return b"250 2.1.0 ok"

    def refused(self, now: float, where: str) -> None:
        self.asked += 1
        self.refusals.append((now, where))
        self.on_attempt(now, where, self.share(now))

    def install(self) -> None:
        self.sink.greeting = self.greeting
        self.sink.mail_reply = self.mail_reply


class SinkFactory(ServerFactory):
    noisy = False

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def buildProtocol(self, addr: IAddress | None) -> SinkProtocol:
        return SinkProtocol(self.sink)


def main() -> None:
    parser = argparse.ArgumentParser(description="A recording SMTP sink standing in for a primary mail server.")
    parser.add_argument("--port", type=int, default=2526)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--record", help="append one JSON line per message (time, subject) to this file")
    parser.add_argument("--capacity-rate", type=float, default=0, help="messages/s before 421 (0: no capacity)")
    parser.add_argument("--capacity-sessions", type=int, default=10, help="sessions at once before a 421 greeting")
    parser.add_argument("--slow-from", type=float, default=0, help="seconds after start the capacity drops")
    parser.add_argument("--slow-for", type=float, default=0, help="for how long (s)")
    parser.add_argument("--slow-factor", type=float, default=1 / 3, help="to this share of itself")
    options = parser.parse_args()
    from twisted.internet import reactor

    record = open(options.record, "a") if options.record else None
    sink = Sink()
    if options.capacity_rate:
        capacity = Capacity(
            sink,
            rate=options.capacity_rate,
            sessions=options.capacity_sessions,
            slow_from=options.slow_from,
            slow_until=options.slow_from + options.slow_for,
            slow_factor=options.slow_factor,
        )
        capacity.install()
        if record is not None:
            # one line per attempt, for the benchmark: refused (where) or "ok"
            def attempted(at: float, what: str, share: float) -> None:
                record.write(json.dumps({"t": at, "attempt": what, "share": share}) + "\n")

            capacity.on_attempt = attempted

    def show(message: Received) -> None:
        subject = email.parser.BytesHeaderParser().parsebytes(message.body)["Subject"]
        if record is not None:
            record.write(json.dumps({"t": message.at, "subject": subject, "rcpt": message.recipients}) + "\n")
            record.flush()
            return
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} from <{message.sender}> to {', '.join(message.recipients)}: {subject}", flush=True)

    sink.on_message = show
    reactor.listenTCP(options.port, sink.factory(), interface=options.interface)
    print(f"sink listening on {options.interface}:{options.port}", file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
