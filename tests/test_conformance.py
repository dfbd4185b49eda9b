"""
RFC conformance and interoperability on the wire (issue 15): each test
locks down one behaviour listed in docs/conformance.md.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import SkipTest

import attrs
import pytest
from flufl.bounce import all_failures, scan_message
from twisted.internet import reactor
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from relayx.address import AddressError, Mailbox, normalize_domain
from relayx.checks.chain import Client, Filter, FilterChain, FilterChains, Verdict
from relayx.checks.greylist import Greylist, sender_key
from relayx.checks.spf_filter import SPF, SPFCache
from relayx.config import AnyRecipient, DomainConfig, RecipientList, SMTPRoute
from relayx.delivery.dsn import FailedRecipient, build_dsn
from relayx.dns import ReverseNames
from relayx.interfaces import Outcome, Throttle
from relayx.redis.embedded import free_port
from relayx.reply import Reply
from relayx.service import LISTEN_BACKLOG, listen
from relayx.smtp.client import fold_long_lines
from relayx.smtp.server import Limits
from relayx.smtp.tls import load_options
from tests import test_smtp_server as smtp_server
from tests.certs import CA
from tests.dns import LoopbackDNS, a, mx
from tests.helpers import LoopbackSink, NodeCase, send, wait_for
from tests.test_delivery import Scripted

LIMITS = attrs.evolve(smtp_server.LIMITS, max_message_size=100_000)
DOMAINS = (
    *smtp_server.DOMAINS[:1],
    DomainConfig("example.org", (SMTPRoute("127.0.0.1", 2526),), AnyRecipient(), Throttle(1)),
)


class Recorder(Filter):
    """
    Remembers the client address each point of the session was given.
    """

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def connection(self, client: str) -> Verdict:
        self.seen.append(client)
        return None

    async def mail(self, client: Client, sender: str) -> Verdict:
        self.seen.append(client.ip)
        return None

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        self.seen.append(client.ip)
        return None

    async def message(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> Verdict:
        self.seen.append(client.ip)
        return None


class Harness(smtp_server.Harness):
    """
    The SMTP server harness with this module's limits (larger messages).
    """

    def __init__(self, limits: Limits = LIMITS, domains: tuple[DomainConfig, ...] = DOMAINS, **kw: Any) -> None:
        super().__init__(limits, domains=domains, **kw)


def spf_table(records: dict[tuple[str, str], list[str]]) -> SPFCache:
    async def lookup(name: str, rdtype: str) -> list[str]:
        return records.get((name.lower().rstrip("."), rdtype), [])

    return SPFCache(lookup, Clock())


# -- 1. IPv4 clients on an IPv6 socket ----------------------------------------


def test_ipv4_mapped_client_is_ipv4_for_filters_and_received() -> None:
    """When an IPv4 client arrives on a tcp6 socket as ::ffff:a.b.c.d, every filter, SPF and Received: see a.b.c.d."""
    recorder = Recorder()
    spf = SPF(
        spf_table({("sender.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"]}),
        "mx2.example.net",
        {"fail": "reject"},
    )
    h = Harness(
        peer=IPv6Address("TCP", "::ffff:192.0.2.7", 40000),
        filters=FilterChains(default=FilterChain([recorder, spf])),
    )
    assert h.banner.startswith("220 ")
    h.send("EHLO client.test\r\n")
    assert h.send("MAIL FROM:<bob@sender.test>\r\n").startswith("250 ")
    assert h.send("RCPT TO:<alice@example.com>\r\n").startswith("250 ")
    h.send("DATA\r\n")
    assert h.send("Subject: x\r\n\r\nbody\r\n.\r\n").startswith("250 ")
    assert recorder.seen == ["192.0.2.7"] * 4
    [message] = h.store.messages
    assert b"Received: from client.test ([192.0.2.7])" in message.body
    assert b"Received-SPF: pass" in message.body
    assert set(h.factory.per_ip) == {"192.0.2.7"}


def test_real_ipv6_client_is_unchanged() -> None:
    """When a real IPv6 client connects, its address is kept (compressed form)."""
    recorder = Recorder()
    h = Harness(peer=IPv6Address("TCP", "2001:db8::7", 40000), filters=FilterChains(default=FilterChain([recorder])))
    assert h.banner.startswith("220 ")
    assert recorder.seen == ["2001:db8::7"]


class DualStackListen(TestCase):
    async def test_shipped_cluster_listen_serves_ipv4_and_ipv6(self) -> None:
        """When the shipped cluster config's tcp and tcp6 listeners share a port, both start and both answer."""
        config = tomllib.loads((Path(__file__).parent.parent / "deploy" / "relayx.cluster.toml").read_text())
        descriptions: list[str] = config["smtp"]["listen"]
        assert any(d.startswith("tcp6:") for d in descriptions) and any(d.startswith("tcp:") for d in descriptions)
        port = free_port()

        class Hello(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(b"hi " + self.transport.getPeer().host.encode())  # type: ignore[attr-defined]
                self.transport.loseConnection()

        for description in descriptions:
            listening = await listen(reactor, description.replace(":25", f":{port}", 1), Factory.forProtocol(Hello))
            self.addCleanup(listening.stopListening)

        def greet(family: socket.AddressFamily, host: str) -> bytes:
            with socket.socket(family) as s:
                s.settimeout(10)
                s.connect((host, port))
                return s.recv(100)

        assert await deferToThread(greet, socket.AF_INET, "127.0.0.1") == b"hi 127.0.0.1"
        assert await deferToThread(greet, socket.AF_INET6, "::1") == b"hi ::1"

    async def test_listen_queue_holds_a_burst_of_senders(self) -> None:
        """
        When a listener's description sets no backlog, its listen queue is LISTEN_BACKLOG (not Twisted's 50), and
        one that sets it keeps its own.
        """
        default = await listen(reactor, "tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol))
        self.addCleanup(default.stopListening)
        chosen = await listen(reactor, "tcp:0:interface=127.0.0.1:backlog=7", Factory.forProtocol(Protocol))
        self.addCleanup(chosen.stopListening)
        assert (default.backlog, chosen.backlog) == (LISTEN_BACKLOG, 7)  # type: ignore[attr-defined]


# -- 2. routing in addresses --------------------------------------------------


def test_routed_local_parts_are_refused_like_postfix() -> None:
    """When a recipient of a served domain routes on (%, !, quoted @, source route), it gets 550 5.7.1."""
    h = Harness(limits=attrs.evolve(LIMITS, max_errors=20))
    h.send("EHLO client.test\r\n")
    h.send("MAIL FROM:<bob@sender.test>\r\n")
    for address in (
        "user%other.test@example.com",
        "other.test!user@example.com",
        '"user@other.test"@example.com',
        '"user\\@other.test"@example.com',
        '"user%other.test"@example.com',
        "@other.test:user@example.com",
        "@a.test,@b.test:user@example.com",
    ):
        reply = h.send(f"RCPT TO:<{address}>\r\n")
        assert reply.startswith("550 5.7.1 "), (address, reply)
    assert h.send("RCPT TO:<user.name+tag@example.com>\r\n").startswith("250 ")
    assert h.send('RCPT TO:<"user name"@example.com>\r\n').startswith("250 ")


def test_routed_mailbox_property() -> None:
    """When a local part is checked for routing, only %, ! and @ (quoted or escaped) count."""
    from relayx.address import parse_path

    assert Mailbox.parse("a%b@example.com").routed
    assert Mailbox.parse("b!a@example.com").routed
    assert Mailbox.parse('"a@b"@example.com').routed
    assert not Mailbox.parse("a.b-c+d@example.com").routed
    assert not Mailbox.parse('"a b"@example.com').routed
    assert parse_path("TO:<@x.test,@y.test:a@example.com>", "TO:", allow_null=False).route == ("x.test", "y.test")
    assert parse_path("FROM:<@x.test:a@example.com>", "FROM:", allow_null=True).mailbox == Mailbox("a", "example.com")


# -- 3. dialogue ----------------------------------------------------------------


def test_bare_postmaster_is_accepted_for_the_primary_domain() -> None:
    """When RCPT TO:<Postmaster> has no domain, it is accepted as postmaster of the first domain, any case."""
    h = Harness(domains=(DOMAINS[0], attrs.evolve(DOMAINS[1], recipients=RecipientList(frozenset()))))
    h.factory.postmaster_domain = "example.org"
    h.send("EHLO client.test\r\n")
    h.send("MAIL FROM:<bob@sender.test>\r\n")
    assert h.send("RCPT TO:<Postmaster>\r\n").startswith("250 ")
    assert h.send("RCPT TO: <POSTMASTER>\r\n").startswith("250 ")
    assert h.send("RCPT TO:<postmaster@example.org>\r\n").startswith("550 5.1.1")
    h.send("DATA\r\n")
    assert h.send("Subject: x\r\n\r\nbody\r\n.\r\n").startswith("250 ")
    [message] = h.store.messages
    assert [str(r) for r in message.recipients] == ["postmaster@example.org"]


def test_bare_postmaster_is_primary_domain_of_the_node() -> None:
    """When the front door is built from the example config, <Postmaster> goes to its first [[domain]]."""

    from relayx.config import load
    from relayx.metrics import Metrics
    from relayx.service import build_smtp_factory

    config = load(Path(__file__).parent.parent / "deploy" / "relayx.example.toml")
    from types import SimpleNamespace

    anything: Any = SimpleNamespace(verify=None)
    factory = build_smtp_factory(config, Clock(), Metrics(), anything, anything, None)
    assert factory.postmaster_domain == config.domains[0].name == "example.com"


def test_vrfy_and_rset_syntax() -> None:
    """When VRFY has no argument or RSET has one, the reply is 501; the normal forms still work."""
    h = Harness()
    h.send("EHLO client.test\r\n")
    assert h.send("VRFY\r\n").startswith("501 5.5.4")
    assert h.send("VRFY bob\r\n").startswith("252 ")
    assert h.send("RSET foo\r\n").startswith("501 5.5.4")
    assert h.send("RSET\r\n").startswith("250 ")


def test_too_many_recipients_is_not_an_error() -> None:
    """When a sender goes past max_recipients, each extra RCPT gets 452 4.5.3 and the session survives to DATA."""
    h = Harness(limits=attrs.evolve(LIMITS, max_recipients=100, max_errors=10))
    h.send("EHLO client.test\r\n")
    h.send("MAIL FROM:<bob@sender.test>\r\n")
    replies = [h.send(f"RCPT TO:<u{n}@example.com>\r\n") for n in range(130)]
    assert all(r.startswith("250 ") for r in replies[:100])
    assert all(r.startswith("452 4.5.3") for r in replies[100:])
    h.send("DATA\r\n")
    assert h.send("Subject: x\r\n\r\nbody\r\n.\r\n").startswith("250 ")
    assert len(h.store.messages[0].recipients) == 100


# -- 4. header hygiene ----------------------------------------------------------


def test_forged_authentication_results_are_stripped() -> None:
    """When a message carries Authentication-Results with relayx's authserv-id, they are removed; others stay."""
    h = Harness()
    h.send("EHLO client.test\r\nMAIL FROM:<bob@sender.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    h.send(
        "Authentication-Results: MX2.example.net;\r\n\tspf=pass smtp.mailfrom=ceo@bank.test\r\n"
        "Authentication-Results: (forged) mx2.example.net 1; dkim=pass\r\n"
        "Authentication-Results: mx.sender.test; spf=pass\r\n"
        "Subject: x\r\n\r\nAuthentication-Results: mx2.example.net; in the body\r\n.\r\n"
    )
    [message] = h.store.messages
    fields = [line for line in message.body.split(b"\r\n\r\n")[0].split(b"\r\n") if b"Authentication" in line]
    assert fields == [b"Authentication-Results: mx.sender.test; spf=pass"]
    assert b"in the body" in message.body


def test_forged_authentication_results_deep_in_a_long_header_are_stripped() -> None:
    """When a header section is longer than the first 4 KiB looked at, a forged field further down is still removed."""
    h = Harness()
    h.send("EHLO client.test\r\nMAIL FROM:<bob@sender.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    padding = "".join(f"X-Padding-{n}: {'p' * 70}\r\n" for n in range(80))
    h.send(padding + "Authentication-Results: mx2.example.net; spf=pass\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    [message] = h.store.messages
    assert b"Authentication-Results" not in message.body
    assert padding.encode() + b"Subject: x\r\n\r\nbody\r\n" in message.body


def test_spf_trace_fields_sit_above_received() -> None:
    """When SPF adds Received-SPF and Authentication-Results, they come before this hop's Received: (RFC 7208 9.1)."""
    spf = SPF(spf_table({("sender.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"]}), "mx2.example.net", {})
    h = Harness(filters=FilterChains(default=FilterChain([spf])))
    h.send("EHLO client.test\r\nMAIL FROM:<bob@sender.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    h.send("Subject: x\r\n\r\nbody\r\n.\r\n")
    [message] = h.store.messages
    head = message.body.split(b"\r\n\r\n")[0].split(b"\r\n")
    names = [line.split(b":")[0] for line in head if line[:1] not in b" \t"]
    assert names == [b"Received-SPF", b"Authentication-Results", b"Received", b"Subject"]
    parsed = email.message_from_bytes(message.body, policy=email.policy.default)
    assert str(parsed["Authentication-Results"]).startswith("mx2.example.net; spf=pass")


def test_control_characters_in_helo_never_reach_received_or_logs() -> None:
    """When HELO carries control characters, Received: and the session log show them as '?'."""
    events: list[dict[str, object]] = []
    from twisted.logger import ILogObserver, globalLogPublisher
    from zope.interface import implementer

    @implementer(ILogObserver)
    def observe(event: dict[str, object]) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        h = Harness()
        h.send(b"EHLO evil\x1b[31m\x07\x7f\xc2\x85name\r\n")
        h.send("MAIL FROM:<bob@sender.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\nSubject: x\r\n\r\nb\r\n.\r\n")
        h.protocol.connectionLost()
    finally:
        globalLogPublisher.removeObserver(observe)
    [message] = h.store.messages
    received = message.body.split(b"\r\n")[0]
    assert received == b"Received: from evil?[31m???name ([192.0.2.7])"
    [ended] = [e for e in events if "smtp session" in str(e.get("log_format", ""))]
    assert ended["helo"] == "evil?[31m???name"


def reverse_table(records: dict[tuple[str, str], list[str]]) -> Callable[[str, str], Awaitable[list[str]]]:
    async def lookup(name: str, rdtype: str) -> list[str]:
        return records.get((name, rdtype), [])

    return lookup


def test_reverse_name_in_received_when_forward_confirmed() -> None:
    """When the client's PTR name resolves back to it, Received: says `from helo (name [ip])`."""
    names = ReverseNames(
        reverse_table(
            {("7.2.0.192.in-addr.arpa", "PTR"): ["mail.client.test."], ("mail.client.test", "A"): ["192.0.2.7"]}
        ),
        Clock(),
        2.0,
    )
    h = Harness(reverse_names=names.name)
    h.send("EHLO client.test\r\nMAIL FROM:<bob@sender.test>\r\nRCPT TO:<alice@example.com>\r\n")
    h.send("DATA\r\nSubject: x\r\n\r\nb\r\n.\r\n")
    [message] = h.store.messages
    assert message.body.startswith(b"Received: from client.test (mail.client.test [192.0.2.7])\r\n")


def test_reverse_name_known_is_taken_without_a_look_up() -> None:
    """When a client's name is known (kept from before, or never looked up), the session takes it as is."""
    calls: list[str] = []

    async def table(name: str, rdtype: str) -> list[str]:
        calls.append(name)
        return {"PTR": ["mail.client.test."], "A": ["192.0.2.7"]}[rdtype]

    names = ReverseNames(table, Clock(), 2.0)
    assert names.known("192.0.2.7") is None
    assert names.known("127.0.0.1") == names.known("fe80::1") == names.known("not an address") == (None,)
    assert _result(names.name("192.0.2.7")) == "mail.client.test"
    assert names.known("192.0.2.7") == ("mail.client.test",)
    h = Harness(reverse_names=names.name, known_names=names.known)
    h.send("EHLO client.test\r\nMAIL FROM:<bob@sender.test>\r\nRCPT TO:<alice@example.com>\r\n")
    h.send("DATA\r\nSubject: x\r\n\r\nb\r\n.\r\n")
    [message] = h.store.messages
    assert message.body.startswith(b"Received: from client.test (mail.client.test [192.0.2.7])\r\n")
    assert len(calls) == 2


def test_reverse_name_not_confirmed_or_slow_is_left_out() -> None:
    """When the PTR name does not lead back, has bad characters or DNS hangs, no name is shown; answers are cached."""
    calls: list[str] = []

    async def lying(name: str, rdtype: str) -> list[str]:
        calls.append(name)
        if rdtype == "PTR":
            return ["bank.test", "evil\x1bname.test"]
        return ["203.0.113.1"] if name == "bank.test" else ["192.0.2.7"]

    clock = Clock()
    names = ReverseNames(lying, clock, 2.0)
    assert _result(names.name("192.0.2.7")) is None
    assert calls == ["7.2.0.192.in-addr.arpa", "bank.test"]
    assert _result(names.name("192.0.2.7")) is None
    assert len(calls) == 2  # cached

    async def hanging(name: str, rdtype: str) -> list[str]:
        await Deferred()
        return []

    slow = ReverseNames(hanging, clock, 2.0)
    d = Deferred.fromCoroutine(slow.name("198.51.100.1"))
    assert not d.called
    clock.advance(2.1)
    assert _result(d) is None
    assert _result(slow.name("127.0.0.1")) is None


def _result(work: Awaitable[str | None]) -> str | None:
    d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)  # type: ignore[arg-type]
    results: list[str | None] = []
    d.addCallback(results.append)
    assert results, "not done"
    return results[0]


class ReverseNamesOverDNS(TestCase):
    async def test_forward_confirmed_name_from_a_real_dns_server(self) -> None:
        """When a DNS server on loopback serves PTR and A records, ReverseNames confirms the name through dnspython."""
        from twisted.names import dns as names_dns

        from relayx.dns import dns_lookup

        server = LoopbackDNS(
            {
                "2.0.192.in-addr.arpa": {"7.2.0.192.in-addr.arpa": [names_dns.Record_PTR(b"mail.client.test")]},
                "client.test": {"mail.client.test": [a("192.0.2.7")]},
            }
        )
        self.addCleanup(server.stop)
        names = ReverseNames(dns_lookup((("127.0.0.1", server.port),), 2.0), reactor, 2.0)
        assert await names.name("192.0.2.7") == "mail.client.test"


# -- 5. DSNs --------------------------------------------------------------------

GMAIL_REPLY = (
    "The email account that you tried to reach does not exist. Please try\n"
    "double-checking the recipient's email address for typos or\n"
    "unnecessary spaces. For more information, go to\n"
    " https://support.google.com/mail/?p=NoSuchUser a1si123456"
)


def parts(message: Any) -> list[Any]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


def _dsn(**overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": "mx2.relayx.test",
        "message_id": "DSN1",
        "queue_id": "Q1",
        "sender": "bob@sender.test",
        "arrival": 1_700_000_000.0,
        "now": 1_700_000_060.0,
        "failures": [FailedRecipient("gone@example.com", 550, "5.1.1", GMAIL_REPLY)],
        "original": b"Subject: hello\r\nMessage-ID: <1@sender.test>\r\n\r\nbody\r\n",
    }
    arguments.update(overrides)
    return build_dsn(**arguments)


def test_multiline_reply_never_puts_bare_lf_in_a_dsn() -> None:
    """When the primary's refusal is a multi-line reply, the DSN has CRLF only, lines under 998 and folded fields."""
    raw = _dsn()
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 90
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    status = parts(parsed)[1]
    [_, block] = parts(status)
    diagnostic = " ".join(str(block["Diagnostic-Code"]).split())
    assert diagnostic == "smtp; 550 5.1.1 " + " ".join(GMAIL_REPLY.split())
    assert scan_message(email.message_from_bytes(raw)) == {b"gone@example.com"}


def test_dsn_passes_flufl_bounce() -> None:
    """When a failure DSN and a delay warning are read by flufl.bounce, they are a permanent and a temporary failure."""
    failed = email.message_from_bytes(_dsn())
    assert all_failures(failed) == (frozenset(), frozenset({b"gone@example.com"}))
    delayed = email.message_from_bytes(
        _dsn(failures=[FailedRecipient("slow@example.com", 0, "4.4.1", "connection refused")], delayed=True)
    )
    assert all_failures(delayed) == (frozenset({b"slow@example.com"}), frozenset())


def test_delay_warning_says_still_trying() -> None:
    """When a delay warning is built, its text says the mail is still being tried, never that relayx gave up."""
    raw = _dsn(failures=[FailedRecipient("slow@example.com", 0, "4.4.1", "connection refused")], delayed=True)
    text = raw.decode()
    assert "gave up" not in text
    assert "<slow@example.com>: still trying: connection refused" in text
    assert "Action: delayed" in text and "Action: failed" not in text


def test_smtputf8_bounce_uses_global_delivery_status() -> None:
    """When the sender or original headers are UTF-8, the DSN is message/global-delivery-status (RFC 6533)."""
    raw = _dsn(
        sender="bøb@sender.test",
        failures=[FailedRecipient("jörg@example.com", 550, "5.1.1", "no such user")],
        original="Subject: grüße\r\nFrom: bøb@sender.test\r\n\r\nbody\r\n".encode(),
    )
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    _, status, headers = parts(parsed)
    assert status.get_content_type() == "message/global-delivery-status"
    assert headers.get_content_type() == "message/global-headers"
    assert "Final-Recipient: utf-8; jörg@example.com".encode() in raw
    assert "X-Original-Sender: utf-8; bøb@sender.test".encode() in raw
    ascii_only = _dsn()
    assert b"message/delivery-status" in ascii_only and b"text/rfc822-headers" in ascii_only


# -- 6. MX ----------------------------------------------------------------------


class UndeliverableMXTests(NodeCase):
    async def test_null_mx_and_best_mx_left_fail_at_once_with_a_dsn(self) -> None:
        """When a domain has a null MX or this node is its best MX, the sender gets a DSN (5.1.10, 5.4.4) at once."""
        from twisted.names import dns as names_dns

        mx_port = free_port()
        senders_mx = LoopbackSink(mx_port, interface="127.0.0.2")
        senders_mx.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(senders_mx.stop()))
        dns = LoopbackDNS(
            {
                "sender.test": {"sender.test": [mx(10, "mx.sender.test")], "mx.sender.test": [a("127.0.0.2")]},
                "nullmx.test": {"nullmx.test": [names_dns.Record_MX(0, b"")]},
                "bestmx.test": {"bestmx.test": [mx(10, "mx2.relayx.test"), mx(20, "mx9.bestmx.test")]},
            }
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(dns.stop()))
        sink = LoopbackSink()
        await self.start_node(
            sink,
            delivery={"nameservers": [dns.address], "mx_port": mx_port},
            domains=[
                {"name": "nullmx.test", "routes": ["mx"], "recipients": "any"},
                {"name": "bestmx.test", "routes": ["mx"], "recipients": "any"},
            ],
        )
        body = b"Subject: doomed\r\nMessage-ID: <9@sender.test>\r\n\r\nbody\r\n"
        assert await send(self.smtp_port, "bob@sender.test", ["a@nullmx.test"], body) == {}
        assert await send(self.smtp_port, "bob@sender.test", ["b@bestmx.test"], body) == {}
        await wait_for(lambda: len(senders_mx.messages) == 2, 30, "two DSNs at the sender's MX")
        found = {}
        for dsn in senders_mx.messages:
            status = parts(parts(email.message_from_bytes(dsn.body))[1])[1]
            found[status["Final-Recipient"]] = (status["Action"], status["Status"])
            assert scan_message(email.message_from_bytes(dsn.body))
        assert found == {
            "rfc822; a@nullmx.test": ("failed", "5.1.10"),
            "rfc822; b@bestmx.test": ("failed", "5.4.4"),
        }


# -- 7. outbound ----------------------------------------------------------------

EHLO_UTF8 = b"250-dest.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 1000000\r\n"
EHLO_8BIT = b"250-dest.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000000\r\n"
ACCEPT_ALL = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n250 2.0.0 queued\r\n"


def _deliver(ehlo: bytes, sender: str, recipient: str, body: bytes) -> tuple[Outcome, bytes]:
    s = Scripted({"a": b"220 dest.test\r\n" + ehlo + ACCEPT_ALL + b"250 ok\r\n"})
    d = Deferred.fromCoroutine(s.deliverer(["a"]).deliver("example.com", sender, (recipient,), body))
    outcomes: list[Outcome] = []
    d.addCallback(outcomes.append)
    assert outcomes
    return outcomes[0], s.transports["a"].value()


UTF8_HEADERS = "Subject: Grüße\r\nFrom: Jörg <bob@sender.test>\r\n\r\nHallo\r\n".encode()


def test_utf8_headers_relayed_with_smtputf8_when_offered() -> None:
    """When a message has UTF-8 headers and the primary offers SMTPUTF8, MAIL FROM asks for it."""
    outcome, sent = _deliver(EHLO_UTF8, "bob@sender.test", "a@example.com", UTF8_HEADERS)
    assert outcome.delivered == ("a@example.com",)
    mail = sent.split(b"\r\n")[1]
    assert mail.startswith(b"MAIL FROM:<bob@sender.test>") and b" SMTPUTF8" in mail and b"BODY=8BITMIME" in mail


def test_utf8_headers_without_smtputf8_go_as_8bitmime() -> None:
    """When the primary lacks SMTPUTF8 and only headers are UTF-8, the message goes as 8BITMIME, not bounced."""
    outcome, sent = _deliver(EHLO_8BIT, "bob@sender.test", "a@example.com", UTF8_HEADERS)
    assert outcome.delivered == ("a@example.com",)
    mail = sent.split(b"\r\n")[1]
    assert b"SMTPUTF8" not in mail and b"BODY=8BITMIME" in mail


def test_utf8_addresses_without_smtputf8_fail_567() -> None:
    """When an address is UTF-8 and the primary lacks SMTPUTF8, the recipient fails with 5.6.7 (as Postfix)."""
    outcome, sent = _deliver(EHLO_8BIT, "jörg@sender.test", "a@example.com", b"Subject: x\r\n\r\nb\r\n")
    [(recipient, reply)] = outcome.failed
    assert recipient == "a@example.com" and (reply.code, reply.status) == (553, "5.6.7")
    assert b"MAIL FROM" not in sent


def test_ascii_message_never_asks_for_smtputf8() -> None:
    """When envelope and headers are ASCII, SMTPUTF8 is not asked for even if offered (Postfix's autodetect)."""
    _, sent = _deliver(EHLO_UTF8, "bob@sender.test", "a@example.com", b"Subject: x\r\n\r\nb\r\n")
    assert b"SMTPUTF8" not in sent.split(b"\r\n")[1]


def test_long_lines_folded_at_998() -> None:
    """When a message has 2,000- and 5,000-octet lines, no line sent exceeds 998 octets and unfolding restores it."""
    header = b"X-Long: " + b"h" * 2000
    line = b"".join(bytes([97 + n % 26]) for n in range(5000))
    body = header + b"\r\nSubject: x\r\n\r\n" + line + b"\r\n.dot\r\n"
    outcome, sent = _deliver(EHLO_8BIT, "bob@sender.test", "a@example.com", body)
    assert outcome.delivered == ("a@example.com",)
    data = sent.split(b"RCPT TO:<a@example.com>\r\nDATA\r\n", 1)[1]
    assert max(len(x) for x in data.split(b"\r\n")) == 998
    content = data[: data.index(b"\r\n.\r\n")].replace(b"\r\n..", b"\r\n.")
    assert content.replace(b"\r\n ", b"") == body.rstrip(b"\r\n")
    parsed = email.message_from_bytes(content + b"\r\n", policy=email.policy.default)
    assert str(parsed["X-Long"]).replace(" ", "") == "h" * 2000
    assert fold_long_lines(b"short\r\nlines\r\n") == b"short\r\nlines\r\n"


class OpportunisticFallbackTests(NodeCase):
    async def test_broken_tls_falls_back_to_plaintext(self) -> None:
        """When the primary offers STARTTLS but only TLS 1.0, opportunistic delivery retries in the clear."""
        from twisted.internet.ssl import CertificateOptions, TLSVersion

        ca = CA()
        directory = Path(tempfile.mkdtemp())
        cert, key, _ = ca.issue(directory, "mx.broken.test")
        good = load_options(cert, key)
        destination = LoopbackSink()
        destination.sink.tls = CertificateOptions(
            privateKey=good.privateKey,
            certificate=good.certificate,
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_0,
            lowerMaximumSecurityTo=TLSVersion.TLSv1_0,
        )
        destination.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(destination.stop()))
        domain = {
            "name": "broken.test",
            "routes": [f"smtp://127.0.0.1:{destination.port}"],
            "recipients": "any",
            "tls": "opportunistic",
        }
        await self.start_node(LoopbackSink(), domains=[domain])
        assert await send(self.smtp_port, "bob@sender.test", ["a@broken.test"], b"Subject: s\r\n\r\nx\r\n") == {}
        await wait_for(lambda: len(destination.messages) == 1, 30, "delivery in the clear")
        assert not destination.messages[0].tls


# -- 8. TLS in ------------------------------------------------------------------


class InboundTLSTests(NodeCase):
    async def start_with_chain(self) -> Path:
        """
        A node whose certificate is issued by an intermediate CA, the file
        holding the leaf then the intermediate; returns the root CA's file.
        """
        root = CA()
        intermediate = CA(root, "relayx test intermediate")
        directory = Path(tempfile.mkdtemp())
        leaf, key, _ = intermediate.issue(directory, "mx2.relayx.test")
        (directory / "fullchain.pem").write_bytes(leaf.read_bytes() + intermediate.pem())
        (directory / "root.pem").write_bytes(root.pem())
        await self.start_node(
            LoopbackSink(),
            smtp={"tls_certificate": str(directory / "fullchain.pem"), "tls_key": str(key)},
        )
        return directory / "root.pem"

    def starttls(self, context: ssl.SSLContext) -> tuple[str, str | None, str]:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=20) as client:
            client.ehlo("client.test")
            client.starttls(context=context)
            assert isinstance(client.sock, ssl.SSLSocket)
            version = client.sock.version() or ""
            alpn = client.sock.selected_alpn_protocol()
            code, _ = client.ehlo("client.test")
            return version, alpn, str(code)

    async def test_chain_sent_and_alpn_accepted(self) -> None:
        """When a client trusting only the root offers ALPN, STARTTLS verifies through the intermediate, no alert."""
        root = await self.start_with_chain()
        context = ssl.create_default_context(cafile=str(root))
        context.set_alpn_protocols(["h2", "http/1.1", "smtp"])
        version, alpn, code = await deferToThread(self.starttls, context)
        assert version == "TLSv1.3" and alpn is None and code == "250"

    async def test_openssl_s_client_verifies_the_chain_with_alpn(self) -> None:
        """When openssl s_client starts TLS with ALPN and only the root CA, it verifies the chain; no alert."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise SkipTest("no openssl command")
        root = await self.start_with_chain()

        def s_client() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    openssl,
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{self.smtp_port}",
                    "-starttls",
                    "smtp",
                    "-alpn",
                    "h2,smtp",
                    "-CAfile",
                    str(root),
                    "-verify_return_error",
                    "-verify_hostname",
                    "mx2.relayx.test",
                ],
                input="QUIT\n",
                capture_output=True,
                text=True,
                timeout=30,
            )

        result = await deferToThread(s_client)
        output = result.stdout + result.stderr
        assert "Verify return code: 0 (ok)" in output, output
        assert "alert" not in output.lower() and "No ALPN negotiated" in output
        assert "depth=1 CN = relayx test intermediate" in output

    async def test_tls12_offers_only_ecdhe_aead(self) -> None:
        """When a TLS 1.2 client offers only CBC or static-RSA suites, the handshake fails; ECDHE AES-GCM works."""
        root = await self.start_with_chain()

        def tls12(ciphers: str) -> tuple[str, str | None, str]:
            context = ssl.create_default_context(cafile=str(root))
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(ciphers)
            return self.starttls(context)

        assert (await deferToThread(tls12, "ECDHE-ECDSA-AES128-GCM-SHA256"))[0] == "TLSv1.2"
        for weak in ("ECDHE-ECDSA-AES128-SHA", "AES128-SHA256:AES256-SHA"):
            try:
                await deferToThread(tls12, weak)
            except (ssl.SSLError, smtplib.SMTPException, ConnectionError) as e:
                assert "handshake" in str(e).lower() or "alert" in str(e).lower() or isinstance(e, ConnectionError), e
            else:
                raise AssertionError(f"{weak} was accepted")


# -- 9. IDNA --------------------------------------------------------------------


def test_domains_are_uts46_nontransitional() -> None:
    """When a UTF-8 domain is normalised, it follows UTS 46 non-transitional: faß.de is xn--fa-hia.de, not fass.de."""
    assert normalize_domain("faß.de") == "xn--fa-hia.de"
    assert normalize_domain("Bücher.Example") == "xn--bcher-kva.example"
    assert normalize_domain("XN--FA-HIA.DE") == "xn--fa-hia.de"
    assert Mailbox.parse("jörg@faß.de").domain == "xn--fa-hia.de"
    for bad in ("a\u200db.de", "-bad.de", "xn--.de"):
        with pytest.raises(AddressError):
            normalize_domain(bad)


def test_rcpt_to_utf8_domain_is_stored_as_a_label() -> None:
    """When RCPT TO names faß.de with SMTPUTF8, it is matched against the configured xn--fa-hia.de."""
    domains = (DomainConfig("xn--fa-hia.de", (SMTPRoute("127.0.0.1", 2526),), AnyRecipient(), Throttle(1)),)
    h = Harness(domains=domains)
    h.send("EHLO client.test\r\nMAIL FROM:<bob@sender.test> SMTPUTF8\r\n")
    assert h.send("RCPT TO:<jörg@faß.de>\r\n").startswith("250 ")
    assert h.send("RCPT TO:<jörg@fass.de>\r\n").startswith("550 5.7.1")


# -- filters: greylisting keys ------------------------------------------------------


class FakeRedis:
    """
    The three commands greylisting uses, in memory.
    """

    def __init__(self) -> None:
        self.data: dict[str, object] = {}

    async def call(self, command: str, *args: Any) -> object:
        if command == "set":
            key, value, _, _, only_new = args
            if only_new and key in self.data:
                return None
            self.data[key] = value
            return True
        if command == "get":
            return self.data.get(args[0])
        return 1


def test_greylisting_passes_batv_srs_and_verp_retries() -> None:
    """When a sender retries with a fresh BATV tag, SRS hash or VERP number, the retry after the delay passes."""
    clock = Clock()
    clock.advance(1_700_000_000)
    grey = Greylist(FakeRedis(), "t", 60.0, 86400.0, clock)
    client = Client("192.0.2.7", "client.test")
    rcpt = Mailbox("alice", "example.com")

    def verdict(sender: str) -> object:
        d = Deferred.fromCoroutine(grey.recipient(client, sender, rcpt))
        results: list[object] = []
        d.addCallback(results.append)
        return results[0]

    for first, retry in (
        ("prvs=1234abcdef=bob@sender.test", "prvs=5678fedcba=bob@sender.test"),
        ("SRS0=hhh=T1=orig.test=bob@fwd.test", "SRS0=kkk=T2=orig.test=bob@fwd.test"),
        ("bounce-1001-alice=example.com@lists.test", "bounce-1002-alice=example.com@lists.test"),
    ):
        refused = verdict(first)
        assert isinstance(refused, Reply) and refused.code == 450
        clock.advance(61)
        assert verdict(retry) is None, (first, retry)
    assert isinstance(verdict("carol@sender.test"), Reply)
    assert sender_key("Bob+News@Sender.TEST") == "bob@sender.test"
