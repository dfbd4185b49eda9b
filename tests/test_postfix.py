"""
Interoperability with Postfix (issue 15): a private Postfix instance as the
primary relayx delivers to, and as a sender relaying to relayx, with a
corpus of hard messages compared byte for byte (less the trace fields each
hop adds, and Postfix's LF line ends in its maildir).
"""

from __future__ import annotations

import re
import smtplib

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from relayx.smtp.client import fold_long_lines
from tests.helpers import LoopbackSink, NodeCase, wait_for
from tests.postfix import PostfixProcess

#: (name, MAIL options, message): what a sender may legitimately send
CORPUS: list[tuple[str, list[str], bytes]] = [
    ("dots", [], b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nend .\r\n"),
    (
        "utf8 headers",
        ["SMTPUTF8", "BODY=8BITMIME"],
        "Subject: Grüße aus Köln\r\nFrom: Jörg <bob@sender.test>\r\n\r\nSchöne Grüße\r\n".encode(),
    ),
    ("from line and whitespace", [], b"Subject: ws\r\n\r\nFrom me to you\r\ntrailing   \r\n\ttab\r\n\r\n\r\nlast\r\n"),
    ("folded header, empty body", [], b"Subject: a\r\n b\r\n\tc\r\nX-Empty:\r\n\r\n"),
    ("998-octet line", [], b"Subject: 998\r\n\r\n" + b"x" * 998 + b"\r\n"),
    ("latin-1 body", ["BODY=8BITMIME"], b"Subject: latin\r\n\r\ncaf\xe9 cr\xe8me\r\n"),
    ("header only", [], b"Subject: only a header\r\n"),
    ("2000-octet line", [], b"Subject: long\r\nX-Long: " + b"h" * 2000 + b"\r\n\r\n" + b"b" * 2000 + b"\r\n"),
    (
        "mime",
        [],
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\n.\r\n--b--\r\n",
    ),
]

_TRACE = re.compile(rb"^(Return-Path|X-Original-To|Delivered-To|Received):[^\n]*\n(?:[ \t][^\n]*\n)*", re.IGNORECASE)


def without_trace(message: bytes) -> bytes:
    """
    The message less the trace fields at its top (``Received:`` of every
    hop, Postfix's ``Return-Path`` and ``Delivered-To``), LF line ends.
    """
    message = message.replace(b"\r\n", b"\n")
    while match := _TRACE.match(message):
        message = message[match.end() :]
    return message


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name)


def smtp_send(port: int, recipient: str, options: list[str], body: bytes) -> object:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail("bob@sender.test", [recipient], body, mail_options=options)


class PostfixInteropTests(NodeCase):
    timeout = 180

    async def test_postfix_as_primary_receives_the_corpus_byte_for_byte(self) -> None:
        """When relayx delivers the corpus to a Postfix primary, each message arrives unchanged (long lines folded)."""
        postfix = PostfixProcess("example.com")
        self.addCleanup(postfix.stop)
        await deferToThread(postfix.start)
        # example.com is routed to the "sink" port, which is Postfix's
        await self.start_node(LoopbackSink(postfix.port))
        for name, options, body in CORPUS:
            assert await deferToThread(smtp_send, self.smtp_port, f"{slug(name)}@example.com", options, body) == {}
        try:
            await wait_for(lambda: len(postfix.delivered()) == len(CORPUS), 60, "the corpus in Postfix's maildir")
        except AssertionError:
            raise AssertionError(
                f"{len(postfix.delivered())} delivered; Postfix log:\n{postfix.log()[-4000:]}"
            ) from None
        got = sorted(without_trace(m) for m in postfix.delivered())
        expected = sorted(
            fold_long_lines(body if body.endswith(b"\r\n") else body + b"\r\n").replace(b"\r\n", b"\n")
            for _, _, body in CORPUS
        )
        assert got == expected, postfix.log()[-3000:]

    async def test_postfix_as_sender_relays_the_corpus_through_relayx(self) -> None:
        """When Postfix relays the corpus to relayx, relayx accepts each message and hands it on unchanged."""
        sink = LoopbackSink()
        sink.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(sink.stop()))
        await self.start_node(
            LoopbackSink(),
            domains=[{"name": "relayed.test", "routes": [f"smtp://127.0.0.1:{sink.port}"], "recipients": "any"}],
        )
        postfix = PostfixProcess("primary.invalid")
        self.addCleanup(postfix.stop)
        await deferToThread(postfix.start, f"[127.0.0.1]:{self.smtp_port}")
        for name, options, body in CORPUS:
            assert await deferToThread(smtp_send, postfix.port, f"{slug(name)}@relayed.test", options, body) == {}
        await wait_for(lambda: len(sink.messages) == len(CORPUS), 60, "the corpus through Postfix and relayx")
        got = sorted(without_trace(m.body) for m in sink.messages)
        expected = sorted(
            fold_long_lines(body if body.endswith(b"\r\n") else body + b"\r\n").replace(b"\r\n", b"\n")
            for _, _, body in CORPUS
        )
        assert got == expected, postfix.log()[-3000:]
