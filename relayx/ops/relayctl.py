"""
``relayctl``: the admin API from a shell. Readable tables by default,
``--json`` for scripts; ``release --watch`` draws a progress bar until the
domain's queue is empty.

The API's address and token come from ``--url`` and ``--token`` (or
``--token-file``), else from ``RELAYCTL_URL`` and ``RELAYCTL_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

from relayx.queue.states import JobState

DEFAULT_URL = "http://127.0.0.1:8025"


class Failure(Exception):
    """
    What to tell the operator, in one line, before exiting 1.
    """


class Client:
    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def __call__(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        params = {k: str(v) for k, v in query.items() if v is not None}
        address = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        request = urllib.request.Request(
            address,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                reason = e.reason
            raise Failure(f"{reason} (HTTP {e.code})") from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise Failure(f"cannot reach the admin API at {self.url}: {why}") from None


def _when(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time such as 2026-11-23T22:00+00:00, got {text!r}") from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def table(out: TextIO, headings: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """
    Columns as wide as their widest cell, left-aligned.
    """
    cells = [[str(h) for h in headings], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    for row in cells:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def _domains(out: TextIO, domains: list[dict[str, Any]]) -> None:
    rows = []
    for d in domains:
        state = "held" if d["held"] else "waiting" if d["paused_until"] else "delivering"
        jobs = d["jobs"]
        routes = " ".join(d["routes"]) + (" (changed)" if d["routes_overridden"] else "")
        rows.append(
            [
                d["domain"],
                state,
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


def _progress(out: TextIO, done: int, total: int, width: int = 30) -> None:
    filled = int(width * done / total) if total else width
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} delivered")
    out.flush()


def watch(
    api: Client,
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
    return {name: getattr(options, name) for name in FILTERS if getattr(options, name) is not None}


def watch_bulk(
    api: Client,
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayctl", description="Operate a relayx cluster over its admin API.")
    parser.add_argument("--url", default=os.environ.get("RELAYCTL_URL", DEFAULT_URL), help="the admin API's address")
    parser.add_argument("--token", default=os.environ.get("RELAYCTL_TOKEN"), help="a bearer token of [admin] tokens")
    parser.add_argument("--token-file", help="read the token from this file")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("status", help="the cluster's nodes and every domain's queue")
    verbs.add_parser("domains", help="every domain's queue")
    for name, what in (("domain", "one domain's queue"), ("flush", "deliver a domain's queue now")):
        verbs.add_parser(name, help=what).add_argument("domain")
    hold = verbs.add_parser("hold", help="queue a domain's mail without delivering it")
    hold.add_argument("domain")
    hold.add_argument("--from", dest="start", type=_when, help="start of a scheduled hold (ISO 8601)")
    hold.add_argument("--until", dest="end", type=_when, help="end of the hold (ISO 8601)")
    release = verbs.add_parser("release", help="end a domain's hold")
    release.add_argument("domain")
    release.add_argument("--rate", type=float, help="deliver the backlog at no more than this many messages/s")
    release.add_argument("--watch", action="store_true", help="show a progress bar until the queue is empty")
    release.add_argument("--timeout", type=float, default=3600.0, help="how long --watch waits (seconds)")
    route = verbs.add_parser("route", help="change where a domain's queued and new mail goes")
    route.add_argument("domain")
    route.add_argument("routes", nargs="*", help="smtp://host:port (several: tried in order) or mx")
    route.add_argument("--reset", action="store_true", help="go back to the configured routes")
    messages = verbs.add_parser("messages", help="list and search queued messages, a page at a time")
    _filters(messages)
    messages.add_argument("--cursor", type=int, default=0, help="continue from a page's next cursor")
    messages.add_argument("--limit", type=int, default=50)
    bulk = verbs.add_parser("bulk", help="delete, bounce or requeue every message matching a filter")
    bulk.add_argument("action", choices=["delete", "bounce", "requeue"])
    _filters(bulk)
    bulk.add_argument("--watch", action="store_true", help="show its progress until it is done")
    bulk.add_argument("--timeout", type=float, default=3600.0, help="how long --watch waits (seconds)")
    status = verbs.add_parser("bulk-status", help="the bulk actions and their progress")
    status.add_argument("bulk_id", nargs="?")
    verbs.add_parser("bulk-cancel", help="stop a running bulk action").add_argument("bulk_id")
    for name, what in (
        ("show", "one message: envelope, header and delivery history"),
        ("delete", "delete a message"),
        ("bounce", "return a message to its sender with a DSN"),
        ("requeue", "try a message's deferred and failed recipients again now"),
    ):
        verbs.add_parser(name, help=what).add_argument("queue_id")
    verbs.add_parser("audit", help="the newest changes and who made them").add_argument("--limit", type=int, default=20)
    return parser


def run(options: argparse.Namespace, api: Client, out: TextIO) -> None:
    verb = options.verb
    if verb == "route" and options.reset == bool(options.routes):
        raise Failure("give the new routes, or --reset for the configured ones")
    answer: Any
    if verb == "status":
        answer = {"cluster": api("GET", "cluster"), "domains": api("GET", "domains")["domains"]}
    elif verb == "domains":
        answer = api("GET", "domains")
    elif verb == "domain":
        answer = api("GET", f"domains/{options.domain}")
    elif verb == "flush":
        answer = api("POST", f"domains/{options.domain}/flush", {})
    elif verb == "hold":
        answer = api("POST", f"domains/{options.domain}/hold", {"start": options.start, "end": options.end})
    elif verb == "release":
        answer = api("POST", f"domains/{options.domain}/release", {"rate": options.rate or 0})
    elif verb == "route":
        answer = api("POST", f"domains/{options.domain}/route", {"routes": options.routes or None})
    elif verb == "messages":
        answer = api("GET", "messages", cursor=options.cursor or None, limit=options.limit, **_filter(options))
    elif verb == "bulk":
        given = _filter(options)
        if not given:
            raise Failure("give a filter (--domain, --sender, ...); a bulk action never means everything by default")
        answer = api("POST", "bulk", {"action": options.action, "filter": given})
    elif verb == "bulk-status":
        answer = api("GET", f"bulk/{options.bulk_id}") if options.bulk_id else api("GET", "bulk")
    elif verb == "bulk-cancel":
        answer = api("DELETE", f"bulk/{options.bulk_id}")
    elif verb == "show":
        answer = api("GET", f"messages/{options.queue_id}")
    elif verb == "delete":
        answer = api("DELETE", f"messages/{options.queue_id}")
    elif verb in ("bounce", "requeue"):
        answer = api("POST", f"messages/{options.queue_id}/{verb}", {})
    else:
        answer = api("GET", "audit", limit=options.limit)
    if options.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    else:
        _print(verb, answer, out)
    if verb == "release" and options.watch:
        watch(api, options.domain, sys.stderr if options.json else out, timeout=options.timeout)
    if verb == "bulk" and options.watch and answer.get("id"):
        watch_bulk(api, answer["id"], sys.stderr if options.json else out, timeout=options.timeout)


def _print(verb: str, answer: Any, out: TextIO) -> None:
    if verb == "status":
        cluster = answer["cluster"]
        redis = cluster["redis"]
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
        out.write("\n")
        _domains(out, answer["domains"])
    elif verb == "domains":
        _domains(out, answer["domains"])
    elif verb == "domain":
        _domains(out, [answer])
    elif verb == "messages":
        rows = [
            [
                m["queue_id"],
                m["domain"],
                m["state"],
                m["sender"] or "<>",
                ", ".join(m["recipients"]),
                _age(m["age"]),
                m["attempts"],
                m["error"],
            ]
            for m in answer["messages"]
        ]
        table(out, ["QUEUE ID", "DOMAIN", "STATE", "SENDER", "RECIPIENTS", "AGE", "TRIES", "LAST ERROR"], rows)
        if answer["next_cursor"] is not None:
            out.write(f"(more: --cursor {answer['next_cursor']})\n")
        elif not rows:
            out.write("no queued message matches\n")
    elif verb in ("bulk", "bulk-status", "bulk-cancel"):
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
    elif verb == "show":
        received = datetime.fromtimestamp(answer["received"]).isoformat(timespec="seconds")
        out.write(
            f"queue id  {answer['queue_id']}\nsender    <{answer['sender']}>\nreceived  {received}\n"
            f"size      {answer['size']} bytes\n\n"
        )
        for job in answer["jobs"]:
            out.write(f"{job['jid']} to {job['domain']}: {job['state']}, {job['attempts']} attempt(s)\n")
            out.write(f"  owed    {', '.join(job['owed']) or '-'}\n")
            for rcpt, code, status, text in job["failed"]:
                out.write(f"  failed  {rcpt}: {code} {status} {text}\n")
            for at, what in job["history"]:
                out.write(f"  {datetime.fromtimestamp(at).isoformat(timespec='seconds')}  {what}\n")
        out.write("\n" + answer["header"])
    elif verb == "audit":
        rows = []
        for r in answer["records"]:
            what = r.get("domain") or r.get("queue_id") or ""
            detail = " ".join(r["routes"]) if r.get("routes") else f"rate {r['rate']:g}" if r.get("rate") else ""
            when = datetime.fromtimestamp(int(r["at"]) / 1000).isoformat(timespec="seconds")
            rows.append([when, r["who"], r["action"], what, detail])
        table(out, ["WHEN", "WHO", "ACTION", "ON", "DETAIL"], rows)
    else:
        out.write(", ".join(f"{k}: {v}" for k, v in answer.items()) + "\n")


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    options = _parser().parse_args(argv)
    token = options.token
    try:
        if options.token_file:
            try:
                with open(options.token_file) as f:
                    token = f.read().strip()
            except OSError as e:
                raise Failure(f"cannot read the token file {options.token_file}: {e.strerror}") from None
        if not token:
            raise Failure("no token: give --token, --token-file or set RELAYCTL_TOKEN")
        run(options, Client(options.url, token), out)
    except Failure as e:
        print(f"relayctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
