"""
High availability with real Redis processes: replicated durability, a
Sentinel failover under load, and a Redis outage, with relayx nodes as
processes and a recording sink as the primary.
"""

from __future__ import annotations

import smtplib
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from relayx.interfaces import StoreUnavailable
from relayx.queue.redis import RedisQueue, Replication
from relayx.redis.connection import connect
from relayx.redis.embedded import free_port
from tests.helpers import LoopbackSink, RedisProcess, wait_for
from tests.test_cluster import Cluster, subject
from tests.test_queue_redis import T0, deferred_test, message


def replica_of(master: RedisProcess) -> RedisProcess:
    replica = RedisProcess("--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    return replica


def sentinel(master: RedisProcess, directory: Path) -> tuple[Any, int]:
    """
    A Sentinel watching ``master`` as "relayx", quick to fail over.
    """
    import subprocess

    from relayx.redis.embedded import find_redis_server

    port = free_port()
    config = directory / f"sentinel-{port}.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile {directory}/sentinel-{port}.log\n"
        f"sentinel monitor relayx 127.0.0.1 {master.port} 2\n"
        "sentinel down-after-milliseconds relayx 1000\n"
        "sentinel failover-timeout relayx 5000\n"
        "sentinel parallel-syncs relayx 1\n"
    )
    process = subprocess.Popen(
        [find_redis_server(), str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return process, port


def send_one(port: int, n: int) -> int:
    """
    Send message ``n`` ("message 000n") in a connection of its own; the reply
    code it got: 250, the code of the refusal (at any step), or 0 when the
    connection failed or was cut before a reply. It waits for a reply as long
    as an MTA does for the one to DATA's end (RFC 5321 4.5.3.2.6: 10 minutes).
    """
    name = f"message {n:04}"
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=600) as client:
            client.sendmail("bob@sender.test", [f"u{n}@example.com"], f"Subject: {name}\r\n\r\nbody\r\n")
        return 250
    except smtplib.SMTPResponseException as e:
        return e.smtp_code
    except smtplib.SMTPRecipientsRefused as e:
        return min(code for code, _ in e.recipients.values())
    except (smtplib.SMTPException, OSError):
        return 0


def send_paced(ports: list[int], count: int, pause: float, on_sent: Any = None) -> dict[str, int]:
    """
    Send ``count`` numbered messages one connection each, alternating nodes;
    the reply code each got (``send_one``).
    """
    codes: dict[str, int] = {}
    for n in range(count):
        codes[f"message {n:04}"] = send_one(ports[n % len(ports)], n)
        if on_sent is not None:
            on_sent(n)
        time.sleep(pause)
    return codes


class DurabilityTests(TestCase):
    timeout = 60

    @deferred_test
    async def test_replicated_needs_the_replica(self) -> None:
        """When durability is replicated, a write is confirmed while the replica is up and 451'd once it is gone."""
        master = RedisProcess()
        master.start()
        self.addCleanup(master.stop)
        replica = replica_of(master)
        self.addCleanup(replica.stop)
        redis = await connect("127.0.0.1", master.port, 0, None, reactor, 5.0, poolsize=2)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        queue = RedisQueue(
            redis, "dur", lease=60, retention=600, retry_schedule=(60,), randrange=lambda n: 0,
            replication=Replication(replicas=1, timeout=1.0),
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                await queue.enqueue(message(f"M{time.monotonic_ns()}", "a@one.test", at=T0))
                break
            except StoreUnavailable:
                # the replica is still doing its first sync
                assert time.monotonic() < deadline, "the replica never acknowledged"
        assert await queue.persistence_warnings() == []
        replica.kill()
        with self.assertRaises(StoreUnavailable) as caught:
            await queue.enqueue(message("LONELY", "a@one.test", at=T0))
        assert "reached 0 of 1 replica(s)" in str(caught.exception)
        warnings: list[str] = []
        while not any("has 0" in w for w in warnings):
            # the master notices the lost replica on its next replication check
            assert time.monotonic() < deadline + 30, warnings
            warnings = await queue.persistence_warnings()

    @deferred_test
    async def test_weak_persistence_is_reported(self) -> None:
        """When Redis fsyncs only every second, the start-up check says what that risks."""
        weak = RedisProcess(fsync="everysec")
        weak.start()
        self.addCleanup(weak.stop)
        redis = await connect("127.0.0.1", weak.port, 0, None, reactor, 5.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        queue = RedisQueue(redis, "weak", lease=60, retention=600, retry_schedule=(60,), randrange=lambda n: 0)
        [warning] = await queue.persistence_warnings()
        assert "appendfsync everysec" in warning and "appendfsync always" in warning


class FailoverTests(TestCase):
    timeout = 240

    @deferred_test
    async def test_sentinel_failover_under_load(self) -> None:
        """When the master is SIGKILLed while 500 messages arrive, every message that got 250 is delivered once."""
        directory = Path(tempfile.mkdtemp(prefix="relayx-ha-"))
        master = RedisProcess()
        master.start()
        replicas = [replica_of(master), replica_of(master)]
        sentinels = [sentinel(master, directory) for _ in range(3)]
        self.addCleanup(master.stop)
        for r in replicas:
            self.addCleanup(r.stop)
        for process, _ in sentinels:
            self.addCleanup(process.terminate)
        sink = LoopbackSink()
        self.addCleanup(lambda: sink.stop())
        addresses = ", ".join(f'"127.0.0.1:{port}"' for _, port in sentinels)
        cluster = Cluster(
            directory,
            f'sentinels = [{addresses}]\nmaster_name = "relayx"\ndurability = "replicated"\nreplicas = 1\n'
            'replication_timeout = "1s"\ntimeout = "3s"',
            sink.port,
            2,
            queue="",
            domain="",
            lease="30s",
        )
        self.addCleanup(cluster.stop)
        await deferToThread(time.sleep, 2)  # replicas synced, sentinels agreed
        cluster.start()

        def kill_midway(n: int) -> None:
            if n == 250:
                master.kill()

        codes = await deferToThread(send_paced, list(cluster.ports.values()), 500, 0.04, kill_midway)
        accepted = {name for name, code in codes.items() if code == 250}
        assert len(accepted) > 300, "the cluster did not carry on after the failover"
        assert all(code in (250, 451, 0) for code in codes.values())
        sink.start()
        await wait_for(lambda: accepted <= {subject(m.body) for m in sink.messages}, 120, "every accepted message")
        await deferToThread(time.sleep, 3)  # time for any duplicate to show
        received = [subject(m.body) for m in sink.messages]
        for name in accepted:
            assert received.count(name) == 1, f"{name} delivered {received.count(name)} times"
        print(f"\n{len(accepted)} accepted, {list(codes.values()).count(451)} answered 451 during the failover")


class OutageTests(TestCase):
    timeout = 240
