"""
The SMTP front door against real clients: STARTTLS with generated
certificates, smtplib with SMTPUTF8 and 8-bit bodies, a pipelining client on
a raw socket, and connection limits.
"""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread

from tests.certs import CA
from tests.helpers import LoopbackSink, NodeCase, send, wait_for
from tests.test_queue_redis import deferred_test


def tls_client(ca: CA, port: int, body: bytes, maximum: ssl.TLSVersion | None = None) -> dict[str, Any]:
    context = ssl.create_default_context(cadata=ca.pem().decode())
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        serial = x509_serial(client.sock.getpeercert(binary_form=True))
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        refused = client.sendmail("bob@sender.test", ["alice@example.com"], body)
        return {"refused": refused, "serial": serial}


def x509_serial(der: bytes | None) -> int:
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def pipelined(port: int, script: bytes, replies: int) -> list[str]:
    """
    Send ``script`` in one write after EHLO and read ``replies`` replies.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        reader = s.makefile("rb")
        reader.readline()
        s.sendall(b"EHLO pipeliner.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        s.sendall(script)
        lines: list[str] = []
        while len(lines) < replies:
            line = reader.readline().decode()
            if not line:
                break
            if line[3:4] == " ":
                lines.append(line.strip())
        return lines


class FrontDoorTests(NodeCase):
    @deferred_test
    async def test_starttls_delivers_and_records_tls(self) -> None:
        """When a client requires TLS, it upgrades with STARTTLS, delivers, and the Received header shows TLS."""
        ca = CA()
        directory = Path(tempfile.mkdtemp())
        cert, key, serial = ca.issue(directory, "mx2.relayx.test")
        sink = LoopbackSink()
        sink.start()
        await self.start_node(sink, smtp={"tls_certificate": str(cert), "tls_key": str(key)})
        result = await deferToThread(tls_client, ca, self.smtp_port, b"Subject: secret\r\n\r\nover TLS\r\n")
        assert result == {"refused": {}, "serial": serial}
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery")
        header = sink.messages[0].body.split(b"\r\nSubject:")[0].decode()
        assert "with ESMTPS id" in header
        assert "(using TLSv1.3 with cipher TLS_" in header or "(using TLSv1.2 with cipher" in header

    @deferred_test
    async def test_old_tls_refused_and_certificate_reloaded(self) -> None:
        """When a client offers only TLS 1.1 it fails; when the certificate changes, the next session gets it."""
        ca = CA()
        directory = Path(tempfile.mkdtemp())
        cert, key, first = ca.issue(directory, "mx2.relayx.test")
        sink = LoopbackSink()
        sink.start()
        await self.start_node(sink, smtp={"tls_certificate": str(cert), "tls_key": str(key)})

        def old_client() -> str:
            try:
                tls_client(ca, self.smtp_port, b"x\r\n", maximum=ssl.TLSVersion.TLSv1_1)
            except (ssl.SSLError, smtplib.SMTPException, OSError) as e:
                return type(e).__name__
            return "no error"

        assert await deferToThread(old_client) != "no error"
        _, _, second = ca.issue(directory, "mx2.relayx.test")
        later = time.time() + 5
        os.utime(cert, (later, later))
        result = await deferToThread(tls_client, ca, self.smtp_port, b"Subject: x\r\n\r\ny\r\n")
        assert result["serial"] == second != first

    @deferred_test
    async def test_smtputf8_and_8bit_with_smtplib(self) -> None:
        """When smtplib sends an SMTPUTF8 envelope and an 8-bit body, the primary gets both unchanged."""
        sink = LoopbackSink()
        sink.start()
        await self.start_node(sink)
        body = "Subject: grüße\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄpfel und Birnen\r\n".encode()

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
                client.ehlo("client.test")
                assert client.has_extn("smtputf8") and client.has_extn("8bitmime")
                return client.sendmail(
                    "jörg@sender.test", ["jürgen@example.com"], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
                )

        assert await deferToThread(send) == {}
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery")
        message = sink.messages[0]
        assert (message.sender, message.recipients) == ("jörg@sender.test", ["jürgen@example.com"])
        assert message.body.endswith(body)
        assert b"with UTF8SMTP id" in message.body

    @deferred_test
    async def test_pipelining_client(self) -> None:
        """When a client pipelines a whole transaction in one write, every reply comes back in order."""
        sink = LoopbackSink()
        await self.start_node(sink)
        script = (
            b"MAIL FROM:<bob@sender.test>\r\nRCPT TO:<nobody@elsewhere.test>\r\nRCPT TO:<a@example.com>\r\n"
            b"RCPT TO:<bob@example.org>\r\nDATA\r\nSubject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        )
        replies = await deferToThread(pipelined, self.smtp_port, script, 7)
        assert [r[:9] for r in replies] == [
            "250 2.1.0",
            "550 5.7.1",
            "250 2.1.5",
            "550 5.1.1",
            "354 End d",
            "250 2.0.0",
            "221 2.0.0",
        ]

    @deferred_test
    async def test_connections_per_client_limited(self) -> None:
        """When one client opens more sessions than allowed, the extra one gets 421 4.7.0 and the others carry on."""
        sink = LoopbackSink()
        await self.start_node(sink, smtp={"max_connections_per_ip": 2})

        def connect_three() -> list[str]:
            sockets = [socket.create_connection(("127.0.0.1", self.smtp_port), timeout=10) for _ in range(3)]
            try:
                return [s.makefile("rb").readline().decode()[:9] for s in sockets]
            finally:
                for s in sockets:
                    s.close()

        assert await deferToThread(connect_three) == ["220 mx2.r", "220 mx2.r", "421 4.7.0"]

    @deferred_test
    async def test_recipient_verification_by_callout(self) -> None:
        """When recipients are verified, the primary's 550 is ours at RCPT time; while it is down, its answers stand."""
        sink = LoopbackSink()
        sink.sink.rcpt_reply = lambda rcpt: b"550 5.1.1 no such user" if rcpt.startswith("ghost") else b"250 ok"
        sink.start()
        await self.start_node(sink)

        def rcpt(*addresses: str) -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("bob@sender.test")
                return [client.rcpt(a) for a in addresses]

        first = await deferToThread(rcpt, "real@verify.test", "ghost@verify.test")
        assert [code for code, _ in first] == [250, 550]
        assert first[1][1].startswith(b"5.1.1")
        await sink.stop()
        later = await deferToThread(rcpt, "real@verify.test", "ghost@verify.test", "new@verify.test")
        assert [code for code, _ in later] == [250, 550, 451]
        # the callouts sent no message
        assert sink.messages == []

    @deferred_test
    async def test_trickling_crowd_does_not_lock_out_a_real_client(self) -> None:
        """When 200 trickling connections from four addresses fill every slot, a client from another gets served."""
        sink = LoopbackSink()
        sink.start()
        await self.start_node(sink, smtp={"max_connections": 100, "max_connections_per_ip": 50})

        def crowd_then_client() -> tuple[list[str], dict[str, Any]]:
            crowd: list[socket.socket] = []
            banners: list[str] = []
            try:
                for n in range(200):
                    s = socket.create_connection(
                        ("127.0.0.1", self.smtp_port), timeout=10, source_address=(f"127.0.0.{2 + n % 4}", 0)
                    )
                    crowd.append(s)
                    banners.append(s.makefile("rb").readline().decode()[:9])
                    s.sendall(b"EHLO tr")  # and never the rest of the line
                with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
                    refused = client.sendmail("bob@sender.test", ["alice@example.com"], b"Subject: hi\r\n\r\nx\r\n")
                return banners, refused
            finally:
                for s in crowd:
                    s.close()

        banners, refused = await deferToThread(crowd_then_client)
        assert refused == {}
        assert banners.count("220 mx2.r") >= 100
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery")

    @deferred_test
    async def test_large_message_through_the_spool(self) -> None:
        """When a 3 MB message comes over a real socket, it is spooled, delivered intact, and the spool left empty."""
        sink = LoopbackSink()
        sink.start()
        node = await self.start_node(sink, smtp={"spool_threshold": "64KB"})
        spool = node.config.node.data_dir / "spool"
        assert oct(spool.stat().st_mode & 0o777) == "0o700"
        line = b"0123456789" * 7 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (3_000_000 // len(line)) + b".leading dot\r\n"
        assert await send(self.smtp_port, "bob@sender.test", ["alice@example.com"], body) == {}
        assert [p for p in spool.rglob("*") if p.is_file()] == []
        await wait_for(lambda: len(sink.messages) == 1, 60, "the delivery")
        assert sink.messages[0].body.endswith(body)
