"""
Outbound TLS policy against a destination with a certificate made for the
test: ``verify`` delivers when the name matches and defers with the reason
when it does not; ``required`` defers when STARTTLS is not offered.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred

from relayx.service import RelayNode
from relayx.smtp.tls import load_options
from tests.certs import CA
from tests.helpers import LoopbackSink, NodeCase, eventually, send, wait_for
from tests.test_queue_redis import deferred_test


class OutboundTLSTests(NodeCase):
    async def setup_tls(self, tls: str, name: str | None, offer: bool = True) -> tuple[LoopbackSink, RelayNode]:
        ca = CA()
        directory = Path(tempfile.mkdtemp())
        cert, key, _ = ca.issue(directory, "mx.tlsdomain.test")
        (directory / "ca.pem").write_bytes(ca.pem())
        destination = LoopbackSink()
        if offer:
            destination.sink.tls = load_options(cert, key)
        destination.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(destination.stop()))
        domain = {"name": "tlsdomain.test", "routes": [f"smtp://127.0.0.1:{destination.port}"], "recipients": "any"}
        domain["tls"] = tls
        if name:
            domain["tls_name"] = name
        node = await self.start_node(
            LoopbackSink(), delivery={"tls_ca_file": str(directory / "ca.pem")}, domains=[domain]
        )
        return destination, node

    @deferred_test
    async def test_verify_with_the_right_name_delivers(self) -> None:
        """When the policy is verify and the certificate bears the expected name, the message goes over TLS."""
        destination, _ = await self.setup_tls("verify", "mx.tlsdomain.test")
        assert await send(self.smtp_port, "bob@sender.test", ["a@tlsdomain.test"], b"Subject: s\r\n\r\nx\r\n") == {}
        await wait_for(lambda: len(destination.messages) == 1, 30, "the delivery")
        assert destination.messages[0].tls

    @deferred_test
    async def test_verify_with_the_wrong_name_defers(self) -> None:
        """When the certificate does not bear the expected name, nothing is sent and the reason is recorded."""
        destination, node = await self.setup_tls("verify", "other.tlsdomain.test")
        assert await send(self.smtp_port, "bob@sender.test", ["a@tlsdomain.test"], b"Subject: s\r\n\r\nx\r\n") == {}
        queue = node.queue
        assert queue is not None

        async def last_error() -> str:
            return (await queue.domain_state("tlsdomain.test", 0)).last_error

        why = await eventually(last_error, 30, "the deferral")
        assert "TLS with other.tlsdomain.test failed (verify)" in why
        assert destination.messages == []

    @deferred_test
    async def test_required_without_starttls_defers(self) -> None:
        """When TLS is required and the destination does not offer STARTTLS, the message waits."""
        destination, node = await self.setup_tls("required", None, offer=False)
        assert await send(self.smtp_port, "bob@sender.test", ["a@tlsdomain.test"], b"Subject: s\r\n\r\nx\r\n") == {}
        queue = node.queue
        assert queue is not None

        async def last_error() -> str:
            return (await queue.domain_state("tlsdomain.test", 0)).last_error

        assert "STARTTLS is not offered" in await eventually(last_error, 30, "the deferral")
        assert destination.messages == []
