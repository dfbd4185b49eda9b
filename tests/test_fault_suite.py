"""
The promise under faults, with real redis-server and relayx processes and a
real primary on loopback: every message answered 250 is delivered exactly
once, no message answered 451 is delivered at all (its sender sends it
again), no fault is answered 5xx, and the node accepts mail again within
10 s of the fault's end.

The faults (issue #16): Redis stalled 30 s (SIGSTOP), killed and restarted
from its AOF, shut down for 20 s, filled to its maxmemory, its AOF's disk
full; the replica gone under replicated durability; and the node itself
SIGKILLed with sessions in the middle of DATA.

A message whose sender was cut off before the end of DATA is never
delivered. One whose session was cut after it (the node killed while it
committed the message, or before its 250 reached the sender) may be: the
queue cannot know whether the 250 went out, so it keeps the message, and
the sender, which sends it again, causes a duplicate (RFC 5321, 6.1) rather
than a loss.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.helpers import LoopbackSink, RedisProcess, wait_for
from tests.test_cluster import Cluster, subject
from tests.test_ha import replica_of, send_one
from tests.test_queue_redis import deferred_test

#: the issue's bound: mail is accepted again this soon after the fault ends
RESUME_WITHIN = 10.0
#: messages sent after the fault has ended
AFTER = 60
#: longer than the fault, so that a delivery in flight settles after it rather
#: than being taken over and sent twice; jobs leased but not attempted (their
#: body could not be read) wait for their lease to run out, as do a killed
#: node's: the long one only for the long faults
LEASE = "25s"
LONG_LEASE = "40s"
#: concurrent sessions, each pausing this long between its messages
SENDERS = 4
PAUSE = 0.1

#: a fault, run in a thread while mail arrives; it returns (time.monotonic())
#: when it has ended, and the store, or node, is whole again
Fault = Callable[[], float]


def send_through(ports: list[int], done: threading.Event) -> tuple[dict[str, int], dict[str, float]]:
    """
    Send numbered messages, ``SENDERS`` at a time, paced, until ``done`` is
    set and ``AFTER`` more; the code each got (``send_one``) and when its
    session ended.
    """
    codes: dict[str, int] = {}
    ended: dict[str, float] = {}
    numbers = itertools.count()
    after = itertools.count()

    def sender() -> None:
        while not (done.is_set() and next(after) >= AFTER):
            n = next(numbers)
            codes[f"message {n:04}"] = send_one(ports[n % len(ports)], n)
            ended[f"message {n:04}"] = time.monotonic()
            time.sleep(PAUSE)

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes, ended


def stall(redis: RedisProcess) -> float:
    assert redis.process is not None
    time.sleep(2)
    redis.process.send_signal(signal.SIGSTOP)
    time.sleep(30)
    redis.process.send_signal(signal.SIGCONT)
    return time.monotonic()


def kill_and_restart(redis: RedisProcess) -> float:
    time.sleep(2)
    redis.kill()
    time.sleep(3)
    redis.start()  # the same directory: it loads its AOF
    return time.monotonic()


def stop_for_20_seconds(redis: RedisProcess) -> float:
    time.sleep(3)
    redis.stop(keep=True)  # SIGTERM: Redis writes its AOF and exits
    time.sleep(20)
    redis.start()
    return time.monotonic()


def fill_memory(redis: RedisProcess) -> float:
    """
    Lower maxmemory to what Redis already uses, so writes are refused
    (noeviction), then give the room back.
    """
    import redis as client

    r = client.Redis(port=redis.port)
    time.sleep(2)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", str(used))
    time.sleep(5)
    r.config_set("maxmemory", "0")
    return time.monotonic()


def fill_disk(redis: RedisProcess) -> float:
    """
    Fill the filesystem Redis's AOF is on. With ``appendfsync always`` Redis
    cannot answer a write it failed to log (nor undo it), so it exits at the
    first short AOF write; restarted as its supervisor would (every 0.5 s),
    it exits again at the next write, until the room is given back after
    10 s.
    """
    assert redis.process is not None
    time.sleep(2)
    filler = redis.directory / "filler"
    # unbuffered: closing the file must not write again (and fail)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    full = time.monotonic()
    while time.monotonic() < full + 10:
        if redis.process.poll() is not None:
            # it may not even start while the disk is full (a new AOF file)
            with contextlib.suppress(RuntimeError):
                redis.start()
        time.sleep(0.5)
    filler.unlink()
    time.sleep(0.5)  # a Redis exiting as the room came back has exited by now
    if redis.process.poll() is not None:
        redis.start()
    return time.monotonic()


def replica_down(replica: RedisProcess) -> float:
    """
    Kill the only replica for 8 s, then start it again (it loads its AOF and
    syncs with the master).
    """
    time.sleep(2)
    replica.kill()
    time.sleep(8)
    replica.start()
    return time.monotonic()


def tmpfs(directory: Path, size: str) -> None:
    """
    Mount a tmpfs of ``size`` on ``directory``, or skip the test.
    """
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True
    )
    if mounted.returncode != 0:
        raise SkipTest(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")


def reply(reader: BinaryIO) -> bytes:
    """
    The code of the next (last line of a) reply.
    """
    while True:
        line = reader.readline()
        if line[3:4] != b"-":
            return line[:3]


def mid_data(port: int, numbers: range, size: int) -> list[socket.socket]:
    """
    Open a session for each of the messages ``numbers`` that sends about
    ``size`` bytes of its message and stops before its end (no final ".").
    """
    sessions = []
    for n in numbers:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        reader = s.makefile("rb")
        assert reply(reader) == b"220"
        for command, expect in (
            (b"EHLO cut.test", b"250"),
            (b"MAIL FROM:<bob@sender.test>", b"250"),
            (f"RCPT TO:<u{n}@example.com>".encode(), b"250"),
            (b"DATA", b"354"),
        ):
            s.sendall(command + b"\r\n")
            assert reply(reader) == expect, command
        s.sendall(f"Subject: message {n:04}\r\n\r\n".encode() + (b"x" * 998 + b"\r\n") * (size // 1000))
        sessions.append(s)
    return sessions


class FaultSuite(TestCase):
    timeout = 300

    def redis(self, *extra: str) -> RedisProcess:
        redis = RedisProcess(*extra)
        redis.start()
        self.addCleanup(redis.stop)
        return redis

    def cluster(self, redis: str, lease: str = LEASE) -> tuple[Cluster, LoopbackSink]:
        """
        One relayx node as a process with ``redis`` as its [redis] section,
        and the primary it delivers to.
        """
        sink = LoopbackSink()
        sink.start()
        self.addCleanup(lambda: sink.stop())
        directory = Path(tempfile.mkdtemp(prefix="relayx-fault-"))
        # a delivery cut by the fault is tried again, and the domain it paused
        # probed, within seconds: the test waits for every accepted message
        quick = 'retry_schedule = ["2s"]\nprobe_interval = "2s"'
        cluster = Cluster(directory, redis, sink.port, 1, queue=quick, domain="", lease=lease)
        self.addCleanup(cluster.stop)
        cluster.start()
        return cluster, sink

    async def survive(
        self,
        fault: Fault,
        cluster: Cluster,
        sink: LoopbackSink,
        cut: frozenset[str] = frozenset(),
        node_killed: bool = False,
    ) -> None:
        """
        Send mail through ``fault`` and check the promise; ``cut``: messages
        whose sessions were cut before their end, never to be delivered.
        ``node_killed``: a session cut with no reply may have been committed
        just before (RFC 5321, 6.1: its sender sends it again, a duplicate at
        worst); otherwise it counts as refused.
        """
        done = threading.Event()
        ended: list[float] = []

        def run() -> None:
            try:
                ended.append(fault())
            finally:
                done.set()  # the senders stop even when the fault itself failed

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        codes, replied = await deferToThread(send_through, list(cluster.ports.values()), done)
        await deferToThread(thread.join, 60)
        assert ended, "the fault failed (its traceback is above)"
        back = ended[0]
        assert all(code < 500 for code in codes.values()), {n: c for n, c in codes.items() if c >= 500}
        accepted = {name for name, code in codes.items() if code == 250}
        unanswered = {name for name, code in codes.items() if code == 0} if node_killed else set()
        refused = {name for name, code in codes.items() if code != 250} - unanswered
        assert refused or unanswered, "the fault changed nothing"
        resumed = min((t for name, t in replied.items() if t > back and codes[name] == 250), default=back + 1e9) - back
        assert resumed <= RESUME_WITHIN, f"mail accepted again only {resumed:.1f}s after the fault ended"
        await wait_for(lambda: accepted <= {subject(m.body) for m in sink.messages}, 120, "every accepted message")
        await deferToThread(time.sleep, 3)
        received = [subject(m.body) for m in sink.messages]
        print(
            f"\n{len(accepted)} accepted, {len(refused)} refused, {len(unanswered)} unanswered, {len(cut)} cut, "
            f"{len(received)} delivered; accepting again {resumed:.1f}s after the fault"
        )
        assert len(received) == len(set(received)), "a message was delivered twice"
        assert set(received) & refused == set(), "a message answered 451 was delivered"
        assert set(received) & cut == set(), "a message cut before its end was delivered"
        assert accepted <= set(received), "an accepted message was lost"
        assert set(received) <= accepted | unanswered, "a message was delivered that its sender was not told was"

    async def survive_redis(self, fault: Callable[[RedisProcess], float], lease: str = LEASE) -> None:
        redis = self.redis()
        cluster, sink = self.cluster(f'url = "{redis.url}"\ntimeout = "2s"', lease)
        await self.survive(lambda: fault(redis), cluster, sink)

    @deferred_test
    async def test_redis_stalled(self) -> None:
        """When Redis is stopped for 30 s under load, no 250 is lost or doubled and no 451 is delivered."""
        await self.survive_redis(stall, LONG_LEASE)

    @deferred_test
    async def test_redis_killed_and_restarted(self) -> None:
        """When Redis is killed under load and restarted from its AOF, no 250 is lost and no 451 is delivered."""
        await self.survive_redis(kill_and_restart)

    @deferred_test
    async def test_redis_down_for_20_seconds(self) -> None:
        """When Redis is shut down for 20 s under load and started again, no 250 is lost and no 451 is delivered."""
        await self.survive_redis(stop_for_20_seconds, LONG_LEASE)

    @deferred_test
    async def test_redis_memory_full(self) -> None:
        """When Redis reaches its maxmemory under load, mail is refused with 4xx, none lost, none refused delivered."""
        await self.survive_redis(fill_memory)

    @deferred_test
    async def test_redis_disk_full(self) -> None:
        """When the disk of Redis's AOF fills under load, mail is refused with 4xx, none lost, none refused sent."""
        redis = RedisProcess()
        tmpfs(redis.directory, "16m")
        self.addCleanup(subprocess.run, ["umount", "--lazy", str(redis.directory)], check=False)
        redis.start()
        self.addCleanup(redis.stop, keep=True)
        cluster, sink = self.cluster(f'url = "{redis.url}"\ntimeout = "2s"')
        await self.survive(lambda: fill_disk(redis), cluster, sink)

    @deferred_test
    async def test_replica_down(self) -> None:
        """When the replica is gone under replicated durability, mail is refused with 4xx and none of it delivered."""
        master = self.redis()
        replica = replica_of(master)
        self.addCleanup(replica.stop)
        cluster, sink = self.cluster(
            f'url = "{master.url}"\ntimeout = "2s"\ndurability = "replicated"\nreplicas = 1\nreplication_timeout = "1s"'
        )
        await self.survive(lambda: replica_down(replica), cluster, sink)

    @deferred_test
    async def test_node_killed_mid_data(self) -> None:
        """When the node is SIGKILLed with 20 sessions mid-DATA under load, no 250 is lost, no cut message sent."""
        redis = self.redis()
        cluster, sink = self.cluster(f'url = "{redis.url}"\ntimeout = "2s"')
        port = cluster.ports["node-0"]
        spool = cluster.directory / "node-0-data" / "spool"
        cut: list[socket.socket] = []

        def kill_and_restart() -> float:
            # half the cut messages in memory, half past the spool threshold (1 MiB)
            time.sleep(2)
            cut.extend(mid_data(port, range(5000, 5010), 10_000) + mid_data(port, range(5010, 5020), 3_000_000))
            cluster.kill("node-0")
            for s in cut:
                s.close()
            cluster.start()
            return time.monotonic()

        cut_names = frozenset(f"message {n:04}" for n in range(5000, 5020))
        await self.survive(kill_and_restart, cluster, sink, cut_names, node_killed=True)
        left = [p for p in spool.rglob("*") if p.is_file()]
        assert left == [], f"spool files left: {left}"
