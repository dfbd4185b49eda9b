"""
The other processes of a node (``[node] processes``): SMTP workers that take
mail on the node's shared ports, each with its own reactor and Redis
connections, while the first process also delivers, serves the admin API
and runs the embedded Redis. Operators see one node.

The supervisor starts them once the node is up, restarts one that dies
(after a pause that grows while they keep dying), and stops them with
SIGTERM on shutdown: each answers new sessions ``421``, lets messages in
progress finish within ``smtp.shutdown_grace``, then exits. A worker also
exits when the first process dies (its standard input closes), so none is
left behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: restarts within this many seconds count towards the next pause
RESTART_WINDOW = 60.0
#: the longest pause before a worker is started again
MAX_PAUSE = 30.0


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self.pid = getattr(transport, "pid", None)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor:
    """
    Keeps ``count`` worker processes running: ``command(index)`` is each
    one's argument list.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        command: Callable[[int], Sequence[str]],
        count: int,
        environment: dict[str, str] | None = None,
        on_exit: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._command = command
        self._count = count
        self._environment = dict(os.environ if environment is None else environment)
        self._on_exit = on_exit
        self._running: dict[int, _Worker] = {}
        self._restarts: dict[int, list[float]] = {}
        self._pending: dict[int, IDelayedCall] = {}
        self._stopping = False

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        for index in range(1, self._count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if self._stopping:
            return
        worker = _Worker(self, index)
        argv = list(self._command(index))
        try:
            self._reactor.spawnProcess(worker, argv[0], argv, env=self._environment, childFDs={0: "w", 1: 1, 2: 2})
        except OSError as e:
            log.error("SMTP worker {index} could not be started: {why}", index=index, why=str(e))
            self._schedule(index)
            return
        self._running[index] = worker
        log.info("SMTP worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self._running.get(worker.index) is worker:
            del self._running[worker.index]
        if worker.pid is not None:
            self._on_exit(worker.pid)
        if self._stopping:
            return
        how = "exited" if reason.check(ProcessDone) else f"ended: {reason.getErrorMessage()}"
        log.error("SMTP worker {index} {how}; starting it again", index=worker.index, how=how)
        self._schedule(worker.index)

    def _schedule(self, index: int) -> None:
        now = self._clock.seconds()
        recent = [t for t in self._restarts.get(index, []) if now - t < RESTART_WINDOW] + [now]
        self._restarts[index] = recent
        pause = min(MAX_PAUSE, 0.5 * 2 ** (len(recent) - 1))
        self._pending[index] = self._clock.callLater(pause, self._spawn, index)

    async def stop(self, timeout: float) -> None:
        """
        SIGTERM to every worker, SIGKILL to those still running after
        ``timeout`` seconds; returns when all have ended.
        """
        self._stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        workers = list(self._running.values())
        for worker in workers:
            _signal(worker, "TERM")
        if not workers:
            return

        def kill() -> None:
            for worker in workers:
                _signal(worker, "KILL")

        killer = self._clock.callLater(timeout, kill)
        for worker in workers:
            await worker.ended
        if killer.active():
            killer.cancel()


def _signal(worker: _Worker, name: str) -> None:
    transport: IProcessTransport | None = worker.transport
    if transport is None:
        return
    try:
        transport.signalProcess(name)
    except ProcessExitedAlready:
        pass


def worker_command(config_path: str, extra: Sequence[str], listen: Sequence[str]) -> Callable[[int], list[str]]:
    """
    The command line of worker ``index``: ``relayx worker`` with the node's
    configuration, its command-line overrides and the shared ports.
    """

    def command(index: int) -> list[str]:
        argv = [sys.executable, "-m", "relayx", "worker", "--index", str(index), "--config", config_path, *extra]
        for description in listen:
            argv += ["--smtp-listen", description]
        return argv

    return command


def watch_parent(reactor: Any, gone: Callable[[], None]) -> None:
    """
    Call ``gone`` when standard input closes: the first process ended.
    """
    from twisted.internet import stdio
    from twisted.internet.protocol import Protocol

    class _Watch(Protocol):
        def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
            gone()

    stdio.StandardIO(_Watch(), reactor=reactor)
