"""
The operator's command line: ``relayx VERB`` and ``relayctl VERB`` are one
program with one set of verbs, outputs and exit codes.

Every verb is written once (``run``), over a *transport* that answers the
admin API's requests (``/api/v1/...``, see ``relayx.ops.api``):

- ``Local`` (``--config FILE``): the API's own code, run in this process
  straight over the cluster's Redis (and body store) as the configuration
  names them, through ``AdminAPI.call``; it needs no node to be running.
- ``Client`` (``--url``, ``--token``): HTTP to a node's admin API.

So a check (an unknown domain, a bad route, a hold that would replace a
scheduled one), an answer's shape (``--json`` prints it as it is) and an
error's wording are the API's, whichever way the verb went. ``relayx``
without a verb runs a node (``relayx --config FILE``); ``relayx`` with a verb
needs ``--config`` (or ``--url``), ``relayctl`` goes over HTTP unless given
``--config``. ``check`` and ``preflight`` read the configuration itself and
need ``--config``.

Exit status: 0 done; 1 could not be done (the API or Redis unreachable, a
refused token, a server error, a check or preflight error, a --watch that
timed out); 2 refused as given (bad usage, an unknown domain, message or bulk
action, a bad value, a hold that needs --replace); 141 when the output's
reader went away (``| head``), without a traceback.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import io
import json
import os
import socket
import ssl
import sys
import tarfile
import threading
import time
import typing
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, Any, Protocol, TextIO

import attrs

from relayx.address import AddressError, normalize_domain
from relayx.config import Config, ConfigError, load, parse_duration, parse_route
from relayx.dns import dns_lookup, dns_lookup_mx
from relayx.ops import check, preflight, report
from relayx.ops.api import APIError, RawBody, unknown_domain
from relayx.queue.redis import RedisQueue
from relayx.queue.states import JobState
from relayx.redis.connection import open_redis
from relayx.redis.embedded import EmbeddedRedis

DEFAULT_URL = "http://127.0.0.1:8025"
#: messages fetched per page while exporting (each page one bounded listing call)
EXPORT_PAGE = 100

#: the verbs, in the order ``--help`` lists them
VERBS: dict[str, str] = {
    "nodes": "the live nodes and the deliveries each holds",
    "status": "the cluster and every domain's queue, or one domain's in detail",
    "domains": "every domain's queue, one line each",
    "qshape": "queued mail by age, per domain (like Postfix's qshape)",
    "hold": "accept and queue a domain's mail, deliver none (now or in a window)",
    "release": "end or cancel a domain's hold",
    "flush": "deliver a domain's queue now, without waiting for retries",
    "route": "change where a domain's queued and new mail goes",
    "messages": "list and search queued messages, a page at a time",
    "show": "one message: envelope, header, delivery history (--raw: the message)",
    "export": "a domain's queued mail as an mbox or a tar of .eml files",
    "delete": "delete a message",
    "bounce": "return a message to its sender with a DSN",
    "requeue": "try a message's deferred and failed recipients again now",
    "bulk": "delete, bounce or requeue every message matching a filter",
    "bulk-status": "the bulk actions and their progress",
    "bulk-cancel": "stop a running bulk action",
    "audit": "the newest changes: who, when, what before and after",
    "report": "proof of delivery: every message a domain accepted in a window and its fate (text, CSV, HTML)",
    "check": "check the configuration and what it points at (needs --config)",
    "check-queue": "recount the queue in bounded steps against its counters; --repair mends (needs --config)",
    "preflight": "a domain's MX, primary, STARTTLS and MTA-STS before a cutover (needs --config)",
    "completion": "a bash or zsh completion script",
}

FILTERS = (
    "domain",
    "sender",
    "recipient",
    "message_id",
    "sender_has",
    "recipient_has",
    "subject_has",
    "state",
    "older_than",
    "newer_than",
)

#: HTTP statuses that mean "refused as given" (exit 2); others are failures (exit 1)
REFUSED = (400, 404, 405, 409, 413)


class Failure(Exception):
    """
    What to tell the operator, in one line, and the exit status.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Transport(Protocol):
    """
    Answers the admin API's requests; ``path`` is below ``/api/v1/``.
    """

    def __call__(self, method: str, path: str, body: Any = None, **query: Any) -> Any: ...

    def raw(self, path: str) -> bytes: ...


def _query(query: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in query.items() if v is not None}


class Client:
    """
    The admin API over HTTP.
    """

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _open(self, method: str, path: str, body: Any, query: dict[str, Any]) -> bytes:
        params = _query(query)
        address = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        request = urllib.request.Request(
            address,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                reason = e.reason
            raise Failure(str(reason), 2 if e.code in REFUSED else 1) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise Failure(f"cannot reach the admin API at {self.url}: {why}") from None

    def __call__(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        return json.loads(self._open(method, path, body, query))

    def raw(self, path: str) -> bytes:
        return self._open("GET", path, None, {})


class Local:
    """
    The admin API's code in this process, over the configuration's Redis:
    each request runs in ``reactor`` (in another thread) and this thread
    waits for its answer.
    """

    def __init__(self, api: Any, reactor: Any, who: str) -> None:
        self.api = api
        self.reactor = reactor
        self.who = who

    def _call(self, method: str, path: str, body: Any, query: dict[str, Any]) -> Any:
        from twisted.internet.defer import Deferred
        from twisted.internet.threads import blockingCallFromThread

        from relayx.interfaces import StoreUnavailable

        def call() -> Deferred[Any]:
            return Deferred.fromCoroutine(self.api.call(method, path, _query(query), body, self.who))

        try:
            return blockingCallFromThread(self.reactor, call)
        except APIError as e:
            raise Failure(e.reason, 2 if e.status in REFUSED else 1) from None
        except StoreUnavailable as e:
            raise Failure(f"the queue (Redis) is unavailable: {e}") from None

    def __call__(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        # through JSON, so that the answer is the one HTTP would give, to the type
        return json.loads(json.dumps(self._call(method, path, body, query)))

    def raw(self, path: str) -> bytes:
        answer = self._call("GET", path, None, {})
        assert isinstance(answer, RawBody)
        return answer.body


# -- the parser ---------------------------------------------------------------


def _when(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time such as 2026-11-23T22:00+00:00, got {text!r}") from None


def _route(text: str) -> str:
    try:
        return str(parse_route(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected {e}") from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30s, 5m, 2h, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """
    Bad usage in one line (and exit status 2), not the whole usage text.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _common(program: str) -> _Parser:
    """
    The options every verb takes, before or after it.
    """
    common = _Parser(add_help=False)
    s = argparse.SUPPRESS
    where = common.add_argument(
        "--config", default=s, metavar="FILE", help="a node's TOML configuration: go straight to its Redis"
    )
    where.complete = {"bash": "_filedir", "zsh": "_files"}  # type: ignore[attr-defined]
    common.add_argument("--url", default=s, help=f"the admin API's address (RELAYCTL_URL; {DEFAULT_URL})")
    common.add_argument("--token", default=s, help="a bearer token of [admin] tokens (RELAYCTL_TOKEN)")
    common.add_argument("--token-file", default=s, metavar="FILE", help="read the token from this file")
    common.add_argument("--json", action="store_true", default=s, help="the answer as JSON, for scripts")
    return common


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain")
    parser.add_argument("--sender", help="the sender's address, exactly (<> for the null sender)")
    parser.add_argument("--recipient", help="a recipient's address, exactly")
    parser.add_argument("--message-id", help="the Message-ID, exactly (with or without <>)")
    parser.add_argument("--sender-has", help="part of the sender's address")
    parser.add_argument("--recipient-has", help="part of a recipient's address")
    parser.add_argument("--subject-has", help="part of the subject")
    parser.add_argument("--state", choices=[str(state) for state in JobState])
    parser.add_argument("--older-than", help="e.g. 2h")
    parser.add_argument("--newer-than", help="e.g. 30m")


def _filter(options: argparse.Namespace) -> dict[str, str]:
    return {name: getattr(options, name) for name in FILTERS if getattr(options, name, None) is not None}


def parser(program: str = "relayx") -> argparse.ArgumentParser:
    common = _common(program)
    epilog = (
        "Run a node:  relayx --config FILE [--redis-url URL] [--node-id ID] [--data-dir DIR]\n"
        "                    [--smtp-listen ENDPOINT]\n\n"
        "With --config a verb goes straight to the cluster's Redis (no node needs to run);\n"
        "otherwise over a node's admin API (--url, --token). Every verb takes --json.\n"
        f"Help on one verb: {program} VERB --help. Completion: {program} completion bash|zsh.\n\n"
        "Exit status: 0 done; 1 could not be done (unreachable, server error, a check failed);\n"
        "2 refused as given (bad usage, unknown domain or message, bad value, needs --replace)."
    )
    top = _Parser(
        prog=program,
        description="Operate a relayx cluster.",
        epilog=epilog,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB", title="verbs")

    def verb(name: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=VERBS[name], description=VERBS[name], parents=[common])

    verb("nodes")
    verb("status").add_argument("domain", nargs="?", help="one domain, in detail")
    verb("domains")
    qshape = verb("qshape")
    qshape.add_argument("domains", nargs="*", metavar="domain", help="these domains only")
    qshape.add_argument("--waiting", action="store_true", help="only mail waiting its turn (ready or held)")
    qshape.add_argument("--first", type=_duration, default=300.0, help="the first bucket's age (default 5m)")
    qshape.add_argument("--buckets", type=int, default=10, help="how many buckets, each twice the last (10)")
    hold = verb("hold")
    hold.add_argument("domain")
    hold.add_argument("--from", dest="start", type=_when, help="start of a scheduled hold (ISO 8601)")
    hold.add_argument("--until", dest="end", type=_when, help="end of the hold (ISO 8601)")
    hold.add_argument("--replace", action="store_true", help="replace a scheduled hold (else refused)")
    release = verb("release")
    release.add_argument("domain")
    release.add_argument("--rate", type=float, help="deliver the backlog at no more than this many messages/s")
    release.add_argument("--watch", action="store_true", help="show a progress bar until the queue is empty")
    release.add_argument("--timeout", type=float, default=3600.0, help="how long --watch waits (seconds)")
    verb("flush").add_argument("domain")
    route = verb("route")
    route.add_argument("domain")
    route.add_argument("routes", nargs="*", type=_route, help="smtp://host:port (several: tried in order) or mx")
    route.add_argument("--reset", action="store_true", help="go back to the configured routes")
    messages = verb("messages")
    _filters(messages)
    messages.add_argument("--cursor", type=int, default=0, help="continue from a page's next cursor")
    messages.add_argument("--limit", type=int, default=50)
    show = verb("show")
    show.add_argument("queue_id")
    show.add_argument("--raw", action="store_true", help="the message as accepted (like postcat)")
    export = verb("export")
    export.add_argument("domain")
    export.add_argument("--format", choices=["mbox", "tar"], default="mbox", help="mbox (mboxrd) or tar of .eml")
    export.add_argument("--output", "-o", default="-", help="a file (default: standard output, not a terminal)")
    export.add_argument("--state", choices=[str(state) for state in JobState], help="only mail in this state")
    for name in ("delete", "bounce", "requeue"):
        verb(name).add_argument("queue_id")
    bulk = verb("bulk")
    bulk.add_argument("action", choices=["delete", "bounce", "requeue"])
    _filters(bulk)
    bulk.add_argument("--watch", action="store_true", help="show its progress until it is done")
    bulk.add_argument("--timeout", type=float, default=3600.0, help="how long --watch waits (seconds)")
    verb("bulk-status").add_argument("bulk_id", nargs="?")
    verb("bulk-cancel").add_argument("bulk_id")
    verb("audit").add_argument("--limit", type=int, default=20)
    proof = verb("report")
    proof.add_argument("domain")
    proof.add_argument("--from", dest="start", type=_when, required=True, help="the window's start (ISO 8601)")
    proof.add_argument("--until", dest="end", type=_when, help="the window's end (ISO 8601; default: now)")
    proof.add_argument(
        "--format",
        choices=["text", "csv", "html", "json"],
        default="text",
        help="text, CSV, a printable HTML page or JSON",
    )
    proof.add_argument("--output", "-o", default="-", help="a file (default: standard output)")
    verb("check")
    verb("check-queue").add_argument(
        "--repair", action="store_true", help="mend locations and indexes and set each wrong counter to its recount"
    )
    verb("preflight").add_argument("domain")
    verb("completion").add_argument("shell", choices=["bash", "zsh"])
    return top


# -- output -------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _span(seconds: float) -> str:
    """
    A bucket edge as Postfix's qshape writes it, in minutes when whole.
    """
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _iso(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def table(out: TextIO, headings: Sequence[str], rows: Sequence[Sequence[object]], right: int = 0) -> None:
    """
    Columns as wide as their widest cell; the columns from ``right`` on
    (when given) aligned right.
    """
    cells = [[str(h) for h in headings], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    for row in cells:
        line = "  ".join(
            cell.rjust(width) if right and i >= right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        out.write(line.rstrip() + "\n")


def _state(d: dict[str, Any]) -> str:
    if d["held"]:
        return "held"
    if d.get("hold_start"):
        return "hold scheduled"
    if d["paused_until"]:
        return "waiting"
    pace = d.get("pace")
    return "slowed" if pace and not pace["full"] else "delivering"


def _domains(out: TextIO, domains: list[dict[str, Any]]) -> None:
    rows = []
    for d in domains:
        jobs = d["jobs"]
        routes = " ".join(d["routes"]) + (" (changed)" if d["routes_overridden"] else "")
        rows.append(
            [
                d["domain"],
                _state(d),
                jobs["ready"],
                jobs["held"],
                jobs["deferred"],
                jobs["in_flight"],
                jobs["failed"],
                _age(d["oldest_age"]),
                routes,
                d["last_error"],
            ]
        )
    table(
        out,
        ["DOMAIN", "STATE", "READY", "HELD", "DEFERRED", "IN FLIGHT", "FAILED", "OLDEST", "ROUTES", "LAST ERROR"],
        rows,
    )


def _window(w: dict[str, Any] | None) -> str:
    """
    A hold (API seconds) in words: "held until released", "scheduled from X until Y", "not held".
    """
    if not w:
        return "not held"
    until = f"until {_iso(w.get('end'))}" if w.get("end") else "until released"
    if w.get("held"):
        return f"held {until}"
    if w.get("start"):
        return f"scheduled from {_iso(w.get('start'))} {until}"
    return "not held"


def _window_ms(w: object) -> str:
    """
    A hold as an audit record keeps it (ms; Lua's false for not held).
    """
    if not isinstance(w, dict):
        return "?"
    seconds = {k: (w.get(k) or 0) / 1000 for k in ("start", "end")}
    return _window({"held": w.get("held") is True, **seconds})


def _progress(out: TextIO, done: int, total: int, width: int = 30) -> None:
    filled = int(width * done / total) if total else width
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} delivered")
    out.flush()


def watch(
    api: Transport,
    domain: str,
    out: TextIO,
    interval: float = 1.0,
    timeout: float = 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """
    Redraw the progress bar until the domain's queue (all but failed jobs)
    is empty, or ``timeout`` passes.
    """

    def remaining() -> int:
        jobs = api("GET", f"domains/{domain}")["jobs"]
        return int(sum(n for state, n in jobs.items() if state != "failed"))

    total = remaining()
    deadline = clock() + timeout
    while True:
        left = remaining()
        total = max(total, left)
        _progress(out, total - left, total)
        if left == 0:
            out.write("\n")
            return
        if clock() > deadline:
            out.write("\n")
            raise Failure(f"{domain} still has {left} message(s) queued after {timeout:g}s")
        sleep(interval)


def watch_bulk(
    api: Transport,
    bulk_id: str,
    out: TextIO,
    interval: float = 1.0,
    timeout: float = 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """
    Show a bulk action's progress until it is no longer running, or ``timeout`` passes.
    """
    deadline = clock() + timeout
    while True:
        state = api("GET", f"bulk/{bulk_id}")
        out.write(
            f"\r{state['state']}: {state['examined']} examined, {state['matched']} matched, "
            f"{state['acted']} message(s) changed"
        )
        out.flush()
        if state["state"] != "running":
            out.write("\n")
            return dict(state)
        if clock() > deadline:
            out.write("\n")
            raise Failure(f"bulk action {bulk_id} still running after {timeout:g}s")
        sleep(interval)


# -- the verbs ----------------------------------------------------------------


def run(options: argparse.Namespace, api: Transport, out: TextIO, binary: IO[bytes] | None = None) -> None:
    """
    One verb over ``api``: its answer as text, or as JSON with ``--json``.
    ``binary``: where ``show --raw`` and ``export`` write the messages.
    """
    verb = options.verb
    as_json = bool(getattr(options, "json", False))
    answer: Any
    if verb == "route" and options.reset == bool(options.routes):
        raise Failure("give the new routes, or --reset for the configured ones", 2)
    if verb == "export":
        _export(options, api, out, binary, as_json)
        return
    if verb == "report":
        _report(options, api, out, as_json)
        return
    if verb == "show" and options.raw:
        raw = api.raw(f"messages/{_path(options.queue_id)}/raw")
        if as_json:
            answer = {"queue_id": options.queue_id, "size": len(raw), "raw_base64": base64.b64encode(raw).decode()}
            out.write(json.dumps(answer, indent=2) + "\n")
        else:
            target = binary if binary is not None else sys.stdout.buffer
            target.write(raw)
            target.flush()
        return
    if verb == "nodes":
        answer = api("GET", "cluster")
    elif verb == "status":
        if options.domain:
            answer = api("GET", f"domains/{_path(options.domain)}")
        else:
            answer = {"cluster": api("GET", "cluster"), "domains": api("GET", "domains")["domains"]}
    elif verb == "domains":
        answer = api("GET", "domains")
    elif verb == "qshape":
        if not 1 <= options.buckets <= 20:
            raise Failure("--buckets: expected 1 to 20", 2)
        answer = api(
            "GET",
            "qshape",
            domain=",".join(options.domains) or None,
            state="waiting" if options.waiting else None,
            first=max(1, round(options.first)),
            buckets=options.buckets,
        )
    elif verb == "flush":
        answer = api("POST", f"domains/{_path(options.domain)}/flush", {})
    elif verb == "hold":
        body = {"start": options.start, "end": options.end, "replace": options.replace}
        answer = api("POST", f"domains/{_path(options.domain)}/hold", body)
    elif verb == "release":
        answer = api("POST", f"domains/{_path(options.domain)}/release", {"rate": options.rate or 0})
    elif verb == "route":
        answer = api("POST", f"domains/{_path(options.domain)}/route", {"routes": options.routes or None})
    elif verb == "messages":
        answer = api("GET", "messages", cursor=options.cursor or None, limit=options.limit, **_filter(options))
    elif verb == "bulk":
        given = _filter(options)
        if not given:
            raise Failure("give a filter (--domain, --sender, ...); a bulk action never means everything", 2)
        answer = api("POST", "bulk", {"action": options.action, "filter": given})
    elif verb == "bulk-status":
        answer = api("GET", f"bulk/{_path(options.bulk_id)}") if options.bulk_id else api("GET", "bulk")
    elif verb == "bulk-cancel":
        answer = api("DELETE", f"bulk/{_path(options.bulk_id)}")
    elif verb == "show":
        answer = api("GET", f"messages/{_path(options.queue_id)}")
    elif verb == "delete":
        answer = api("DELETE", f"messages/{_path(options.queue_id)}")
    elif verb in ("bounce", "requeue"):
        answer = api("POST", f"messages/{_path(options.queue_id)}/{verb}", {})
    elif verb == "audit":
        answer = api("GET", "audit", limit=options.limit)
    else:
        raise Failure(f"no verb {verb!r}", 2)
    if as_json:
        out.write(json.dumps(answer, indent=2) + "\n")
    else:
        _print(verb, answer, out)
    if verb == "release" and options.watch:
        watch(api, options.domain, sys.stderr if as_json else out, timeout=options.timeout)
    if verb == "bulk" and options.watch and answer.get("id"):
        watch_bulk(api, answer["id"], sys.stderr if as_json else out, timeout=options.timeout)


def _path(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _print(verb: str, answer: Any, out: TextIO) -> None:
    if verb == "nodes":
        _nodes(out, answer)
    elif verb == "status":
        if "cluster" in answer:
            _nodes(out, answer["cluster"], heading=True)
            out.write("\n")
            _domains(out, answer["domains"])
        else:
            _domain_detail(out, answer)
    elif verb == "domains":
        _domains(out, answer["domains"])
    elif verb == "qshape":
        _qshape(out, answer)
    elif verb == "hold":
        if answer["scheduled"]:
            now = f"hold scheduled from {_iso(answer['start'])} " + (
                f"until {_iso(answer['end'])}" if answer["end"] else "until released"
            )
        else:
            now = "held " + (f"until {_iso(answer['end'])}" if answer["end"] else "until released")
        out.write(f"{answer['domain']}: {now} (before: {_window(answer['previous'])})\n")
    elif verb == "release":
        domain = answer["domain"]
        if answer["was_held"]:
            rate = f" at {answer['rate']:g} msg/s" if answer["rate"] else ""
            out.write(f"{domain}: released{rate} (before: {_window(answer['previous'])})\n")
        elif answer["cancelled_schedule"]:
            out.write(f"{domain}: scheduled hold cancelled (was {_window(answer['previous'])})\n")
        else:
            out.write(f"{domain}: was not held; nothing to release\n")
    elif verb == "flush":
        out.write(f"{answer['domain']}: delivering now ({answer['deferred_jobs_due_now']} deferred job(s) due now)\n")
    elif verb == "route":
        before = " ".join(answer["previous"]) + ("" if answer["previous_overridden"] else " (configured)")
        now = " ".join(answer["routes"]) + ("" if answer["overridden"] else " (configured)")
        out.write(f"{answer['domain']}: queued and new mail goes to {now} (before: {before})\n")
    elif verb == "messages":
        _messages(out, answer)
    elif verb in ("bulk", "bulk-status", "bulk-cancel"):
        _bulks(out, answer)
    elif verb == "show":
        _show(out, answer)
    elif verb == "delete":
        out.write(f"{answer['queue_id']}: deleted ({answer['jobs']} job(s))\n")
    elif verb == "bounce":
        out.write(f"{answer['queue_id']}: bounced, its sender gets a DSN ({answer['jobs']} job(s))\n")
    elif verb == "requeue":
        out.write(f"{answer['queue_id']}: {answer['requeued']} job(s) back in the queue\n")
    elif verb == "audit":
        _audit(out, answer["records"])


def _nodes(out: TextIO, cluster: dict[str, Any], heading: bool = False) -> None:
    redis = cluster["redis"]
    if heading:
        out.write(
            f"node {cluster['node']}, Redis {redis['where']} {'up' if redis['connected'] else 'DOWN'}, "
            f"durability {cluster['durability']}\n\n"
        )
    now = time.time()
    table(
        out,
        ["NODE", "HOSTNAME", "SEEN", "LEASES"],
        [[n["node"], n["hostname"], _age(now - n["last_seen"]) + " ago", n["leases"]] for n in cluster["nodes"]],
    )


def _domain_detail(out: TextIO, d: dict[str, Any]) -> None:
    _domains(out, [d])
    out.write("\n")
    window = {"held": d["held"], "start": d.get("hold_start"), "end": d.get("hold_end")}
    out.write(f"hold       {_window(window)}\n")
    if d["paused_until"]:
        out.write(f"failing    retry by {_iso(d['paused_until'])}: {d['last_error']}\n")
    if d.get("release_rate"):
        out.write(f"release    at {d['release_rate']:g} msg/s while the backlog drains\n")
    if d.get("pace"):
        ceiling = d["pace"]["ceiling"]
        limit = f"{ceiling['rate']:g} msg/s" if ceiling["rate"] else "no rate limit"
        out.write(f"pace       {d['pace']['text']} (configured: {ceiling['concurrency']} sessions, {limit})\n")
    routes = " ".join(d["routes"]) + (" (set at run time)" if d["routes_overridden"] else " (configured)")
    out.write(f"routes     {routes}\n")
    out.write(f"queued     {d['total']} job(s), oldest {_age(d['oldest_age'])}\n")


def _qshape(out: TextIO, answer: dict[str, Any]) -> None:
    edges = answer["edges"]
    headings = ["", "T", *([f"<{_span(edges[0])}"] if edges else ["all"])]
    headings += [_span(e) + "+" if i == len(edges) - 1 else _span(e) for i, e in enumerate(edges)]
    rows = [["TOTAL", answer["total"]["total"], *answer["total"]["buckets"]]]
    rows += [[d["domain"], d["total"], *d["buckets"]] for d in answer["domains"]]
    table(out, headings, rows, right=1)


def _messages(out: TextIO, answer: dict[str, Any]) -> None:
    rows = [
        [
            m["queue_id"],
            m["domain"],
            m["state"],
            m["sender"] or "<>",
            ", ".join(m["recipients"]),
            _age(m["age"]),
            m["attempts"],
            m["subject"],
            m["error"],
        ]
        for m in answer["messages"]
    ]
    table(out, ["QUEUE ID", "DOMAIN", "STATE", "SENDER", "RECIPIENTS", "AGE", "TRIES", "SUBJECT", "LAST ERROR"], rows)
    if answer["next_cursor"] is not None:
        out.write(f"(more: --cursor {answer['next_cursor']})\n")
    elif not rows:
        out.write("no queued message matches\n")


def _bulks(out: TextIO, answer: dict[str, Any]) -> None:
    if answer.get("id") is None and "bulk" not in answer:
        out.write(f"{answer['message']}\n")
        return
    actions = answer["bulk"] if "bulk" in answer else [answer]
    rows = [
        [
            b["id"],
            b["action"],
            b["state"],
            " ".join(f"{k}={v}" for k, v in b["filter"].items()) or "(whole domain)",
            b["examined"],
            b["matched"],
            b["acted"],
            b["who"],
        ]
        for b in actions
    ]
    table(out, ["ID", "ACTION", "STATE", "FILTER", "EXAMINED", "MATCHED", "CHANGED", "WHO"], rows)


def _show(out: TextIO, answer: dict[str, Any]) -> None:
    out.write(
        f"queue id  {answer['queue_id']}\nsender    <{answer['sender']}>\nreceived  {_iso(answer['received'])}\n"
        f"size      {answer['size']} bytes\n\n"
    )
    for job in answer["jobs"]:
        out.write(f"{job['jid']} to {job['domain']}: {job['state']}, {job['attempts']} attempt(s)\n")
        out.write(f"  owed    {', '.join(job['owed']) or '-'}\n")
        for rcpt, code, status, text in job["failed"]:
            out.write(f"  failed  {rcpt}: {code} {status} {text}\n")
        for at, what in job["history"]:
            out.write(f"  {_iso(at)}  {what}\n")
    out.write("\n" + answer["header"])


def audit_line(r: dict[str, Any]) -> list[str]:
    """
    One audit record as WHEN, WHO, ACTION, ON, DETAIL: what it changed, and
    from what. Any record reads, whatever fields it has or lacks.
    """
    try:
        when = datetime.fromtimestamp(int(r.get("at") or 0) / 1000, UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError):
        when = "?"
    action = str(r.get("action", "?"))
    on = str(r.get("domain") or r.get("queue_id") or r.get("bulk") or "")
    detail = ""
    previous = r.get("previous")
    if action == "hold":
        start, end = r.get("start") or 0, r.get("end") or 0
        now = _window_ms({"held": not start or start <= int(r.get("at") or 0), "start": start, "end": end})
        detail = f"{now} (before: {_window_ms(previous)})" if previous is not None else now
    elif action == "release":
        rate = r.get("rate")
        detail = f"released at {rate:g} msg/s" if isinstance(rate, int | float) and rate else "released"
        if isinstance(previous, dict) and previous.get("held") is not True:
            detail = "scheduled hold cancelled" if previous.get("start") else "was not held"
        if previous is not None:
            detail += f" (before: {_window_ms(previous)})"
    elif action == "route":
        routes = r.get("routes")
        detail = " ".join(str(x) for x in routes) if isinstance(routes, list) and routes else "configured routes"
        if isinstance(previous, str):  # records written before "previous" was a list
            try:
                previous = json.loads(previous) if previous else None
            except ValueError:
                previous = [previous]
        if "previous" in r:
            before = " ".join(str(x) for x in previous) if isinstance(previous, list) and previous else None
            detail += f" (before: {before or 'configured routes'})"
    elif action.startswith("bulk") and isinstance(r.get("filter"), dict):
        detail = " ".join(f"{k}={v}" for k, v in r["filter"].items())
    return [when, str(r.get("who", "?")), action, on, detail]


def _audit(out: TextIO, records: list[dict[str, Any]]) -> None:
    table(out, ["WHEN", "WHO", "ACTION", "ON", "DETAIL"], [audit_line(r) for r in records])


# -- export -------------------------------------------------------------------


def _queued(api: Transport, domain: str, state: str | None) -> Iterator[tuple[dict[str, Any], bytes]]:
    """
    The domain's queued messages in acceptance order, a page of listing at a
    time, each with its content; a message's several jobs (copy
    destinations) give it once, and one gone meanwhile is passed over.
    """
    cursor: int | None = 0
    last = None
    while cursor is not None:
        page = api("GET", "messages", domain=domain, state=state, cursor=cursor or None, limit=EXPORT_PAGE)
        for row in page["messages"]:
            if row["queue_id"] == last:
                continue
            last = row["queue_id"]
            try:
                raw = api.raw(f"messages/{_path(row['queue_id'])}/raw")
            except Failure as e:
                if e.code == 2:  # delivered or deleted since the page was read
                    continue
                raise
            yield row, raw
        cursor = page["next_cursor"]


def mbox_entry(sender: str, received: float, raw: bytes) -> bytes:
    """
    One message in mboxrd form: a From_ line, the content with LF line
    ends and every ``>*From `` line quoted with one more ``>``, a blank line.
    """
    stamp = time.asctime(time.gmtime(received))
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    quoted = [b">" + line if line.lstrip(b">").startswith(b"From ") else line for line in lines]
    head = f"From {sender or 'MAILER-DAEMON'} {stamp}\n".encode()
    return head + b"\n".join(quoted) + b"\n\n"


def _export(options: argparse.Namespace, api: Transport, out: TextIO, binary: IO[bytes] | None, as_json: bool) -> None:
    to_stdout = options.output == "-"
    if to_stdout and binary is None and sys.stdout.isatty():
        raise Failure("an export is not for a terminal: give --output FILE or pipe it", 2)
    # the domain is checked before anything is written
    api("GET", f"domains/{_path(options.domain)}")
    target: IO[bytes]
    if to_stdout:
        target = binary if binary is not None else sys.stdout.buffer
    else:
        try:
            target = open(options.output, "xb")
        except OSError as e:
            raise Failure(f"cannot create {options.output}: {e.strerror}", 2) from None
    count = size = 0
    try:
        tar = tarfile.open(fileobj=target, mode="w|") if options.format == "tar" else None
        for row, raw in _queued(api, options.domain, options.state):
            if tar is not None:
                info = tarfile.TarInfo(f"{row['queue_id']}.eml")
                info.size, info.mtime, info.mode = len(raw), int(row["received"]), 0o600
                tar.addfile(info, io.BytesIO(raw))
            else:
                target.write(mbox_entry(row["sender"], row["received"], raw))
            count, size = count + 1, size + len(raw)
        if tar is not None:
            tar.close()
        target.flush()
    finally:
        if not to_stdout:
            target.close()
    summary = {"domain": options.domain, "format": options.format, "messages": count, "bytes": size}
    summary["output"] = options.output
    report = sys.stderr if to_stdout else out
    if as_json:
        report.write(json.dumps(summary, indent=2) + "\n")
    else:
        where = "standard output" if to_stdout else options.output
        report.write(f"{options.domain}: {count} message(s), {size} bytes, as {options.format} to {where}\n")


def _report(options: argparse.Namespace, api: Transport, out: TextIO, as_json: bool) -> None:
    answer = api("GET", f"domains/{_path(options.domain)}/report", **{"from": options.start, "until": options.end})
    kind = "json" if as_json else options.format
    text = {
        "json": lambda a: json.dumps(a, indent=2) + "\n",
        "csv": report.as_csv,
        "html": report.as_html,
        "text": report.as_text,
    }[kind](answer)
    if options.output == "-":
        out.write(text)
        return
    try:
        with open(options.output, "x", encoding="utf-8", newline="") as target:
            target.write(text)
    except OSError as e:
        raise Failure(f"cannot create {options.output}: {e.strerror}", 2) from None
    t = answer["totals"]
    out.write(
        f"{options.domain}: {t['accepted']} accepted, {t['delivered']} delivered, {t['bounced']} bounced, "
        f"{t['queued']} still queued; {kind} written to {options.output}\n"
    )


# -- check and preflight (the configuration itself) ---------------------------


async def _queue(reactor: Any, config: Config, diagnose: bool = False) -> RedisQueue:
    embedded = None
    if config.redis.embedded:
        embedded = EmbeddedRedis.recorded(config.node.data_dir)
        if embedded is None:
            raise ConfigError(
                f"{config.source}: no [redis] url and no embedded Redis running under {config.node.data_dir}"
            )
    # ``relayx check`` reads an evicting Redis to report it with everything else
    redis = await open_redis(config.redis, reactor, embedded, poolsize=1, evicting_ok=diagnose)
    if not await redis.wait_connected(config.redis.timeout):
        why = redis.refused or f"Redis at {redis.where} is not answering"
        await redis.disconnect()
        raise ConfigError(f"{config.source}: {why}")
    return RedisQueue.configured(redis, config)


async def _check(reactor: Any, as_json: bool, config: Config, out: TextIO) -> int:
    """
    ``check``: the findings, and exit status 1 when any is an error.
    """
    findings = check.check_files(config, datetime.now(UTC), os.geteuid() == 0)
    if config.redis.embedded and EmbeddedRedis.recorded(config.node.data_dir) is None:
        findings.append(check.Finding(check.Level.OK, "redis", "embedded Redis: started by the node (AOF always)"))
    else:
        try:
            queue = await _queue(reactor, config, diagnose=True)
        except ConfigError as e:
            findings.append(check.Finding(check.Level.ERROR, "redis", str(e), "start Redis, or fix [redis]"))
        else:
            try:
                findings += await check.check_redis(queue.redis, config)
            finally:
                await queue.redis.disconnect()
    out.write((json.dumps([f.as_json() for f in findings], indent=2) if as_json else check.render(findings)) + "\n")
    return 1 if any(f.level is check.Level.ERROR for f in findings) else 0


async def _check_queue(reactor: Any, repair: bool, as_json: bool, config: Config, out: TextIO) -> int:
    """
    ``check-queue``: the counters against a recount; exit status 1 when they
    differ (without ``--repair``) or a queue changed while it was repaired.
    """
    queue = await _queue(reactor, config)
    try:
        report = await queue.check_queue([q for d in config.domains for q in d.queues()], repair)
    finally:
        await queue.redis.disconnect()
    if as_json:
        out.write(json.dumps(attrs.asdict(report), indent=2, default=list) + "\n")
    else:
        out.write(f"checked {report.queues} queue(s), {report.walked} entries\n")
        for name, field, counter, recount in report.differences:
            out.write(f"{name:<30} {field:<10} counter {counter}, recount {recount}\n")
        for name, n in report.problems.items():
            out.write(f"{name:<30} {n} entr{'y' if n == 1 else 'ies'}" + (" mended\n" if repair else "\n"))
        for name in report.repaired:
            out.write(f"{name}: counters set to the recount\n")
        for name in report.busy:
            out.write(f"{name}: changed during the check, not repaired; run again (or hold the domain first)\n")
        if report.consistent:
            out.write("consistent\n")
        elif not repair:
            out.write("inconsistent: run again with --repair to mend\n")
    return 1 if not report.consistent and (not repair or report.busy) else 0


async def _preflight(reactor: Any, name: str, as_json: bool, config: Config, out: TextIO) -> int:
    """
    ``preflight DOMAIN``: the checklist, and exit status 1 when any item is an error.
    """
    domain = config.domain(name)
    if domain is None:
        raise Failure(f"{name} is not a domain of {config.source}", 2)
    names = {config.node.hostname}
    try:
        queue = await _queue(reactor, config)
    except ConfigError:
        pass  # the cluster's other nodes are unknown without Redis; this node's name is enough
    else:
        try:
            names |= {node.hostname for node in await queue.nodes(time.time(), 3 * config.queue.heartbeat)}
        finally:
            await queue.redis.disconnect()
    d = config.delivery
    lookup = dns_lookup(d.nameservers, d.connect_timeout)
    findings = await preflight.preflight(
        domain,
        sorted(names),
        lookup=lookup,
        lookup_mx=dns_lookup_mx(d.nameservers, d.connect_timeout),
        probe=preflight.make_probe(d.helo_name, d.connect_timeout),
        fetch_policy=preflight.make_fetch(lookup, ssl.create_default_context(), d.connect_timeout),
        mx_port=d.mx_port,
    )
    out.write((json.dumps([f.as_json() for f in findings], indent=2) if as_json else check.render(findings)) + "\n")
    return 1 if any(f.level is check.Level.ERROR for f in findings) else 0


# -- the program --------------------------------------------------------------


class UsageError(Exception):
    """
    The command line names something the configuration does not have.
    """


def configured_domain(config: Config, text: str) -> str:
    """
    ``text`` as a domain (or copy queue, ``example.org#1``) of the
    configuration, normalised; ``UsageError`` naming the problem otherwise,
    in the admin API's words.
    """
    name, hash_, copy = text.partition("#")
    try:
        domain = normalize_domain(name) + hash_ + copy
    except AddressError:
        raise UsageError(f"{text!r} is not a domain name") from None
    known = [queue for d in config.domains for queue in d.queues()]
    if domain not in known:
        raise UsageError(unknown_domain(domain, [d.name for d in config.domains]))
    return domain


def _domains_named(options: argparse.Namespace) -> list[str]:
    named = [getattr(options, "domain", None), *getattr(options, "domains", [])]
    return [d for d in named if d]


def _operator() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


class _Reactor:
    """
    The global reactor for a verb's requests: the running one (a test's),
    else started in a thread of its own for as long as the verb runs.
    """

    def __init__(self, reactor: Any | None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self.reactor: Any = reactor
        self.thread: threading.Thread | None = None
        if not reactor.running:
            self.thread = threading.Thread(
                target=reactor.run, kwargs={"installSignalHandlers": False}, name="relayx-cli", daemon=True
            )
            self.thread.start()

    def call(self, f: Callable[[], Any]) -> Any:
        from twisted.internet.defer import Deferred, ensureDeferred
        from twisted.internet.threads import blockingCallFromThread

        def start() -> Deferred[Any]:
            return ensureDeferred(f())

        return blockingCallFromThread(self.reactor, start)

    def stop(self) -> None:
        if self.thread is not None:
            self.reactor.callFromThread(self.reactor.stop)
            self.thread.join(10)


def _config(options: argparse.Namespace) -> Config:
    try:
        return load(options.config)
    except ConfigError as e:
        raise Failure(str(e), 2) from None


def _token(options: argparse.Namespace) -> str:
    token = getattr(options, "token", None) or os.environ.get("RELAYCTL_TOKEN")
    token_file = getattr(options, "token_file", None)
    if token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise Failure(f"cannot read the token file {token_file}: {e.strerror}", 2) from None
    if not token:
        raise Failure("no token: give --token, --token-file or set RELAYCTL_TOKEN", 2)
    return token


def _main(
    program: str,
    options: argparse.Namespace,
    out: TextIO,
    binary: IO[bytes] | None,
    open_local: Callable[[Config, Any], Any] | None,
    reactor: Any | None,
) -> int:
    verb = options.verb
    as_json = bool(getattr(options, "json", False))
    if verb == "completion":
        import shtab

        out.write(shtab.complete(parser(program), shell=options.shell))
        return 0
    config_path = getattr(options, "config", None)
    if verb in ("check", "check-queue", "preflight"):
        if not config_path:
            raise Failure(f"{verb} reads a configuration: give --config FILE", 2)
        config = _config(options)
        runner = _Reactor(reactor)
        try:
            if verb == "check":
                return int(runner.call(lambda: _check(runner.reactor, as_json, config, out)))
            if verb == "check-queue":
                return int(runner.call(lambda: _check_queue(runner.reactor, options.repair, as_json, config, out)))
            return int(runner.call(lambda: _preflight(runner.reactor, options.domain, as_json, config, out)))
        finally:
            runner.stop()
    if config_path:
        config = _config(options)
        try:
            # before Redis is asked anything
            for name in _domains_named(options):
                configured_domain(config, name)
        except UsageError as e:
            raise Failure(str(e), 2) from None
        if open_local is None:
            raise Failure("--config works with relayx (the node's program); relayctl needs --url", 2)
        runner = _Reactor(reactor)
        try:
            try:
                local = runner.call(lambda: open_local(config, runner.reactor))
            except Failure:
                raise
            except Exception as e:
                raise Failure(str(e)) from None
            try:
                run(options, Local(local.api, runner.reactor, _operator()), out, binary)
            finally:
                runner.call(local.close)
        finally:
            runner.stop()
        return 0
    url = getattr(options, "url", None) or os.environ.get("RELAYCTL_URL")
    if not url:
        if program == "relayx":
            raise Failure("give --config FILE (straight to Redis) or --url URL (a node's admin API)", 2)
        url = DEFAULT_URL
    run(options, Client(url, _token(options)), out, binary)
    return 0


def main(
    argv: list[str] | None = None,
    out: TextIO | None = None,
    program: str = "relayctl",
    open_local: Callable[[Config, Any], Any] | None = None,
    binary: IO[bytes] | None = None,
    reactor: Any | None = None,
) -> int:
    """
    Run one verb; returns the exit status. ``open_local``: what opens the
    API over a configuration's Redis (``relayx.service.operator_api``,
    given by the wiring); ``reactor``: a running reactor to use (tests).
    """
    stdout = out is None
    out = sys.stdout if out is None else out
    try:
        try:
            options = parser(program).parse_args(sys.argv[1:] if argv is None else argv)
        except SystemExit as e:
            return int(e.code or 0)
        return _main(program, options, out, binary, open_local, reactor)
    except Failure as e:
        print(f"{program}: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:
        if stdout:
            # the reader went away (| head): say nothing, and let the
            # interpreter's last flush go nowhere instead of failing
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130
