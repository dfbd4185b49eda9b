"""
The inbound SMTP protocol, driven over a StringTransport with a Clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from relayx.checks.chain import FilterChains
from relayx.checks.recipients import RecipientPolicy
from relayx.config import AnyRecipient, DomainConfig, RecipientList, SMTPRoute
from relayx.interfaces import IMessageStore, IRecipientPolicy, Throttle
from relayx.smtp.server import DateStamps, Limits, SMTPServerFactory, SMTPServerProtocol
from tests.fakes import MemoryStore

LIMITS = Limits(
    max_message_size=1000,
    max_recipients=3,
    max_line_length=512,
    max_errors=5,
    max_hops=5,
    command_timeout=300,
    data_timeout=600,
)

DOMAINS = (
    DomainConfig("example.com", (SMTPRoute("127.0.0.1", 2526),), AnyRecipient(), Throttle(1)),
    DomainConfig(
        "listed.test", (SMTPRoute("127.0.0.1", 2526),), RecipientList(frozenset({"alice@listed.test"})), Throttle(1)
    ),
)


class Dialogue:
    """
    One client's session with a server factory over a StringTransport: what
    the client sends and the replies it reads.
    """

    def __init__(
        self, factory: SMTPServerFactory, peer: IPv4Address | IPv6Address, transport: StringTransport | None = None
    ) -> None:
        self.transport = transport or StringTransport(peerAddress=peer)
        protocol = factory.buildProtocol(peer)
        assert isinstance(protocol, SMTPServerProtocol)
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        self.banner = self.take()

    def take(self) -> str:
        value: str = self.transport.value().decode("utf-8")
        self.transport.clear()
        return value

    def send(self, data: bytes | str) -> str:
        self.protocol.dataReceived(data.encode("utf-8") if isinstance(data, str) else data)
        return self.take()

    def codes(self, data: bytes | str) -> list[str]:
        return [line[:9].strip() for line in self.send(data).splitlines() if line[3:4] == " "]

    def transaction(self) -> None:
        assert self.send("EHLO client.test\r\n").startswith("250-")
        assert self.send("MAIL FROM:<bob@sender.test>\r\n").startswith("250 2.1.0")
        assert self.send("RCPT TO:<alice@example.com>\r\n").startswith("250 2.1.5")


class Harness(Dialogue):
    """
    A server with a memory store on a Clock, and one client session.
    """

    def __init__(
        self,
        limits: Limits = LIMITS,
        peer: IPv4Address | IPv6Address | None = None,
        filters: FilterChains | None = None,
        domains: tuple[DomainConfig, ...] = DOMAINS,
        reverse_names: Callable[[str], Awaitable[str | None]] | None = None,
        known_names: Callable[[str], tuple[str | None] | None] | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        ids = itertools.count(1)
        self.factory = SMTPServerFactory(
            hostname="mx2.example.net",
            limits=limits,
            policy=RecipientPolicy(domains),
            store=self.store,
            clock=self.clock,
            new_queue_id=lambda: f"Q{next(ids)}",
            filters=filters,
            reverse_names=reverse_names,
            known_names=known_names,
        )
        super().__init__(self.factory, peer or IPv4Address("TCP", "192.0.2.7", 40000))


def test_fakes_provide_their_interfaces() -> None:
    """When the fakes stand in for the real store and policy, they provide the same interfaces."""
    assert verifyObject(IMessageStore, MemoryStore())
    assert verifyObject(IRecipientPolicy, RecipientPolicy(DOMAINS))


def test_banner_and_ehlo_advertise_extensions() -> None:
    """When a client connects and says EHLO, it gets a 220 banner and the extensions."""
    h = Harness()
    assert h.banner == "220 mx2.example.net ESMTP relayx\r\n"
    reply = h.send("EHLO client.test\r\n")
    assert reply.splitlines() == [
        "250-mx2.example.net",
        "250-PIPELINING",
        "250-SIZE 1000",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250-CHUNKING",
        "250 DSN",
    ]


def test_message_committed_before_250() -> None:
    """When DATA ends, the reply is 250 with the queue id and the store holds the message."""
    h = Harness()
    h.transaction()
    assert h.send("DATA\r\n").startswith("354 ")
    reply = h.send("Subject: hi\r\n\r\nbody\r\n..leading dot\r\n.\r\n")
    assert reply == "250 2.0.0 Ok: queued as Q1\r\n"
    [message] = h.store.messages
    assert message.sender == "bob@sender.test"
    assert [str(r) for r in message.recipients] == ["alice@example.com"]
    received, rest = message.body.split(b"\r\n\tby ", 1)
    assert received == b"Received: from client.test ([192.0.2.7])"
    assert rest.split(b"\r\n", 2)[2] == b"Subject: hi\r\n\r\nbody\r\n.leading dot\r\n"
    assert b"with ESMTP id Q1\r\n\tfor <alice@example.com>; Tue, 14 Nov 2023" in rest


def test_store_failure_is_451_never_5xx() -> None:
    """When the store cannot commit (Redis down), the end of DATA gets 451 4.3.0, not a bounce."""
    h = Harness()
    h.store.unavailable = True
    h.transaction()
    h.send("DATA\r\n")
    assert h.send("Subject: x\r\n\r\nbody\r\n.\r\n") == (
        "451 4.3.0 Error: temporary queue failure, try again later\r\n"
    )
    assert h.store.messages == []
    # the session stays usable for the retry
    h.store.unavailable = False
    h.transaction()
    h.send("DATA\r\n")
    assert h.send("x\r\n.\r\n").startswith("250 2.0.0")


def test_unexpected_error_is_451() -> None:
    """When the store raises something unforeseen, the client still gets 451, never a traceback."""
    h = Harness()

    async def broken(message: object) -> None:
        raise RuntimeError("bug")

    h.factory.store = type("Broken", (), {"enqueue": staticmethod(broken)})()
    h.transaction()
    h.send("DATA\r\n")
    assert h.send("x\r\n.\r\n").startswith("451 4.3.0")


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        # relaying and recipient validation
        (["EHLO c", "MAIL FROM:<a@b.test>", "RCPT TO:<x@other.test>"], "550 5.7.1"),
        (["EHLO c", "MAIL FROM:<a@b.test>", "RCPT TO:<bob@listed.test>"], "550 5.1.1"),
        (["EHLO c", "MAIL FROM:<a@b.test>", "RCPT TO:<ALICE@listed.test>"], "250 2.1.5"),
        # sequence
        (["MAIL FROM:<a@b.test>"], "503 5.5.1"),
        (["EHLO c", "RCPT TO:<x@example.com>"], "503 5.5.1"),
        (["EHLO c", "MAIL FROM:<a@b.test>", "MAIL FROM:<a@b.test>"], "503 5.5.1"),
        (["EHLO c", "MAIL FROM:<a@b.test>", "DATA"], "503 5.5.1"),
        (["EHLO c", "MAIL FROM:<a@b.test>", "RCPT TO:<x@other.test>", "DATA"], "554 5.5.1"),
        # syntax
        (["EHLO"], "501 5.5.4"),
        (["EHLO c", "MAIL FROM:a@b.test"], "501 5.1.7"),
        (["EHLO c", "MAIL FROM:<a@b.test"], "501 5.1.7"),
        (["EHLO c", "MAIL FROM:<a@b.test>", "RCPT TO:<>"], "501 5.1.3"),
        (["EHLO c", "MAIL FROM:<a@b.test>", "RCPT TO:<no-at-sign>"], "501 5.1.3"),
        (["EHLO c", "MAIL FROM:<a@b.test> FOO=1"], "555 5.5.4"),
        (["EHLO c", "MAIL FROM:<a@b.test> SIZE=abc"], "501 5.5.4"),
        (["EHLO c", "MAIL FROM:<a@b.test> BODY=BINARYMIME"], "501 5.5.4"),
        (["HELO c", "MAIL FROM:<a@b.test> SIZE=10"], "555 5.5.4"),
        (["EHLO c", "MAIL FROM:<jörg@b.test>"], "501 5.1.7"),
        (["BOGUS"], "500 5.5.2"),
        (["EXPN staff"], "502 5.5.1"),
        (["EHLO c\0"], "500 5.5.2"),
        # size
        (["EHLO c", "MAIL FROM:<a@b.test> SIZE=1001"], "552 5.3.4"),
        # accepted forms
        (["EHLO c", "MAIL FROM:<>"], "250 2.1.0"),
        (["EHLO c", "MAIL FROM:<@relay.test:a@b.test>"], "250 2.1.0"),
        (["EHLO c", "MAIL FROM:<jörg@b.test> SMTPUTF8"], "250 2.1.0"),
        (["EHLO c", "MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME"], "250 2.1.0"),
        (["EHLO c", 'MAIL FROM:<"odd > local"@b.test>'], "250 2.1.0"),
        (["NOOP"], "250 2.0.0"),
        (["RSET"], "250 2.0.0"),
        (["VRFY alice"], "252 2.5.2"),
        (["QUIT"], "221 2.0.0"),
    ],
)
def test_conformance(commands: list[str], expected: str) -> None:
    """When a client sends each of these command sequences, the last reply has the expected codes."""
    h = Harness()
    replies = []
    for command in commands:
        replies = h.codes(command + "\r\n")
    assert replies[-1] == expected


def test_too_many_recipients() -> None:
    """When a transaction names more recipients than allowed, the extra ones get 452 4.5.3."""
    h = Harness()
    h.send("EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    for n in range(3):
        assert h.send(f"RCPT TO:<u{n}@example.com>\r\n").startswith("250")
    assert h.send("RCPT TO:<u9@example.com>\r\n").startswith("452 4.5.3")


def test_pipelined_transaction_gets_replies_in_order() -> None:
    """When a client pipelines MAIL, RCPT, DATA, the body and QUIT, the replies come in order."""
    h = Harness()
    h.send("EHLO c\r\n")
    replies = h.send(
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@other.test>\r\nRCPT TO:<y@example.com>\r\nDATA\r\n"
        "Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    ).splitlines()
    assert [r[:9] for r in replies] == ["250 2.1.0", "550 5.7.1", "250 2.1.5", "354 End d", "250 2.0.0", "221 2.0.0"]
    assert len(h.store.messages) == 1


def test_message_split_across_reads() -> None:
    """When the end marker arrives split over several reads, it is still found exactly once."""
    h = Harness()
    h.transaction()
    h.send("DATA\r\n")
    for piece in [b"line one\r", b"\n.", b"stuffed\r\n", b"\r", b"\n", b".", b"\r", b"\n"]:
        reply = h.send(piece)
    assert reply.startswith("250 2.0.0")
    assert h.store.messages[0].body.endswith(b"line one\r\nstuffed\r\n\r\n")


def test_empty_body() -> None:
    """When the body is empty, the message is stored with only our Received header."""
    h = Harness()
    h.transaction()
    h.send("DATA\r\n")
    assert h.send(".\r\n").startswith("250 2.0.0")
    assert h.store.messages[0].body.startswith(b"Received: ")


def test_oversized_message_552_and_session_usable() -> None:
    """When the body exceeds the size limit, the reply is 552 5.3.4, nothing is stored, and the session goes on."""
    h = Harness()
    h.transaction()
    h.send("DATA\r\n")
    assert h.send(b"x" * 700 + b"\r\n" + b"y" * 700 + b"\r\n.\r\n").startswith("552 5.3.4")
    assert h.store.messages == []
    assert h.send("NOOP\r\n").startswith("250")


def test_mail_loop_554() -> None:
    """When a message carries more Received headers than the hop limit, the reply is 554 5.4.6."""
    h = Harness()
    h.transaction()
    h.send("DATA\r\n")
    assert h.send("Received: x\r\n" * 5 + "\r\nbody\r\n.\r\n").startswith("554 5.4.6")


def test_bare_lf_normalised_but_not_an_end_marker() -> None:
    """When the body uses bare LF, LF.LF does not end it and the stored lines end in CRLF."""
    h = Harness()
    h.transaction()
    h.send("DATA\r\n")
    assert h.send(b"a\n.\nb\r\n") == ""
    assert h.send(b".\r\n").startswith("250 2.0.0")
    assert h.store.messages[0].body.endswith(b"a\r\n.\r\nb\r\n")


def test_long_line_rejected_and_session_continues() -> None:
    """When a command line exceeds the limit, the reply is 500 5.5.2 and the next command works."""
    h = Harness()
    assert h.send("NOOP " + "x" * 600 + "\r\n").startswith("500 5.5.2")
    assert h.send("NOOP\r\n").startswith("250")
    # a long line arriving in pieces without a newline yet
    assert h.send("X" * 600).startswith("500 5.5.2")
    assert h.send("Y" * 600 + "\r\n") == ""
    assert h.send("NOOP\r\n").startswith("250")


def test_too_many_errors_disconnects() -> None:
    """When a client makes max_errors mistakes, it gets 421 4.7.0 and is disconnected."""
    h = Harness()
    for _ in range(4):
        h.send("BOGUS\r\n")
    assert h.send("BOGUS\r\n").endswith("421 4.7.0 mx2.example.net Error: too many errors\r\n")
    assert h.transport.disconnecting


def test_idle_timeout() -> None:
    """When a client stays silent past the command timeout, it gets 421 4.4.2 and is disconnected."""
    h = Harness()
    h.clock.advance(299)
    assert not h.transport.disconnecting
    h.clock.advance(2)
    assert h.take().startswith("421 4.4.2")
    assert h.transport.disconnecting


def test_shutdown_spares_a_session_in_data() -> None:
    """When the node shuts down, idle sessions get 421 and one in DATA may finish its message first."""
    idle, busy = Harness(), Harness()
    busy.factory = idle.factory
    busy.protocol.factory = idle.factory
    assert idle.factory.admit(busy.protocol) is None
    busy.transaction()
    busy.send("DATA\r\n")
    still_busy = idle.factory.shut_down()
    assert idle.take().startswith("421 4.3.2")
    assert still_busy == [busy.protocol]
    assert busy.send("x\r\n.\r\n").startswith("250 2.0.0")
    assert busy.protocol.shut_down()


def test_bdat_chunks_stored_byte_for_byte() -> None:
    """When a message comes in BDAT chunks split across reads, each chunk is acknowledged and the bytes kept as sent."""
    h = Harness()
    h.transaction()
    assert h.send(b"BDAT 15\r\nSubject: a\r") == ""
    assert h.send(b"\n.\r\n") == "250 2.0.0 15 octets received\r\n"
    assert h.send(b"BDAT 5 LAST\r\n..x\r\nNOOP\r\n") == "250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok\r\n"
    assert h.store.messages[0].body.endswith(b"\r\nSubject: a\r\n.\r\n..x\r\n")


def test_bdat_refused_chunk_is_skipped() -> None:
    """When BDAT comes before MAIL, its bytes are read and dropped, the reply is 503, and the session goes on."""
    h = Harness()
    h.send("EHLO c\r\n")
    assert h.send(b"BDAT 9 LAST\r\nNOOP\r\nxx\r\n").startswith("503 5.5.1")
    assert h.send("NOOP\r\n").startswith("250")


def test_bdat_oversized_and_mixed_with_data() -> None:
    """When BDAT chunks exceed the size limit the LAST gets 552; DATA after BDAT is refused with 503."""
    h = Harness()
    h.transaction()
    h.send(b"BDAT 600\r\n" + b"x" * 600)
    assert h.send(b"BDAT 600 LAST\r\n" + b"y" * 600).startswith("552 5.3.4")
    assert h.store.messages == []
    h.transaction()
    h.send(b"BDAT 1\r\nx")
    assert h.send("DATA\r\n").startswith("503 5.5.1")


def test_bdat_bad_size_closes() -> None:
    """When BDAT's size cannot be read, the chunk cannot be skipped: the reply is 501 and the session ends."""
    h = Harness()
    h.transaction()
    assert h.send("BDAT many\r\n").startswith("501 5.5.4")
    assert h.transport.disconnecting


def test_bare_lf_rejected_when_configured() -> None:
    """When bare LF is set to reject, a command ending in LF gets 500 5.5.2 and a message with one gets 550 5.5.2."""
    import attrs

    h = Harness(attrs.evolve(LIMITS, reject_bare_lf=True))
    assert h.send("EHLO c\n").startswith("500 5.5.2")
    h.transaction()
    h.send("DATA\r\n")
    assert h.send(b"a\nb\r\n.\r\n").startswith("550 5.5.2")
    assert h.store.messages == []
    assert h.send("NOOP\r\n").startswith("250")


def test_oversized_message_has_no_false_end_marker() -> None:
    """When an oversized message is cut while it is read, the cut never makes an end marker of its own."""
    h = Harness()
    h.transaction()
    h.send("DATA\r\n")
    assert h.send(b"y" * 1200 + b".\r\nZZ") == ""
    assert h.send(b"more\r\n") == ""
    assert h.send(b".\r\n").startswith("552 5.3.4")
    assert h.send("NOOP\r\n").startswith("250")


def test_received_date_formatted_once_a_second() -> None:
    """When two messages arrive in the same second, their Received: date is formatted once; the next second, anew."""
    stamps = DateStamps()
    first = stamps(1_700_000_000.2)
    assert first == format_datetime(datetime.fromtimestamp(1_700_000_000, UTC)) == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert stamps(1_700_000_000.97) is first
    assert stamps(1_700_000_001.0) == "Tue, 14 Nov 2023 22:13:21 +0000"
    h = Harness()
    dates = []
    for step in (0.1, 0.5, 0.6):
        h.clock.advance(step)
        h.transaction()
        h.send("DATA\r\n")
        assert h.send("Subject: x\r\n\r\nbody\r\n.\r\n").startswith("250 ")
        dates.append(h.store.messages[-1].body.split(b"\r\n")[2].rpartition(b"; ")[2])
    assert dates == [b"Tue, 14 Nov 2023 22:13:20 +0000"] * 2 + [b"Tue, 14 Nov 2023 22:13:21 +0000"]


class CountingTransport(StringTransport):
    """
    A StringTransport that counts its writes.
    """

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def test_pipelined_replies_go_out_in_one_write() -> None:
    """When a client pipelines EHLO, MAIL, RCPT and DATA in one packet, the four replies go out in one write."""
    h = Harness()
    peer = IPv4Address("TCP", "192.0.2.8", 40001)
    transport = CountingTransport(peerAddress=peer)
    client = Dialogue(h.factory, peer, transport)
    transport.writes = 0
    codes = client.codes("EHLO client.test\r\nMAIL FROM:<bob@sender.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    assert codes == ["250 DSN", "250 2.1.0", "250 2.1.5", "354 End d"]
    assert transport.writes == 1
    assert client.send("Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n").splitlines() == [
        "250 2.0.0 Ok: queued as Q1",
        "221 2.0.0 Bye",
    ]
    assert transport.writes == 2
