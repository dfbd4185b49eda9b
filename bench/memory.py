"""
A node's memory while many large messages come in at once.

``python -m bench.memory --sessions 50 --size 26214400`` starts a Redis and
one relayx node (processes), opens ``--sessions`` sessions that each send one
message of ``--size`` bytes at full speed over loopback, holds every session
just before its final ``.`` until all have sent their message (so that all
are being received, and all end, at once), then ends them together. The
node's resident set size (VmRSS from /proc) is sampled every 50 ms; the peak
while the messages come in and while they are committed is reported, with
the node's RSS at rest before and after. Bounded by ``--seconds``.

It writes ``bench/results/memory-<time>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Nodes, Redis, redis_memory
from bench.load import header, make_payload, read_reply
from relayx.redis.embedded import free_port

RESULTS = ROOT / "bench" / "results"
#: what a session writes at once (and, at most, what it has buffered)
CHUNK = 64 * 1024
#: connections being opened at once (below the listen backlog, 50)
OPENING = 20


def rss(pid: int) -> int:
    """
    Resident set size of a process, in bytes.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Sampler:
    """
    The peak RSS of a process per phase, sampled in a thread.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.phase = "rest"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss(self.pid)
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def session(
    port: int, n: int, payload: bytes, all_sent: asyncio.Event, sent: list[int], opening: asyncio.Semaphore
) -> int:
    # a few connections are opened at a time: a burst of a thousand overflows
    # the listen backlog, and a connection whose last handshake packet was
    # dropped looks open to the client but never gets its greeting
    async with opening:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await read_reply(reader)  # the greeting: the server has the connection
        except BaseException:
            writer.close()
            raise
    try:
        writer.write(b"EHLO memory.test\r\n")
        await read_reply(reader)
        # every session sends the one shared payload: the generator holds one
        # copy of it, not one per session
        size = len(header(n)) + len(payload)
        envelope = f"MAIL FROM:<load@sender.test> SIZE={size}\r\nRCPT TO:<u{n}@example.com>\r\nDATA\r\n"
        writer.write(envelope.encode())
        codes = [await read_reply(reader) for _ in range(3)]
        if codes[2] != 354:
            return codes[2]
        writer.write(header(n))
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK):
            writer.write(view[start : start + CHUNK])
            await writer.drain()
        sent.append(n)
        await all_sent.wait()
        writer.write(b".\r\n")
        code = await read_reply(reader)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return code
    finally:
        writer.close()


async def load(port: int, sessions: int, size: int, sampler: Sampler, seconds: float) -> dict[str, Any]:
    payload = make_payload(size)
    all_sent = asyncio.Event()
    sent: list[int] = []
    sampler.phase = "receiving"
    begin = time.monotonic()
    opening = asyncio.Semaphore(OPENING)
    tasks = [asyncio.ensure_future(session(port, n, payload, all_sent, sent, opening)) for n in range(sessions)]

    async def release() -> None:
        # sessions refused or cut off never reach the barrier: count them in
        while len(sent) + sum(1 for t in tasks if t.done()) < sessions:
            await asyncio.sleep(0.05)
        received = time.monotonic()
        sampler.phase = "committing"
        all_sent.set()
        timings["received_s"] = round(received - begin, 2)

    timings: dict[str, float] = {}
    releaser = asyncio.ensure_future(release())
    codes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), seconds)
    await releaser
    timings["total_s"] = round(time.monotonic() - begin, 2)
    return {"codes": [c if isinstance(c, int) else repr(c) for c in codes], **timings}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=25 * 1024 * 1024)
    parser.add_argument("--seconds", type=float, default=600, help="give up after this long")
    parser.add_argument("--fsync", default="everysec", choices=["always", "everysec", "no"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--bodies",
        default="redis",
        choices=["redis", "directory"],
        help="where the node keeps bodies (a thousand 25 MiB messages do not fit in Redis's memory)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the node's log and data (the path is printed)")
    options = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="relayx-bench-"))
    redis = Redis(directory, options.fsync)
    bodies = f'\n[bodies]\nbackend = "{options.bodies}"\n' + (
        'directory = "bodies"\n' if options.bodies == "directory" else ""
    )
    nodes = Nodes(directory, 1, redis.port, free_port(), extra=bodies)
    pid = nodes.pids[0]
    try:
        time.sleep(1)
        at_rest = rss(pid)
        sampler = Sampler(pid)
        outcome = asyncio.run(load(nodes.ports[0], options.sessions, options.size, sampler, options.seconds))
        sampler.phase = "after"
        time.sleep(1)
        sampler.stop()
        accepted = sum(1 for c in outcome["codes"] if c == 250)
        mib = 1024 * 1024
        result = {
            "kind": "memory",
            "sessions": options.sessions,
            "size": options.size,
            "bodies": options.bodies,
            "accepted": accepted,
            "codes": sorted({str(c) for c in outcome["codes"]}),
            "received_s": outcome.get("received_s"),
            "total_s": outcome["total_s"],
            "node_rss_mib": {
                "at_rest": round(at_rest / mib, 1),
                **{phase: round(peak / mib, 1) for phase, peak in sampler.peaks.items()},
            },
            "redis_used_mib": round(redis_memory(redis.port) / mib, 1),
        }
    finally:
        nodes.stop()
        redis.stop()
        if options.keep:
            print(f"kept: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    options.results.mkdir(parents=True, exist_ok=True)
    path = options.results / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"result: {path}")


if __name__ == "__main__":
    main()
