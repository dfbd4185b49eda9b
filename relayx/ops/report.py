"""
Proof of delivery: every message a domain accepted in a window, with its
envelope, and what became of each recipient: delivered (when, where, and the
destination's reply with its queue id), failed or bounced (the reply, the
DSN's queue id), deleted, or still queued (the last attempt's reply).

It is read from the domain's event log (``<p>:events:<domain>``, written by
the queue's scripts in the same step as each change; see common.lua's
``record_event``), never from the queue itself: ``XRANGE`` from the window's
start, ``PAGE`` entries per call, folded per queue id. Events after the
window are read too (a message accepted at its end may be delivered later),
until every message of the window has its outcome or the log ends.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import attrs

from relayx.interfaces import IQueueAdmin

#: event log entries read per Redis call
PAGE = 1000

#: messages in one report at most (a node's memory); past them the answer is
#: truncated and names the time to ask again from (``next_from``)
MAX_MESSAGES = 50_000

#: what a recipient's fate can be; the first two are "still queued"
QUEUED, DEFERRED = "queued", "deferred"
FINAL = ("delivered", "failed", "bounced", "deleted")


@attrs.define
class Fate:
    """
    One recipient of one delivery queue: its state, when it changed (epoch
    seconds), the destination and its reply (or why it failed or waits).
    """

    recipient: str
    queue: str
    state: str = QUEUED
    at: float | None = None
    mx: str = ""
    reply: str = ""

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class Row:
    """
    One accepted message and its recipients' fates.
    """

    queue_id: str
    received: float
    sender: str
    message_id: str
    subject: str
    size: int
    fates: dict[tuple[str, str], Fate] = attrs.Factory(dict)
    dsn: str = ""

    @property
    def state(self) -> str:
        """
        The message's state: queued while any recipient is owed, else bounced
        if any failed or was bounced, else deleted if any was, else delivered.
        """
        states = {f.state for f in self.fates.values()}
        if states & {QUEUED, DEFERRED}:
            return QUEUED
        if states & {"failed", "bounced"}:
            return "bounced"
        if "deleted" in states:
            return "deleted"
        return "delivered"

    def as_json(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "received": self.received,
            "sender": self.sender,
            "message_id": self.message_id,
            "subject": self.subject,
            "size": self.size,
            "state": self.state,
            "dsn": self.dsn,
            "recipients": [f.as_json() for f in self.fates.values()],
        }


@attrs.define
class Report:
    domain: str
    start: float
    end: float
    rows: dict[str, Row] = attrs.Factory(dict)
    limit: int = MAX_MESSAGES
    #: when the first message left out was accepted (epoch seconds), if any
    next_from: float | None = None
    #: Redis calls made and entries read (bounded reads, for the tests)
    calls: int = 0
    entries: int = 0

    def totals(self) -> dict[str, int]:
        totals = {"accepted": len(self.rows), "delivered": 0, "bounced": 0, "deleted": 0, "queued": 0}
        for row in self.rows.values():
            totals[row.state] += 1
        return totals

    def as_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "domain": self.domain,
            "from": self.start,
            "until": self.end,
            "totals": self.totals(),
            "messages": [row.as_json() for row in self.rows.values()],
        }
        if not self.rows:
            answer["note"] = f"no message for {self.domain} was accepted from {_iso(self.start)} to {_iso(self.end)}"
        if self.next_from is not None:
            answer["next_from"] = self.next_from
            answer["note"] = (
                f"only the first {len(self.rows)} messages; ask again from {_iso(self.next_from)} for the rest"
            )
        return answer

    def fold(self, entry_id: str, e: dict[str, str]) -> None:
        """
        One event log entry into the report.
        """
        qid, kind, queue = e.get("qid", ""), e.get("kind", ""), e.get("queue", "")
        at = int(e.get("at") or entry_id.split("-")[0]) / 1000
        if kind == "accepted":
            if not self.start <= at <= self.end:
                return
            row = self.rows.get(qid)
            if row is None:
                if len(self.rows) >= self.limit:
                    if self.next_from is None:
                        self.next_from = at
                    return
                row = self.rows[qid] = Row(
                    qid, at, e.get("sender", ""), e.get("mid", ""), e.get("subject", ""), int(e.get("size") or 0)
                )
            for rcpt in _list(e.get("rcpts")):
                row.fates[(str(rcpt), queue)] = Fate(str(rcpt), queue, QUEUED, at)
            return
        row = self.rows.get(qid)
        if row is None:
            return
        if kind == "withdrawn":  # taken back after a 451: never accepted
            del self.rows[qid]
            return
        if kind == "requeued":  # failed recipients owed again (an operator's requeue)
            for rcpt in _list(e.get("rcpts")):
                fate = row.fates.setdefault((str(rcpt), queue), Fate(str(rcpt), queue))
                fate.state, fate.at, fate.reply = QUEUED, at, "requeued by the operator"
            return
        if kind == "dsn":
            row.dsn = e.get("dsn", "")
            return
        mx = e.get("mx", "")
        if kind == "failed":
            for failure in _list(e.get("failures")):
                rcpt, code, status, text = [*list(failure), "", "", "", ""][:4]
                reply = " ".join(str(p) for p in (code, status, text) if p not in ("", 0, None))
                self._set(row, str(rcpt), queue, "failed", at, mx, reply)
            return
        if kind in ("delivered", "deferred", "bounced", "deleted"):
            reply = e.get("reply", "") if kind == "delivered" else e.get("why", "")
            if kind == "bounced":
                reply = "returned to the sender by the postmaster"
            for rcpt in _list(e.get("rcpts")):
                self._set(row, str(rcpt), queue, kind, at, mx, reply)

    @staticmethod
    def _set(row: Row, rcpt: str, queue: str, state: str, at: float, mx: str, reply: str) -> None:
        fate = row.fates.setdefault((rcpt, queue), Fate(rcpt, queue))
        if fate.state in FINAL and state == DEFERRED:
            return  # a recipient once done stays done
        fate.state, fate.at, fate.mx, fate.reply = state, at, mx, reply

    def open(self) -> bool:
        return any(row.state == QUEUED for row in self.rows.values())


async def build(
    queue: IQueueAdmin, domain: str, start: float, end: float, page: int = PAGE, limit: int = MAX_MESSAGES
) -> Report:
    """
    The report of ``domain`` for messages accepted from ``start`` to ``end``
    (epoch seconds, inclusive; the first ``limit`` of them), read ``page``
    entries at a time. Past the window it reads on only while a message of
    the window has no outcome yet (to the log's end if one is still queued).
    """
    report = Report(domain, start, end, limit=limit)
    end_ms = round(end * 1000)
    cursor = str(max(0, round(start * 1000)))
    while True:
        entries = await queue.events(domain, cursor, "+", page)
        report.calls += 1
        report.entries += len(entries)
        for entry_id, fields in entries:
            report.fold(entry_id, fields)
        if len(entries) < page:
            return report
        last = entries[-1][0]
        cursor = "(" + last
        if int(last.split("-")[0]) > end_ms and not report.open():
            return report


def _list(text: str | None) -> list[Any]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


# -- the formats ----------------------------------------------------------------

COLUMNS = (
    "queue_id",
    "received",
    "sender",
    "recipient",
    "message_id",
    "subject",
    "size",
    "state",
    "at",
    "destination",
    "reply",
    "dsn",
)


def lines(answer: dict[str, Any]) -> Iterable[list[str]]:
    """
    A report (as JSON) one recipient a line, in COLUMNS' order.
    """
    for m in answer["messages"]:
        for r in m["recipients"]:
            yield [
                m["queue_id"],
                _iso(m["received"]),
                m["sender"] or "<>",
                r["recipient"] + (f" ({r['queue']})" if "#" in r["queue"] else ""),
                m["message_id"],
                m["subject"],
                str(m["size"]),
                r["state"],
                _iso(r["at"]),
                r["mx"],
                r["reply"],
                m["dsn"],
            ]


def _totals_line(answer: dict[str, Any]) -> str:
    t = answer["totals"]
    return (
        f"{t['accepted']} accepted, {t['delivered']} delivered, {t['bounced']} bounced, "
        f"{t['queued']} still queued" + (f", {t['deleted']} deleted" if t["deleted"] else "")
    )


def as_csv(answer: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    writer.writerows(lines(answer))
    return out.getvalue()


def as_text(answer: dict[str, Any]) -> str:
    head = f"{answer['domain']}: messages accepted from {_iso(answer['from'])} to {_iso(answer['until'])}\n"
    if not answer["messages"]:
        return head + str(answer.get("note", "nothing accepted in this window")) + "\n"
    out = [head, _totals_line(answer) + "\n"]
    if "next_from" in answer:
        out.append(answer["note"] + "\n")
    for line in lines(answer):
        qid, received, sender, rcpt, _mid, _subject, _size, state, at, mx, reply, dsn = line
        where = f" via {mx}" if mx else ""
        extra = f" (DSN {dsn})" if dsn and state in ("failed", "bounced") else ""
        out.append(f"{qid} {received} {sender} -> {rcpt}: {state} {at}{where} {reply}{extra}".rstrip() + "\n")
    return "".join(out)


def as_html(answer: dict[str, Any]) -> str:
    def e(text: str) -> str:
        return str(html.escape(text))

    title = f"Proof of delivery: {answer['domain']}, {_iso(answer['from'])} to {_iso(answer['until'])}"
    head = "".join(f"<th>{e(c.replace('_', ' '))}</th>" for c in COLUMNS)
    body = "".join(
        f'<tr class="{e(line[7])}">' + "".join(f"<td>{e(cell)}</td>" for cell in line) + "</tr>\n"
        for line in lines(answer)
    )
    summary = _totals_line(answer) if answer["messages"] else answer.get("note", "nothing accepted in this window")
    if "next_from" in answer:
        summary += "; " + answer["note"]
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{e(title)}</title>\n<style>"
        "body{font:13px/1.4 sans-serif;margin:2em}table{border-collapse:collapse;width:100%}"
        "th,td{border:1px solid #999;padding:2px 4px;text-align:left;vertical-align:top;word-break:break-word}"
        "th{background:#eee}tr.failed td,tr.bounced td{background:#fdd}tr.queued td,tr.deferred td{background:#ffd}"
        "@media print{body{margin:0;font-size:9pt}th{background:none}}"
        "</style></head><body>\n"
        f"<h1>{e(title)}</h1>\n<p class=totals>{e(summary)}</p>\n"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>\n</body></html>\n"
    )
