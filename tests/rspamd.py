"""
A real ``rspamd`` on a loopback port for the content-filter tests, with a
configuration of its own (Debian's modules, DNS pointed at a closed
loopback port so nothing leaves the machine). Its compiled regular
expressions are kept between runs, which makes later starts take a second
instead of a quarter of a minute.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from unittest import SkipTest

from relayx.redis.embedded import free_port

CONFIG = """
.include "$CONFDIR/common.conf"
options {{
    pidfile = "{run}/rspamd.pid";
    .include "$CONFDIR/options.inc"
    dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.2s; retransmits = 1; }}
}}
logging {{ type = "console"; level = "error"; }}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    count = 1;
    .include "$CONFDIR/worker-normal.inc"
}}
"""


def find_rspamd() -> str | None:
    return shutil.which("rspamd") or next(
        (p for p in ("/usr/bin/rspamd", "/usr/sbin/rspamd") if os.path.exists(p)), None
    )


class RspamdProcess:
    """
    ``rspamd`` with one normal worker (the one that answers ``/checkv2``).
    """

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.run = Path(tempfile.mkdtemp(prefix="relayx-rspamd-"))
        self.cache = Path.home() / ".cache" / "relayx-tests" / "rspamd"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, within: float = 120.0) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))  # a DNS "server" that never answers
        self._dns = closed
        config = self.run / "rspamd.conf"
        config.write_text(CONFIG.format(run=self.run, port=self.port, dns_port=closed.getsockname()[1]))
        user = ["-u", "root", "-g", "root"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [
                self.binary,
                "-f",
                *user,
                "-c",
                str(config),
                "--var",
                f"DBDIR={self.cache}",
                "--var",
                f"RUNDIR={self.run}",
                "--var",
                f"LOCAL_CONFDIR={self.run}/local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rspamd exited with {self.process.returncode} while starting")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as answer:
                    if answer.read().strip() == b"pong":
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"rspamd did not answer on port {self.port} within {within:g}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._dns.close()
        shutil.rmtree(self.run, ignore_errors=True)


_shared: RspamdProcess | None = None


def shared_rspamd() -> RspamdProcess:
    """
    One rspamd for the test session; skips the test, saying why, when
    rspamd is not installed (``.ci/run`` installs Debian's).
    """
    global _shared
    if _shared is None:
        binary = find_rspamd()
        if binary is None:
            raise SkipTest("rspamd is not installed (apt-get install rspamd); the rspamd tests need a real one")
        rspamd = RspamdProcess(binary)
        rspamd.start()
        atexit.register(rspamd.stop)
        _shared = rspamd
    return _shared
