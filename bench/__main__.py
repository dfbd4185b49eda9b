"""
relayx's load benchmarks.

``python -m bench accept``: accept throughput and latency of N nodes (Redis
with ``appendfsync always``) under S concurrent sessions, and of Postfix as a
backup MX for the same domain when it is installed.

``python -m bench replay``: fill the queue while the primary is down, bring a
recording sink up, and measure the drain against the configured throttle.
With ``--capacity-rate N``, the primary has a capacity (N msg/s, ``--capacity-sessions``
at once; 421 above it) that drops to a third for a while (``--slow-from``,
``--slow-for``): the adaptive pace's benchmark (share of the capacity used, of
attempts answered 421, time back to full pace after the recovery).

``python -m bench depth``: fill the queue to given depths (through the
queue's enqueue path) and measure, per depth, accept rate and p99, Redis
memory per queued message, each operator call and the longest Redis command
during it, and the drain rate (``bench/depth.py``).

Every run writes ``bench/results/<kind>-<time>.json`` and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import (
    ROOT,
    Nodes,
    Postfix,
    Redis,
    cpu_seconds,
    postfix_available,
    redis_memory,
)
from bench.sink import recipient_order_violations
from relayx.redis.embedded import free_port

RESULTS = ROOT / "bench" / "results"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run_load(
    ports: list[int], sessions: int, count: int, sizes: list[int], seconds: float, mailboxes: int = 0
) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.load", "--sessions", str(sessions), "--count", str(count)]
    command += ["--seconds", str(seconds), "--mailboxes", str(mailboxes)]
    for port in ports:
        command += ["--port", str(port)]
    for size in sizes:
        command += ["--size", str(size)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=seconds + 60, check=True)
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def summarize(load: dict[str, Any], cpu: dict[str, float]) -> dict[str, Any]:
    samples = load["samples"]
    ok = [s for s in samples if s[2] == 250]
    duration = max((s[1] for s in ok), default=0.0) - min((s[0] for s in ok), default=0.0)
    latencies = [(end - start) * 1000 for start, end, _, _ in ok]
    per_second: dict[int, int] = {}
    for _, end, _, _ in ok:
        per_second[int(end)] = per_second.get(int(end), 0) + 1
    return {
        "accepted": len(ok),
        "refused": len(samples) - len(ok),
        "seconds": round(duration, 3),
        "msg_per_s": round(len(ok) / duration, 1) if duration else 0.0,
        "mb_per_s": round(sum(s[3] for s in ok) / duration / 1e6, 2) if duration else 0.0,
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 2),
            "p90": round(percentile(latencies, 90), 2),
            "p99": round(percentile(latencies, 99), 2),
            "max": round(max(latencies, default=float("nan")), 2),
        },
        "cpu_ms_per_msg": {name: round(seconds * 1000 / max(1, len(ok)), 3) for name, seconds in cpu.items()},
        "per_second": [per_second.get(s, 0) for s in range(0, int(max(per_second, default=0)) + 1)],
        "latency_series": [[round(end, 3), round((end - start) * 1000, 2)] for start, end, _, _ in ok],
    }


def smtp_source(port: int, sessions: int, count: int, size: int, reuse: bool) -> float | None:
    """
    Postfix's own load generator against ``port``: messages per second, or
    ``None`` when it is not installed. With ``reuse``, each session sends
    message after message (``-d``); without, one message per connection,
    as most senders reach an MX.
    """
    binary = shutil.which("smtp-source")
    if binary is None:
        return None
    command = [binary, "-s", str(sessions), "-m", str(count), "-l", str(size), "-f", "load@sender.test"]
    command += ["-t", "rcpt@example.com", *(["-d"] if reuse else []), f"127.0.0.1:{port}"]
    start = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return round(count / (time.monotonic() - start), 1)


def source_runs(port: int, options: argparse.Namespace, cpu: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """
    ``smtp-source`` with and without ``-d``: messages per second and the
    servers' CPU time per message during each (``cpu``: CPU seconds so far
    of each server process).
    """
    if len(options.size) != 1:
        return {}
    found: dict[str, Any] = {}
    for reuse, key in ((False, "smtp_source"), (True, "smtp_source_reuse")):
        before = cpu()
        found[f"{key}_msg_per_s"] = smtp_source(port, options.sessions, options.count, options.size[0], reuse)
        if found[f"{key}_msg_per_s"] is not None:
            after = cpu()
            found[f"{key}_cpu_ms_per_msg"] = {
                name: round((after[name] - before[name]) * 1000 / options.count, 3) for name in before
            }
    return found


def accept(options: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="relayx-bench-"))
    primary = free_port()  # nothing listens there: the primary is down
    result: dict[str, Any] = {
        "kind": "accept",
        "nodes": options.nodes,
        "sessions": options.sessions,
        "count": options.count,
        "sizes": options.size,
        "redis_appendfsync": options.fsync,
        "processes": options.processes,
        "machine": machine(),
    }
    redis = Redis(directory, options.fsync)
    nodes = Nodes(directory, options.nodes, redis.port, primary, processes=options.processes)
    try:
        memory = redis_memory(redis.port)
        pids = {f"relayx-{n}": pid for n, pid in enumerate(nodes.pids)} | {"redis": redis.process.pid}

        def node_cpu() -> dict[str, float]:
            return {name: cpu_seconds(pid) for name, pid in pids.items()}

        before = node_cpu()
        load = run_load(nodes.ports, options.sessions, options.count, options.size, options.seconds)
        after = node_cpu()
        summary = summarize(load, {name: after[name] - before[name] for name in before})
        summary["redis_bytes_per_msg"] = round((redis_memory(redis.port) - memory) / max(1, summary["accepted"]))
        summary |= source_runs(nodes.ports[0], options, node_cpu)
        result["relayx"] = summary
    finally:
        nodes.stop()
        redis.stop()
    if postfix_skipped(options) is None:
        postfix = Postfix(directory, primary)
        try:
            before_cpu = postfix.process_cpu()
            load = run_load([postfix.port], options.sessions, options.count, options.size, options.seconds)
            summary = summarize(load, {"postfix": postfix.process_cpu() - before_cpu})
            summary |= source_runs(postfix.port, options, lambda: {"postfix": postfix.process_cpu()})
            result["postfix"] = summary
        finally:
            postfix.stop()
        result["ratio_relayx_to_postfix"] = round(result["relayx"]["msg_per_s"] / result["postfix"]["msg_per_s"], 2)
        for key in ("smtp_source_msg_per_s", "smtp_source_reuse_msg_per_s"):
            a, b = result["relayx"].get(key), result["postfix"].get(key)
            if a and b:
                result[f"ratio_{key.removesuffix('_msg_per_s')}"] = round(a / b, 2)
    else:
        result["postfix"] = f"not measured: {postfix_skipped(options)}"
    shutil.rmtree(directory, ignore_errors=True)
    return result


def replay(options: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="relayx-bench-"))
    primary = free_port()
    result: dict[str, Any] = {
        "kind": "replay",
        "nodes": options.nodes,
        "count": options.count,
        "rate": options.rate,
        "concurrency": options.concurrency,
        "workers": options.workers,
        "mailboxes": options.mailboxes,
        "machine": machine(),
    }
    if options.capacity_rate:
        result["capacity"] = {
            "rate": options.capacity_rate,
            "sessions": options.capacity_sessions,
            "slow_from": options.slow_from,
            "slow_for": options.slow_for,
            "slow_factor": round(options.slow_factor, 3),
        }
    redis = Redis(directory)
    nodes = Nodes(
        directory,
        options.nodes,
        redis.port,
        primary,
        rate=options.rate,
        concurrency=options.concurrency,
        workers=options.workers,
        retry='"1m", "5m"',
        probe=options.probe,
    )
    pids = {f"relayx-{n}": pid for n, pid in enumerate(nodes.pids)} | {"redis": redis.process.pid}
    try:
        result["relayx"] = drain(
            options,
            directory / "relayx.jsonl",
            primary,
            nodes.ports,
            lambda: None,
            lambda: {name: cpu_seconds(pid) for name, pid in pids.items()},
        )
    finally:
        nodes.stop()
        redis.stop()
    if postfix_skipped(options) is None and not options.capacity_rate:
        postfix = Postfix(directory, primary)
        try:
            # Postfix has no recovery probe: the operator flushes its queue
            result["postfix"] = drain(
                options,
                directory / "postfix.jsonl",
                primary,
                [postfix.port],
                postfix.flush,
                lambda: {"postfix": postfix.process_cpu()},
            )
        finally:
            postfix.stop()
    else:
        result["postfix"] = f"not measured: {postfix_skipped(options) or 'not in the capacity scenario'}"
    if options.keep:
        print(f"kept: {directory}", file=sys.stderr)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return result


def capacity_args(options: argparse.Namespace) -> list[str]:
    """
    The sink's options for a primary with a capacity (none: an empty list).
    """
    if not options.capacity_rate:
        return []
    return [
        *("--capacity-rate", str(options.capacity_rate), "--capacity-sessions", str(options.capacity_sessions)),
        *("--slow-from", str(options.slow_from), "--slow-for", str(options.slow_for)),
        *("--slow-factor", str(options.slow_factor)),
    ]


def capacity_figures(
    options: argparse.Namespace, attempts: list[dict[str, Any]], times: list[float], up: float
) -> dict[str, Any]:
    """
    How the drain used a primary with a capacity: the share of its capacity
    used while there was mail to send (first to last delivery), the share of
    attempts it answered 421, and how long after its recovery the deliveries
    were back at 90 % of the full capacity (3-second average); per second,
    deliveries and the capacity, from the sink's start.
    """
    full: float = options.capacity_rate
    slow_start, slow_end = options.slow_from, options.slow_from + options.slow_for

    def capacity(second: float) -> float:
        return full * (float(options.slow_factor) if slow_start <= second < slow_end else 1.0)

    seconds = int(max((t - up for t in times), default=0)) + 1
    delivered = [0] * seconds
    for t in times:
        delivered[int(t - up)] += 1
    first, last = (times[0] - up, times[-1] - up) if times else (0.0, 0.0)
    offered = sum(capacity(s + 0.5) * max(0.0, min(s + 1, last) - max(s, first)) for s in range(seconds))
    refused = [a for a in attempts if a["attempt"] != "ok"]
    back = None
    if options.slow_for and slow_end < last:
        for s in range(int(slow_end), seconds - 2):
            if sum(delivered[s : s + 3]) / 3 >= 0.9 * full:
                back = round(s + 1.5 - slow_end, 1)
                break
    return {
        "capacity_used": round(len(times) / offered, 3) if offered else None,
        "attempts": len(attempts),
        "answered_421": len(refused),
        "answered_421_share": round(len(refused) / len(attempts), 4) if attempts else None,
        "refused_at_greeting": sum(1 for a in refused if a["attempt"] == "greeting"),
        "refused_at_mail": sum(1 for a in refused if a["attempt"] == "mail"),
        "back_to_full_pace_s": back,
        "goals": {"capacity_used": ">= 0.9", "answered_421_share": "< 0.02", "back_to_full_pace_s": "<= 30"},
        "per_second_capacity": [capacity(s + 0.5) for s in range(seconds)],
        "per_second_from_start": delivered,
        "per_second_421": [sum(1 for a in refused if int(a["t"] - up) == s) for s in range(seconds)],
    }


def drain(
    options: argparse.Namespace,
    record: Path,
    primary: int,
    ports: list[int],
    recovered: Callable[[], None],
    cpu: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """
    Fill the queue behind ``ports`` while the primary is down, bring a
    recording sink up, and measure what it receives and the CPU time the
    servers (``cpu``: seconds by process) spent draining.
    """
    # one session: acceptance order is the order of the message numbers
    fill = run_load(ports, 1, options.count, [options.size], options.seconds, options.mailboxes)
    accepted = sum(1 for s in fill["samples"] if s[2] == 250)
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--port", str(primary), "--record", str(record), *capacity_args(options)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    arrivals: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    try:
        assert sink.stderr is not None
        sink.stderr.readline()  # "sink listening on ...": the primary is back
        up = time.time()
        cpu_before = cpu()
        recovered()
        pace = min(options.rate or 1000, options.capacity_rate or 1000)
        deadline = time.monotonic() + options.seconds + accepted / max(pace, 1) * 2
        while time.monotonic() < deadline:
            lines = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
            arrivals = [a for a in lines if "subject" in a]
            attempts = [a for a in lines if "attempt" in a]
            if len({a["subject"] for a in arrivals}) >= accepted:
                break
            time.sleep(0.2)
        cpu_spent = {name: seconds - cpu_before[name] for name, seconds in cpu().items()}
    finally:
        sink.terminate()
        sink.wait(10)
    times = sorted(a["t"] for a in arrivals)
    in_order = sorted(arrivals, key=lambda a: a["t"])
    numbers = [int(a["subject"].split()[-1]) for a in in_order]
    unique: list[int] = list(dict.fromkeys(numbers))
    # what a person sees: each mailbox's messages in acceptance order
    violations = recipient_order_violations(zip(numbers, (a["rcpt"] for a in in_order), strict=True))
    across = sum(1 for previous, n in itertools.pairwise(unique) if n < previous)
    first = times[0] - up if times else None
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    per_second: dict[int, int] = {}
    for t in times:
        per_second[int(t - times[0])] = per_second.get(int(t - times[0]), 0) + 1
    worst = max((sum(1 for u in times if t <= u < t + 1) for t in times), default=0)
    figures = capacity_figures(options, attempts, times, up) if options.capacity_rate else {}
    return figures | {
        "accepted": accepted,
        "delivered_unique": len(unique),
        "duplicates": len(numbers) - len(unique),
        "order_violations": violations,
        "acceptance_order_violations": across,
        "first_delivery_after_s": round(first, 2) if first is not None else None,
        "measured_rate": round((len(times) - 1) / span, 2) if span else None,
        "worst_1s_window": worst,
        # CPU time per delivered message (machine-independent, unlike the rate on a shared machine)
        "cpu_ms_per_msg": {name: round(seconds * 1000 / max(1, len(unique)), 3) for name, seconds in cpu_spent.items()},
        "per_second": [per_second.get(s, 0) for s in range(0, int(max(per_second, default=0)) + 1)],
    }


def postfix_skipped(options: argparse.Namespace) -> str | None:
    """
    Why Postfix is not measured in this run, or ``None`` when it is.
    """
    if options.no_postfix:
        return "--no-postfix"
    if not postfix_available():
        return "postfix is not installed (apt-get install postfix)"
    return None


def machine() -> dict[str, Any]:
    import os
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("accept", help="accept throughput and latency")
    a.add_argument("--nodes", type=int, default=1)
    a.add_argument("--sessions", type=int, default=20)
    a.add_argument("--count", type=int, default=5000)
    a.add_argument("--size", type=int, action="append", help="message size in bytes (repeat for a mix)")
    a.add_argument("--seconds", type=float, default=120, help="stop sending after this long")
    a.add_argument("--fsync", default="always", choices=["always", "everysec", "no"])
    a.add_argument("--no-postfix", action="store_true")
    a.add_argument(
        "--processes", "--workers", type=int, default=1, help="SMTP worker processes per node ([node] processes)"
    )
    r = sub.add_parser("replay", help="drain of a queue filled while the primary was down")
    r.add_argument("--nodes", type=int, default=2)
    r.add_argument("--count", type=int, default=1000)
    r.add_argument("--size", type=int, default=1024)
    r.add_argument("--rate", type=float, default=None, help="relayx's rate (default 50; 100 with a capacity)")
    r.add_argument(
        "--concurrency", type=int, default=None, help="relayx's sessions per domain (default 20; 8 with a capacity)"
    )
    r.add_argument("--workers", type=int, default=8, help="deliveries at once per node ([queue] workers)")
    r.add_argument("--mailboxes", type=int, default=50, help="recipients' mailboxes the messages go to")
    r.add_argument("--capacity-rate", type=float, default=0, help="the primary's msg/s before 421 (0: none)")
    r.add_argument("--capacity-sessions", type=int, default=5, help="the primary's sessions before a 421 greeting")
    r.add_argument("--slow-from", type=float, default=20, help="seconds after the primary is up its capacity drops")
    r.add_argument("--slow-for", type=float, default=20, help="for how long (0: never)")
    r.add_argument("--slow-factor", type=float, default=1 / 3, help="to this share of itself")
    r.add_argument("--keep", action="store_true", help="keep the nodes' logs and data (the directory is printed)")
    r.add_argument("--probe", default="5s")
    r.add_argument("--seconds", type=float, default=120)
    r.add_argument("--no-postfix", action="store_true")
    d = sub.add_parser("depth", help="operator calls, accept and drain against queue depth")
    d.add_argument("--depth", type=int, action="append", help="queue depth to measure (repeat; 0 is always measured)")
    d.add_argument("--size", type=int, default=1024)
    d.add_argument("--burst", type=int, default=1000, help="messages sent through SMTP at each depth")
    d.add_argument("--sessions", type=int, default=10)
    d.add_argument("--concurrency", type=int, default=20, help="the domain's delivery concurrency (drain)")
    d.add_argument("--drain-seconds", type=float, default=5.0)
    d.add_argument("--passes", type=int, default=3, help="accept bursts and drains at each depth (median reported)")
    d.add_argument("--bodies", choices=("directory", "redis"), default="directory", help="where bodies are kept")
    d.add_argument("--fill-processes", type=int, default=2, help="fill processes running at once")
    d.add_argument("--seconds", type=float, default=120, help="most time for each SMTP burst")
    d.add_argument("--no-postfix", action="store_true", help="(no Postfix comparison in this benchmark)")
    for command in (a, r, d):
        command.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON and PNG")
        command.add_argument(
            "--rounds",
            type=int,
            default=1,
            help="run the whole benchmark (relayx, then Postfix) this many times and report medians with ranges",
        )
    options = parser.parse_args()
    if options.rounds < 1:
        parser.error("--rounds: expected a whole number of at least 1")
    options.results.mkdir(parents=True, exist_ok=True)
    rounds = [run_once(options) for _ in range(options.rounds)]
    if len(rounds) > 1:
        summary = {"kind": f"{options.kind}-rounds", "rounds": len(rounds), **medians(rounds)}
        path = options.results / f"{options.kind}-rounds-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        print(f"medians of {len(rounds)} rounds: {path}")


def run_once(options: argparse.Namespace) -> dict[str, Any]:
    """
    One round of the chosen benchmark: its JSON and plot written, its headline printed.
    """
    if options.kind == "accept":
        options.size = options.size or [1024]
        result = accept(options)
    elif options.kind == "depth":
        from bench.depth import depth

        options.depth = options.depth or [10000]
        result = depth(options)
    else:
        capacity = bool(options.capacity_rate)
        options.rate = options.rate if options.rate is not None else (100 if capacity else 50)
        options.concurrency = options.concurrency or (8 if capacity else 20)
        result = replay(options)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = options.results / f"{options.kind}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    from bench.plot import plot

    picture = plot(result, path.with_suffix(".png"))
    print(json.dumps(headline(result), indent=1))
    print(f"result: {path}" + (f"\nplot: {picture}" if picture else "\nplot: not drawn (pip install matplotlib)"))
    result["file"] = path.name
    return result


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Each number of the rounds' headlines as its median, least and greatest
    (``{"median": m, "range": [lo, hi]}``), under the same path; the files
    the figures come from under ``files``. README figures are copied from here.
    """
    flat: dict[str, list[float]] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{path}.{key}" if path else key)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat.setdefault(path, []).append(float(value))

    for result in rounds:
        walk(headline({k: v for k, v in result.items() if k not in ("machine", "file")}), "")
    figures = {
        path: {"median": statistics.median(values), "range": [min(values), max(values)]}
        for path, values in flat.items()
        if len(values) == len(rounds)
    }
    return {"figures": figures, "files": [r["file"] for r in rounds], "machine": rounds[0].get("machine")}


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """
    The figures worth printing, without the series.
    """

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v) for k, v in value.items() if not k.startswith(("per_second", "latency_series", "arrivals"))
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {k: strip(v) for k, v in result.items() if k not in ("per_second", "arrivals")}


if __name__ == "__main__":
    main()
