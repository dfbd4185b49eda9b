"""
``relayx preflight``: a domain's MX records from a real DNS server on
loopback, a primary that speaks SMTP with STARTTLS, and an MTA-STS policy
served over HTTPS with a certificate of the test CA.
"""

from __future__ import annotations

import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.names import dns
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from relayx.config import AnyRecipient, DomainConfig, parse_route
from relayx.dns import dns_lookup, dns_lookup_mx
from relayx.interfaces import Throttle
from relayx.ops.check import Level
from relayx.ops.preflight import make_fetch, make_probe, preflight
from tests.certs import CA
from tests.dns import LoopbackDNS, a, txt


def tls_options(cert: Path, key: Path) -> CertificateOptions:
    pem = PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes())
    return CertificateOptions(privateKey=pem.privateKey.original, certificate=pem.original)


class Primary(LineReceiver):
    """
    Just enough of an SMTP server: banner, EHLO with STARTTLS, STARTTLS, QUIT.
    """

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.sendLine(b"220 primary.example.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        verb = line.split(b" ")[0].upper()
        if verb in (b"EHLO", b"HELO"):
            self.sendLine(b"250-primary.example.test\r\n250 STARTTLS")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 go ahead")
            transport: Any = self.transport
            transport.startTLS(self.factory.tls)
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            transport = self.transport
            assert transport is not None
            transport.loseConnection()
        else:
            self.sendLine(b"250 ok")


class Policy(Resource):
    isLeaf = True

    def __init__(self, test: PreflightTests) -> None:
        super().__init__()
        self.test = test

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return self.test.policy


def mx(preference: int, host: str, ttl: int) -> Any:
    return dns.Record_MX(preference, host.encode(), ttl=ttl)


class PreflightTests(TestCase):
    def setUp(self) -> None:
        self.ca = CA()
        directory = Path(tempfile.mkdtemp(prefix="relayx-preflight-"))
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key, _ = self.ca.issue(directory, "primary.example.test", stem="smtp")
        factory = Factory.forProtocol(Primary)
        factory.tls = tls_options(cert, key)  # type: ignore[attr-defined]
        tcp: Any = reactor
        self.smtp = tcp.listenTCP(0, factory, interface="127.0.0.1")
        self.smtp_port = self.smtp.getHost().port
        cert, key, _ = self.ca.issue(directory, "mta-sts.example.test", stem="https")
        root = Resource()
        well_known = Resource()
        root.putChild(b".well-known", well_known)
        self.policy = b"version: STSv1\nmode: enforce\nmx: primary.example.test\nmax_age: 86400\n"
        well_known.putChild(b"mta-sts.txt", Policy(self))
        self.https = reactor.listenSSL(0, Site(root), tls_options(cert, key), interface="127.0.0.1")  # type: ignore[attr-defined]

    async def run_preflight(self, records: dict[str, list[Any]]) -> list[Any]:
        server = LoopbackDNS({"example.test": records})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        nameservers = (("127.0.0.1", server.port),)
        lookup = dns_lookup(nameservers, 2.0)
        port = self.smtp_port
        domain = DomainConfig(
            name="example.test",
            routes=(parse_route(f"smtp://127.0.0.1:{port}"),),
            recipients=AnyRecipient(),
            throttle=Throttle(concurrency=1),
        )
        context = ssl.create_default_context(cadata=self.ca.pem().decode())
        return await preflight(
            domain,
            ["relayx.example.test"],
            lookup=lookup,
            lookup_mx=dns_lookup_mx(nameservers, 2.0),
            probe=make_probe("relayx.example.test", 5.0),
            fetch_policy=make_fetch(lookup, context, 5.0, port=self.https.getHost().port),
        )

    def tearDown(self) -> Deferred[Any]:  # type: ignore[override]
        return maybeDeferred(self.smtp.stopListening).addCallback(lambda _: self.https.stopListening())

    def test_a_domain_ready_for_a_cutover(self) -> Deferred[None]:
        """When the primary is at 10, relayx at 20 with short TTLs and the policy lists relayx, all is ok."""
        self.policy = b""

        async def run() -> None:
            findings = await self.run_preflight(
                {
                    "example.test": [mx(10, "primary.example.test", 300), mx(20, "relayx.example.test", 300)],
                    "relayx.example.test": [a("127.0.0.2")],
                }
            )
            assert {f.level for f in findings} == {Level.OK}, findings
            text = " | ".join(f.text for f in findings)
            assert "10 primary.example.test, 20 relayx.example.test" in text
            assert "STARTTLS, certificate names primary.example.test" in text
            assert "publishes no MTA-STS policy" in text

        return Deferred.fromCoroutine(run())

    def test_problems_each_get_a_fix(self) -> Deferred[None]:
        """When relayx is preferred, the TTL is a day, relayx has no address and MTA-STS omits it, each gets a fix."""

        async def run() -> None:
            findings = await self.run_preflight(
                {
                    "example.test": [mx(30, "primary.example.test", 86400), mx(20, "relayx.example.test", 86400)],
                    "_mta-sts.example.test": [txt("v=STSv1; id=20261123")],
                    "mta-sts.example.test": [a("127.0.0.1")],
                }
            )
            problems = {f.subject: f for f in findings if f.level is not Level.OK}
            assert problems["mx"].level is Level.ERROR and "preferred over the primary" in problems["mx"].text
            assert problems["mx ttl"].level is Level.WARNING and "86400 s" in problems["mx ttl"].text
            assert "lower it to 300 s" in problems["mx ttl"].fix
            assert problems["mx relayx.example.test"].level is Level.ERROR
            assert problems["mta-sts"].level is Level.ERROR
            assert "does not list relayx.example.test" in problems["mta-sts"].text
            assert problems["mta-sts"].fix.startswith("add 'mx: relayx.example.test'")

        return Deferred.fromCoroutine(run())

    def test_primary_down_is_a_warning(self) -> Deferred[None]:
        """When the primary does not answer, preflight warns (relayx will hold the mail) instead of failing."""

        async def run() -> None:
            await maybeDeferred(self.smtp.stopListening)
            findings = await self.run_preflight(
                {
                    "example.test": [mx(10, "primary.example.test", 300), mx(20, "relayx.example.test", 300)],
                    "relayx.example.test": [a("127.0.0.2")],
                }
            )
            [primary] = [f for f in findings if f.subject.startswith("primary")]
            assert primary.level is Level.WARNING and "not reachable" in primary.text

        return Deferred.fromCoroutine(run())
