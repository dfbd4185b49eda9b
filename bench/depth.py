"""
``python -m bench depth``: relayx with a deep queue.

One Redis (``appendfsync always``) and one node with its admin API; the
primary is down. For each depth (0 first, then each ``--depth`` in turn), the
queue is filled up to it through the queue's enqueue path (``bench/fill.py``,
pipelined, not SMTP), then measured:

- accept: a short burst through SMTP (``--burst`` messages, ``--sessions``),
  messages per second and p99 of the reply to DATA;
- Redis memory per queued message (growth of ``used_memory`` over the empty queue);
- each operator call (domains summary, a messages page, searches, a metrics
  scrape), its time over HTTP and the longest Redis command while it ran
  (SLOWLOG, every command logged);
- drain: the primary comes back (a recording sink) for ``--drain-seconds``;
  messages delivered per second, then it goes down again.

Accept and drain run ``--passes`` times at each depth, once any AOF rewrite the
fill set off has finished; each reports the median pass, every pass's rate, and
the node's and Redis's CPU per message and Redis's forks during it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Nodes, Redis, cpu_seconds, redis_command, redis_info, redis_memory, wait_port
from relayx.redis.embedded import free_port

TOKEN = "bench-depth-token-0123456789abcdef"
#: the bench's own commands (reading the slow log of 100,000 entries takes tens of ms), not relayx's
BENCH_COMMANDS = ("slowlog", "config", "memory")
#: where bodies go: a directory body store (Redis keeps a stub), or Redis itself
BODIES = {
    "directory": '\n[bodies]\nbackend = "directory"\ndirectory = "{directory}"\n',
    "redis": '\n[bodies]\nbackend = "redis"\n',
}
ADMIN = """
[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
[admin.tokens]
bench = "{token}"
"""


def http(port: int, path: str, token: str | None = TOKEN) -> tuple[float, int, bytes]:
    """
    One GET: milliseconds, HTTP status and body.
    """
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    return round((time.perf_counter() - started) * 1000, 2), status, body


def _resp(reader: Any) -> Any:
    """
    One RESP reply from a socket's file, whole (``redis_command`` reads only small replies).
    """
    line = reader.readline()
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b"-"):
        return rest.decode("utf-8", "replace")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        data = reader.read(int(rest) + 2)
        return data[:-2]
    if kind == b"*":
        return [_resp(reader) for _ in range(max(0, int(rest)))]
    raise RuntimeError(f"unexpected reply from Redis: {line!r}")


@functools.cache
def _script_names() -> dict[str, str]:
    """
    The queue's Lua scripts by their SHA1, to name an ``EVALSHA`` in the slow log.
    """
    from relayx.queue.redis import RedisQueue
    from relayx.redis.scripts import Script

    return {
        script.sha: name.strip("_").lower() + ".lua"
        for name, script in vars(RedisQueue).items()
        if isinstance(script, Script)
    }


def _command_name(args: list[bytes]) -> str:
    """
    A slow log entry's command: its name, or the script's for ``EVALSHA``.
    """
    if not args:
        return ""
    name = args[0].decode("utf-8", "replace").lower()
    if name == "evalsha" and len(args) > 1:
        sha = args[1].decode("ascii", "replace")
        return _script_names().get(sha, f"evalsha {sha[:8]}")
    return name


def slowlog_max_us(port: int) -> tuple[int, str]:
    """
    The longest command in Redis's slow log (microseconds) and its name; the log is then cleared.
    """
    longest = slowlog(port)
    return max(((us, name) for name, (us, _, _) in longest.items()), default=(0, ""))


def slowlog(port: int) -> dict[str, tuple[int, int, int]]:
    """
    Each command in Redis's slow log by name: its longest run (microseconds), how many
    ran and its 99th percentile (microseconds); the log is then cleared.

    The slow log times a command's execution alone: with ``appendfsync always``
    the AOF's write and fsync come after, before Redis replies (Redis's own
    latency, LATENCY's ``aof-fsync-always`` event), and are not in it.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"*3\r\n$7\r\nSLOWLOG\r\n$3\r\nGET\r\n$6\r\n100000\r\n")
        entries = _resp(s.makefile("rb"))
    runs: dict[str, list[int]] = {}
    for entry in entries:
        name = _command_name(entry[3])
        if name not in BENCH_COMMANDS:
            runs.setdefault(name, []).append(int(entry[2]))
    redis_command(port, "SLOWLOG", "RESET")
    return {name: (max(us), len(us), sorted(us)[len(us) * 99 // 100]) for name, us in runs.items()}


def slowest(port: int) -> dict[str, Any]:
    """
    The slow log of a phase: the longest command, and per command its longest run (ms),
    how many ran and their 99th percentile (ms). On a shared machine a command can be
    preempted while it runs: a longest run far above the command's p99 is that, not its cost.
    """
    found = slowlog(port)
    longest = max(((us, name) for name, (us, _, _) in found.items()), default=(0, ""))
    return {
        "redis_longest_ms": round(longest[0] / 1000, 3),
        "redis_longest_command": longest[1],
        "redis_commands": {
            name: {"longest_ms": round(us / 1000, 3), "count": count, "p99_ms": round(p99 / 1000, 3)}
            for name, (us, count, p99) in sorted(found.items(), key=lambda item: -item[1][0])[:8]
        },
    }


def persistence_settled(port: int, limit: float = 600) -> float:
    """
    Wait (at most ``limit`` s) until Redis has no AOF rewrite running or scheduled:
    the fill's appends trigger rewrites (auto-aof-rewrite), and one still forking
    and writing hundreds of MB would share the two cores with what a phase measures.
    The seconds waited.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        info = redis_info(port, "persistence")
        if info.get("aof_rewrite_in_progress") == "0" and info.get("aof_rewrite_scheduled") == "0":
            break
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)


class Costs:
    """
    What a phase cost: CPU seconds of the node and of Redis (its main thread and its
    forked children), and the forks Redis made (AOF rewrites) while it ran.
    """

    def __init__(self, redis: int, node_pids: list[int]) -> None:
        self.redis, self.node_pids = redis, node_pids
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        info = redis_info(self.redis, "cpu", "stats")
        return {
            "node": sum(cpu_seconds(pid) for pid in self.node_pids),
            "redis": float(info["used_cpu_sys_main_thread"]) + float(info["used_cpu_user_main_thread"]),
            "redis_children": float(info["used_cpu_sys_children"]) + float(info["used_cpu_user_children"]),
            "forks": float(info["total_forks"]),
        }

    def per_message(self, messages: int) -> dict[str, Any]:
        after = self._read()
        spent = {name: after[name] - self.before[name] for name in after}
        n = max(1, messages)
        return {
            "node_cpu_ms_per_msg": round(spent["node"] * 1000 / n, 3),
            "redis_cpu_ms_per_msg": round(spent["redis"] * 1000 / n, 3),
            "redis_fork_cpu_s": round(spent["redis_children"], 2),
            "redis_forks": int(spent["forks"]),
        }


def bucket(value: str) -> str:
    """A recipient's or Message-ID's search index bucket (common.lua's index_bucket)."""
    return hashlib.sha1(value.lower().encode()).hexdigest()[:4]


def memory_breakdown(port: int, prefix: str, n: int, depth: int) -> dict[str, int]:
    """
    What one queued message costs Redis, key by key (``MEMORY USAGE``): message
    ``n``'s own keys, and its share of the keys all messages share (the queue's
    two orders, the index buckets of its recipient and Message-ID, the domain's
    event log): a shared key's usage divided by its members.
    """

    def usage(key: str) -> int:
        reply = redis_command(port, "MEMORY", "USAGE", key, "SAMPLES", "0")
        return int(reply[1:].split(b"\r\n")[0]) if reply.startswith(b":") else 0

    def count(*args: str) -> int:
        reply = redis_command(port, *args)
        return max(1, int(reply[1:].split(b"\r\n")[0])) if reply.startswith(b":") else 1

    def seqset(base: str, samples: int = 50) -> int:
        # a seqset (common.lua): its directory and its chunks, per member; at
        # depth, from chunks sampled evenly along the directory
        chunks = count("ZCARD", base)
        sizes, members = 0, 0
        ranks = sorted({round(i * (chunks - 1) / max(1, samples - 1)) for i in range(min(samples, chunks))})
        for rank in ranks:
            reply = redis_command(port, "ZRANGE", base, str(rank), str(rank))
            if not reply.startswith(b"*1"):
                continue
            chunk = reply.split(b"\r\n")[2].decode()
            sizes += usage(f"{base}:{chunk}")
            members += count("ZCARD", f"{base}:{chunk}")
        if not members:
            return 0
        return round((usage(base) + chunks * sizes / len(ranks)) / (chunks * members / len(ranks)))

    qid = f"D{n:09d}"
    shared = {
        "recipient_index": f"{prefix}:ix:rcpt:{bucket(f'rcpt{n}@example.com')}",
        "message_id_index": f"{prefix}:ix:mid:{bucket(f'{n}.depth@bench.test')}",
        "event_log": f"{prefix}:events:example.com",
    }
    counts = {name: count("XLEN" if name == "event_log" else "ZCARD", key) for name, key in shared.items()}
    result = {
        # the message's fields and its (only) job's share one hash (common.lua's msg_key)
        "message_hash": usage(f"{prefix}:job:{qid}.1"),
        # the queue's two orders (seqsets <p>:aq:<q>, <p>:rq:<q>), per job
        "queue_zset": seqset(f"{prefix}:aq:example.com"),
        "ready_zset": seqset(f"{prefix}:rq:example.com"),
    }
    for name, key in shared.items():
        # a queued message has one entry in each (the event log: its "accepted")
        result[name] = round(usage(key) / counts[name])
    result["sum"] = sum(result.values())
    result["keys"] = count("DBSIZE")
    result["depth"] = depth
    return result


def operator_calls(admin: int, redis: int) -> dict[str, Any]:
    """
    Each operator call: its time (best and worst of three) and the longest Redis command meanwhile.
    """
    calls = {
        "api_domains": "/api/v1/domains",
        "api_domain": "/api/v1/domains/example.com",
        "messages_page": "/api/v1/messages?domain=example.com&limit=100",
        "messages_next_page": "/api/v1/messages?domain=example.com&limit=100&cursor=50",
        "search_sender": "/api/v1/messages?sender=sender7@load.test&limit=50",
        "search_recipient": "/api/v1/messages?recipient=rcpt3@example.com",
        "search_message_id": "/api/v1/messages?message_id=3.depth@bench.test",
        "search_subject_scan": "/api/v1/messages?subject_has=no-such-subject&limit=50",
        "search_newer_than": "/api/v1/messages?newer_than=5s&limit=50",
        "metrics": "/metrics",
    }
    result: dict[str, Any] = {}
    for name, path in calls.items():
        times, statuses, block = [], [], (0, "")
        for _ in range(3):
            slowlog_max_us(redis)
            ms, status, _ = http(admin, path, None if name == "metrics" else TOKEN)
            times.append(ms)
            statuses.append(status)
            block = max(block, slowlog_max_us(redis))
        result[name] = {
            "ms": min(times),
            "ms_max": max(times),
            "status": max(statuses),
            "redis_longest_ms": round(block[0] / 1000, 3),
            "redis_longest_command": block[1],
        }
    return result


def fill(config: Path, start: int, count: int, size: int, processes: int) -> dict[str, Any]:
    """
    ``count`` messages numbered from ``start``, by ``processes`` fill processes at
    once (each a share of the numbers): the body store's writes and the node-side
    work of an enqueue are spread over the cores, Redis sees them all pipelined.
    """
    if count <= 0:
        return {"filled": 0, "seconds": 0.0, "processes": 0}
    started = time.monotonic()
    share = -(-count // processes)
    running = []
    for first in range(start, start + count, share):
        command = [sys.executable, "-m", "bench.fill", "--config", str(config), "--start", str(first)]
        command += ["--count", str(min(share, start + count - first)), "--size", str(size)]
        running.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT))
    filled = 0
    for process in running:
        out, _ = process.communicate(timeout=7200)
        if process.returncode:
            raise RuntimeError(f"bench.fill failed ({process.returncode})")
        filled += int(json.loads(out.strip().splitlines()[-1])["filled"])
    seconds = round(time.monotonic() - started, 3)
    return {"filled": filled, "seconds": seconds, "msg_per_s": round(filled / seconds), "processes": len(running)}


def queued(admin: int) -> int:
    _, _, body = http(admin, "/api/v1/domains/example.com")
    return int(json.loads(body)["total"])


def drain(primary: int, directory: Path, seconds: float, admin: int) -> dict[str, Any]:
    """
    Bring the primary up for ``seconds`` after its first delivery; the rate it receives at.
    """
    record = directory / f"drain-{time.time():.0f}.jsonl"
    before = queued(admin)
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--port", str(primary), "--record", str(record)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        assert sink.stderr is not None
        sink.stderr.readline()
        up = time.monotonic()
        first = None
        deadline = up + seconds + 15
        while time.monotonic() < deadline:
            lines = record.read_text().count("\n") if record.exists() else 0
            if lines and first is None:
                first = time.monotonic()
            if first is not None and time.monotonic() - first >= seconds:
                break
            if before and lines >= before:
                break
            time.sleep(0.05)
    finally:
        sink.terminate()
        sink.wait(10)
    arrivals = sorted(json.loads(line)["t"] for line in record.read_text().splitlines()) if record.exists() else []
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    return {
        "delivered": len(arrivals),
        "first_after_s": round(first - up, 2) if first is not None else None,
        "msg_per_s": round((len(arrivals) - 1) / span, 1) if span else None,
    }


def median_pass(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The pass with the median rate, and every pass's rate: one burst or drain of a
    few seconds on a shared machine varies by ±15 %, a depth's figure is their median.
    """
    rates = [p["msg_per_s"] or 0.0 for p in passes]
    middle = sorted(range(len(passes)), key=lambda i: rates[i])[len(passes) // 2]
    return {**passes[middle], "passes_msg_per_s": rates}


def depth(options: argparse.Namespace) -> dict[str, Any]:
    from bench.__main__ import machine, run_load, summarize

    directory = Path(tempfile.mkdtemp(prefix="relayx-depth-"))
    primary, admin = free_port(), free_port()
    depths = [0, *sorted(set(options.depth))]
    result: dict[str, Any] = {
        "kind": "depth",
        "depths": depths,
        "size": options.size,
        "burst": options.burst,
        "sessions": options.sessions,
        "drain_seconds": options.drain_seconds,
        "passes": options.passes,
        "bodies": options.bodies,
        "machine": machine(),
        "points": [],
    }
    redis = Redis(directory, "always")
    redis_command(redis.port, "CONFIG", "SET", "slowlog-max-len", "100000")
    nodes = Nodes(
        directory,
        1,
        redis.port,
        primary,
        concurrency=options.concurrency,
        retry='"1s", "2s"',
        probe="1s",
        extra=ADMIN.format(admin=admin, token=TOKEN) + BODIES[options.bodies].format(directory=directory / "bodies"),
    )
    try:
        wait_port(admin)
        redis_command(redis.port, "CONFIG", "SET", "slowlog-log-slower-than", "-1")
        redis_command(redis.port, "SLOWLOG", "RESET")
        empty = redis_memory(redis.port)
        filled = 0
        for target in depths:
            now_queued = queued(admin)
            redis_command(redis.port, "CONFIG", "SET", "slowlog-log-slower-than", "-1")
            took = fill(directory / "node-0.toml", filled, target - now_queued, options.size, options.fill_processes)
            filled += took["filled"]
            redis_command(redis.port, "SLOWLOG", "RESET")
            point: dict[str, Any] = {"depth": queued(admin), "fill": took}
            used = redis_memory(redis.port)
            redis_command(redis.port, "CONFIG", "SET", "slowlog-log-slower-than", "0")
            point["redis_used_memory"] = used
            point["redis_bytes_per_msg"] = round((used - empty) / point["depth"]) if point["depth"] else None
            if filled:
                point["redis_bytes_by_key"] = memory_breakdown(redis.port, "relayx", filled - 7, point["depth"])
            point["calls"] = operator_calls(admin, redis.port)
            point["rewrite_wait_s"] = persistence_settled(redis.port)
            accepts, drains = [], []
            for _ in range(options.passes):
                costs = Costs(redis.port, nodes.pids)
                load = run_load(nodes.ports, options.sessions, options.burst, [options.size], options.seconds)
                accept = summarize(load, {})
                accepts.append({k: accept[k] for k in ("accepted", "refused", "msg_per_s", "latency_ms")})
                accepts[-1].update(costs.per_message(accept["accepted"]))
                accepts[-1].update(slowest(redis.port))
                costs = Costs(redis.port, nodes.pids)
                drains.append(drain(primary, directory, options.drain_seconds, admin))
                drains[-1].update(costs.per_message(drains[-1]["delivered"]))
                drains[-1].update(slowest(redis.port))
            point["accept"], point["drain"] = median_pass(accepts), median_pass(drains)
            result["points"].append(point)
            print(f"depth {point['depth']}: done", file=sys.stderr)
    finally:
        nodes.stop()
        redis.stop()
        # ~4 GB of body files at 1,000,000: left behind, their deletion slowed the next runs
        shutil.rmtree(directory, ignore_errors=True)
    return result
