"""
The RFC 7208 test suite (``tests/data/rfc7208-tests.yml``: the openspf.org
suite, release 2014.04 with the 2019.08 additions, as pyspf ships it: file
``test/rfc7208-tests.yml`` of github.com/sdgathman/pyspf, commit 4bf96ea;
licence in ``rfc7208-tests.LICENSE``): each scenario's zone data served by a
real DNS server on loopback, each case run through ``relayx.checks.spf.check`` over
``relayx.dns.dns_lookup``.

The suite's conventions (those of its drivers, e.g. pyspf's ``testspf.py``):
an ``SPF`` record stands for a ``TXT`` record too unless the name has
``TXT`` records of its own; ``TXT: NONE`` means no ``TXT`` record; a
``TIMEOUT`` entry makes every query of the name for a type not listed before it
time out (here: SERVFAIL, which is as temporary and does not wait).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import yaml
from twisted.names import dns
from twisted.trial.unittest import TestCase

from relayx.checks.spf import check
from relayx.dns import dns_lookup
from tests.dns import LoopbackDNS, Table
from tests.test_queue_redis import deferred_test

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"

#: pyspf's score, as measured in issue 15 (pyspf 2.0.14 over this very server and
#: dnspython passes 201: it fails null-text, below, and ptr-cname-loop with temperror)
PYSPF_SCORE = 202

#: cases relayx does not pass, each with the reason
KNOWN_EXCEPTIONS: dict[str, str] = {
    "null-text": (
        "a TXT record of no strings cannot be sent on the wire (RFC 1035 3.3.14: one or more); dnspython "
        "drops the whole answer as malformed and waits for a good one, so the result is temperror, "
        "not the pass of the case's other record (pyspf over a real server fails this case the same way)"
    ),
}


@attrs.frozen
class Case:
    scenario: str
    name: str
    host: str
    mailfrom: str
    helo: str
    results: tuple[str, ...]
    spec: str


def _record(rdtype: str, value: Any) -> Any:
    if rdtype == "A":
        return dns.Record_A(value)
    if rdtype == "AAAA":
        return dns.Record_AAAA(value)
    if rdtype == "MX":
        return dns.Record_MX(int(value[0]), value[1].encode())
    if rdtype == "PTR":
        return dns.Record_PTR(value.encode())
    if rdtype == "CNAME":
        return dns.Record_CNAME(value.encode())
    strings = [value] if isinstance(value, str) else list(value)
    return dns.Record_TXT(*(s.encode("utf-8") for s in strings))


def zone(data: dict[str, list[Any]]) -> tuple[dict[str, dict[int, list[Any]]], set[str | tuple[str, int]]]:
    """
    A scenario's ``zonedata`` as a ``Table``'s records and failing names.
    """
    records: dict[str, dict[int, list[Any]]] = {}
    failing: set[str | tuple[str, int]] = set()
    for name, entries in data.items():
        key = name.lower().rstrip(".")
        table = records.setdefault(key, {})
        spf: list[Any] = []
        has_txt = False
        seen: set[int] = set()
        for entry in entries:
            if entry == "TIMEOUT":
                failing.update(
                    (key, t) for t in (dns.A, dns.AAAA, dns.MX, dns.PTR, dns.TXT, dns.CNAME) if t not in seen
                )
                continue
            ((rdtype, value),) = entry.items()
            if rdtype == "SPF":
                spf.append(value)
                continue
            rtype = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "PTR": dns.PTR, "CNAME": dns.CNAME, "TXT": dns.TXT}[
                rdtype
            ]
            table.setdefault(rtype, [])
            if rdtype == "TXT":
                has_txt = True
                if value == "NONE":
                    continue
            seen.add(rtype)
            table[rtype].append(_record(rdtype, value))
        if spf and not has_txt:
            table[dns.TXT] = [_record("TXT", v) for v in spf]
    return records, failing


def load() -> list[tuple[dict[str, list[Any]], list[Case]]]:
    scenarios = []
    with SUITE.open("rb") as f:
        for document in yaml.safe_load_all(f):
            cases = []
            for name, test in document["tests"].items():
                expected = test["result"]
                cases.append(
                    Case(
                        scenario=document["description"],
                        name=name,
                        host=test["host"],
                        mailfrom=test["mailfrom"],
                        helo=test["helo"],
                        results=(expected,) if isinstance(expected, str) else tuple(expected),
                        spec=str(test.get("spec", "")),
                    )
                )
            scenarios.append((document["zonedata"], cases))
    return scenarios


class RFC7208SuiteTests(TestCase):
    @deferred_test
    async def test_rfc7208_suite(self) -> None:
        """When every case of the RFC 7208 test suite is checked against its zone data on a loopback DNS server,
        relayx's result is among the expected ones (all but the listed exceptions: at least pyspf's score)."""
        table = Table()
        server = LoopbackDNS({}, table)
        try:
            lookup = dns_lookup((("127.0.0.1", server.port),), 2.0)
            passed: list[str] = []
            failed: list[str] = []
            for data, cases in load():
                table.records, table.failing = zone(data)
                for case in cases:
                    verdict = await check(lookup, case.host, case.mailfrom, case.helo)
                    if verdict.result.value in case.results:
                        passed.append(case.name)
                    else:
                        failed.append(
                            f"{case.name} ({case.scenario}, RFC 7208 {case.spec}): "
                            f"{verdict.result.value}, expected {'/'.join(case.results)}"
                            + (f" [{verdict.reason}]" if verdict.reason else "")
                        )
        finally:
            await server.stop()
        total = len(passed) + len(failed)
        unexpected = [f for f in failed if f.split(" ", 1)[0] not in KNOWN_EXCEPTIONS]
        assert total == 203
        assert not unexpected, f"{len(passed)}/{total} passed; failures:\n" + "\n".join(unexpected)
        assert len(passed) >= PYSPF_SCORE
