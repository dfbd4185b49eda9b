"""
JSON logs (``[node] log_format = "json"``): one JSON object per line and
per event, with the event's stable keyword fields (``queue_id``, ``peer``,
``code``, ``seconds`` ...) beside the formatted message, so that a log
pipeline indexes fields instead of parsing sentences.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent
from zope.interface import implementer

_SIMPLE = (str, int, float, bool, type(None))


def _field(value: Any) -> Any:
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, _SIMPLE) for v in value):
        return list(value)
    return None


def to_json(event: LogEvent) -> str:
    """
    One event as a line of JSON: time, level, namespace, message, the
    event's own fields, and the traceback of a logged failure.
    """
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key.startswith("_") or key in record:
            continue
        simple = _field(value)
        if simple is not None or value is None:
            record[key] = simple
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str)


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        self.out.write(to_json(event) + "\n")
        self.out.flush()


def json_logger() -> JSONLinesObserver:
    """
    For ``twistd --logger=relayx.logs.json_logger``: JSON lines on stdout.
    """
    return JSONLinesObserver(sys.stdout)
