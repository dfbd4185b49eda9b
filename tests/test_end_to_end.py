"""
A whole node on loopback: real SMTP in (smtplib), a real ``redis-server``,
real SMTP out to a recording sink standing in for the primary.
"""

from __future__ import annotations

import email
import socket

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from relayx.queue.redis import job_qid
from relayx.redis.connection import connect
from relayx.redis.embedded import free_port
from tests.helpers import LoopbackSink, NodeCase, eventually, send, shared_redis, wait_for
from tests.test_queue_redis import deferred_test


def body(n: int, domain: str) -> bytes:
    return (
        f"From: sender{n}@sender.test\r\nTo: u@{domain}\r\nSubject: message {n}\r\n"
        f"Message-ID: <{n}@sender.test>\r\n\r\nline one of {n}\r\n.leading dot\r\n\r\nend\r\n"
    ).encode()


class NodeTests(NodeCase):
    @deferred_test
    async def test_primary_down_then_up_delivers_everything_once_in_order(self) -> None:
        """When 100 messages arrive while the primary is down, all are delivered once, in order, once it is up."""
        sink = LoopbackSink()
        await self.start_node(sink)
        sent: dict[str, list[bytes]] = {"example.com": [], "example.org": []}
        for n in range(100):
            domain = "example.com" if n % 4 else "example.org"
            rcpt = f"user{n}@example.com" if n % 4 else "alice@example.org"
            result = await send(self.smtp_port, f"sender{n}@sender.test", [rcpt], body(n, domain))
            assert result == {}, result
            sent[domain].append(body(n, domain))
        assert sink.messages == []
        sink.start()
        await wait_for(lambda: len(sink.messages) >= 100, 60, "100 deliveries")
        for domain, bodies in sent.items():
            got = [m.body for m in sink.messages if m.recipients[0].endswith(domain)]
            stripped = [b.split(b"\r\n", 3)[3] for b in got]  # the three lines of our Received header
            assert stripped == bodies, f"order or content differs for {domain}"
            for m in got:
                assert m.startswith(b"Received: from ")
                assert b"by mx2.relayx.test (relayx) with ESMTP id" in m
        assert len(sink.messages) == 100
        assert all(m.sender.startswith("sender") for m in sink.messages)
        # sessions are reused from one message to the next to the same host
        assert sink.sink.connections < 20, sink.sink.connections

    @deferred_test
    async def test_5xx_primary_marks_recipient_failed(self) -> None:
        """When the primary refuses a recipient with 550, the others are delivered and a DSN with the reply queued."""
        sink = LoopbackSink()
        sink.sink.rcpt_reply = lambda rcpt: b"550 5.1.1 no such user here" if rcpt.startswith("gone") else b"250 ok"
        sink.start()
        node = await self.start_node(sink)
        assert (
            await send(self.smtp_port, "bob@sender.test", ["gone@example.com", "here@example.com"], body(1, "x")) == {}
        )
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery to the good recipient")
        assert sink.messages[0].recipients == ["here@example.com"]
        queue = node.queue
        assert queue is not None

        async def dsn() -> bytes | None:
            # the DSN's job, to sender.test (whose MX this test's DNS does not know)
            for jid in await queue.redis.call("zrange", queue.key("ready", "sender.test"), 0, -1):
                [body] = await queue.message_fields(job_qid(jid.decode()), ["body"])
                return bytes(body)
            return None

        recorded = await eventually(dsn, 30, "the DSN")
        assert recorded is not None
        assert b"Final-Recipient: rfc822; gone@example.com" in recorded and b"no such user here" in recorded
        assert b"here@example.com" not in recorded.replace(b"gone@example.com", b"")

    @deferred_test
    async def test_unreachable_redis_answers_451(self) -> None:
        """When Redis is unreachable, the node still answers, and the end of DATA gets 451 4.3.0 (never 250 or 5xx)."""
        sink = LoopbackSink()
        await self.start_node(sink, redis_url=f"redis://127.0.0.1:{free_port()}/0")
        result = await send(self.smtp_port, "bob@sender.test", ["alice@example.com"], body(1, "example.com"))
        assert getattr(result, "smtp_code", None) == 451, result
        assert b"4.3.0" in result.smtp_error

    @deferred_test
    async def test_open_relay_refused(self) -> None:
        """When a client tries to relay to a domain the node does not serve, every recipient gets 550 5.7.1."""
        sink = LoopbackSink()
        await self.start_node(sink)
        result = await send(self.smtp_port, "spam@spam.test", ["victim@elsewhere.test"], b"Subject: x\r\n\r\nx\r\n")
        assert result.recipients == {"victim@elsewhere.test": (550, b"5.7.1 Relaying denied")}

    @deferred_test
    async def test_email_parses_after_relay(self) -> None:
        """When a message is relayed, the primary gets a message that parses with its headers intact."""
        sink = LoopbackSink()
        sink.start()
        await self.start_node(sink)
        assert await send(self.smtp_port, "bob@sender.test", ["alice@example.org"], body(7, "example.org")) == {}
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery")
        parsed = email.message_from_bytes(sink.messages[0].body)
        assert parsed["Subject"] == "message 7"
        assert len(parsed.get_all("Received") or []) == 1

    @deferred_test
    async def test_shutdown_mid_message_stores_nothing(self) -> None:
        """When the node stops mid-DATA, the client gets 421 after the grace period and nothing is stored."""
        sink = LoopbackSink()
        node = await self.start_node(sink)

        def start_message() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", self.smtp_port), timeout=30)
            s.sendall(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nSubject: half\r\n")
            # in DATA once the 354 is here (and the connection surely accepted)
            seen = b""
            while b"354 " not in seen:
                seen += s.recv(4096)
            return s

        client = await deferToThread(start_message)
        self.addCleanup(client.close)
        await node.stop()

        def read_all() -> bytes:
            data = b""
            while chunk := client.recv(4096):
                data += chunk
            return data

        replies = (await deferToThread(read_all)).decode()
        assert replies.splitlines()[-1].startswith("421 4.3.2")
        assert node.queue is not None
        redis = await connect("127.0.0.1", shared_redis().port, 0, None, reactor, 5.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        assert await redis.call("keys", node.queue.key("job", "*")) == []
