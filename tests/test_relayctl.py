"""
``relayctl`` against a real node's admin API, and its progress bar on its own.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from twisted.internet.threads import deferToThread

from relayx.ops.relayctl import Client, main, watch
from relayx.redis.embedded import free_port
from tests.helpers import LoopbackSink, NodeCase, send, wait_for
from tests.test_queue_redis import deferred_test

TOKEN = "relayctl-token-0123456789"


def relayctl(port: int, *argv: str, token: str = TOKEN) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--url", f"http://127.0.0.1:{port}", "--token", token, *argv], out=out)
    return code, out.getvalue(), err.getvalue()


class ScriptedAPI(Client):
    """
    Answers a domain's summary from a list of remaining counts.
    """

    def __init__(self, remaining: list[int]) -> None:
        super().__init__("http://unused", "t")
        self.remaining = remaining

    def __call__(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        left = self.remaining.pop(0) if len(self.remaining) > 1 else self.remaining[0]
        return {"jobs": {"ready": left, "held": 0, "deferred": 0, "in_flight": 0, "failed": 7}}


def test_watch_draws_progress_until_empty() -> None:
    """When a released queue drains, --watch redraws its bar until nothing but failed jobs is left."""
    out = io.StringIO()
    waits: list[float] = []
    watch(ScriptedAPI([4, 4, 3, 1, 0]), "example.com", out, sleep=waits.append, clock=lambda: 0.0)
    frames = out.getvalue().split("\r")[1:]
    assert frames[0].endswith("0/4 delivered") and frames[-1] == "[" + "#" * 30 + "] 4/4 delivered\n"
    assert waits == [1.0, 1.0, 1.0]


class RelayctlTests(NodeCase):
    async def start(self, sink: LoopbackSink) -> int:
        port = free_port()
        await self.start_node(sink, admin_listen=[f"tcp:{port}:interface=127.0.0.1"], admin_tokens={"ops": TOKEN})
        return port

    @deferred_test
    async def test_hold_list_release_watch(self) -> None:
        """When an operator holds a domain with relayctl, lists its messages and releases it with --watch,
        the tables show the held message and the bar ends at all delivered."""
        sink = LoopbackSink()
        sink.start()
        port = await self.start(sink)
        code, out, _ = await deferToThread(relayctl, port, "hold", "example.com")
        assert code == 0 and out == "example.com: held until released (before: not held)\n"
        for n in range(3):
            assert (
                await send(self.smtp_port, "bob@sender.test", [f"u{n}@example.com"], b"Subject: x\r\n\r\nx\r\n") == {}
            )
        code, out, _ = await deferToThread(relayctl, port, "messages", "--domain", "example.com")
        lines = out.splitlines()
        assert lines[0].split() == [
            "QUEUE",
            "ID",
            "DOMAIN",
            "STATE",
            "SENDER",
            "RECIPIENTS",
            "AGE",
            "TRIES",
            "SUBJECT",
            "LAST",
            "ERROR",
        ]
        assert len(lines) == 4 and all(" held " in line for line in lines[1:])
        code, out, _ = await deferToThread(relayctl, port, "--json", "messages", "--recipient-has", "u1@")
        [row] = json.loads(out)["messages"]
        code, out, _ = await deferToThread(relayctl, port, "show", row["queue_id"])
        assert code == 0 and "u1@example.com" in out and "Subject: x" in out
        code, out, _ = await deferToThread(relayctl, port, "domains")
        assert out.splitlines()[1].split()[:4] == ["example.com", "held", "0", "3"]
        code, out, _ = await deferToThread(relayctl, port, "bulk", "requeue", "--sender", "nobody@x.test")
        assert code == 0 and out.startswith("nothing in the queue matches the filter")
        code, _, err = await deferToThread(relayctl, port, "bulk", "delete")
        assert code == 2 and err.startswith("relayctl: give a filter")
        code, out, _ = await deferToThread(
            relayctl, port, "bulk", "delete", "--recipient", "u2@example.com", "--watch", "--timeout", "30"
        )
        assert code == 0 and out.rstrip().endswith("done: 1 examined, 1 matched, 1 message(s) changed")
        code, out, _ = await deferToThread(relayctl, port, "bulk-status")
        assert out.splitlines()[1].split()[1:3] == ["delete", "done"]
        code, out, _ = await deferToThread(relayctl, port, "release", "example.com", "--watch", "--timeout", "30")
        assert code == 0 and out.rstrip().endswith("2/2 delivered")
        await wait_for(lambda: len(sink.messages) == 2, 20, "delivery")
        code, out, _ = await deferToThread(relayctl, port, "audit")
        assert [line.split()[3] for line in out.splitlines()[1:]] == ["release", "bulk", "hold"]

    @deferred_test
    async def test_errors_are_one_line(self) -> None:
        """When the token is wrong or the API unreachable, relayctl prints one line and exits 1; a bad value: 2."""
        port = await self.start(LoopbackSink())
        code, _, err = await deferToThread(relayctl, port, "domains", token="wrong-token-0123456789")
        assert code == 1 and err == "relayctl: a valid bearer token is required\n"
        code, _, err = await deferToThread(relayctl, free_port(), "domains")
        assert code == 1 and err.startswith("relayctl: cannot reach the admin API at http://127.0.0.1:")
        code, _, err = await deferToThread(relayctl, port, "route", "example.com", "ftp://x")
        assert code == 2 and err.startswith("relayctl route: argument routes: expected") and err.count("\n") == 1
