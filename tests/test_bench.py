"""
The benchmark harness runs end to end (small counts, no Postfix): a smoke
test that keeps it working, not a measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, *args: str) -> dict[str, object]:
    subprocess.run(
        [sys.executable, "-m", "bench", *args, "--no-postfix", "--results", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=180,
    )
    [path] = tmp_path.glob("*.json")
    result: dict[str, object] = json.loads(path.read_text())
    return result


def test_accept_smoke(tmp_path: Path) -> None:
    """When the accept benchmark runs with a small count, every message is accepted and the result has its fields."""
    result = run(tmp_path, "accept", "--count", "60", "--sessions", "4", "--seconds", "30")
    relayx = result["relayx"]
    assert isinstance(relayx, dict)
    assert relayx["accepted"] == 60 and relayx["refused"] == 0
    assert set(relayx["latency_ms"]) == {"p50", "p90", "p99", "max"}


def test_replay_smoke(tmp_path: Path) -> None:
    """When the replay benchmark drains a small queue, every message arrives once and in order."""
    result = run(tmp_path, "replay", "--count", "20", "--rate", "20", "--probe", "1s", "--seconds", "30")
    relayx = result["relayx"]
    assert isinstance(relayx, dict)
    assert relayx["delivered_unique"] == 20
    assert relayx["duplicates"] == 0 and relayx["order_violations"] == 0


def test_replay_against_a_capacity_smoke(tmp_path: Path) -> None:
    """
    When the replay benchmark drains into a primary with a capacity, every message arrives once and the result
    has the capacity figures (share used, share answered 421, time back to full pace).
    """
    result = run(
        tmp_path,
        "replay", "--count", "60", "--capacity-rate", "20", "--capacity-sessions", "2",
        "--slow-from", "1", "--slow-for", "1", "--probe", "1s", "--seconds", "40",
    )  # fmt: skip
    relayx = result["relayx"]
    assert isinstance(relayx, dict)
    assert relayx["delivered_unique"] == 60 and relayx["duplicates"] == 0
    assert relayx["attempts"] >= 60 and 0 <= relayx["answered_421_share"] < 1 and relayx["capacity_used"] > 0
    assert len(relayx["per_second_capacity"]) == len(relayx["per_second_from_start"])


def test_depth_smoke(tmp_path: Path) -> None:
    """
    When the depth benchmark runs at a small depth, each point has its operator calls, memory, and the
    median of its accept and drain passes with what each cost the node and Redis.
    """
    result = run(
        tmp_path,
        "depth",
        "--depth",
        "200",
        "--burst",
        "20",
        "--sessions",
        "2",
        "--drain-seconds",
        "0.5",
        "--passes",
        "2",
    )
    points = result["points"]
    assert isinstance(points, list) and points[0]["depth"] == 0
    deep = points[-1]
    assert deep["depth"] >= 200 and deep["redis_bytes_per_msg"] > 0
    assert all(call["status"] == 200 for call in deep["calls"].values())
    assert deep["accept"]["accepted"] == 20 and deep["drain"]["delivered"] > 0
    for phase in (deep["accept"], deep["drain"]):
        assert len(phase["passes_msg_per_s"]) == 2 and phase["node_cpu_ms_per_msg"] > 0
        assert phase["redis_cpu_ms_per_msg"] > 0 and phase["redis_forks"] >= 0
    by_key = deep["redis_bytes_by_key"]
    assert by_key["message_hash"] > 0 and "job_hash" not in by_key and by_key["queue_zset"] > 0
    assert result["bodies"] == "directory" and deep["fill"]["processes"] == 2


def test_rounds_report_medians_with_ranges() -> None:
    """
    When a benchmark runs several rounds, every headline number is reported
    as its median with the least and greatest value, and the series are left out.
    """
    from bench.__main__ import medians

    rounds = [
        {"file": f"accept-{n}.json", "machine": {"cpus": 2}, "relayx": {"msg_per_s": rate, "per_second": [1, 2]}}
        for n, rate in enumerate((900.0, 700.0, 800.0))
    ]
    summary = medians(rounds)
    assert summary["figures"] == {"relayx.msg_per_s": {"median": 800.0, "range": [700.0, 900.0]}}
    assert summary["files"] == ["accept-0.json", "accept-1.json", "accept-2.json"]
