"""
DSNs: their format (RFC 3464), retiring failed jobs once, and a bounce
delivered end to end to the sender's MX found in a real DNS server.
"""

from __future__ import annotations

import email
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from relayx.delivery.bounce import Bouncer
from relayx.delivery.dsn import FailedRecipient, build_dsn
from relayx.interfaces import Outcome, Throttle
from relayx.redis.embedded import free_port
from relayx.reply import Reply
from tests.dns import LoopbackDNS, a, mx
from tests.helpers import LoopbackSink, NodeCase, send, wait_for
from tests.test_queue_redis import T0, QueueCase, deferred_test, message


def parts(message: Any) -> list[Any]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


def test_dsn_is_a_delivery_status_report() -> None:
    """When a DSN is built, it parses as multipart/report with the recipients, statuses and original headers."""
    raw = build_dsn(
        reporting_mta="mx2.relayx.test",
        message_id="DSN1",
        queue_id="Q1",
        sender="bob@sender.test",
        arrival=T0,
        now=T0 + 60,
        failures=[
            FailedRecipient("gone@example.com", 550, "5.1.1", "no such user"),
            FailedRecipient("slow@example.com", 0, "4.4.7", "retention expired; last error: refused"),
        ],
        original=b"Subject: hello\r\nMessage-ID: <1@sender.test>\r\n\r\nthe body, not returned\r\n",
    )
    parsed = email.message_from_bytes(raw)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["To"] == "<bob@sender.test>" and parsed["Auto-Submitted"] == "auto-replied"
    _, status, headers = parts(parsed)
    assert status.get_content_type() == "message/delivery-status"
    blocks = parts(status)
    assert blocks[0]["Reporting-MTA"] == "dns; mx2.relayx.test"
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]] == [
        ("rfc822; gone@example.com", "failed", "5.1.1"),
        ("rfc822; slow@example.com", "failed", "4.4.7"),
    ]
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: hello" in raw and b"the body, not returned" not in raw


class BounceQueueTests(QueueCase):
    @deferred_test
    async def test_bounce_retires_once_and_queues_the_dsn(self) -> None:
        """When two nodes bounce the same failed job, one DSN is queued and the job and message are gone."""
        q = await self.make_queue()
        await q.enqueue(message("M", "gone@one.test", sender="bob@sender.test"))
        [lease] = (await q.claim("n", T0, 10, {}, Throttle(1))).leases
        await q.settle(lease, Outcome(failed=(("gone@one.test", Reply(550, "5.1.1", "no such user")),)), T0)
        [job] = await q.failed(10)
        assert job.sender == "bob@sender.test" and job.failures == (("gone@one.test", 550, "5.1.1", "no such user"),)
        ids = iter(["DSN-A", "DSN-B"])
        bouncer = Bouncer(
            queue=q, clock=Clock(), hostname="mx2.relayx.test", new_queue_id=lambda: next(ids), interval=1
        )
        first = bouncer.dsn_for(job, T0)
        second = bouncer.dsn_for(job, T0)
        assert first is not None and second is not None
        assert await q.bounce(job, first, T0) is True
        assert await q.bounce(job, second, T0) is False
        assert await q.failed(10) == []
        [dsn] = (await q.claim("n", T0, 10, {}, Throttle(1))).leases
        assert (dsn.queue_id, dsn.domain, dsn.recipients) == ("DSN-A", "sender.test", ("bob@sender.test",))
        assert (await q.load(dsn)).sender == ""
        assert await q.redis.call("exists", q.message_key("M")) == 0


class BounceEndToEnd(NodeCase):
    @deferred_test
    async def test_5xx_primary_sends_dsn_to_senders_mx(self) -> None:
        """When the primary refuses a recipient with 550, the sender's domain (found by MX) receives a valid DSN."""
        primary = LoopbackSink()
        primary.sink.rcpt_reply = lambda rcpt: b"550 5.1.1 no such user" if rcpt.startswith("gone") else b"250 ok"
        primary.start()
        senders_mx, delivery = self.start_senders_mx()
        await self.start_node(primary, delivery=delivery)
        original = b"Subject: important\r\nMessage-ID: <7@sender.test>\r\n\r\nbody\r\n"
        assert await send(self.smtp_port, "bob@sender.test", ["gone@example.com"], original) == {}
        await wait_for(lambda: len(senders_mx.messages) == 1, 30, "the DSN at the sender's MX")
        dsn = senders_mx.messages[0]
        assert dsn.sender == "" and dsn.recipients == ["bob@sender.test"]
        parsed = email.message_from_bytes(dsn.body)
        assert parsed.get_content_type() == "multipart/report"
        status = parts(parts(parsed)[1])
        assert status[1]["Final-Recipient"] == "rfc822; gone@example.com"
        assert status[1]["Status"] == "5.1.1"
        assert b"Subject: important" in dsn.body
        assert primary.messages == []


class MXTests(NodeCase):
    @deferred_test
    async def test_backup_mx_delivers_to_the_primary_only(self) -> None:
        """When this node is MX 20 of a domain, it waits for MX 10 and never delivers to itself or to MX 30."""
        mx_port = free_port()
        primary = LoopbackSink(mx_port, interface="127.0.0.2")
        other_backup = LoopbackSink(mx_port, interface="127.0.0.3")
        other_backup.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(other_backup.stop()))
        records = {
            "mxdomain.test": [
                mx(10, "primary.mxdomain.test"),
                mx(20, "mx2.relayx.test"),
                mx(30, "backup3.mxdomain.test"),
            ],
            "primary.mxdomain.test": [a("127.0.0.2")],
            "backup3.mxdomain.test": [a("127.0.0.3")],
        }
        dns = LoopbackDNS({"mxdomain.test": records})
        self.addCleanup(lambda: Deferred.fromCoroutine(dns.stop()))
        await self.start_node(
            primary,
            delivery={"nameservers": [dns.address], "mx_port": mx_port},
            domains=[{"name": "mxdomain.test", "routes": ["mx"], "recipients": "any"}],
            probe_interval="1s",
        )
        assert await send(self.smtp_port, "bob@sender.test", ["alice@mxdomain.test"], b"Subject: mx\r\n\r\nx\r\n") == {}
        await deferToThread(time.sleep, 2)
        assert other_backup.messages == [] and primary.messages == []
        primary.start()
        await wait_for(lambda: len(primary.messages) == 1, 30, "delivery to MX 10")
        assert other_backup.messages == []


class DelayWarningTests(QueueCase):
    @deferred_test
    async def test_delay_warning_once_while_still_retried(self) -> None:
        """When mail waits past the delay warning, its sender gets one 'delayed' DSN and the mail is still retried."""
        q = await self.make_queue(delay_warning=3600.0)
        await q.enqueue(message("OLD", "a@one.test", sender="bob@sender.test", at=T0))
        await q.enqueue(message("NEW", "a@one.test", sender="bob@sender.test", at=T0 + 3000))
        [lease] = (await q.claim("n", T0 + 3700, 10, {}, Throttle(1))).leases
        assert await q.settle(lease, Outcome(unreachable="connection refused"), T0 + 3700) == "paused"
        [job] = await q.delayed(10)
        assert job.queue_id == "OLD" and job.failures == (("a@one.test", 0, "4.0.0", "connection refused"),)
        bouncer = Bouncer(queue=q, clock=Clock(), hostname="mx2.relayx.test", new_queue_id=lambda: "WARN", interval=1)
        warning = bouncer.dsn_for(job, T0 + 3700, delayed=True)
        assert warning is not None and b"Action: delayed" in warning.body
        assert await q.warn(job, warning, T0 + 3700) is True
        assert await q.warn(job, warning, T0 + 3700) is False
        # warned once only, however often it is retried
        [again] = [x for x in (await q.claim("n", T0 + 3760, 10, {}, Throttle(1))).leases if x.queue_id == "OLD"]
        await q.settle(again, Outcome(unreachable="connection refused"), T0 + 3760)
        assert await q.delayed(10) == []
        state = await q.domain_state("sender.test", T0 + 3760)
        assert state.ready + state.in_flight == 1  # the warning, on its way to the sender
