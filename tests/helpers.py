"""
Real processes and servers on loopback for the integration tests: a
``redis-server``, a recording SMTP sink standing in for the primary, and
``smtplib`` as a third-party client.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver

from relayx.redis_server import find_redis_server, free_port, redis_arguments

_prefixes = itertools.count()


class RedisProcess:
    """
    A ``redis-server`` of our own on a free loopback port, with AOF.
    """

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="relayx-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = find_redis_server()
        self.process = subprocess.Popen(
            [binary, *redis_arguments(self.port, self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


_shared: RedisProcess | None = None


def shared_redis() -> RedisProcess:
    """
    One ``redis-server`` for the test session; tests keep apart by key prefix.
    """
    global _shared
    if _shared is None:
        _shared = RedisProcess()
        _shared.start()
        atexit.register(_shared.stop)
    return _shared


def unique_prefix() -> str:
    return f"t{next(_prefixes)}x{int(time.time() * 1000) % 100000}"


@attrs.define
class Received:
    sender: str
    recipients: list[str]
    body: bytes


class SinkProtocol(LineReceiver):
    """
    A minimal, independent SMTP server that records what it is sent and
    answers RCPT and the end of DATA as the test tells it.
    """

    delimiter = b"\r\n"

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.sender = ""
        self.recipients: list[str] = []
        self.lines: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.sendLine(b"220 sink.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.lines is not None:
            if line == b".":
                body = b"".join(l[1:] + b"\r\n" if l.startswith(b".") else l + b"\r\n" for l in self.lines)
                self.lines = None
                reply = self.sink.data_reply(self.recipients)
                if reply.startswith(b"250"):
                    self.sink.messages.append(Received(self.sender, list(self.recipients), body))
                self.sendLine(reply)
                self.recipients = []
            else:
                self.lines.append(line)
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000")
        elif verb == b"HELO":
            self.sendLine(b"250 sink.test")
        elif verb == b"MAIL":
            self.sender = line[10:].split(b">")[0].lstrip(b"<").decode()
            self.recipients = []
            self.sendLine(b"250 2.1.0 ok")
        elif verb == b"RCPT":
            rcpt = line[8:].split(b">")[0].lstrip(b"<").decode()
            reply = self.sink.rcpt_reply(rcpt)
            if reply.startswith(b"250"):
                self.recipients.append(rcpt)
            self.sendLine(reply)
        elif verb == b"DATA":
            if not self.recipients:
                self.sendLine(b"554 5.5.1 no valid recipients")
            else:
                self.lines = []
                self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.sendLine(b"250 2.0.0 ok")


class Sink:
    """
    The destination ("the primary"): down until ``start`` is called.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[Received] = []
        self.listening: IListeningPort | None = None
        self.rcpt_reply: Callable[[str], bytes] = lambda rcpt: b"250 2.1.5 ok"
        self.data_reply: Callable[[list[str]], bytes] = lambda rcpts: b"250 2.0.0 queued"

    def start(self) -> None:
        factory = Factory.forProtocol(lambda: SinkProtocol(self))
        factory.noisy = False
        self.listening = reactor.listenTCP(self.port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self.listening is not None:
            await self.listening.stopListening()
            self.listening = None


def send(port: int, sender: str, recipients: list[str], body: bytes) -> Deferred[Any]:
    """
    Send one message with ``smtplib`` (in a thread); the result is its
    ``sendmail`` return value, or the SMTP exception it raised.
    """

    def run() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            try:
                return client.sendmail(sender, recipients, body)
            except smtplib.SMTPException as e:
                return e

    return deferToThread(run)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """
    Poll ``condition`` (bounded by ``timeout``) while real processes work.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)  # type: ignore[arg-type]
