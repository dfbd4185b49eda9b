"""
Filtering before the queue: the chain's rules, DNS lists against a real DNS
server on loopback, and greylisting and rate limits shared by two nodes.
"""

from __future__ import annotations

import smtplib
import socket
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from relayx.address import Mailbox
from relayx.filters import ALLOW, Filter, FilterChain, Verdict, reversed_ip
from relayx.reply import Reply
from tests.dns import LoopbackDNS, a
from tests.helpers import LoopbackSink, NodeCase, unique_prefix
from tests.test_queue_redis import deferred_test

REFUSED = Reply(554, "5.7.1", "no")


class Fixed(Filter):
    def __init__(self, verdict: Verdict | Exception, calls: list[str], name: str) -> None:
        self.verdict, self.calls, self.name = verdict, calls, name

    async def recipient(self, client: str, sender: str, recipient: Mailbox) -> Verdict:
        self.calls.append(self.name)
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict


def run_chain(*filters: Filter) -> Reply | None:
    result: list[Reply | None] = []
    chain = FilterChain(filters)
    Deferred.fromCoroutine(chain.recipient("192.0.2.1", "a@b.test", Mailbox.parse("x@y.test"))).addCallback(
        result.append
    )
    return result[0]


def test_chain_order_allow_and_failure() -> None:
    """When filters run, the first reply decides, ALLOW ends the chain, and a failing filter is skipped."""
    calls: list[str] = []
    assert run_chain(Fixed(None, calls, "a"), Fixed(REFUSED, calls, "b"), Fixed(None, calls, "c")) == REFUSED
    assert calls == ["a", "b"]
    calls.clear()
    assert run_chain(Fixed(ALLOW, calls, "a"), Fixed(REFUSED, calls, "b")) is None
    assert calls == ["a"]
    calls.clear()
    assert run_chain(Fixed(RuntimeError("dns down"), calls, "a"), Fixed(REFUSED, calls, "b")) == REFUSED


def test_reversed_ip() -> None:
    """When a client address is looked up in a DNS list, it is reversed by octet or by IPv6 nibble."""
    assert reversed_ip("192.0.2.7") == "7.2.0.192"
    assert reversed_ip("2001:db8::1") == "1." + "0." * 23 + "8.b.d.0.1.0.0.2"
    assert reversed_ip("not an address") is None


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
