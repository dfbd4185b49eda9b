"""
What the benchmarks start and measure: a Redis, relayx nodes and (when
installed) a Postfix instance configured as a backup MX, all on loopback,
plus CPU and memory readings from /proc and Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from relayx.redis.embedded import find_redis_server, free_port, redis_arguments

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def wait_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """
    User and system CPU time of a process, its reaped children and its
    live ones (a node's SMTP workers).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    total = (utime + stime + cutime + cstime) / CLOCK_TICKS
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue  # it ended meanwhile
    return total


def children(pid: int) -> list[int]:
    """
    The live child processes of ``pid``.
    """
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return found


def redis_command(port: int, *args: str) -> bytes:
    """
    One command to Redis over a plain socket; the raw reply.
    """
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            data += chunk
            if not chunk or _complete(data):
                return data


def _complete(data: bytes) -> bool:
    if data.startswith(b"$"):
        header, _, rest = data.partition(b"\r\n")
        return int(header[1:]) < 0 or len(rest) >= int(header[1:]) + 2
    return data.endswith(b"\r\n")


def redis_info(port: int, *sections: str) -> dict[str, str]:
    """INFO's ``field:value`` lines of ``sections``."""
    text = redis_command(port, "INFO", *sections).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def redis_memory(port: int) -> int:
    return int(redis_info(port, "memory")["used_memory"])


class Redis:
    def __init__(self, directory: Path, fsync: str = "always") -> None:
        self.directory = directory / "redis"
        self.directory.mkdir(parents=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [find_redis_server(), *redis_arguments(self.port, self.directory, fsync)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.process)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


NODE = """
[node]
id = "bench-{n}"
hostname = "bench-{n}.relayx.test"
data_dir = "data-{n}"
processes = {processes}

[smtp]
listen = ["tcp:{port}:interface=127.0.0.1"]
max_connections_per_ip = 1000

[redis]
url = "redis://127.0.0.1:{redis}/0"

[queue]
retry_schedule = [{retry}]
probe_interval = "{probe}"
workers = {workers}

[[domain]]
name = "example.com"
routes = ["smtp://127.0.0.1:{primary}"]
recipients = "any"
concurrency = {concurrency}
rate = {rate}
ramp_up = "0s"
"""


class Nodes:
    """
    ``count`` relayx nodes as processes sharing one Redis.
    """

    def __init__(
        self,
        directory: Path,
        count: int,
        redis_port: int,
        primary: int,
        rate: float = 0,
        concurrency: int = 1,
        workers: int = 8,
        retry: str = '"1h"',
        probe: str = "1h",
        processes: int = 1,
        extra: str = "",
    ) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for n, port in enumerate(self.ports):
            config = directory / f"node-{n}.toml"
            config.write_text(
                NODE.format(
                    n=n,
                    port=port,
                    redis=redis_port,
                    primary=primary,
                    rate=rate,
                    concurrency=concurrency,
                    workers=workers,
                    retry=retry,
                    probe=probe,
                    processes=processes,
                )
                + extra.format(n=n)
            )
            log = open(directory / f"node-{n}.log", "wb")
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "relayx", "--config", str(config)], stdout=log, stderr=log, cwd=ROOT
                )
            )
        for port, process in zip(self.ports, self.processes, strict=True):
            wait_port(port, process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def postfix_available() -> bool:
    return shutil.which("postfix") is not None and Path("/usr/lib/postfix/sbin/master").exists()


class Postfix:
    """
    A private Postfix instance configured as a backup MX for example.com
    (relay_domains, relaying to the primary), listening on a loopback port.
    """

    def __init__(self, directory: Path, primary: int) -> None:
        self.port = free_port()
        directory.chmod(0o755)  # Postfix's daemons run as the postfix user
        self.config = directory / "postfix-etc"
        self.config.mkdir()
        queue = directory / "postfix-queue"
        data = directory / "postfix-data"
        for d in (queue, data):
            d.mkdir()
        shutil.chown(data, "postfix")
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        master = [
            f"127.0.0.1:{self.port} inet n - y - - smtpd" if line.startswith("smtp      inet") else line
            for line in master
        ]
        (self.config / "master.cf").write_text("\n".join(master) + "\n")
        (self.config / "main.cf").write_text(
            f"""
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = example.com
transport_maps = inline:{{ example.com=smtp:[127.0.0.1]:{primary} }}
smtpd_relay_restrictions = reject_unauth_destination
maillog_file = {directory}/postfix.log
maillog_file_prefixes = {directory}
smtpd_banner = $myhostname ESMTP
default_process_limit = 100
"""
        )
        subprocess.run(["postfix", "-c", str(self.config), "set-permissions"], check=False, capture_output=True)
        subprocess.run(["postfix", "-c", str(self.config), "check"], check=False, capture_output=True)
        subprocess.run(["postfix", "-c", str(self.config), "start"], check=True, capture_output=True)
        wait_port(self.port)

    def master_pid(self) -> int:
        queue = Path(
            subprocess.run(
                ["postconf", "-c", str(self.config), "-h", "queue_directory"], capture_output=True, text=True
            ).stdout.strip()
        )
        return int((queue / "pid" / "master.pid").read_text().strip())

    def process_cpu(self) -> float:
        """
        CPU seconds of every Postfix process of this instance (master and children).
        """
        total = 0.0
        master = self.master_pid()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if int(entry.name) == master or ppid == master:
                    total += cpu_seconds(int(entry.name))
        return total

    def flush(self) -> None:
        """
        Attempt every queued message now, as an operator does once the primary is back.
        """
        subprocess.run(["postfix", "-c", str(self.config), "flush"], check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.config), "stop"], check=False, capture_output=True)
