"""
JSON logs (``[node] log_format = "json"``): one JSON object per line and
per event, with the event's stable keyword fields (``queue_id``, ``peer``,
``code``, ``seconds`` ...) beside the formatted message, so that a log
pipeline indexes fields instead of parsing sentences.

Text logs (the default): Twisted's text lines, byte for byte, made faster
(``text_logger``).
"""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
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


class ClassicText:
    """
    An event as Twisted's text observer writes it (``formatEventAsClassicLogText``
    with RFC 3339 times), made cheaply for the common event: the time prefix
    formatted once a second, and a plain ``log_format`` filled by
    ``str.format_map``. Twisted's formatter (a pure-Python ``string.Formatter``,
    and a time zone looked up per event) was a tenth of a node's CPU with a
    connection per message, for its one line per session. Any other event (a
    failure, a call in the format, a field that is missing) goes to Twisted's
    own formatter, so the text is the same either way.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = math.floor(when)
        if second != self._second:
            self._stamp = formatTime(second, timeFormatRFC3339)
            self._second = second
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        line = self._plain(event)
        if line is None:
            return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when, timeFormatRFC3339))
        return line

    def _plain(self, event: LogEvent) -> str | None:
        form = event.get("log_format")
        if type(form) is not str or "()" in form or "log_failure" in event or "log_flattened" in event:
            return None
        try:
            text = form.format_map(event)
        except Exception:
            return None
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        elif type(system) is not str:
            return None
        return f"{self._time(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"


def text_logger() -> FileLogObserver:
    """
    For ``twistd --logger=relayx.logs.text_logger``: Twisted's text lines on stdout.
    """
    return FileLogObserver(sys.stdout, ClassicText())
