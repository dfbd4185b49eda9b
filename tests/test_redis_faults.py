"""
Redis faults against real ``redis-server`` processes and real SMTP: a stall
(SIGSTOP), a crash and restart (SIGKILL), a slow script, an evicting Redis,
ACL users and passwords, TLS. The node must recover within seconds of Redis
being back, with its pool at full size, and refuse what it must refuse.

Only these tests wait on the wall clock, each bound by a deadline.
"""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from relayx.redis.connection import _protocol_classes, connect
from relayx.redis.embedded import find_redis_server, free_port
from relayx.service import RelayNode, StartupError
from tests.certs import CA
from tests.helpers import LoopbackSink, NodeCase, RedisProcess, send, wait_for
from tests.test_metrics import get
from tests.test_queue_redis import deferred_test

#: the pool size a node opens
POOL = 8


def test_replies_are_parsed_in_c() -> None:
    """
    When relayx talks to Redis, direct or behind Sentinels, its replies are parsed by hiredis (txredisapi's
    C reader): the pure-Python parser cost a third of a delivery's CPU.
    """
    for protocol in _protocol_classes():
        assert issubclass(protocol, txredisapi.HiredisProtocol)


def redis_cli(redis: RedisProcess, *args: str) -> str:
    """
    Run one command with ``redis-cli`` (a process of its own, as an operator would).
    """
    cli = str(Path(find_redis_server()).with_name("redis-cli"))
    done = subprocess.run([cli, "-p", str(redis.port), *args], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def started(redis: RedisProcess, case: Any) -> RedisProcess:
    redis.start()
    case.addCleanup(redis.stop)
    return redis


class RecoveryTests(NodeCase):
    """
    After a stall, a restart or a slow call, mail is accepted again within
    seconds and the pool is back to full size.
    """

    async def node_on(self, redis: RedisProcess, **kw: Any) -> tuple[RelayNode, LoopbackSink]:
        sink = LoopbackSink()
        sink.start()
        node = await self.start_node(sink, redis_url=redis.url, **kw)
        assert node.redis is not None
        await wait_for(lambda: node.redis is not None and node.redis.pool_size == POOL, 10, "a full pool")
        return node, sink

    async def back_within(self, node: RelayNode, seconds: float) -> float:
        """
        Send until a message is accepted and the pool is full again; how long it took.
        """
        assert node.redis is not None
        began = time.monotonic()
        n = 0
        while True:
            n += 1
            answer = await send(
                self.smtp_port, "bob@sender.test", [f"back{n}@example.com"], b"Subject: back\r\n\r\nx\r\n"
            )
            if answer == {}:
                break
            assert isinstance(answer, smtplib.SMTPResponseException) and answer.smtp_code == 451, answer
            assert time.monotonic() - began < seconds, f"mail still refused after {seconds}s: {answer}"
            await deferLater(reactor, 0.2, lambda: None)
        await wait_for(lambda: node.redis is not None and node.redis.pool_size == POOL, seconds, "the pool refilled")
        return time.monotonic() - began

    @deferred_test
    async def test_stall_sigstop(self) -> None:
        """When Redis is stopped (SIGSTOP) past the timeout, then resumed, mail and a full pool are back within 10 s."""
        redis = started(RedisProcess(), self)
        node, _ = await self.node_on(redis)
        assert redis.process is not None and node.redis is not None
        redis.process.send_signal(signal.SIGSTOP)
        try:
            # the reply waits for Redis: the enqueue may have run just before the stall
            stalled = send(self.smtp_port, "bob@sender.test", ["s@example.com"], b"Subject: s\r\n\r\nx\r\n")
            await wait_for(lambda: node.redis is not None and node.redis.problem() is not None, 10, "not ready")
            # the stalled connections may have been dropped: either way the node says why it is not ready
            problem = node.redis.problem() or ""
            assert "not answered" in problem or "not connected" in problem, problem
            # long enough for reconnections' handshakes to time out too (the old pool stopped for good here)
            await deferToThread(time.sleep, 3)
        finally:
            redis.process.send_signal(signal.SIGCONT)
        # taken back (451), or, had a delivery begun before the take-back ran, kept (250)
        result = await stalled
        assert result == {} or (isinstance(result, smtplib.SMTPResponseException) and result.smtp_code == 451)
        took = await self.back_within(node, 10)
        await wait_for(lambda: node.redis is not None and node.redis.problem() is None, 5, "ready again")
        print(f"\nback {took:.1f}s after SIGCONT")

    @deferred_test
    async def test_two_stalls_in_a_row(self) -> None:
        """When Redis stalls twice in a row, the pool still comes back to full size each time."""
        redis = started(RedisProcess(), self)
        node, _ = await self.node_on(redis)
        assert redis.process is not None
        for _ in range(2):
            redis.process.send_signal(signal.SIGSTOP)
            try:
                stalled = send(self.smtp_port, "bob@sender.test", ["s@example.com"], b"Subject: s\r\n\r\nx\r\n")
                await deferToThread(time.sleep, 4)
            finally:
                redis.process.send_signal(signal.SIGCONT)
            await stalled  # its reply waits for Redis
            await self.back_within(node, 10)

    @deferred_test
    async def test_sigkill_and_restart(self) -> None:
        """When Redis is killed and restarted, mail and a full pool are back within 10 s of the restart."""
        redis = started(RedisProcess(), self)
        node, sink = await self.node_on(redis)
        assert await send(self.smtp_port, "bob@sender.test", ["k@example.com"], b"Subject: k\r\n\r\nx\r\n") == {}
        redis.kill()
        down = await send(self.smtp_port, "bob@sender.test", ["d@example.com"], b"Subject: d\r\n\r\nx\r\n")
        assert isinstance(down, smtplib.SMTPResponseException) and down.smtp_code == 451
        assert node.redis is not None and node.redis.problem() is not None
        await deferToThread(redis.start)
        took = await self.back_within(node, 10)
        await wait_for(lambda: any(m.recipients[0].startswith("back") for m in sink.messages), 30, "delivery")
        print(f"\nback {took:.1f}s after the restart")

    @deferred_test
    async def test_slow_script(self) -> None:
        """When a script keeps Redis busy past the timeout, calls time out, then the pool refills and mail flows."""
        redis = started(RedisProcess(), self)
        node, _ = await self.node_on(redis)
        busy = (
            "local s = redis.call('TIME') "
            "while true do local n = redis.call('TIME') "
            "if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 4000000 then break end end return 1"
        )
        script = deferToThread(redis_cli, redis, "EVAL", busy, "0")
        await deferLater(reactor, 0.3, lambda: None)
        # several calls outlast the timeout, each closing its connection
        answers = await Deferred.fromCoroutine(self._several_sends(4))
        assert all(isinstance(a, smtplib.SMTPResponseException) and a.smtp_code == 451 for a in answers), answers
        assert await script == "1"
        took = await self.back_within(node, 10)
        print(f"\nback {took:.1f}s after the script ended")

    async def _several_sends(self, count: int) -> list[Any]:
        from twisted.internet.defer import gatherResults

        sends = [
            send(self.smtp_port, "bob@sender.test", [f"b{n}@example.com"], b"Subject: b\r\n\r\nx\r\n")
            for n in range(count)
        ]
        return list(await gatherResults(sends))


class EvictionTests(NodeCase):
    """
    A Redis that may evict keys is refused: at start, and at run time.
    """

    @deferred_test
    async def test_refused_at_start(self) -> None:
        """When Redis's maxmemory-policy is allkeys-lru, the node does not start, with one line naming the setting."""
        redis = started(RedisProcess("--maxmemory-policy", "allkeys-lru"), self)
        with self.assertRaises(StartupError) as caught:
            await self.start_node(LoopbackSink(), redis_url=redis.url)
        text = str(caught.exception)
        assert "maxmemory-policy allkeys-lru" in text and "noeviction" in text and "\n" not in text

    @deferred_test
    async def test_policy_changed_at_run_time(self) -> None:
        """When the policy turns evicting at run time, mail gets 451 and /readyz 503 until it is noeviction again."""
        redis = started(RedisProcess(), self)
        sink = LoopbackSink()
        sink.start()
        admin = free_port()
        node = await self.start_node(sink, redis_url=redis.url, admin_listen=[f"tcp:{admin}:interface=127.0.0.1"])
        assert node.redis is not None
        assert await deferToThread(get, admin, "/readyz") == (200, "ready\n")
        await deferToThread(redis_cli, redis, "CONFIG", "SET", "maxmemory-policy", "volatile-lru")
        await wait_for(lambda: node.redis is not None and node.redis.refused is not None, 5, "the policy noticed")
        refused = await send(self.smtp_port, "bob@sender.test", ["e@example.com"], b"Subject: e\r\n\r\nx\r\n")
        assert isinstance(refused, smtplib.SMTPResponseException) and refused.smtp_code == 451
        status, text = await deferToThread(get, admin, "/readyz")
        assert status == 503 and "maxmemory-policy volatile-lru" in text
        assert await deferToThread(get, admin, "/healthz") == (200, "ok\n")
        await deferToThread(redis_cli, redis, "CONFIG", "SET", "maxmemory-policy", "noeviction")
        await wait_for(lambda: node.redis is not None and node.redis.pool_size == POOL, 10, "the pool back")
        assert await send(self.smtp_port, "bob@sender.test", ["f@example.com"], b"Subject: f\r\n\r\nx\r\n") == {}
        assert await deferToThread(get, admin, "/readyz") == (200, "ready\n")


def test_node_process_exits_1_on_an_evicting_redis(tmp_path: Path) -> None:
    """When `relayx` is started on an evicting Redis, it exits 1 with one line naming maxmemory-policy."""
    redis = RedisProcess("--maxmemory-policy", "allkeys-random")
    redis.start()
    try:
        config = tmp_path / "relayx.toml"
        config.write_text(
            f'[node]\nid = "p"\nhostname = "mx.test"\n[smtp]\nlisten = ["tcp:{free_port()}:interface=127.0.0.1"]\n'
            f'[redis]\nurl = "{redis.url}"\n'
            '[[domain]]\nname = "example.com"\nroutes = ["smtp://127.0.0.1:2"]\nrecipients = "any"\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "relayx", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    finally:
        redis.stop()
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "maxmemory-policy allkeys-random" in line]
    assert len(lines) == 1 and "relayx cannot start" in lines[0]


class CredentialTests(NodeCase):
    """
    ACL users and URL-encoded passwords from ``[redis] url``; wrong ones stop the node.
    """

    # the default user may only PING (RedisProcess checks it is up); alice may do all
    ACL = (
        "--user", "default", "on", "nopass", "~nothing:*", "+ping",
        "--user", "alice", "on", ">p@ss/w:rd", "~*", "&*", "+@all",
        "--user", "bob", "on", ">bobpw", "~other:*", "+@all",
    )  # fmt: skip

    @deferred_test
    async def test_acl_user_with_encoded_password(self) -> None:
        """When the URL names an ACL user and a URL-encoded password, the node authenticates as that user and works."""
        redis = started(RedisProcess(*self.ACL), self)
        sink = LoopbackSink()
        sink.start()
        url = f"redis://alice:p%40ss%2Fw%3Ard@127.0.0.1:{redis.port}/0"
        node = await self.start_node(sink, redis_url=url)
        assert node.redis is not None and node.redis.connected
        assert await send(self.smtp_port, "bob@sender.test", ["a@example.com"], b"Subject: a\r\n\r\nx\r\n") == {}
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery")

    @deferred_test
    async def test_wrong_password_stops_the_start(self) -> None:
        """When the password is wrong, the node does not start: one line with Redis's WRONGPASS."""
        redis = started(RedisProcess(*self.ACL), self)
        with self.assertRaises(StartupError) as caught:
            await self.start_node(LoopbackSink(), redis_url=f"redis://alice:nope@127.0.0.1:{redis.port}/0")
        assert "WRONGPASS" in str(caught.exception) and "\n" not in str(caught.exception)

    @deferred_test
    async def test_no_password_where_one_is_needed_stops_the_start(self) -> None:
        """When Redis needs more rights than the URL's (default) user has, the node does not start."""
        redis = started(RedisProcess(*self.ACL), self)
        with self.assertRaises(StartupError) as caught:
            await self.start_node(LoopbackSink(), redis_url=redis.url)
        assert "NOPERM" in str(caught.exception) or "maxmemory-policy" in str(caught.exception)

    @deferred_test
    async def test_user_without_rights_to_the_keys_stops_the_start(self) -> None:
        """When the ACL user may not touch the node's keys, the node does not start: one line with NOPERM."""
        redis = started(RedisProcess(*self.ACL), self)
        with self.assertRaises(StartupError) as caught:
            await self.start_node(LoopbackSink(), redis_url=f"redis://bob:bobpw@127.0.0.1:{redis.port}/0")
        assert "NOPERM" in str(caught.exception) and "\n" not in str(caught.exception)


class TLSTests(NodeCase):
    """
    ``rediss://``: TLS with the configured CA, the server's name checked.
    """

    def tls_redis(self, name: str) -> tuple[RedisProcess, Path, int]:
        directory = Path(tempfile.mkdtemp(prefix="relayx-redis-tls-"))
        ca = CA()
        ca_file = directory / "ca.pem"
        ca_file.write_bytes(ca.pem())
        cert, key, _ = ca.issue(directory, name)
        tls_port = free_port()
        redis = RedisProcess(
            "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no",
        )  # fmt: skip
        return started(redis, self), ca_file, tls_port

    @deferred_test
    async def test_tls_with_ca_file(self) -> None:
        """When the URL is rediss:// and the CA file signs the server's certificate, the node works over TLS."""
        _, ca_file, tls_port = self.tls_redis("localhost")
        sink = LoopbackSink()
        sink.start()
        node = await self.start_node(
            sink, redis_url=f"rediss://localhost:{tls_port}/0", redis={"tls_ca_file": str(ca_file)}
        )
        assert node.redis is not None and node.redis.connected
        assert await send(self.smtp_port, "bob@sender.test", ["t@example.com"], b"Subject: t\r\n\r\nx\r\n") == {}

    @deferred_test
    async def test_tls_name_is_checked(self) -> None:
        """When the server's certificate names another host, no connection is made and mail gets 451."""
        _, ca_file, tls_port = self.tls_redis("redis.test")
        node = await self.start_node(
            LoopbackSink(), redis_url=f"rediss://localhost:{tls_port}/0", redis={"tls_ca_file": str(ca_file)}
        )
        assert node.redis is not None and not node.redis.connected
        refused = await send(self.smtp_port, "bob@sender.test", ["t@example.com"], b"Subject: t\r\n\r\nx\r\n")
        assert isinstance(refused, smtplib.SMTPResponseException) and refused.smtp_code == 451


class NodeLoopTests(NodeCase):
    @deferred_test
    async def test_heartbeat_survives_an_error_and_fqdn_is_off_the_reactor(self) -> None:
        """When a heartbeat raises unexpectedly it is logged and the next one runs; the FQDN look-up ran in a thread."""
        import socket

        threads: list[str] = []
        real = socket.getfqdn

        def getfqdn(name: str = "") -> str:
            threads.append(threading.current_thread().name)
            return real(name)

        socket.getfqdn = getfqdn
        self.addCleanup(setattr, socket, "getfqdn", real)
        sink = LoopbackSink()
        sink.start()
        node = await self.start_node(sink, heartbeat="1s")
        # the configuration's default hostname is read before the reactor runs; the node's own look-up is last
        assert threads and threads[-1] != threading.main_thread().name
        assert node.queue is not None
        beats: list[float] = []
        original = node.queue.heartbeat

        async def heartbeat(*args: Any) -> None:
            beats.append(time.monotonic())
            if len(beats) == 1:
                raise RuntimeError("injected into the heartbeat")
            await original(*args)

        node.queue.heartbeat = heartbeat  # type: ignore[method-assign,assignment]
        await wait_for(lambda: len(beats) >= 3, 10, "heartbeats after the error")
        assert node.heartbeat is not None and node.heartbeat.running
        assert len(self.flushLoggedErrors(RuntimeError)) == 1


class ConnectionTests(NodeCase):
    @deferred_test
    async def test_pool_refills_after_calls_time_out(self) -> None:
        """When calls outlast the timeout (a busy script), each loses its connection, and the pool refills by itself."""
        redis = started(RedisProcess(), self)
        conn = await connect("127.0.0.1", redis.port, 0, None, reactor, 1.0, poolsize=4)
        self.addCleanup(conn.disconnect)
        await wait_for(lambda: conn.pool_size == 4, 10, "a full pool")
        busy = (
            "local s = redis.call('TIME') "
            "while true do local n = redis.call('TIME') "
            "if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 2500000 then break end end return 1"
        )
        script = deferToThread(redis_cli, redis, "EVAL", busy, "0")
        await deferLater(reactor, 0.3, lambda: None)
        from relayx.interfaces import StoreUnavailable

        for _ in range(6):
            try:
                await conn.call("get", "x")
            except StoreUnavailable:
                pass
        assert await script == "1"
        await wait_for(lambda: conn.pool_size == 4, 10, "the pool refilled")
        assert await conn.call("ping") in (b"PONG", "PONG")
