"""
The PNG beside each benchmark result: throughput and latency over time for
``accept``, arrivals per second against the throttle for ``replay``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if result["kind"] == "depth":
        _depth(plt, result)
        figure = plt.gcf()
    elif result["kind"] == "replay" and "capacity" in result:
        figure = _capacity(plt, result)
    elif result["kind"] == "accept":
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
        for name in ("relayx", "postfix"):
            run = result.get(name)
            if not isinstance(run, dict):
                continue
            top.plot(range(len(run["per_second"])), run["per_second"], label=f"{name}: {run['msg_per_s']} msg/s")
            series = run["latency_series"]
            bottom.scatter(
                [t for t, _ in series], [ms for _, ms in series], s=2, label=f"{name} p99 {run['latency_ms']['p99']} ms"
            )
        top.set_ylabel("messages accepted per second")
        top.set_title(f"accept: {result['count']} x {result['sizes']} B, {result['sessions']} sessions")
        top.legend()
        bottom.set_ylabel("reply to DATA (ms)")
        bottom.set_xlabel("seconds")
        bottom.set_yscale("log")
        bottom.legend()
    else:
        figure, axis = plt.subplots(figsize=(9, 4.5))
        for name, color in (("relayx", "tab:blue"), ("postfix", "tab:orange")):
            run = result.get(name)
            if not isinstance(run, dict):
                continue
            per_second = run["per_second"]
            axis.step(
                range(len(per_second)),
                per_second,
                where="post",
                color=color,
                label=f"{name}: first after {run['first_delivery_after_s']} s, {run['measured_rate']} msg/s, "
                f"worst second {run['worst_1s_window']}, {run['duplicates']} duplicates",
            )
        if result["rate"]:
            axis.axhline(result["rate"], color="red", label=f"relayx throttle {result['rate']:g} msg/s")
            axis.axhline(result["rate"] * 1.1, color="red", linestyle=":", label="110 %")
        axis.set_yscale("symlog")
        axis.set_title(f"replay of {result['count']} messages queued while the primary was down")
        axis.set_xlabel("seconds after the first delivery")
        axis.set_ylabel("delivered to the primary per second")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _capacity(plt: Any, result: dict[str, Any]) -> Any:
    """
    Deliveries per second against the primary's capacity, and its 421s.
    """
    run = result["relayx"]
    capacity = result["capacity"]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    seconds = range(len(run["per_second_from_start"]))
    axis.step(seconds, run["per_second_capacity"], where="post", color="red", label="the primary's capacity")
    axis.step(
        seconds,
        run["per_second_from_start"],
        where="post",
        color="tab:blue",
        label=f"delivered: {run['capacity_used']:.0%} of the capacity used, back to full pace "
        f"{run['back_to_full_pace_s']} s after the recovery",
    )
    axis.bar(
        seconds,
        run["per_second_421"],
        color="tab:orange",
        alpha=0.6,
        label=f"answered 421: {run['answered_421_share']:.1%} of {run['attempts']} attempts",
    )
    axis.set_title(
        f"replay of {result['count']} messages to a primary taking {capacity['rate']:g} msg/s, "
        f"{capacity['sessions']} sessions (a third for {capacity['slow_for']:g} s); relayx ceiling "
        f"{result['rate']:g} msg/s, {result['concurrency']} sessions, {result['nodes']} nodes"
    )
    axis.title.set_fontsize(9)
    axis.set_xlabel("seconds after the primary came up")
    axis.set_ylabel("per second")
    axis.legend(fontsize=8)
    return figure


def _depth(plt: Any, result: dict[str, Any]) -> None:
    """
    Four panels against queue depth: operator call times, the longest Redis
    command during each, accept rate and p99, memory per message and drain rate.
    """
    points = result["points"]
    depths = [max(1, p["depth"]) for p in points]
    figure, ((calls, block), (accept, memory)) = plt.subplots(2, 2, figsize=(12, 8))
    for name in points[0]["calls"]:
        calls.plot(depths, [p["calls"][name]["ms"] for p in points], marker="o", label=name)
        block.plot(depths, [p["calls"][name]["redis_longest_ms"] for p in points], marker="o", label=name)
    calls.axhline(100, color="red", linestyle=":", label="goal 100 ms")
    block.axhline(10, color="red", linestyle=":", label="goal 10 ms")
    calls.set_ylabel("operator call (ms)")
    block.set_ylabel("longest Redis command meanwhile (ms)")
    accept.plot(depths, [p["accept"]["msg_per_s"] for p in points], marker="o", label="accept msg/s")
    accept.plot(depths, [p["drain"]["msg_per_s"] or 0 for p in points], marker="s", label="drain msg/s")
    twin = accept.twinx()
    twin.plot(depths, [p["accept"]["latency_ms"]["p99"] for p in points], color="tab:red", marker="^", label="p99")
    twin.set_ylabel("accept p99 (ms)")
    accept.set_ylabel("messages per second")
    memory.plot(depths, [p["redis_bytes_per_msg"] or 0 for p in points], marker="o", label="bytes per message")
    memory.axhline(600, color="red", linestyle=":", label="goal 600 B (bodies out of Redis)")
    memory.set_ylabel("Redis memory per queued message (B)")
    for axis in (calls, block, accept, memory):
        axis.set_xscale("log")
        axis.set_xlabel("queued messages (0 drawn at 1)")
        axis.legend(fontsize=7)
    figure.suptitle(f"depth: {result['size']} B messages, burst {result['burst']}, {result['machine']['cpus']} CPUs")
