"""
A tenant cutover: mail held during the window goes to the new tenant on
release, because routes are read at delivery time; the change is audited.
"""

from __future__ import annotations

import time

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.helpers import LoopbackSink, NodeCase, send, wait_for
from tests.test_queue_redis import deferred_test


class CutoverTests(NodeCase):
    @deferred_test
    async def test_held_mail_goes_to_the_new_tenant(self) -> None:
        """When a held domain is re-routed and released, its queued mail goes to the new route, in order."""
        old_tenant, new_tenant = LoopbackSink(), LoopbackSink()
        old_tenant.start()
        new_tenant.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(new_tenant.stop()))
        node = await self.start_node(old_tenant)
        queue = node.queue
        assert queue is not None
        await queue.hold("example.com", time.time(), who="ops@test")
        for n in range(3):
            body = f"Subject: cutover {n}\r\n\r\nx\r\n".encode()
            assert await send(self.smtp_port, "bob@sender.test", [f"u{n}@example.com"], body) == {}
        await deferToThread(time.sleep, 1)
        assert old_tenant.messages == []
        await queue.set_routes("example.com", (f"smtp://127.0.0.1:{new_tenant.port}",), time.time(), "ops@test")
        assert (await queue.release("example.com", time.time())).held is True
        await wait_for(lambda: len(new_tenant.messages) == 3, 30, "the held mail at the new tenant")
        assert [m.body.split(b"Subject: ")[1][:8] for m in new_tenant.messages] == [
            b"cutover ",
            b"cutover ",
            b"cutover ",
        ]
        assert [m.recipients for m in new_tenant.messages] == [
            ["u0@example.com"],
            ["u1@example.com"],
            ["u2@example.com"],
        ]
        assert old_tenant.messages == []
        records = await queue.audit(10)
        assert [r["action"] for r in records] == ["release", "route", "hold"]
        record = records[1]
        assert record["who"] == "ops@test" and record["action"] == "route" and record["domain"] == "example.com"
        assert record["routes"] == [f"smtp://127.0.0.1:{new_tenant.port}"] and record["previous"] is None
        # and back to the configured route
        await queue.set_routes("example.com", None, time.time(), "ops@test")
        assert await queue.route_override("example.com") is None
        assert [r["action"] for r in await queue.audit(10)] == ["route", "release", "route", "hold"]

    @deferred_test
    async def test_dual_delivery_to_old_and_new_tenant(self) -> None:
        """When a domain copies to a second destination that is down for a while, both end with every message once."""
        old_tenant, new_tenant = LoopbackSink(), LoopbackSink()
        old_tenant.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(new_tenant.stop()))
        domain = {
            "name": "dual.test",
            "routes": [f"smtp://127.0.0.1:{old_tenant.port}"],
            "copy_to": [f"smtp://127.0.0.1:{new_tenant.port}"],
            "recipients": "any",
        }
        await self.start_node(old_tenant, domains=[domain], probe_interval="1s")
        for n in range(5):
            body = f"Subject: dual {n}\r\n\r\nx\r\n".encode()
            assert await send(self.smtp_port, "bob@sender.test", [f"u{n}@dual.test"], body) == {}
        await wait_for(lambda: len(old_tenant.messages) == 5, 30, "the old tenant's copies")
        assert new_tenant.messages == []
        new_tenant.start()
        await wait_for(lambda: len(new_tenant.messages) == 5, 30, "the new tenant's copies")
        await deferToThread(time.sleep, 1)
        for sink in (old_tenant, new_tenant):
            subjects = [m.body.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages]
            assert subjects == [f"dual {n}".encode() for n in range(5)]
