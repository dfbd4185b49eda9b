"""
Metrics and health over HTTP from a running node.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request

from twisted.internet.threads import deferToThread

from relayx.ops.cli import _domain_detail
from relayx.redis.embedded import free_port
from tests.helpers import LoopbackSink, NodeCase, eventually, send, wait_for
from tests.test_api import TOKEN, call
from tests.test_queue_redis import deferred_test


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class MetricsTests(NodeCase):
    async def node_with_admin(self, **kw: object) -> int:
        admin = free_port()
        sink = LoopbackSink()
        sink.start()
        self.sink = sink
        await self.start_node(sink, admin_listen=[f"tcp:{admin}:interface=127.0.0.1"], **kw)  # type: ignore[arg-type]
        return admin

    @deferred_test
    async def test_metrics_count_mail_and_queue(self) -> None:
        """When mail is accepted, refused and delivered, /metrics counts it and shows the queue per domain."""
        admin = await self.node_with_admin()
        assert await send(self.smtp_port, "bob@sender.test", ["a@example.com", "x@elsewhere.test"], b"x\r\n") == {
            "x@elsewhere.test": (550, b"5.7.1 Relaying denied")
        }
        await wait_for(lambda: len(self.sink.messages) == 1, 30, "the delivery")

        async def settled() -> set[str]:
            # the sink has the message a moment before the node records its delivery
            status, text = await deferToThread(get, admin, "/metrics")
            assert status == 200
            lines = set(text.splitlines())
            return lines if 'relayx_queue_oldest_seconds{domain="example.com"} 0.0' in lines else set()

        lines = await eventually(settled, 30, "the delivery recorded")
        assert "relayx_messages_accepted_total 1.0" in lines
        assert 'relayx_smtp_refused_total{reply="5xx"} 1.0' in lines
        assert 'relayx_delivery_recipients_total{result="delivered"} 1.0' in lines
        assert 'relayx_queue_jobs{domain="example.com",state="ready"} 0.0' in lines
        assert "relayx_redis_up 1.0" in lines
        assert 'relayx_queue_jobs{domain="example.com",state="held"} 0.0' in lines
        assert 'relayx_queue_oldest_seconds{domain="example.com"} 0.0' in lines
        assert "relayx_lease_takeovers_total 0.0" in lines and "relayx_throttle_waits_total 0.0" in lines
        count = next(line for line in lines if line.startswith("relayx_redis_seconds_count"))
        assert float(count.split()[1]) > 0

    @deferred_test
    async def test_health_and_readiness(self) -> None:
        """When Redis is reachable the node is live and ready; when it is not, live but not ready."""
        admin = await self.node_with_admin()
        assert await deferToThread(get, admin, "/healthz") == (200, "ok\n")
        assert await deferToThread(get, admin, "/readyz") == (200, "ready\n")
        down = await self.node_with_admin(redis_url=f"redis://127.0.0.1:{free_port()}/0")
        assert await deferToThread(get, down, "/healthz") == (200, "ok\n")
        status, text = await deferToThread(get, down, "/readyz")
        assert status == 503 and "Redis" in text

    @deferred_test
    async def test_pace_cut_by_a_busy_greeting_is_shown(self) -> None:
        """
        When the primary greets the first session with 421, the message is delivered on the next without pausing
        the domain, and the metrics, the API and the CLI's domain view show the cut pace and why.
        """
        greetings = [b"421 4.7.0 too many sessions"]
        admin = await self.node_with_admin(admin_tokens={"ops": TOKEN})
        self.sink.sink.greeting = lambda: greetings.pop() if greetings else b"220 sink ESMTP"
        assert await send(self.smtp_port, "bob@sender.test", ["a@example.com"], b"Subject: x\r\n\r\nx\r\n") == {}
        await wait_for(lambda: len(self.sink.messages) == 1, 30, "the delivery")
        status, text = await deferToThread(get, admin, "/metrics")
        lines = set(text.splitlines())
        assert status == 200
        assert 'relayx_delivery_pushbacks_total{kind="sessions"} 1.0' in lines
        assert 'relayx_destination_concurrency{domain="example.com"} 1.0' in lines
        assert 'relayx_destination_rate{domain="example.com"} 0.0' in lines
        assert 'relayx_destination_paced{domain="example.com"} 1.0' in lines
        assert any(
            line.startswith('relayx_destination_pace_cut_timestamp_seconds{domain="example.com"') for line in lines
        )
        code, summary = await deferToThread(call, admin, "GET", "domains/example.com")
        pace = summary["pace"]
        assert code == 200 and summary["paused_until"] is None
        assert pace["event"] == "cut" and pace["kind"] == "sessions" and pace["concurrency"] == 1
        assert pace["why"].startswith("421 4.7.0 too many sessions from ")
        out = io.StringIO()
        _domain_detail(out, summary)
        assert "\npace       1 session, no rate limit: cut (sessions) at " in out.getvalue()
