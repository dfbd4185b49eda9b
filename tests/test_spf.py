"""
SPF evaluation (RFC 7208) against DNS tables: mechanisms, modifiers,
macros and the processing limits. The same code against a real DNS server
on loopback is in test_filters.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred

from relayx.checks.spf import Result, Verdict, check
from relayx.dns import LookupFailed

#: (name, type) -> records; a name in FAILING makes the look-up fail
ZONE: dict[tuple[str, str], list[str]] = {
    ("pass.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"],
    ("soft.test", "TXT"): ["v=spf1 ~all"],
    ("neutral.test", "TXT"): ["v=spf1 ?all"],
    ("nomatch.test", "TXT"): ["v=spf1 ip4:198.51.100.1"],
    ("other.test", "TXT"): ["some other record"],
    ("two.test", "TXT"): ["v=spf1 -all", "v=spf1 +all"],
    ("syntax.test", "TXT"): ["v=spf1 ip4:192.0.2.1 bogus:x -all"],
    ("port.test", "TXT"): ["v=spf1 ip4:192.0.2.1 a:mail.port.test:8080 -all"],
    ("crlf.test", "TXT"): ["v=spf1 ip4:192.0.2.1\r\n -all"],
    ("percent.test", "TXT"): ["v=spf1 exists:%{l}%%%_x.percent.test -all"],
    ("bob% x.percent.test", "A"): ["127.0.0.2"],
    ("include.test", "TXT"): ["v=spf1 include:pass.test -all"],
    ("include-none.test", "TXT"): ["v=spf1 include:missing.test -all"],
    ("redirect.test", "TXT"): ["v=spf1 redirect=pass.test"],
    ("redirect-none.test", "TXT"): ["v=spf1 redirect=missing.test"],
    ("a.test", "TXT"): ["v=spf1 a a:host.a.test/28 -all"],
    ("a.test", "A"): ["203.0.113.5"],
    ("host.a.test", "A"): ["198.51.100.17"],
    ("mx.test", "TXT"): ["v=spf1 mx -all"],
    ("mx.test", "MX"): ["mail1.mx.test", "mail2.mx.test"],
    ("mail1.mx.test", "A"): ["203.0.113.1"],
    ("mail2.mx.test", "A"): ["203.0.113.2"],
    ("exists.test", "TXT"): ["v=spf1 exists:%{ir}.%{l1r+-}._spf.%{d} -all"],
    ("2.2.0.192.bob._spf.exists.test", "A"): ["127.0.0.2"],
    ("ptr.test", "TXT"): ["v=spf1 ptr -all"],
    ("9.2.0.192.in-addr.arpa", "PTR"): ["host.ptr.test", "host.elsewhere.test"],
    ("host.ptr.test", "A"): ["192.0.2.9"],
    ("temp.test", "TXT"): ["v=spf1 a:broken.test -all"],
    ("loop.test", "TXT"): ["v=spf1 include:loop.test -all"],
    ("void.test", "TXT"): ["v=spf1 a:v1.test a:v2.test a:v3.test +all"],
    ("many.test", "TXT"): ["v=spf1 " + " ".join(f"a:h{n}.many.test" for n in range(11)) + " -all"],
    **{(f"h{n}.many.test", "A"): [f"198.51.100.{200 + n}"] for n in range(11)},
    ("helo.test", "TXT"): ["v=spf1 a:mail.helo.test -all"],
    ("mail.helo.test", "A"): ["192.0.2.2"],
}
FAILING = {"broken.test"}


async def table(name: str, rdtype: str) -> list[str]:
    if name in FAILING:
        raise LookupFailed(f"{rdtype} {name}: Timeout")
    return ZONE.get((name.lower(), rdtype), [])


def verdict(ip: str, sender: str, helo: str = "client.test") -> Verdict:
    results: list[Verdict] = []
    Deferred.fromCoroutine(check(table, ip, sender, helo)).addCallback(results.append)
    return results[0]


@pytest.mark.parametrize(
    "ip, sender, expected",
    [
        ("192.0.2.2", "bob@pass.test", Result.PASS),
        ("2001:db8::25", "bob@pass.test", Result.PASS),
        ("198.51.100.1", "bob@pass.test", Result.FAIL),
        ("198.51.100.1", "bob@soft.test", Result.SOFTFAIL),
        ("198.51.100.1", "bob@neutral.test", Result.NEUTRAL),
        ("192.0.2.2", "bob@nomatch.test", Result.NEUTRAL),
        ("192.0.2.2", "bob@other.test", Result.NONE),
        ("192.0.2.2", "bob@missing.test", Result.NONE),
        ("192.0.2.2", "bob@localhost", Result.NONE),
        ("192.0.2.2", "bob@two.test", Result.PERMERROR),
        ("192.0.2.1", "bob@syntax.test", Result.PERMERROR),
        ("192.0.2.1", "bob@port.test", Result.PERMERROR),
        ("192.0.2.1", "bob@crlf.test", Result.PERMERROR),
        ("192.0.2.1", "bob@percent.test", Result.PASS),
        ("::ffff:192.0.2.2", "bob@pass.test", Result.PASS),
        ("192.0.2.2", "bob@include.test", Result.PASS),
        ("198.51.100.1", "bob@include.test", Result.FAIL),
        ("192.0.2.2", "bob@include-none.test", Result.PERMERROR),
        ("192.0.2.2", "bob@redirect.test", Result.PASS),
        ("198.51.100.1", "bob@redirect.test", Result.FAIL),
        ("192.0.2.2", "bob@redirect-none.test", Result.PERMERROR),
        ("203.0.113.5", "bob@a.test", Result.PASS),
        ("198.51.100.30", "bob@a.test", Result.PASS),
        ("198.51.100.40", "bob@a.test", Result.FAIL),
        ("203.0.113.2", "bob@mx.test", Result.PASS),
        ("203.0.113.3", "bob@mx.test", Result.FAIL),
        ("192.0.2.2", "bob@exists.test", Result.PASS),
        ("192.0.2.3", "bob@exists.test", Result.FAIL),
        ("192.0.2.9", "bob@ptr.test", Result.PASS),
        ("192.0.2.8", "bob@ptr.test", Result.FAIL),
        ("192.0.2.2", "bob@temp.test", Result.TEMPERROR),
        ("192.0.2.2", "bob@loop.test", Result.PERMERROR),
        ("192.0.2.2", "bob@void.test", Result.PERMERROR),
        ("198.51.100.209", "bob@many.test", Result.PASS),
        ("198.51.100.210", "bob@many.test", Result.PERMERROR),
    ],
)
def test_check_host(ip: str, sender: str, expected: Result) -> None:
    """When a client is checked against its sender's SPF record, the result follows RFC 7208."""
    assert verdict(ip, sender).result is expected


def test_null_sender_checks_helo() -> None:
    """When MAIL FROM is <>, the HELO name is checked as postmaster@helo."""
    passed = verdict("192.0.2.2", "", helo="helo.test")
    assert (passed.result, passed.identity, passed.sender) == (Result.PASS, "helo", "postmaster@helo.test")
    assert verdict("192.0.2.3", "", helo="helo.test").result is Result.FAIL


def test_ipv4_mapped_client_is_ipv4() -> None:
    """When the client is an IPv4-mapped IPv6 address (a tcp6 listener), it is checked and recorded as IPv4."""
    v = verdict("::ffff:198.51.100.1", "bob@pass.test")
    assert (v.result, v.ip) == (Result.FAIL, "198.51.100.1")


def test_permerror_reason_is_safe_in_header() -> None:
    """When a record's syntax error quotes control or non-ASCII characters, Received-SPF carries them replaced."""
    v = verdict("192.0.2.1", "bob@crlf.test")
    assert v.result is Result.PERMERROR
    received = v.received_spf("mx2.example.net")
    assert received.split("\r\n")[0].endswith("domain of crlf.test: bad network in 'ip4:192.0.2.1?r?n')")


def test_headers() -> None:
    """When a result is recorded, Received-SPF and Authentication-Results name the result, client and identity."""
    v = verdict("198.51.100.1", "bob@pass.test", helo="mail.sender.test")
    received = v.received_spf("mx2.example.net")
    assert received.startswith(
        "Received-SPF: fail (mx2.example.net: domain of bob@pass.test does not designate 198.51.100.1"
    )
    assert 'client-ip=198.51.100.1; envelope-from="bob@pass.test"; helo=mail.sender.test;' in received
    assert received.endswith("receiver=mx2.example.net; identity=mailfrom")
    assert v.authentication_results("mx2.example.net") == (
        "Authentication-Results: mx2.example.net; spf=fail smtp.mailfrom=bob@pass.test"
    )
