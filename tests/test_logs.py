"""
Structured logs: events as JSON lines with their fields, and the Message-ID
a delivery attempt's line carries.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, textFileLogObserver
from twisted.python.failure import Failure

from relayx.delivery.scheduler import message_id
from relayx.logs import JSONLinesObserver, text_logger


def test_events_become_json_lines() -> None:
    """When an event is logged in JSON, it is one line with the message, level and the event's simple fields."""
    out = io.StringIO()
    log = Logger(namespace="relayx.test", observer=JSONLinesObserver(out))
    log.info("job {job} of {queue_id}: {code}", job="Q1.1", queue_id="Q1", code=250, seconds=0.25, rcpts=["a@b.c"])
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.failure("unexpected", Failure(), queue_id="Q2")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "job Q1.1 of Q1: 250" and first["level"] == "info"
    assert (first["queue_id"], first["code"], first["seconds"], first["rcpts"]) == ("Q1", 250, 0.25, ["a@b.c"])
    assert first["namespace"] == "relayx.test" and first["time"].endswith("+00:00")
    assert second["level"] == LogLevel.critical.name and "RuntimeError: boom" in second["traceback"]


def test_message_id_from_header_only() -> None:
    """When a stored message is delivered, its Message-ID is read from the header section, not the body."""
    assert message_id(b"Received: x\r\nMessage-ID: <a.1@b.test>\r\n\r\nbody\r\n") == "<a.1@b.test>"
    assert message_id(b"Subject: x\r\n\r\nMessage-ID: <not@header>\r\n") == ""


def test_text_lines_are_twisteds() -> None:
    """When events of every kind are logged as text, the lines are those of Twisted's own text observer."""
    ours, theirs = io.StringIO(), io.StringIO()
    fast = text_logger()
    fast._outFile = ours
    slow = textFileLogObserver(theirs)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    base = {"log_namespace": "relayx.smtp.server", "log_level": LogLevel.info, "log_time": 1_700_000_000.25}
    events: list[dict[str, object]] = [
        {
            **base,
            "log_format": "smtp session from {peer} ended after {seconds:.3f}s: [{ids}]",
            "peer": "192.0.2.7",
            "seconds": 0.01234,
            "ids": "A B",
        },
        {**base, "log_time": 1_700_000_000.75, "log_format": "same second {n!r}", "n": "x"},
        {**base, "log_time": 1_700_000_001.0, "log_format": "next second\nand a second line"},
        {**base, "log_format": "missing {field}"},
        {**base, "log_format": "a call {f()}", "f": lambda: 42},
        {**base, "log_format": "attribute {e.args[0]}", "e": ValueError("why")},
        {**base, "log_format": "failed", "log_failure": failure},
        {**base, "log_format": "with system", "log_system": "relayx#worker"},
        {"log_format": "no time, namespace or level"},
        {**base, "log_format": ""},
        {**base},
    ]
    for event in events:
        fast(dict(event))
        slow(dict(event))
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().count("2023-11-14T") == 8
