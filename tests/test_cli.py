"""
The one operator CLI (``relayx VERB`` and ``relayctl VERB``): the same verbs
over both transports (straight to a real Redis with ``--config``, and HTTP to
a real node's admin API), unknown domains refused, audit before and after,
holds that would replace a schedule, qshape, raw messages and export, help,
completion and a closed pipe.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import mailbox
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from relayx.config import load
from relayx.ops import cli
from relayx.ops.cli import VERBS, UsageError, audit_line, configured_domain, main, mbox_entry
from relayx.redis.connection import connect
from relayx.redis.embedded import free_port
from relayx.service import operator_api
from tests.helpers import LoopbackSink, NodeCase, send, shared_redis, unique_prefix
from tests.test_queue_redis import T0, QueueCase, deferred_test, message

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cli-token-0123456789abcdef"
KNOWN = "(its domains: example.com, example.org, verify.test)"


def config_file(redis_url: str, prefix: str, sink_port: int = 9) -> Path:
    """
    A configuration naming the test's Redis and key prefix, with the domains NodeCase gives a node.
    """
    path = Path(tempfile.mkdtemp(prefix="relayx-cli-")) / "relayx.toml"
    path.write_text(
        f"""
[node]
id = "cli-node"
hostname = "mx2.relayx.test"
data_dir = "{path.parent}"
[smtp]
listen = ["tcp:{free_port()}:interface=127.0.0.1"]
[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
timeout = "2s"
[[domain]]
name = "example.com"
routes = ["smtp://127.0.0.1:{sink_port}"]
recipients = "any"
[[domain]]
name = "example.org"
routes = ["smtp://127.0.0.1:{sink_port}"]
recipients = ["alice@example.org"]
[[domain]]
name = "verify.test"
routes = ["smtp://127.0.0.1:{sink_port}"]
recipients = "any"
"""
    )
    return path


def invoke(program: str, *argv: str) -> tuple[int, str, str, bytes]:
    """
    One verb in this process (from a thread: the test's reactor runs the
    direct transport's requests): exit status, text out, errors, bytes out.
    """
    out, err, binary = io.StringIO(), io.StringIO(), io.BytesIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv), out=out, program=program, open_local=operator_api, binary=binary, reactor=reactor)
    return code, out.getvalue(), err.getvalue(), binary.getvalue()


class BothTransports(NodeCase):
    """
    A node with its admin API, and a configuration file for ``--config``.
    """

    async def setup(self, sink: LoopbackSink) -> None:
        self.admin = free_port()
        node = await self.start_node(
            sink, admin_listen=[f"tcp:{self.admin}:interface=127.0.0.1"], admin_tokens={"ops": TOKEN}
        )
        self.config = config_file(shared_redis().url, node.config.redis.key_prefix, sink.port)

    async def http(self, *argv: str) -> tuple[int, str, str, bytes]:
        url = f"http://127.0.0.1:{self.admin}"
        return await deferToThread(invoke, "relayctl", "--url", url, "--token", TOKEN, *argv)

    async def direct(self, *argv: str) -> tuple[int, str, str, bytes]:
        return await deferToThread(invoke, "relayx", *argv, "--config", str(self.config))

    async def both(self, *argv: str) -> tuple[tuple[int, str, str, bytes], tuple[int, str, str, bytes]]:
        return await self.http(*argv), await self.direct(*argv)


class VerbTests(BothTransports):
    @deferred_test
    async def test_unknown_domain_refused_by_every_verb(self) -> None:
        """When a verb names a domain the cluster lacks, both transports exit 2 with one line and change nothing."""
        await self.setup(LoopbackSink())
        for argv in (
            ("hold", "exmaple.com"),
            ("release", "exmaple.com"),
            ("route", "exmaple.com", "smtp://10.0.0.1:25"),
            ("flush", "exmaple.com"),
            ("status", "exmaple.com"),
            ("qshape", "exmaple.com"),
            ("export", "exmaple.com", "--output", str(self.config.parent / "x.mbox")),
            ("messages", "--domain", "exmaple.com"),
        ):
            for program, (code, out, err, _) in zip(("relayctl", "relayx"), await self.both(*argv), strict=True):
                assert (code, out) == (2, ""), argv
                assert err == f"{program}: exmaple.com is not a domain of this cluster {KNOWN}\n", argv
        code, out, _, _ = await self.direct("audit")
        assert out.splitlines()[1:] == []

    @deferred_test
    async def test_same_answers_over_both_transports(self) -> None:
        """When the same verbs run over HTTP and straight to Redis, their text and JSON are the same."""
        sink = LoopbackSink()
        sink.start()
        await self.setup(sink)
        (code, held, _, _), _ = await self.both("hold", "example.com", "--until", "2099-01-01T00:00+00:00")
        assert code == 0 and held == "example.com: held until 2099-01-01T00:00:00+00:00 (before: not held)\n"
        http, direct = await self.both("status", "example.com")
        assert http == direct and http[0] == 0
        assert "hold       held until 2099-01-01T00:00:00+00:00\n" in http[1]
        assert http[1].splitlines()[1].split()[:2] == ["example.com", "held"]
        http, direct = await self.both("--json", "domains")
        assert json.loads(http[1]) == json.loads(direct[1])
        http, direct = await self.both("qshape", "--json")
        assert json.loads(http[1]) == json.loads(direct[1])
        for verb in ("nodes", "status", "domains", "messages", "audit", "bulk-status", "qshape"):
            (hcode, hout, _, _), (dcode, dout, _, _) = await self.both(verb, "--json")
            assert hcode == dcode == 0 and isinstance(json.loads(hout), dict) and isinstance(json.loads(dout), dict)
        http, direct = await self.both("show", "0000000000000000")
        assert http[:3] == (2, "", "relayctl: no message 0000000000000000 in the queue\n")
        assert direct[:3] == (2, "", "relayx: no message 0000000000000000 in the queue\n")

    @deferred_test
    async def test_hold_schedule_release_and_audit(self) -> None:
        """When an immediate hold meets a scheduled one it is refused without --replace, release says it cancelled
        the schedule, and audit shows every change with what it replaced, message actions included."""
        sink = LoopbackSink()
        sink.start()
        await self.setup(sink)
        code, out, _, _ = await self.direct(
            "hold", "example.com", "--from", "2099-01-01T00:00+00:00", "--until", "2099-01-02T00:00+00:00"
        )
        window = "from 2099-01-01T00:00:00+00:00 until 2099-01-02T00:00:00+00:00"
        assert code == 0 and out == f"example.com: hold scheduled {window} (before: not held)\n"
        for code, out, err, _ in await self.both("hold", "example.com"):
            assert (code, out) == (2, "") and err.count("\n") == 1
            assert f": a hold is scheduled {window}; give replace (--replace)" in err
        code, out, _, _ = await self.http("hold", "example.org")
        code, out, err, _ = await self.http("hold", "example.org", "--from", "2099-01-01T00:00+00:00")
        assert code == 2 and "example.org is held now until released" in err
        code, out, _, _ = await self.http("release", "example.com")
        assert code == 0 and out == f"example.com: scheduled hold cancelled (was scheduled {window})\n"
        code, out, _, _ = await self.direct("release", "example.com")
        assert out == "example.com: was not held; nothing to release\n"
        code, out, _, _ = await self.direct("hold", "example.com", "--from", "2099-01-01T00:00+00:00")
        code, out, _, _ = await self.direct("hold", "example.com", "--replace")
        assert code == 0 and out == (
            "example.com: held until released (before: scheduled from 2099-01-01T00:00:00+00:00 until released)\n"
        )
        code, out, _, _ = await self.http("route", "example.com", "smtp://127.0.0.1:2")
        assert out == (
            "example.com: queued and new mail goes to smtp://127.0.0.1:2 "
            f"(before: smtp://127.0.0.1:{sink.port} (configured))\n"
        )
        assert await send(self.smtp_port, "bob@sender.test", ["u@example.com"], b"Subject: a\r\n\r\nx\r\n") == {}
        code, out, _, _ = await self.direct("messages", "--json")
        [row] = json.loads(out)["messages"]
        qid = row["queue_id"]
        for verb in ("requeue", "bounce"):
            code, out, _, _ = await self.http(verb, qid)
            assert code == 0, out
        code, out, _, _ = await self.direct("delete", qid)
        assert (code, out) == (0, f"{qid}: deleted (1 job(s))\n")
        code, _, err, _ = await self.direct("delete", qid)
        assert code == 2 and err == f"relayx: no message {qid} in the queue\n"
        http, direct = await self.both("audit")
        assert http == direct
        lines = http[1].splitlines()
        records = json.loads((await self.http("--json", "audit"))[1])["records"]
        assert [r["action"] for r in records] == [
            "delete", "bounce", "requeue", "route", "hold", "hold", "release", "release", "hold", "hold",
        ]  # fmt: skip
        assert len(lines) == 11 and f"  delete   {qid}" in lines[1] and f"  bounce   {qid}" in lines[2]
        assert lines[4].endswith("smtp://127.0.0.1:2 (before: configured routes)")
        assert lines[5].endswith(
            "held until released (before: scheduled from 2099-01-01T00:00:00+00:00 until released)"
        )
        assert lines[7].endswith("was not held (before: not held)")
        assert lines[8].endswith(f"scheduled hold cancelled (before: scheduled {window})")
        assert records[3]["previous"] is None and records[3]["routes"] == ["smtp://127.0.0.1:2"]
        assert records[4]["previous"] == {"held": False, "start": 4070908800000, "end": 0}

    @deferred_test
    async def test_raw_qshape_and_export(self) -> None:
        """When mail is held, qshape counts it as young, show --raw and the API's .eml give the message as accepted,
        and export writes every message once as an mbox or a tar of .eml files, a page at a time."""
        sink = LoopbackSink()
        sink.start()
        await self.setup(sink)
        await self.direct("hold", "example.com")
        await self.http("hold", "example.org")
        bodies = [f"Subject: m{n}\r\nMessage-ID: <m{n}@x>\r\n\r\nFrom here\r\nline {n}\r\n".encode() for n in range(5)]
        for n, body in enumerate(bodies):
            rcpts = [f"u{n}@example.com"] + (["alice@example.org"] if n == 0 else [])
            assert await send(self.smtp_port, "bob@sender.test", rcpts, body) == {}
        http, direct = await self.both("qshape")
        assert http == direct
        assert direct[1].splitlines()[0].split() == ["T", "<5m", *"5m 10m 20m 40m 80m 160m 320m 640m 1280m+".split()]
        assert direct[1].splitlines()[1].split() == ["TOTAL", "6", "6", *["0"] * 9]
        assert direct[1].splitlines()[2].split() == ["example.com", "5", "5", *["0"] * 9]
        code, out, _, _ = await self.direct(
            "qshape", "example.com", "example.org", "--waiting", "--buckets", "3", "--first", "1h"
        )
        assert out.splitlines()[0].split() == ["T", "<60m", "60m", "120m+"]
        assert out.splitlines()[2].split() == ["example.com", "5", "5", "0", "0"]
        assert out.splitlines()[3].split() == ["example.org", "1", "1", "0", "0"]
        rows = json.loads((await self.direct("messages", "--json", "--domain", "example.com"))[1])["messages"]
        qid = rows[0]["queue_id"]
        (hcode, _, _, hraw), (dcode, _, _, draw) = await self.both("show", qid, "--raw")
        assert hcode == dcode == 0 and hraw == draw and hraw.endswith(bodies[0]) and hraw.startswith(b"Received: ")
        code, out, _, _ = await self.http("show", qid, "--raw", "--json")
        assert base64.b64decode(json.loads(out)["raw_base64"]) == hraw
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}/api/v1/messages/{qid}/raw", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        response = await deferToThread(urllib.request.urlopen, request, timeout=10)
        assert response.headers["content-type"] == "message/rfc822"
        assert response.headers["content-disposition"] == f'attachment; filename="{qid}.eml"'
        assert response.read() == hraw
        self.patch(cli, "EXPORT_PAGE", 2)
        (hcode, _, herr, mbox), (dcode, _, derr, mbox2) = await self.both("export", "example.com")
        assert hcode == dcode == 0 and mbox == mbox2
        assert herr == derr and herr.startswith("example.com: 5 message(s), ")
        assert herr.endswith(" bytes, as mbox to standard output\n")
        assert mbox.count(b"\n>From here\n") == 5 and mbox.count(b"\r") == 0
        path = self.config.parent / "out.mbox"
        path.write_bytes(mbox)
        box = list(mailbox.mbox(str(path)))
        assert [m["Subject"] for m in box] == [f"m{n}" for n in range(5)]
        assert box[0].get_from().startswith("bob@sender.test ")
        target = self.config.parent / "out.tar"
        code, out, _, _ = await self.direct(
            "export", "example.com", "--format", "tar", "--output", str(target), "--json"
        )
        assert code == 0 and json.loads(out)["messages"] == 5
        with tarfile.open(target) as tar:
            names = tar.getnames()
            assert names == [f"{r['queue_id']}.eml" for r in rows]
            first = tar.extractfile(names[0])
            assert first is not None and first.read() == hraw
        code, _, err, _ = await self.direct("export", "example.com", "--format", "tar", "--output", str(target))
        assert code == 2 and err.startswith(f"relayx: cannot create {target}")


class HoldScriptTests(QueueCase):
    @deferred_test
    async def test_hold_refuses_to_replace_a_window(self) -> None:
        """When a hold would replace a scheduled one, or a hold in force by a later one, nothing changes without
        replace; with it, the audit record keeps the window it replaced."""
        q = await self.make_queue()
        change = await q.hold("one.test", T0, start=T0 + 100, end=T0 + 200)
        assert change.applied and not change.previous.held
        change = await q.hold("one.test", T0 + 10)
        assert not change.applied and change.previous.start == T0 + 100 and change.previous.end == T0 + 200
        assert not (await q.domain_state("one.test", T0 + 10)).held
        change = await q.hold("one.test", T0 + 10, replace=True)
        assert change.applied and (await q.domain_state("one.test", T0 + 10)).held
        change = await q.hold("one.test", T0 + 20, start=T0 + 500)
        assert not change.applied and change.previous.held
        change = await q.hold("one.test", T0 + 20, end=T0 + 900)
        assert change.applied
        before = await q.release("one.test", T0 + 30)
        assert before.held and before.end == T0 + 900 and before.start is None
        records = await q.audit(10)
        assert [r["action"] for r in records] == ["release", "hold", "hold", "hold"]
        start, end = round((T0 + 100) * 1000), round((T0 + 200) * 1000)
        assert records[2]["previous"] == {"held": False, "start": start, "end": end}

    @deferred_test
    async def test_qshape_counts_by_age_with_bisection(self) -> None:
        """When jobs of several ages are queued, qshape puts each in its age bucket, for every job or those waiting."""
        q = await self.make_queue()
        ages = [7200, 3600, 3000, 1200, 600, 100, 10, 1]
        for n, age in enumerate(ages):
            await q.enqueue(message(f"A{n}", f"u{n}@one.test", at=T0 - age))
        now = T0
        # an age right on an edge (3600) counts with the younger bucket
        assert await q.qshape("one.test", now, [300, 900, 3600]) == [8, 3, 1, 3, 1]
        assert await q.qshape("one.test", now, []) == [8, 8]
        assert await q.qshape("two.test", now, [300]) == [0, 0, 0]
        assert await q.qshape("one.test", now, [300], waiting=True) == [8, 3, 5]
        assert await q.raw("A0") == message("A0", "u0@one.test").body
        assert await q.raw("nope") is None


def test_help_lists_the_verbs() -> None:
    """When an operator asks relayx or relayctl for --help, every verb is listed with what it does, and exit is 0."""
    for program in ("relayx", "relayctl"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--help"], program=program) == 0
        for verb in VERBS:
            assert f"    {verb} " in out.getvalue(), verb
    result = subprocess.run(
        [sys.executable, "-m", "relayx", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0 and "qshape" in result.stdout and "twistd" not in result.stdout


def test_completion_scripts() -> None:
    """When asked for completion, relayx prints a bash and a zsh script that know the verbs and their options."""
    out = io.StringIO()
    assert main(["completion", "bash"], out=out, program="relayx") == 0
    bash = out.getvalue()
    assert "-F _shtab_relayx relayx" in bash and "qshape" in bash and "--replace" in bash
    out = io.StringIO()
    assert main(["completion", "zsh"], out=out, program="relayctl") == 0
    assert out.getvalue().startswith("#compdef relayctl") and "bulk-cancel" in out.getvalue()


def test_usage_errors_exit_2() -> None:
    """When a verb lacks what it needs (a transport, a route, a filter), it exits 2 with one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["status"], program="relayx") == 2
        assert main(["route", "example.com", "--url", "http://127.0.0.1:9", "--token", "t"], program="relayctl") == 2
        assert main(["bulk", "delete", "--url", "http://127.0.0.1:9", "--token", "t"], program="relayctl") == 2
        assert main(["check"], program="relayctl") == 2
    lines = err.getvalue().splitlines()
    assert lines == [
        "relayx: give --config FILE (straight to Redis) or --url URL (a node's admin API)",
        "relayctl: give the new routes, or --reset for the configured ones",
        "relayctl: give a filter (--domain, --sender, ...); a bulk action never means everything",
        "relayctl: check reads a configuration: give --config FILE",
    ]


class Closed(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_pipe_is_quiet() -> None:
    """When the output's reader has gone, the verb ends with 141 and prints nothing, no traceback."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["completion", "bash"], out=Closed(), program="relayx") == 141
    assert err.getvalue() == ""


def test_audit_lines_read_any_record() -> None:
    """When audit records of every kind (and odd ones) are shown, each gives a line, none raises."""
    at = int(T0 * 1000)
    records: list[dict[str, Any]] = [
        {"at": at, "who": "ops", "action": "delete", "queue_id": "Q1"},
        {"at": at, "who": "ops", "action": "bounce", "queue_id": "Q2"},
        {"at": at, "who": "ops", "action": "requeue", "queue_id": "Q3"},
        {"at": at, "who": "ops", "action": "flush", "domain": "a.test"},
        {"at": at, "who": "ops", "action": "bulk delete", "bulk": "b1", "filter": {"sender": "x@y"}},
        {"at": at, "who": "ops", "action": "bulk cancel", "bulk": "b1"},
        {"at": at, "who": "ops", "action": "route", "domain": "a.test", "routes": {}, "previous": ""},
        {"at": at, "who": "ops", "action": "route", "domain": "a.test", "routes": ["mx"], "previous": '["mx"]'},
        {"at": at, "who": "ops", "action": "hold", "domain": "a.test", "start": 0, "end": 0},
        {"at": at, "who": "ops", "action": "release", "domain": "a.test", "rate": 5},
        {"action": "something new", "extra": [1, 2]},
        {},
    ]
    lines = [audit_line(r) for r in records]
    assert [line[3] for line in lines[:6]] == ["Q1", "Q2", "Q3", "a.test", "b1", "b1"]
    assert lines[4][4] == "sender=x@y"
    assert lines[6][4] == "configured routes (before: configured routes)"
    assert lines[7][4] == "mx (before: mx)"
    assert lines[8][4] == "held until released" and lines[9][4] == "released at 5 msg/s"
    assert lines[10][2:4] == ["something new", ""]
    assert lines[11] == ["1970-01-01T00:00:00+00:00", "?", "?", "", ""]


def test_mbox_quotes_from_lines() -> None:
    """When a message has lines starting with From or >From, the mbox entry quotes them once more (mboxrd)."""
    entry = mbox_entry("", 0.0, b"Subject: x\r\n\r\nFrom me\r\n>From you\r\nFromage\r\n")
    assert entry == (b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970\nSubject: x\n\n>From me\n>>From you\nFromage\n\n")


class PipeTests(QueueCase):
    @deferred_test
    async def test_head_closes_the_pipe(self) -> None:
        """When `relayx audit` feeds `head -1` more than a pipe holds, it exits 141 without a traceback."""
        server = shared_redis()
        prefix = unique_prefix()
        redis = await connect("127.0.0.1", server.port, 0, None, reactor, 5.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        record = json.dumps({"at": int(T0 * 1000), "who": "ops@" + "x" * 200, "action": "flush", "domain": "a.test"})
        for _ in range(4):
            await redis.call("lpush", f"{prefix}:audit", [record] * 250)
        config = config_file(server.url, prefix)

        def run() -> tuple[int, bytes, bytes]:
            command = [sys.executable, "-m", "relayx", "audit", "--limit", "1000", "--config", str(config)]
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
            assert child.stdout is not None and child.stderr is not None
            first = child.stdout.readline()
            child.stdout.close()
            errors = child.stderr.read()
            return child.wait(60), first, errors

        code, first, errors = await deferToThread(run)
        assert first.split() == [b"WHEN", b"WHO", b"ACTION", b"ON", b"DETAIL"]
        assert (code, errors) == (141, b"")


UNREACHABLE = """
[redis]
url = "redis://127.0.0.1:1/0"

[[domain]]
name = "example.com"
routes = ["smtp://127.0.0.1:2526"]
copy_to = ["smtp://127.0.0.1:2527"]
recipients = "any"
"""


@pytest.fixture
def unreachable(tmp_path: Path) -> Path:
    path = tmp_path / "relayx.toml"
    path.write_text(UNREACHABLE)
    return path


def test_configured_domain_is_normalised(unreachable: Path) -> None:
    """When a configured domain is named in capitals or with a final dot, it is accepted in its normal form."""
    config = load(unreachable)
    assert configured_domain(config, "Example.COM.") == "example.com"
    assert configured_domain(config, "example.com#1") == "example.com#1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exmaple.com", "exmaple.com is not a domain of this cluster"),
        ("not a domain", "is not a domain name"),
        ("example.com#2", "not a domain of"),
    ],
)
def test_unknown_or_bad_domain_is_refused(unreachable: Path, text: str, expected: str) -> None:
    """When the domain is misspelt, malformed or not configured, UsageError says which and lists the domains."""
    with pytest.raises(UsageError, match=expected):
        configured_domain(load(unreachable), text)


@pytest.mark.parametrize("verb", ["hold", "release", "status", "route", "flush", "qshape", "export"])
def test_typo_exits_2_before_redis(unreachable: Path, verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    """When `relayx hold exmaple.com --config` has a typo, it exits 2 with one line, before asking Redis anything."""
    argv = [verb, "--config", str(unreachable), "exmaple.com", *(["mx"] if verb == "route" else [])]
    assert main(argv, program="relayx", open_local=operator_api) == 2
    err = capsys.readouterr().err
    assert err == "relayx: exmaple.com is not a domain of this cluster (its domains: example.com)\n"
