"""
Content filtering by a real rspamd on loopback: spam is refused at the end
of DATA, before anything is queued; clean mail is delivered with its score.
"""

from __future__ import annotations

from twisted.internet.threads import deferToThread

from tests.helpers import LoopbackSink, NodeCase, send, wait_for
from tests.rspamd import shared_rspamd
from tests.test_queue_redis import deferred_test

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(body: bytes) -> bytes:
    return (
        b"From: Bob <bob@sender.test>\r\nTo: a@example.com\r\nSubject: lunch\r\n"
        b"Message-ID: <1@sender.test>\r\nDate: Mon, 23 Nov 2026 05:00:00 +0000\r\n\r\n" + body + b"\r\n"
    )


class RspamdTests(NodeCase):
    async def start(self) -> LoopbackSink:
        rspamd = await deferToThread(shared_rspamd)
        sink = LoopbackSink()
        sink.start()
        await self.start_node(sink, filters={"rspamd_url": rspamd.url, "rspamd_failure": "tempfail"})
        return sink

    @deferred_test
    async def test_gtube_rejected(self) -> None:
        """When a message carries the GTUBE pattern, rspamd's reject makes DATA 554 5.7.1 and nothing is queued."""
        sink = await self.start()
        result = await send(self.smtp_port, "bob@sender.test", ["a@example.com"], message(GTUBE))
        assert result.smtp_code == 554 and result.smtp_error.startswith(b"5.7.1")
        clean = await send(self.smtp_port, "bob@sender.test", ["a@example.com"], message(b"Lunch tomorrow?"))
        assert clean == {}
        await wait_for(lambda: len(sink.messages) == 1, 20, "the clean message")
        assert b"Lunch tomorrow?" in sink.messages[0].body

    @deferred_test
    async def test_clean_message_accepted_with_score(self) -> None:
        """When rspamd finds nothing to act on, the message is delivered with its X-Rspamd-Score header."""
        sink = await self.start()
        assert await send(self.smtp_port, "bob@sender.test", ["a@example.com"], message(b"See you at noon.")) == {}
        await wait_for(lambda: len(sink.messages) == 1, 20, "delivery")
        body = sink.messages[0].body
        assert b"\r\nX-Rspamd-Score: " in body and b"X-Spam: Yes" not in body
