"""
The admin HTTP API on a real node: bearer tokens, a domain held, searched,
viewed, released and re-routed over HTTP, each change in the audit log.
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from relayx.interfaces import IBulkActions, IQueueAdmin, QueueCounts, StoreUnavailable
from relayx.metrics import Metrics
from relayx.ops.api import MAX_BODY, AdminAPI, Cluster, authenticate
from relayx.ops.http import admin_http, admin_site
from relayx.redis.embedded import free_port
from tests.helpers import LoopbackSink, NodeCase, eventually, send, wait_for
from tests.test_queue_redis import deferred_test

TOKEN = "s3cret-token-for-the-tests"


def test_authenticate() -> None:
    """When a request carries a bearer token, the token's name is found only for an exact match."""
    tokens = [("ops", TOKEN), ("ci", "another-token-0123456789")]
    assert authenticate(f"Bearer {TOKEN}".encode(), tokens) == "ops"
    assert authenticate(b"Bearer another-token-0123456789", tokens) == "ci"
    assert authenticate(f"Bearer {TOKEN}x".encode(), tokens) is None
    assert authenticate(TOKEN.encode(), tokens) is None
    assert authenticate(None, tokens) is None


def call(port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class APITests(NodeCase):
    async def start(self, sink: LoopbackSink, tokens: dict[str, str] | None = None) -> int:
        port = free_port()
        await self.start_node(
            sink,
            admin_listen=[f"tcp:{port}:interface=127.0.0.1"],
            admin_tokens={"ops": TOKEN} if tokens is None else tokens,
        )
        return port

    async def api(self, port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> Any:
        return await deferToThread(call, port, method, path, body, token)

    @deferred_test
    async def test_tokens_required(self) -> None:
        """When a request has no token or a wrong one, it gets 401; with no tokens configured the API is off (403)."""
        port = await self.start(LoopbackSink())
        assert (await self.api(port, "GET", "domains", token=None))[0] == 401
        code, body = await self.api(port, "GET", "domains", token="wrong-token-0123456789")
        assert code == 401 and body == {"error": "a valid bearer token is required"}
        assert (await self.api(port, "GET", "domains"))[0] == 200
        off = await self.start(LoopbackSink(), tokens={})
        assert (await self.api(off, "GET", "domains"))[0] == 403

    @deferred_test
    async def test_hold_search_view_release(self) -> None:
        """When a domain is held over the API, new mail shows as held, can be viewed, and is delivered on release;
        every change is audited with the token's name."""
        sink = LoopbackSink()
        sink.start()
        port = await self.start(sink)
        assert (await self.api(port, "POST", "domains/example.com/hold", {}))[1]["held"] is True
        body = b"Subject: held mail\r\n\r\nwait for it\r\n"
        assert await send(self.smtp_port, "bob@sender.test", ["a@example.com"], body) == {}
        code, page = await self.api(port, "GET", "messages?domain=example.com&state=held")
        assert code == 200 and page["next_cursor"] is None
        [row] = page["messages"]
        assert row["subject"] == "held mail"
        assert row["recipients"] == ["a@example.com"] and row["sender"] == "bob@sender.test"
        code, summary = await self.api(port, "GET", "domains/example.com")
        assert summary["held"] is True and summary["jobs"]["held"] == 1 and summary["oldest_age"] is not None
        code, view = await self.api(port, "GET", f"messages/{row['queue_id']}")
        assert code == 200 and "Subject: held mail" in view["header"] and view["jobs"][0]["state"] == "held"
        assert (await self.api(port, "GET", "messages?sender=nobody@x.test"))[1]["messages"] == []
        assert (await self.api(port, "GET", "messages"))[1]["total"] == 1
        assert (await self.api(port, "POST", "domains/example.com/release", {"rate": 5}))[1]["was_held"] is True
        await wait_for(lambda: len(sink.messages) == 1, 20, "delivery after release")
        records = (await self.api(port, "GET", "audit"))[1]["records"]
        assert [(r["action"], r["who"]) for r in records[:2]] == [
            ("release", "ops (127.0.0.1)"),
            ("hold", "ops (127.0.0.1)"),
        ]

    @deferred_test
    async def test_bad_requests_get_clear_errors(self) -> None:
        """When a request is wrong, the answer is a 4xx with a one-line reason, and nothing changes."""
        port = await self.start(LoopbackSink())
        cases = [
            ("GET", "domains/nowhere.test", None, 404, "nowhere.test is not a domain of this cluster"),
            ("POST", "domains/example.com/route", {"routes": ["ftp://x"]}, 400, "routes: expected"),
            ("POST", "domains/example.com/release", {"rate": "fast"}, 400, "rate: expected messages per second"),
            ("GET", "messages?state=lost", None, 400, "state: expected one of"),
            ("GET", "messages?limit=100000", None, 400, "limit: expected a whole number from 1 to 500"),
            ("GET", "messages?colour=red", None, 400, "unknown parameter 'colour'"),
            ("GET", "messages?offset=50", None, 400, "offset: pages now go by cursor"),
            ("GET", "messages?cursor=abc", None, 400, "cursor: expected a whole number"),
            (
                "POST",
                "bulk",
                {"action": "explode", "filter": {"domain": "example.com"}},
                400,
                "action: expected one of",
            ),
            ("POST", "bulk", {"action": "delete"}, 400, "filter: expected an object with at least one of"),
            ("POST", "bulk", {"action": "delete", "filter": {"colour": "red"}}, 400, "unknown filter 'colour'"),
            ("GET", "bulk/nosuch", None, 404, "no bulk action nosuch"),
            ("GET", "messages/NOSUCHID", None, 404, "no message NOSUCHID in the queue"),
            ("DELETE", "messages/NOSUCHID", None, 404, "no message NOSUCHID"),
            ("POST", "domains/example.com/explode", {}, 404, "no action 'explode'"),
            ("GET", "domains/example.com/history?since=yesterday", None, 400, "since: expected seconds since"),
            ("GET", "history?limit=0", None, 400, "limit: expected a whole number from 1 to 10080"),
            ("GET", "domains/nowhere.test/history", None, 404, "nowhere.test is not a domain"),
        ]
        for method, path, body, status, reason in cases:
            code, answer = await self.api(port, method, path, body)
            assert (code, reason in answer["error"]) == (status, True), (path, code, answer)
        assert (await self.api(port, "GET", "audit"))[1]["records"] == []

    @deferred_test
    async def test_route_change_and_cluster(self) -> None:
        """When a domain is re-routed over the API its summary shows the new routes; the cluster lists this node."""
        port = await self.start(LoopbackSink())
        code, answer = await self.api(port, "POST", "domains/example.com/route", {"routes": ["smtp://127.0.0.9:2525"]})
        assert code == 200 and answer["routes"] == ["smtp://127.0.0.9:2525"]
        summary = (await self.api(port, "GET", "domains/example.com"))[1]
        assert summary["routes"] == ["smtp://127.0.0.9:2525"] and summary["routes_overridden"] is True
        await self.api(port, "POST", "domains/example.com/route", {"routes": None})
        assert (await self.api(port, "GET", "domains/example.com"))[1]["routes_overridden"] is False
        cluster = (await self.api(port, "GET", "cluster"))[1]
        assert cluster["node"] == "node-a" and cluster["redis"]["connected"] and cluster["durability"] == "aof"

    @deferred_test
    async def test_bulk_delete_by_filter(self) -> None:
        """When every message from one sender is deleted in bulk, the others stay, progress shows the count, one
        audit record names the filter, and a filter that matches nothing is a plain answer."""
        port = await self.start(LoopbackSink())
        assert (await self.api(port, "POST", "domains/example.com/hold", {}))[0] == 200
        for n in range(6):
            sender = "spam@bad.test" if n % 2 else "bob@sender.test"
            assert await send(self.smtp_port, sender, [f"u{n}@example.com"], b"Subject: s\r\n\r\nx\r\n") == {}
        code, started = await self.api(
            port, "POST", "bulk", {"action": "delete", "filter": {"sender": "Spam@bad.test", "domain": "example.com"}}
        )
        assert code == 200 and started["state"] == "running" and started["filter"] == {"sender": "spam@bad.test"}

        async def finished() -> Any:
            progress = (await self.api(port, "GET", f"bulk/{started['id']}"))[1]
            return progress if progress["state"] == "done" else None

        progress = await eventually(finished, 20, "the bulk delete")
        assert progress["matched"] == 3 and progress["acted"] == 3
        page = (await self.api(port, "GET", "messages?domain=example.com"))[1]
        assert sorted(m["sender"] for m in page["messages"]) == ["bob@sender.test"] * 3
        records = (await self.api(port, "GET", "audit"))[1]["records"]
        assert records[0]["action"] == "bulk delete" and records[0]["filter"] == {"sender": "spam@bad.test"}
        code, nothing = await self.api(port, "POST", "bulk", {"action": "bounce", "filter": {"sender": "x@y.test"}})
        assert code == 200 and nothing["id"] is None and nothing["matched"] == 0
        assert "nothing in the queue matches" in nothing["message"]
        assert [b["id"] for b in (await self.api(port, "GET", "bulk"))[1]["bulk"]] == [started["id"]]

    @deferred_test
    async def test_history_of_a_domain_and_the_cluster(self) -> None:
        """When the history has samples, a domain's history gives its counts, rates and drain, and the cluster's the
        sums; the samples are read from `since` (a time or a duration back) on."""
        sink = LoopbackSink()
        sink.start()
        port = free_port()
        node = await self.start_node(
            sink, admin_listen=[f"tcp:{port}:interface=127.0.0.1"], admin_tokens={"ops": TOKEN}
        )
        assert node.history is not None
        assert (await self.api(port, "POST", "domains/example.com/hold", {}))[0] == 200
        for n in range(2):
            assert (
                await send(self.smtp_port, "bob@sender.test", [f"u{n}@example.com"], b"Subject: s\r\n\r\nx\r\n") == {}
            )
        now = node.reactor.seconds()
        assert await node.history.sample(now - 60)
        code, answer = await self.api(port, "GET", "domains/example.com/history?since=1h")
        assert code == 200 and answer["interval"] == 60 and answer["next_since"] is None
        [sample] = answer["samples"]
        assert (sample["held"], sample["total"], sample["hold"], sample["accepted"]) == (2, 2, 1, 2)
        assert (
            answer["replay"]["held"] is True and answer["replay"]["remaining"] == 2 and answer["replay"]["eta"] is None
        )
        assert (await self.api(port, "POST", "domains/example.com/release", {}))[0] == 200
        await wait_for(lambda: len(sink.messages) == 2, 20, "delivery after release")
        assert await node.history.sample(now)
        answer = (await self.api(port, "GET", f"domains/example.com/history?since={int(now - 3600)}"))[1]
        assert [s["delivered_per_minute"] for s in answer["samples"]] == [None, 2.0]
        assert answer["replay"]["remaining"] == 0 and answer["replay"]["delivered_per_minute"] == 2.0
        cluster = (await self.api(port, "GET", "history?limit=1"))[1]
        assert cluster["domain"] is None and cluster["next_since"] is not None
        assert [(s["accepted"], s["delivered"]) for s in cluster["samples"]] == [(2, 0)]


def _admin_channel(
    metrics_tokens: list[tuple[str, str]] | None = None,
    queue_summary: Callable[[Sequence[str]], Awaitable[Mapping[str, QueueCounts]]] | None = None,
) -> Callable[[], tuple[Any, StringTransport]]:
    """
    Connections to an admin site (API, metrics) over StringTransports.
    """
    clock = Clock()

    async def no_summary(queues: Sequence[str]) -> Mapping[str, QueueCounts]:
        raise StoreUnavailable("not in this test")

    site = admin_http(
        admin_site(
            Metrics(),
            ready=lambda: None,
            domains=["example.com"],
            queue_summary=queue_summary or no_summary,
            clock=clock,
            redis_connected=lambda: True,
            api=AdminAPI(
                queue=cast(IQueueAdmin, object()),
                bulk=cast(IBulkActions, object()),
                domains=(),
                tokens=[("ops", TOKEN)],
                clock=clock,
                cluster=Cluster("n", "aof", "here", lambda: True, 15.0),
            ),
            metrics_tokens=metrics_tokens,
        )
    )

    def connect() -> tuple[Any, StringTransport]:
        channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        channel.callLater = clock.callLater
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        return channel, transport

    return connect


def test_chunked_body_refused_before_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a chunked POST without a token grows past the cap, it gets 413 and is cut off, never written to disk."""

    def no_temporary_files(*args: Any, **kw: Any) -> Any:
        raise AssertionError("request body spooled to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_temporary_files)
    channel, transport = _admin_channel()()
    channel.dataReceived(
        b"POST /api/v1/domains/example.com/hold HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"4000\r\n" + b"a" * 0x4000 + b"\r\n"
    sent = 0
    while not transport.disconnecting and sent < 500 * 1024 * 1024:
        channel.dataReceived(chunk)
        sent += 0x4000
    assert sent <= MAX_BODY + 0x4000
    assert transport.value().startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b"401" not in transport.value()


def test_declared_large_body_refused_at_once() -> None:
    """When a request declares a body over the cap, it gets 413 before any of it is read."""
    channel, transport = _admin_channel()()
    channel.dataReceived(
        b"POST /api/v1/domains/example.com/hold HTTP/1.1\r\nHost: x\r\nContent-Length: 524288000\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting


def test_small_body_reaches_authentication() -> None:
    """When a request body is under the cap, the API answers it (here 401: no token)."""
    channel, transport = _admin_channel()()
    body = b'{"start": 1}'
    channel.dataReceived(
        b"POST /api/v1/domains/example.com/hold HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert transport.value().startswith(b"HTTP/1.1 401 ")


def test_metrics_token_required_when_configured() -> None:
    """When /metrics needs a token, a scrape without one gets 401 and one with it the metrics."""
    connect = _admin_channel(metrics_tokens=[("prometheus", TOKEN)])
    channel, transport = connect()
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 401 ")
    channel, transport = connect()
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n" % TOKEN.encode())
    assert transport.value().startswith(b"HTTP/1.1 200 ") and b"relayx_redis_up 1.0" in transport.value()


def test_concurrent_scrapes_share_one_refresh() -> None:
    """When scrapes come while the metrics are being read from Redis, they all get that one reading."""
    calls: list[Deferred[None]] = []

    async def summary(queues: Sequence[str]) -> Mapping[str, QueueCounts]:
        waiting: Deferred[None] = Deferred()
        calls.append(waiting)
        await waiting
        raise StoreUnavailable("the test's Redis")

    connect = _admin_channel(queue_summary=summary)
    scrapes = [connect() for _ in range(5)]
    for channel, _ in scrapes:
        channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(calls) == 1
    calls[0].callback(None)
    for _, transport in scrapes:
        assert transport.value().startswith(b"HTTP/1.1 200 ")
