"""
A node in several processes: the shared-port descriptions, the supervisor's
restarts and shutdown on a Clock, and a real ``relayx --config`` whose two
processes share the SMTP port, restart a killed worker and leave nothing
behind.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from bench.harness import children, wait_port
from relayx.redis.embedded import free_port
from relayx.reuseport import TCPListen, parse_tcp
from relayx.workers import WorkerSupervisor


def test_parse_tcp_descriptions() -> None:
    """When SMTP listen descriptions are parsed, plain TCP ones are shared and others are left to Twisted."""
    assert parse_tcp("tcp:2525:interface=127.0.0.1") == TCPListen(socket.AF_INET, 2525, "127.0.0.1", 50)
    assert parse_tcp("tcp:port=25:backlog=200") == TCPListen(socket.AF_INET, 25, "", 200)
    six = parse_tcp("tcp6:25:interface=\\:\\:")
    assert six == TCPListen(socket.AF_INET6, 25, "::", 50)
    assert six.description(2526) == "tcp6:2526:backlog=50:interface=\\:\\:"
    assert parse_tcp("unix:/run/relayx.sock") is None
    assert parse_tcp("ssl:465:privateKey=k.pem") is None
    assert parse_tcp("tcp:smtp") is None


class FakeProcess:
    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeProcessReactor:
    """
    ``spawnProcess`` that records each start (no process runs: the
    supervisor's logic is what is tested here).
    """

    def __init__(self) -> None:
        self.started: list[FakeProcess] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> FakeProcess:
        process = FakeProcess(protocol, 1000 + len(self.started))
        protocol.makeConnection(process)
        self.started.append(process)
        return process


def end(process: FakeProcess, killed: bool = True) -> None:
    reason = ProcessTerminated(signal=9) if killed else ProcessDone(0)
    process.protocol.processEnded(Failure(reason))


def test_supervisor_restarts_with_growing_pauses() -> None:
    """When a worker keeps dying, it is started again after 0.5 s, 1 s, 2 s ...; ended pids are reported."""
    clock, reactor = Clock(), FakeProcessReactor()
    dead: list[int] = []
    supervisor = WorkerSupervisor(reactor, clock, lambda i: ["relayx", str(i)], 2, {}, dead.append)  # type: ignore[arg-type]
    supervisor.start()
    assert len(reactor.started) == 2 and supervisor.running == 2
    for pause in (0.5, 1.0, 2.0):
        end(reactor.started[-1])
        assert supervisor.running == 1
        clock.advance(pause - 0.01)
        assert supervisor.running == 1
        clock.advance(0.01)
        assert supervisor.running == 2
    assert dead == [1001, 1002, 1003]


def test_supervisor_stops_with_term_then_kill() -> None:
    """When the node stops, each worker gets SIGTERM; one still running after the timeout gets SIGKILL."""
    clock, reactor = Clock(), FakeProcessReactor()
    supervisor = WorkerSupervisor(reactor, clock, lambda i: ["relayx", str(i)], 2, {})  # type: ignore[arg-type]
    supervisor.start()
    first, second = reactor.started
    stopped = supervisor.stop(timeout=15)
    done: list[None] = []
    from twisted.internet.defer import Deferred

    Deferred.fromCoroutine(stopped).addCallback(done.append)
    assert first.signals == ["TERM"] and second.signals == ["TERM"]
    end(first, killed=False)
    clock.advance(15)
    assert second.signals == ["TERM", "KILL"] and not done
    end(second)
    assert done == [None]
    clock.advance(60)
    assert len(reactor.started) == 2, "no restart while stopping"


def alive(pid: int) -> bool:
    """
    Whether ``pid`` runs (a zombie does not).
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listeners(port: int) -> int:
    """
    How many listening sockets /proc shows on ``port`` (each process of a
    node binds its own with SO_REUSEPORT).
    """
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            count += 1
    return count


def workers(node: int) -> list[int]:
    """
    The node's SMTP workers: its child processes running ``relayx worker``
    (not those of other nodes on the machine).
    """
    found = []
    for pid in children(node):
        try:
            if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_two_processes_share_the_port_and_survive_a_worker_kill(tmp_path: Path) -> None:
    """When a node runs 2 processes, both listen on the SMTP port, a killed worker comes back, and mail counts once."""
    smtp, admin = free_port(), free_port()
    config = tmp_path / "relayx.toml"
    config.write_text(
        f'[node]\nid = "n1"\nhostname = "mx.test"\ndata_dir = "data"\nprocesses = 2\n'
        f'[smtp]\nlisten = ["tcp:{smtp}:interface=127.0.0.1"]\n'
        f'[admin]\nlisten = ["tcp:{admin}:interface=127.0.0.1"]\n'
        f'[[domain]]\nname = "example.com"\nroutes = ["smtp://127.0.0.1:{free_port()}"]\nrecipients = "any"\n'
    )
    node = subprocess.Popen(
        [sys.executable, "-m", "relayx", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        wait_port(smtp, node)
        deadline = time.monotonic() + 30
        while listeners(smtp) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listeners(smtp) == 2
        [worker] = workers(node.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (set(workers(node.pid)) - {worker}) and time.monotonic() < deadline:
            time.sleep(0.05)
        while listeners(smtp) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listeners(smtp) == 2, "the worker was started again"
        seen = {worker, *workers(node.pid)}
        for n in range(30):
            with smtplib.SMTP("127.0.0.1", smtp, timeout=30) as client:
                client.sendmail("bob@sender.test", ["alice@example.com"], f"Subject: {n}\r\n\r\nhi\r\n")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
        assert "relayx_messages_accepted_total 30.0" in metrics
    finally:
        node.send_signal(signal.SIGTERM)
        output, _ = node.communicate(timeout=60)
    log = output.decode()
    assert node.returncode in (0, -signal.SIGTERM), log
    assert "SMTP worker 1 ended" in log and "starting it again" in log
    assert not [pid for pid in seen if alive(pid)], "no worker left behind"
    assert "Traceback" not in log, log
