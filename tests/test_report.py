"""
Proof of delivery (``report``): the event log the queue's scripts keep, the
report folded from it, its formats, the API and the CLI, and a real node
whose report survives a restart.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.threads import deferToThread

from relayx.interfaces import Outcome
from relayx.ops import report
from relayx.ops.cli import Client, Failure, parser, run
from relayx.redis.embedded import free_port
from relayx.reply import Reply
from tests.helpers import LoopbackSink, NodeCase, send, unique_prefix, wait_for
from tests.test_api import TOKEN, call
from tests.test_end_to_end import body
from tests.test_queue_redis import T0, QueueCase, deferred_test, message, take

MX = "sink.test [127.0.0.1]:25"


def _ok(qid: str) -> Reply:
    return Reply(250, "2.0.0", f"queued as P-{qid}")


class EventLogTests(QueueCase):
    @deferred_test
    async def test_report_folds_every_outcome(self) -> None:
        """When messages are delivered, refused, bounced, deleted or left waiting, the report shows each with totals."""
        q = await self.make_queue()
        for n in range(6):
            await q.enqueue(message(f"M{n}", f"u{n}@one.test", at=T0 + n))
        outside = message("LATE", "x@one.test", at=T0 + 3600)
        await q.enqueue(outside)
        now = T0 + 10
        # M0..M5 in order, one at a time (concurrency 1)
        for n in range(4):
            [lease] = [x for x in await take(q, "n", now, 10) if x.domain == "one.test"]
            assert lease.queue_id == f"M{n}"
            if n == 1:
                failed = ((f"u{n}@one.test", Reply(550, "5.1.1", "no such user")),)
                outcome = Outcome(failed=failed, destination=MX)
            elif n == 2:
                outcome = Outcome(deferred=((f"u{n}@one.test", Reply(451, "4.3.0", "try later")),), destination=MX)
            else:
                outcome = Outcome(delivered=lease.recipients, destination=MX, accepted=_ok(lease.queue_id))
            await q.settle(lease, outcome, now)
        assert await q.drop("M4", now, "ops", bounce=True) == 1
        assert await q.drop("M5", now, "ops", bounce=False) == 1
        got = (await report.build(q, "one.test", T0, T0 + 60)).as_json()
        assert got["totals"] == {"accepted": 6, "delivered": 2, "bounced": 2, "deleted": 1, "queued": 1}
        rows = {m["queue_id"]: m for m in got["messages"]}
        assert list(rows) == ["M0", "M1", "M2", "M3", "M4", "M5"]
        assert rows["M0"]["sender"] == "bob@sender.test" and rows["M0"]["subject"] == "M0"
        assert rows["M0"]["received"] == T0
        [fate] = rows["M0"]["recipients"]
        assert fate == {
            "recipient": "u0@one.test",
            "queue": "one.test",
            "state": "delivered",
            "at": now,
            "mx": MX,
            "reply": "250 2.0.0 queued as P-M0",
        }
        assert rows["M1"]["recipients"][0]["state"] == "failed"
        assert rows["M1"]["recipients"][0]["reply"] == "550 5.1.1 no such user"
        assert rows["M2"]["state"] == "queued" and rows["M2"]["recipients"][0]["reply"] == "451 4.3.0 try later"
        assert rows["M4"]["recipients"][0]["state"] == "bounced"
        assert rows["M5"]["recipients"][0]["state"] == "deleted"
        # an operator's requeue makes a failed recipient owed again, then it is delivered
        assert await q.requeue("M1", now, "ops") == 1
        requeued = (await report.build(q, "one.test", T0, T0 + 60)).as_json()
        assert requeued["totals"]["queued"] == 2 and requeued["messages"][1]["state"] == "queued"
        leases = [x for x in await take(q, "n", now + 600, 10) if x.queue_id == "M1"]
        assert leases, "M1 is ready again"
        await q.settle(leases[0], Outcome(delivered=leases[0].recipients, destination=MX, accepted=_ok("M1")), now)
        again = (await report.build(q, "one.test", T0, T0 + 60)).as_json()
        assert again["messages"][1]["recipients"][0]["state"] == "delivered"

    @deferred_test
    async def test_dsn_queue_id_is_shown(self) -> None:
        """When a failed message's DSN is queued, the report names the DSN's queue id."""
        q = await self.make_queue()
        await q.enqueue(message("M", "gone@one.test"))
        [lease] = await take(q, "n", T0, 10)
        await q.settle(lease, Outcome(failed=(("gone@one.test", Reply(550, "5.1.1", "gone")),)), T0)
        [job] = await q.failed(10)
        dsn = message("DSN1", "bob@sender.test", sender="")
        assert await q.bounce(job, dsn, T0)
        got = (await report.build(q, "one.test", T0 - 1, T0 + 1)).as_json()
        assert got["messages"][0]["dsn"] == "DSN1"
        assert got["totals"]["bounced"] == 1

    @deferred_test
    async def test_reads_are_bounded_by_the_page(self) -> None:
        """When the log holds more entries than a page, the report reads it a page per call and misses none."""
        q = await self.make_queue()
        for n in range(25):
            await q.enqueue(message(f"M{n:02}", "a@one.test", at=T0 + n))
        built = await report.build(q, "one.test", T0, T0 + 100, page=10)
        assert built.totals()["accepted"] == 25 and built.totals()["queued"] == 25
        assert built.calls == 3 and built.entries == 25
        # a window of a few messages stops reading once they are all settled... or the log ends
        only = await report.build(q, "one.test", T0 + 5, T0 + 6, page=10)
        assert sorted(only.rows) == ["M05", "M06"]
        # at most `limit` messages, and where to ask again from
        first = (await report.build(q, "one.test", T0, T0 + 100, page=10, limit=20)).as_json()
        assert len(first["messages"]) == 20 and first["next_from"] == T0 + 20
        assert "ask again from" in first["note"] and "ask again from" in report.as_text(first)
        rest = await report.build(q, "one.test", first["next_from"], T0 + 100, page=10, limit=20)
        assert sorted(rest.rows) == [f"M{n}" for n in range(20, 25)]

    @deferred_test
    async def test_empty_window_is_a_clear_answer(self) -> None:
        """When nothing was accepted in the window, the report says so, in every format."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test"))
        got = (await report.build(q, "one.test", T0 + 100, T0 + 200)).as_json()
        assert got["messages"] == [] and got["totals"]["accepted"] == 0
        assert "no message for one.test was accepted" in got["note"]
        assert "no message for one.test was accepted" in report.as_text(got)
        assert "no message for one.test was accepted" in report.as_html(got)
        assert report.as_csv(got).splitlines() == [",".join(report.COLUMNS)]
        nothing = (await report.build(q, "two.test", T0 - 100, T0 + 200)).as_json()
        assert nothing["messages"] == []

    @deferred_test
    async def test_log_is_trimmed_to_the_retention(self) -> None:
        """When entries are older than the retention and its margin, the next write trims them (bounded memory)."""
        q = await self.make_queue(retention=60.0)
        for n in range(149):
            await q.enqueue(message(f"OLD{n}", "a@one.test", at=T0))
        [lease] = await take(q, "n", T0, 10)
        await q.settle(lease, Outcome(delivered=lease.recipients), T0)  # sets the trim: retention + a day
        key = q.key("events", "one.test")
        assert await q.redis.call("execute_command", "XLEN", key) == 150
        # approximate trimming (MINID ~) drops whole nodes (at most 100 entries or 4 KB) once all are old
        later = T0 + 60 + 86400 + 3600
        await q.enqueue(message("NEW", "a@one.test", at=later))
        left = await q.redis.call("execute_command", "XLEN", key)
        assert 1 <= left < 100, left
        [(_, last)] = await q.redis.call("execute_command", "XREVRANGE", key, "+", "-", "COUNT", 1) or [(0, [])]
        assert b"NEW" in last
        assert len((await report.build(q, "one.test", T0 - 1, T0 + 1)).rows) < 100


class CompactEntryTests(QueueCase):
    @deferred_test
    async def test_what_an_entry_tells_is_left_out_and_read_back(self) -> None:
        """When an entry's time, job or queue is what its ID and stream tell, it is stored as "" and read back whole;
        an entry of the previous format (every field given) reads the same."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test", "b@two.test", at=T0))
        key = q.key("events", "one.test")
        [(_, raw)] = await q.redis.call("execute_command", "XRANGE", key, "-", "+")
        stored = {k.decode(): v.decode() for k, v in zip(raw[::2], raw[1::2], strict=True)}
        assert stored["kind"] == "accepted" and (stored["at"], stored["jid"], stored["queue"]) == ("", "", "")
        [(entry_id, fields)] = await q.events("one.test", "-", "+", 10)
        assert entry_id.startswith(f"{round(T0 * 1000)}-")
        assert (fields["at"], fields["jid"], fields["queue"], fields["qid"]) == (
            str(round(T0 * 1000)),
            "M.1",
            "one.test",
            "M",
        )
        [(_, second)] = await q.events("two.test", "-", "+", 10)
        assert (second["jid"], second["queue"]) == ("M.2", "two.test")
        # the previous format, as the previous version wrote it
        await q.redis.call(
            "execute_command",
            "XADD",
            key,
            f"{round(T0 * 1000) + 5}-0",
            "kind",
            "accepted",
            "queue",
            "one.test#1",
            "qid",
            "OLD",
            "jid",
            "OLD.3",
            "at",
            str(round(T0 * 1000) + 2),
            "sender",
            "x@y.test",
            "rcpts",
            '["c@one.test"]',
            "mid",
            "",
            "subject",
            "s",
            "size",
            "9",
        )
        [_, (_, old)] = await q.events("one.test", "-", "+", 10)
        assert (old["at"], old["jid"], old["queue"]) == (str(round(T0 * 1000) + 2), "OLD.3", "one.test#1")
        got = (await report.build(q, "one.test", T0 - 1, T0 + 1)).as_json()
        assert [(m["queue_id"], m["received"]) for m in got["messages"]] == [("M", T0), ("OLD", T0 + 0.002)]
        assert got["messages"][1]["recipients"][0]["queue"] == "one.test#1"


class WithdrawnTests(QueueCase):
    @deferred_test
    async def test_taken_back_message_is_not_in_the_report(self) -> None:
        """When an enqueue is taken back (its sender got 451), the report does not count it as accepted."""
        q = await self.make_queue()
        await q.enqueue(message("GONE", "a@one.test"))
        await q.enqueue(message("KEPT", "b@one.test"))
        assert not await q._take_back("GONE", "the reply never came")
        got = (await report.build(q, "one.test", T0 - 1, T0 + 1)).as_json()
        assert [m["queue_id"] for m in got["messages"]] == ["KEPT"] and got["totals"]["accepted"] == 1


class RetryLogTests(QueueCase):
    @deferred_test
    async def test_same_deferral_is_logged_once(self) -> None:
        """When a recipient is deferred again for the same reason, the log does not grow; a new reason is logged."""
        q = await self.make_queue(retry_schedule=(1.0,))
        await q.enqueue(message("M", "a@one.test"))
        key = q.key("events", "one.test")
        for n, text in enumerate(["busy", "busy", "busy", "full"]):
            [lease] = await take(q, "n", T0 + 10 * n, 10)
            await q.settle(lease, Outcome(deferred=(("a@one.test", Reply(451, "4.3.0", text)),)), T0 + 10 * n)
        assert await q.redis.call("execute_command", "XLEN", key) == 3  # accepted, busy, full
        got = (await report.build(q, "one.test", T0 - 1, T0 + 1)).as_json()
        assert got["messages"][0]["recipients"][0]["reply"] == "451 4.3.0 full"


def test_cli_writes_a_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """When report is given -o FILE, the page goes there and a summary to the terminal; an existing file is kept."""
    answer = {
        "domain": "one.test",
        "from": T0,
        "until": T0 + 60,
        "totals": {"accepted": 0, "delivered": 0, "bounced": 0, "deleted": 0, "queued": 0},
        "messages": [],
        "note": "no message for one.test was accepted from A to B",
    }
    asked: list[tuple[str, dict[str, Any]]] = []

    class Canned:
        def __call__(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
            asked.append((path, query))
            return answer

        def raw(self, path: str) -> bytes:
            raise AssertionError(path)

    target = tmp_path / "proof.html"
    argv = ["report", "one.test", "--from", "2027-01-15T08:00+00:00", "--format", "html", "-o", str(target)]
    out = io.StringIO()
    run(parser().parse_args(argv), Canned(), out)
    assert asked == [("domains/one.test/report", {"from": 1800000000.0, "until": None})]
    assert "no message for one.test was accepted" in target.read_text()
    assert (
        out.getvalue()
        == "one.test: 0 accepted, 0 delivered, 0 bounced, 0 still queued; html written to " + str(target) + "\n"
    )
    with pytest.raises(Failure) as refused:
        run(parser().parse_args(argv), Canned(), io.StringIO())
    assert refused.value.code == 2 and "cannot create" in str(refused.value)
    text = io.StringIO()
    run(parser().parse_args(["report", "one.test", "--from", "2027-01-15T08:00+00:00"]), Canned(), text)
    assert "no message for one.test was accepted" in text.getvalue()


def test_formats_escape_and_quote() -> None:
    """When a subject holds markup or commas, HTML escapes it and CSV quotes it."""
    answer = {
        "domain": "one.test",
        "from": T0,
        "until": T0 + 60,
        "totals": {"accepted": 1, "delivered": 1, "bounced": 0, "deleted": 0, "queued": 0},
        "messages": [
            {
                "queue_id": "M",
                "received": T0,
                "sender": "",
                "message_id": "1@x",
                "subject": "<script>a, b</script>",
                "size": 10,
                "state": "delivered",
                "dsn": "",
                "recipients": [
                    {
                        "recipient": "a@one.test",
                        "queue": "one.test",
                        "state": "delivered",
                        "at": T0,
                        "mx": "m",
                        "reply": "250 ok",
                    }
                ],
            }
        ],
    }
    page = report.as_html(answer)
    assert "<script>" not in page and "&lt;script&gt;a, b&lt;/script&gt;" in page
    assert "1 accepted, 1 delivered, 0 bounced, 0 still queued" in page
    [head, row] = list(csv.reader(io.StringIO(report.as_csv(answer))))
    assert head[3] == "recipient" and row[2] == "<>" and row[5] == "<script>a, b</script>"


class NodeReportTests(NodeCase):
    @deferred_test
    async def test_report_of_a_window_survives_a_restart(self) -> None:
        """When a node delivers some, fails one (550) and keeps one queued, the report says so, and after a restart."""
        sink = LoopbackSink()
        sink.sink.rcpt_reply = lambda rcpt: (
            b"550 5.1.1 no such user"
            if rcpt.startswith("gone")
            else b"451 4.3.0 later"
            if rcpt.startswith("later")
            else b"250 ok"
        )
        sink.sink.data_reply = lambda rcpts: b"250 2.0.0 Ok: queued as PRIMARY-" + rcpts[0].split("@")[0].encode()
        sink.start()
        prefix = unique_prefix()
        admin = free_port()
        options: dict[str, Any] = {
            "key_prefix": prefix,
            "admin_listen": [f"tcp:{admin}:interface=127.0.0.1"],
            "admin_tokens": {"ops": TOKEN},
        }
        node = await self.start_node(sink, **options)
        start = time.time() - 1
        recipients = [f"user{n}@example.com" for n in range(5)] + ["gone@example.com", "later@example.com"]
        for n, rcpt in enumerate(recipients):
            assert await send(self.smtp_port, f"s{n}@sender.test", [rcpt], body(n, "example.com")) == {}
        until = time.time() + 1
        await wait_for(lambda: len(sink.messages) >= 5, 30, "five deliveries")
        queue = node.queue
        assert queue is not None

        async def settled() -> bool:
            got = (await report.build(queue, "example.com", start, until)).totals()
            return got["delivered"] == 5 and got["bounced"] == 1

        for _ in range(100):
            if await settled():
                break
            await deferToThread(time.sleep, 0.2)
        first = (await report.build(queue, "example.com", start, until)).as_json()
        assert first["totals"] == {"accepted": 7, "delivered": 5, "bounced": 1, "deleted": 0, "queued": 1}
        rows = {m["recipients"][0]["recipient"]: m for m in first["messages"]}
        delivered = rows["user3@example.com"]["recipients"][0]
        assert delivered["reply"] == "250 2.0.0 Ok: queued as PRIMARY-user3"
        assert "127.0.0.1" in delivered["mx"]
        assert rows["gone@example.com"]["recipients"][0]["reply"].startswith("550 5.1.1 no such user")
        assert rows["later@example.com"]["state"] == "queued"
        assert "451 4.3.0 later" in rows["later@example.com"]["recipients"][0]["reply"]

        # a restart: the same Redis and prefix, a new node; the delivered ones are gone from the queue
        await node.stop()
        sink.sink.rcpt_reply = lambda rcpt: b"451 4.3.0 later"
        await self.start_node(sink, **options)
        path = f"domains/example.com/report?from={start}&until={until}"
        status, again = await deferToThread(call, admin, "GET", path)
        assert status == 200, again
        assert again["totals"] == first["totals"]
        assert [m["queue_id"] for m in again["messages"]] == [m["queue_id"] for m in first["messages"]]
        # the CLI over the API: text and CSV
        out = io.StringIO()
        argv = ["report", "example.com", "--from", _isoz(start), "--until", _isoz(until), "--format", "csv"]
        argv += ["--url", f"http://127.0.0.1:{admin}", "--token", TOKEN]
        await deferToThread(_cli, argv, out)
        lines = list(csv.reader(io.StringIO(out.getvalue())))
        assert len(lines) == 8 and lines[0] == list(report.COLUMNS)
        status, bad = await deferToThread(call, admin, "GET", "domains/example.com/report?from=yesterday")
        assert status == 400 and "from: expected" in bad["error"]
        status, bad = await deferToThread(call, admin, "GET", "domains/example.com/report?format=pdf")
        assert status == 400 and "format" in bad["error"]
        status, bad = await deferToThread(call, admin, "GET", "domains/exmaple.com/report")
        assert status == 404


def _isoz(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _cli(argv: list[str], out: io.StringIO) -> None:
    options = parser().parse_args(argv)
    run(options, Client(options.url, options.token), out)
