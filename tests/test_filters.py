"""
Filtering before the queue: the chain's rules, DNS lists against a real DNS
server on loopback, and greylisting and rate limits shared by two nodes.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from relayx.address import Mailbox
from relayx.checks.chain import ALLOW, AddHeaders, Client, Decision, Filter, FilterChain, Verdict
from relayx.checks.dnslists import DNSLists, reversed_ip
from relayx.config import DNSList, parse_dnslist
from relayx.dns import dns_lookup
from relayx.redis.embedded import free_port
from relayx.reply import Reply
from tests.dns import LoopbackDNS, a, txt
from tests.helpers import LoopbackSink, NodeCase, send, unique_prefix, wait_for
from tests.test_queue_redis import deferred_test

REFUSED = Reply(554, "5.7.1", "no")


class Fixed(Filter):
    def __init__(self, verdict: Verdict | Exception, calls: list[str], name: str) -> None:
        self.verdict, self.calls, self.name = verdict, calls, name

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        self.calls.append(self.name)
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict


def run_chain(*filters: Filter) -> Decision:
    result: list[Decision] = []
    chain = FilterChain(filters)
    client = Client("192.0.2.1", "client.test")
    Deferred.fromCoroutine(chain.recipient(client, "a@b.test", Mailbox.parse("x@y.test"))).addCallback(result.append)
    return result[0]


def test_chain_order_allow_and_failure() -> None:
    """When filters run, the first reply decides, ALLOW ends the chain, and a failing filter is skipped."""
    calls: list[str] = []
    assert run_chain(Fixed(None, calls, "a"), Fixed(REFUSED, calls, "b"), Fixed(None, calls, "c")).reply == REFUSED
    assert calls == ["a", "b"]
    calls.clear()
    assert run_chain(Fixed(ALLOW, calls, "a"), Fixed(REFUSED, calls, "b")) == Decision()
    assert calls == ["a"]
    calls.clear()
    assert run_chain(Fixed(RuntimeError("dns down"), calls, "a"), Fixed(REFUSED, calls, "b")).reply == REFUSED


class Scanner(Filter):
    async def message(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> Verdict:
        return None


def test_chain_knows_whether_it_scans_content() -> None:
    """When no filter of a chain looks at the message, the chain says so, so DATA does not assemble it for them."""
    assert not FilterChain([Fixed(None, [], "a")]).scans_content
    assert FilterChain([Fixed(None, [], "a"), Scanner()]).scans_content


def test_chain_collects_headers() -> None:
    """When filters ask for header lines and then one allows or refuses, the lines so far are kept, each once."""
    calls: list[str] = []
    spf = AddHeaders(("Received-SPF: pass",))
    score = AddHeaders(("X-Rspamd-Score: 1.00 / 15.00", "Received-SPF: pass"))
    decision = run_chain(Fixed(spf, calls, "a"), Fixed(score, calls, "b"), Fixed(ALLOW, calls, "c"))
    assert decision == Decision(None, ("Received-SPF: pass", "X-Rspamd-Score: 1.00 / 15.00"))
    assert run_chain(Fixed(spf, calls, "a"), Fixed(REFUSED, calls, "b")) == Decision(REFUSED, ("Received-SPF: pass",))


def test_reversed_ip() -> None:
    """When a client address is looked up in a DNS list, it is reversed by octet or by IPv6 nibble."""
    assert reversed_ip("192.0.2.7") == "7.2.0.192"
    assert reversed_ip("2001:db8::1") == "1." + "0." * 23 + "8.b.d.0.1.0.0.2"
    assert reversed_ip("not an address") is None


def test_dnslist_patterns() -> None:
    """When a DNS list entry names the answers that count (Postfix's zone=d.d.d.d), only those match; a bad
    pattern is a one-line error."""
    assert parse_dnslist("ZEN.Spamhaus.org") == DNSList("zen.spamhaus.org")
    zen = parse_dnslist("zen.spamhaus.org=127.0.0.[2..4;9;10..11]")
    assert zen.zone == "zen.spamhaus.org"
    assert [n for n in range(1, 13) if zen.counts(f"127.0.0.{n}")] == [2, 3, 4, 9, 10, 11]
    assert not zen.counts("127.0.1.2")
    assert parse_dnslist("bl.test=127.0.0.2").counts("127.0.0.2")
    for bad in ("bl.test=127.0.0", "bl.test=127.0.0.256", "bl.test=127.0.0.[4..2]", "bl.test=127.0.0.[1..]", "x=1"):
        with pytest.raises(ValueError):
            parse_dnslist(bad)


class DNSListCodeTests(TestCase):
    """
    DNSLists against a real DNS server on loopback, with a fake clock for
    its cache and its warnings.
    """

    async def check(self, lists: DNSLists, client: str) -> Verdict:
        return await lists.recipient(Client(client, "client.test"), "a@b.test", Mailbox.parse("x@y.test"))

    def warnings(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []

        @implementer(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if "answer" in event and event.get("log_level") is not None and event["log_level"].name == "warn":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    @deferred_test
    async def test_dnsbl_error_codes_are_not_listings(self) -> None:
        """When a DNSBL answers 127.255.255.254/255 (Spamhaus: public resolver, over quota) or outside
        127.0.0.0/8, the client is not listed and one warning per interval names the list; 127.0.0.2 lists."""
        records = {
            "1.0.0.127.zen.test": [a("127.255.255.254")],
            "2.0.0.127.zen.test": [a("127.255.255.255")],
            "3.0.0.127.zen.test": [a("127.0.0.2")],
            "4.0.0.127.zen.test": [a("192.0.2.80")],
        }
        server = LoopbackDNS({"zen.test": records})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        clock = Clock()
        clock.advance(1000)
        lists = DNSLists([DNSList("zen.test")], [], dns_lookup((("127.0.0.1", server.port),), 5.0), clock, cache_for=0)
        warnings = self.warnings()
        assert await self.check(lists, "127.0.0.1") is None
        assert await self.check(lists, "127.0.0.2") is None
        assert await self.check(lists, "127.0.0.1") is None
        assert [(w["zone"], w["answer"]) for w in warnings] == [("zen.test", "127.255.255.254")]
        assert "error code" in warnings[0]["meaning"]
        listed = await self.check(lists, "127.0.0.3")
        assert isinstance(listed, Reply) and listed.code == 554 and "zen.test" in listed.text
        clock.advance(lists.warn_every)
        assert await self.check(lists, "127.0.0.4") is None
        assert [w["answer"] for w in warnings] == ["127.255.255.254", "192.0.2.80"]

    @deferred_test
    async def test_allowlist_refusal_trusts_nobody(self) -> None:
        """When a DNSWL answers 127.0.0.255 (dnswl.org: refused), the client is not allowed and is still checked."""
        records = {"1.0.0.127.wl.test": [a("127.0.0.255")], "1.0.0.127.bl.test": [a("127.0.0.2")]}
        server = LoopbackDNS({"wl.test": records, "bl.test": {}})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        clock = Clock()
        lookup = dns_lookup((("127.0.0.1", server.port),), 5.0)
        lists = DNSLists([DNSList("bl.test")], [DNSList("wl.test")], lookup, clock, cache_for=0)
        warnings = self.warnings()
        verdict = await self.check(lists, "127.0.0.1")
        assert isinstance(verdict, Reply) and verdict.code == 554, "the refusal did not allow the client"
        assert [(w["zone"], w["answer"]) for w in warnings] == [("wl.test", "127.0.0.255")]

    @deferred_test
    async def test_dns_list_return_codes(self) -> None:
        """When a DNSBL or DNSWL entry names its return codes, other answers in 127.0.0.0/8 do not count."""
        records = {
            "1.0.0.127.bl.test": [a("127.0.0.4")],
            "2.0.0.127.bl.test": [a("127.0.0.2")],
            "1.0.0.127.wl.test": [a("127.0.0.255")],
            "3.0.0.127.wl.test": [a("127.0.10.1")],
            "3.0.0.127.bl.test": [a("127.0.0.2")],
        }
        server = LoopbackDNS({"bl.test": records, "wl.test": {}})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        lists = DNSLists(
            [parse_dnslist("bl.test=127.0.0.[2..3]")],
            [parse_dnslist("wl.test=127.0.[0..255].[0..3]")],
            dns_lookup((("127.0.0.1", server.port),), 5.0),
            Clock(),
        )
        assert await self.check(lists, "127.0.0.1") is None  # 127.0.0.4 on bl, 127.0.0.255 (an error) on wl
        assert isinstance(await self.check(lists, "127.0.0.2"), Reply)
        assert await self.check(lists, "127.0.0.3") is ALLOW


def rcpt(port: int, recipient: str, sender: str = "bob@sender.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        if code != 250:
            return code, text
        return client.rcpt(recipient)


class FilterTests(NodeCase):
    async def dns(self, records: dict[str, dict[str, list[Any]]]) -> LoopbackDNS:
        server = LoopbackDNS(records)
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    @deferred_test
    async def test_dnsbl_listed_client_refused_with_zone(self) -> None:
        """When the client is listed in a DNSBL, its recipients get 554 5.7.1 naming the zone."""
        dns = await self.dns({"bl.test": {"1.0.0.127.bl.test": [a("127.0.0.2")]}})
        await self.start_node(LoopbackSink(), delivery={"nameservers": [dns.address]}, filters={"dnsbl": ["bl.test"]})
        code, text = await deferToThread(rcpt, self.smtp_port, "a@example.com")
        assert code == 554 and b"5.7.1" in text and b"blocked using bl.test" in text

    @deferred_test
    async def test_dnsbl_error_code_accepted(self) -> None:
        """When a DNSBL answers with an error code (127.255.255.254, as Spamhaus does to public resolvers), the
        client's recipients are accepted."""
        dns = await self.dns({"bl.test": {"1.0.0.127.bl.test": [a("127.255.255.254")]}})
        await self.start_node(LoopbackSink(), delivery={"nameservers": [dns.address]}, filters={"dnsbl": ["bl.test"]})
        assert (await deferToThread(rcpt, self.smtp_port, "a@example.com"))[0] == 250

    @deferred_test
    async def test_dnswl_listed_client_trusted(self) -> None:
        """When the client is on a DNSWL, the DNSBL listing does not count."""
        dns = await self.dns(
            {
                "bl.test": {"1.0.0.127.bl.test": [a("127.0.0.2")]},
                "wl.test": {"1.0.0.127.wl.test": [a("127.0.0.2")]},
            }
        )
        await self.start_node(
            LoopbackSink(),
            delivery={"nameservers": [dns.address]},
            filters={"dnsbl": ["bl.test"], "dnswl": ["wl.test"]},
        )
        assert (await deferToThread(rcpt, self.smtp_port, "a@example.com"))[0] == 250

    @deferred_test
    async def test_dns_timeout_does_not_block(self) -> None:
        """When the DNSBL's server does not answer, the list is skipped and the mail is accepted."""
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        await self.start_node(
            LoopbackSink(),
            delivery={"nameservers": [f"127.0.0.1:{silent.getsockname()[1]}"]},
            filters={"dnsbl": ["bl.test"], "dns_timeout": "1s"},
        )
        assert (await deferToThread(rcpt, self.smtp_port, "a@example.com"))[0] == 250

    @deferred_test
    async def test_greylisting_across_two_nodes(self) -> None:
        """When a first attempt on node A is greylisted, the retry after the delay on node B is accepted."""
        prefix = unique_prefix()
        grey = {"greylist_delay": "1s"}
        await self.start_node(LoopbackSink(), filters=grey, key_prefix=prefix)
        port_a = self.smtp_port
        await self.start_node(LoopbackSink(), filters=grey, key_prefix=prefix, node_id="node-b")
        port_b = self.smtp_port
        code, text = await deferToThread(rcpt, port_a, "a@example.com")
        assert code == 450 and text.startswith(b"4.2.0 Greylisted")
        assert (await deferToThread(rcpt, port_b, "a@example.com"))[0] == 450  # too soon, on either node
        await deferToThread(time.sleep, 1.2)
        assert (await deferToThread(rcpt, port_b, "a@example.com"))[0] == 250
        # another sender is a new triplet
        assert (await deferToThread(rcpt, port_b, "a@example.com", "eve@other.test"))[0] == 450

    @deferred_test
    async def test_rate_limit_shared_by_two_nodes(self) -> None:
        """When a client sends more messages per minute than allowed, counted over two nodes, MAIL gets 450 4.7.1."""
        prefix = unique_prefix()
        limit = {"messages_per_minute": 3}
        await self.start_node(LoopbackSink(), filters=limit, key_prefix=prefix)
        port_a = self.smtp_port
        await self.start_node(LoopbackSink(), filters=limit, key_prefix=prefix, node_id="node-b")
        port_b = self.smtp_port
        codes = [(await deferToThread(rcpt, port, "a@example.com")) for port in (port_a, port_a, port_b, port_b)]
        assert [c for c, _ in codes] == [250, 250, 250, 450]
        assert codes[3][1].startswith(b"4.7.1")

    @deferred_test
    async def test_domain_has_its_own_chain(self) -> None:
        """When a domain has its own [domain.filter], its recipients get it and other domains get [filter]."""
        dns = await self.dns({"bl.test": {"1.0.0.127.bl.test": [a("127.0.0.2")]}})
        sink = LoopbackSink()
        strict = {"name": "strict.test", "routes": [f"smtp://127.0.0.1:{sink.port}"], "recipients": "any"}
        await self.start_node(
            sink,
            delivery={"nameservers": [dns.address]},
            domains=[{**strict, "filter": {"dnsbl": ["bl.test"]}}],
        )
        code, text = await deferToThread(rcpt, self.smtp_port, "a@strict.test")
        assert code == 554 and b"bl.test" in text
        assert (await deferToThread(rcpt, self.smtp_port, "a@example.com"))[0] == 250

    @deferred_test
    async def test_spf_fail_refused_and_pass_recorded(self) -> None:
        """When SPF fails for the sender's domain, RCPT gets 550 5.7.23; when it passes, the delivered message
        carries Received-SPF and Authentication-Results."""
        dns = await self.dns(
            {
                "good.test": {"good.test": [txt("v=spf1 ip4:127.0.0.0/8 -all")]},
                "bad.test": {"bad.test": [txt("v=spf1 ip4:192.0.2.1 -all")]},
            }
        )
        sink = LoopbackSink()
        sink.start()
        await self.start_node(sink, delivery={"nameservers": [dns.address]}, filters={"spf": True})
        code, text = await deferToThread(rcpt, self.smtp_port, "a@example.com", "eve@bad.test")
        assert code == 550 and text.startswith(b"5.7.23")
        result = await send(self.smtp_port, "bob@good.test", ["a@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
        assert result == {}
        await wait_for(lambda: len(sink.messages) == 1, 20, "delivery")
        body = sink.messages[0].body
        assert b"Received-SPF: pass (mx2.relayx.test: domain of bob@good.test designates 127.0.0.1" in body
        assert b"Authentication-Results: mx2.relayx.test; spf=pass smtp.mailfrom=bob@good.test" in body
        # trace fields of this hop: above relayx's Received: line (RFC 7208 9.1)
        assert body.index(b"Received-SPF:") < body.index(b"Received:") < body.index(b"Subject: hi")

    @deferred_test
    async def test_rspamd_unreachable_fails_open_or_closed(self) -> None:
        """When rspamd does not answer, the message is accepted by default and deferred with 451 when failing closed."""
        closed = free_port()  # nothing listens there
        sink = LoopbackSink()
        await self.start_node(sink, filters={"rspamd_url": f"http://127.0.0.1:{closed}", "rspamd_timeout": "2s"})
        assert await send(self.smtp_port, "bob@sender.test", ["a@example.com"], b"Subject: x\r\n\r\nx\r\n") == {}
        await self.start_node(sink, filters={"rspamd_url": f"http://127.0.0.1:{closed}", "rspamd_failure": "tempfail"})
        result = await send(self.smtp_port, "bob@sender.test", ["a@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert result.smtp_code == 451 and result.smtp_error.startswith(b"4.7.1")
