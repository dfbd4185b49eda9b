"""
Real processes and servers on loopback for the integration tests: a
``redis-server``, a recording SMTP sink standing in for the primary, and
``smtplib`` as a third-party client.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from bench.sink import Received, Sink
from relayx.config import parse
from relayx.redis.embedded import find_redis_server, free_port, redis_arguments
from relayx.service import RelayNode
from tests.dns import LoopbackDNS, a, mx

_prefixes = itertools.count()
T = TypeVar("T")


class RedisProcess:
    """
    A ``redis-server`` of our own on a free loopback port, with AOF.
    """

    def __init__(self, *extra: str, fsync: str = "always") -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="relayx-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.extra = extra
        self.fsync = fsync

    def start(self) -> None:
        binary = find_redis_server()
        self.process = subprocess.Popen(
            [binary, *redis_arguments(self.port, self.directory, self.fsync), *self.extra],
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

    def stop(self, keep: bool = False) -> None:
        """
        Shut Redis down (it writes its AOF first); ``keep`` its files for a restart.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        if not keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

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


class LoopbackSink:
    """
    The destination ("the primary") on a loopback port: down until ``start``.
    """

    def __init__(self, port: int | None = None, interface: str = "127.0.0.1") -> None:
        self.port = port or free_port()
        self.interface = interface
        self.sink = Sink()
        self.listening: IListeningPort | None = None

    @property
    def messages(self) -> list[Received]:
        return self.sink.messages

    def start(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.sink.factory(), interface=self.interface)

    async def stop(self) -> None:
        if self.listening is not None:
            await maybeDeferred(self.listening.stopListening)
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
        await deferLater(reactor, 0.02, lambda: None)


async def eventually(check: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """
    Poll an asynchronous ``check`` (bounded by ``timeout``) until its result is truthy.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


class NodeCase(TestCase):
    """
    Runs a whole relayx node in the test's reactor, on loopback ports, with
    example.com (any recipient), example.org (alice only) and verify.test
    (recipients verified by callout) routed to ``sink``.
    """

    timeout = 120
    smtp_port = 0

    async def start_node(
        self,
        sink: LoopbackSink,
        redis_url: str | None = None,
        smtp: dict[str, Any] | None = None,
        delivery: dict[str, Any] | None = None,
        domains: list[dict[str, Any]] | None = None,
        filters: dict[str, Any] | None = None,
        key_prefix: str | None = None,
        node_id: str = "node-a",
        admin_listen: list[str] | None = None,
        admin_tokens: dict[str, str] | None = None,
        redis: dict[str, Any] | None = None,
        bodies: dict[str, Any] | None = None,
        **queue: Any,
    ) -> RelayNode:
        port = free_port()
        data = {
            "node": {"id": node_id, "hostname": "mx2.relayx.test", "data_dir": tempfile.mkdtemp()},
            "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "shutdown_grace": "1s", **(smtp or {})},
            "redis": {
                "url": redis_url or shared_redis().url,
                "key_prefix": key_prefix or unique_prefix(),
                "timeout": "2s",
                **(redis or {}),
            },
            "filter": filters or {},
            "admin": {"listen": admin_listen or [], "tokens": admin_tokens or {}},
            "bodies": bodies or {},
            "queue": {"retry_schedule": ["1s"], "poll_interval": "100ms", "lease": "10s", **queue},
            "delivery": {"connect_timeout": "2s", "command_timeout": "10s", **(delivery or {})},
            "domain": [
                {"name": "example.com", "routes": [f"smtp://127.0.0.1:{sink.port}"], "recipients": "any"},
                {
                    "name": "example.org",
                    "routes": [f"smtp://127.0.0.1:{sink.port}"],
                    "recipients": ["alice@example.org"],
                },
                {
                    "name": "verify.test",
                    "routes": [f"smtp://127.0.0.1:{sink.port}"],
                    "recipients": {"verify": True, "default": "tempfail", "timeout": "3s"},
                },
                *(domains or []),
            ],
        }
        node = RelayNode(parse(data, "test.toml", Path(".")), reactor)
        await node.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(node.stop()))
        self.addCleanup(lambda: Deferred.fromCoroutine(sink.stop()))
        self.smtp_port = port
        return node

    def start_senders_mx(self) -> tuple[LoopbackSink, dict[str, Any]]:
        """
        The sender's mail exchanger for DSNs: a sink on 127.0.0.2 that a loopback
        DNS server names as sender.test's MX; returns it and the ``delivery``
        settings that make a node find it.
        """
        mx_port = free_port()
        senders_mx = LoopbackSink(mx_port, interface="127.0.0.2")
        senders_mx.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(senders_mx.stop()))
        dns = LoopbackDNS(
            {"sender.test": {"sender.test": [mx(10, "mx.sender.test")], "mx.sender.test": [a("127.0.0.2")]}}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(dns.stop()))
        return senders_mx, {"nameservers": [dns.address], "mx_port": mx_port}


@contextlib.contextmanager
def logged_events() -> Iterator[list[dict[str, Any]]]:
    """
    The events logged inside the ``with`` block.
    """
    events: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)
