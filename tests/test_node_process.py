"""
The README's way of running a node: ``relayx --config FILE`` as its own
process, with the embedded Redis, stopped and started again.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.harness import wait_port
from relayx.redis.embedded import free_port

CONFIG = """
[node]
id = "proc-1"
hostname = "mx2.relayx.test"
data_dir = "data"

[smtp]
listen = ["tcp:{smtp}:interface=127.0.0.1"]

[queue]
retry_schedule = ["1s"]
poll_interval = "200ms"

[[domain]]
name = "example.com"
routes = ["smtp://127.0.0.1:{primary}"]
recipients = "any"
"""


class _SinkHandler(socketserver.StreamRequestHandler):
    """
    Just enough SMTP to take one message: records the DATA lines.
    """

    def handle(self) -> None:
        self.wfile.write(b"220 primary.test\r\n")
        in_data = False
        lines: list[bytes] = []
        for line in self.rfile:
            if in_data:
                if line == b".\r\n":
                    self.server.bodies.append(b"".join(lines))  # type: ignore[attr-defined]
                    in_data = False
                    self.wfile.write(b"250 2.0.0 ok\r\n")
                else:
                    lines.append(line)
                continue
            verb = line[:4].upper()
            if verb == b"DATA":
                in_data = True
                self.wfile.write(b"354 go\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


def _start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "relayx", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=config.parent,
    )


def _stop(process: subprocess.Popen[bytes]) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    # twistd ends by re-raising the signal it was stopped with
    assert process.returncode in (0, -signal.SIGTERM), output.decode()
    return output.decode()


def test_node_keeps_mail_across_restart_with_embedded_redis(tmp_path: Path) -> None:
    """When a node with no Redis configured accepts mail and restarts, the mail survives and is delivered."""
    smtp_port, primary_port = free_port(), free_port()
    config = tmp_path / "relayx.toml"
    config.write_text(CONFIG.format(smtp=smtp_port, primary=primary_port))

    node = _start(config)
    try:
        wait_port(smtp_port, node)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            assert client.sendmail("bob@sender.test", ["alice@example.com"], b"Subject: kept\r\n\r\nsafe\r\n") == {}
    finally:
        log = _stop(node)
    assert "embedded redis-server" in log
    # Redis 6 writes appendonly.aof; Redis 7 a directory of AOF parts
    aof = tmp_path / "data" / "redis"
    # the message is in the AOF: its Subject as its hash's search field (the body is in the body store)
    written = b"".join(part.read_bytes() for part in [*aof.glob("appendonly*.aof*"), *aof.glob("*/*.aof")])
    assert b"$7\r\nsubject\r\n$4\r\nkept\r\n" in written
    # the embedded Redis went away with the node
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in processes

    sink = socketserver.ThreadingTCPServer(("127.0.0.1", primary_port), _SinkHandler)
    sink.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=sink.serve_forever, daemon=True)
    thread.start()
    node = _start(config)
    try:
        deadline = time.monotonic() + 30
        while not sink.bodies and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
    finally:
        _stop(node)
        sink.shutdown()
        sink.server_close()
    [body] = sink.bodies  # type: ignore[attr-defined]
    assert body.endswith(b"Subject: kept\r\n\r\nsafe\r\n") and body.startswith(b"Received: from ")


def test_twistd_lists_the_plugin() -> None:
    """When relayx is installed, `twistd --help` lists the relayx plugin."""
    twistd = Path(sys.executable).parent / "twistd"
    result = subprocess.run([str(twistd), "--help"], capture_output=True, text=True, timeout=60)
    assert "relayx" in result.stdout


def test_node_that_cannot_listen_exits_1(tmp_path: Path) -> None:
    """When the SMTP port is taken, the node says so in one line and exits with status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relayx.toml"
        config.write_text(CONFIG.format(smtp=port, primary=free_port()))
        result = subprocess.run(
            [sys.executable, "-m", "relayx", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode == 1, result.stdout
    [line] = [line for line in result.stdout.splitlines() if "cannot start" in line]
    assert f"smtp.listen: cannot listen on 'tcp:{port}:interface=127.0.0.1'" in line


def test_startup_objects_frozen_only_by_a_node_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When twistd makes the node, start-up's objects are frozen once it is up; a node in a test's process does not."""
    import gc

    from relayx import tap
    from relayx.config import parse
    from relayx.service import RelayNode

    calls: list[str] = []

    def collect(*generation: int) -> int:
        calls.append("collect")
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    config = parse(
        {
            "node": {"id": "n1", "hostname": "mx2.relayx.test", "data_dir": str(tmp_path)},
            "redis": {"url": "redis://127.0.0.1:1/0"},
            "domain": [{"name": "example.com", "routes": ["smtp://127.0.0.1:25"], "recipients": "any"}],
        },
        "test.toml",
        tmp_path,
    )
    RelayNode(config, reactor=None)._freeze_startup()
    assert calls == []
    options = tap.Options()
    options.loaded = config
    node = tap.makeService(options)
    tap.NODES.remove(node)
    assert isinstance(node, RelayNode)
    node._freeze_startup()
    assert calls == ["collect", "freeze"]
