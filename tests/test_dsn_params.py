"""
The SMTP DSN extension (RFC 3461): NOTIFY, ORCPT, RET and ENVID taken at
MAIL and RCPT, kept with the message in the queue, passed on to a primary
that offers DSN, and obeyed by the DSNs relayx sends.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from typing import Any

import attrs
import pytest
from flufl.bounce import all_failures
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from relayx.address import AddressError, xtext_decode, xtext_encode
from relayx.delivery.bounce import Bouncer
from relayx.interfaces import FailedJob, Lease, MessageDsn, Notify, Outcome, RecipientDsn, Ret, StoredMessage, Throttle
from relayx.queue.redis import dsn_from_json, dsn_to_json
from relayx.reply import Reply
from tests.fakes import MemoryStore
from tests.helpers import LoopbackSink, NodeCase, wait_for
from tests.test_conformance import Harness
from tests.test_delivery import Scripted
from tests.test_queue_redis import T0, QueueCase, deferred_test, message


def parts(message: Any) -> list[Any]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


# -- xtext ----------------------------------------------------------------------


def test_xtext_round_trip() -> None:
    """When text with '+', '=', spaces and UTF-8 is xtext encoded, decoding gives it back."""
    for text in ("user@example.org", "a+b=c d", "jörg@example.org", "<id.1@host>"):
        assert xtext_decode(xtext_encode(text)) == text
    assert xtext_encode("a+b=c") == "a+2Bb+3Dc"


@pytest.mark.parametrize("bad", ["a+2", "a+2b", "a+ZZ", "a=b", "a b", "é"])
def test_xtext_malformed_is_refused(bad: str) -> None:
    """When xtext has a bad '+' escape or a character outside xchar, decoding raises AddressError."""
    with pytest.raises(AddressError):
        xtext_decode(bad)


# -- 1. dialogue ----------------------------------------------------------------

MAIL_CASES = [
    ("RET=FULL", "250 "),
    ("RET=hdrs", "250 "),
    ("ENVID=QQ314159", "250 "),
    ("RET=HDRS ENVID=id+2B1", "250 "),
    ("RET=BODY", "501 5.5.4"),
    ("RET", "501 5.5.4"),
    ("ENVID=a+2", "501 5.5.4"),
    ("ENVID=a+2b", "501 5.5.4"),
    ("ENVID=" + "x" * 101, "501 5.5.4"),
    ("ENVID=", "501 "),
    ("ENVID=\u00e9", "501 5.5.4"),
    ("FOO=1", "555 5.5.4"),
]


@pytest.mark.parametrize(("params", "expected"), MAIL_CASES)
def test_mail_dsn_parameters(params: str, expected: str) -> None:
    """When MAIL carries RET or ENVID, a well-formed value is taken and a malformed one gets 501 (RFC 3461 4.3, 4.4)."""
    h = Harness()
    assert "250 DSN\r\n" in h.send("EHLO client.test\r\n")
    assert h.send(f"MAIL FROM:<bob@sender.test> {params}\r\n").startswith(expected)


RCPT_CASES = [
    ("NOTIFY=NEVER", "250 "),
    ("NOTIFY=SUCCESS,FAILURE,DELAY", "250 "),
    ("NOTIFY=failure", "250 "),
    ("ORCPT=rfc822;u+40example.com", "250 "),
    ("ORCPT=rfc822;u@example.com NOTIFY=SUCCESS", "250 "),
    ("NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
    ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"),
    ("NOTIFY=SOMETIMES", "501 5.5.4"),
    ("NOTIFY=SUCCESS,", "501 5.5.4"),
    ("ORCPT=rfc822", "501 5.5.4"),
    ("ORCPT=;u@example.com", "501 5.5.4"),
    ("ORCPT=rfc822;", "501 5.5.4"),
    ("ORCPT=rfc822;u+4", "501 5.5.4"),
    ("ORCPT=rfc822;u+0Ax", "501 5.5.4"),
    ("FOO=1", "555 5.5.4"),
]


@pytest.mark.parametrize(("params", "expected"), RCPT_CASES)
def test_rcpt_dsn_parameters(params: str, expected: str) -> None:
    """When RCPT carries NOTIFY or ORCPT, a well-formed value is taken and a malformed one gets 501 (RFC 3461 4.1-2)."""
    h = Harness()
    h.send("EHLO client.test\r\n")
    h.send("MAIL FROM:<bob@sender.test>\r\n")
    assert h.send(f"RCPT TO:<u@example.com> {params}\r\n").startswith(expected)


def test_dsn_parameters_need_ehlo() -> None:
    """When a HELO client gives NOTIFY, the answer is 555, as for any parameter without EHLO."""
    h = Harness()
    h.send("HELO client.test\r\n")
    h.send("MAIL FROM:<bob@sender.test>\r\n")
    assert h.send("RCPT TO:<u@example.com> NOTIFY=NEVER\r\n").startswith("555 5.5.4")


def test_accepted_message_carries_its_dsn_parameters() -> None:
    """When a transaction gives RET, ENVID, NOTIFY and ORCPT, the committed message carries them decoded."""
    h = Harness()
    h.send("EHLO client.test\r\n")
    h.send("MAIL FROM:<bob@sender.test> RET=HDRS ENVID=env+2B1\r\n")
    assert h.send("RCPT TO:<a@example.com> NOTIFY=NEVER ORCPT=rfc822;list+40example.com\r\n").startswith("250 ")
    assert h.send("RCPT TO:<b@example.com>\r\n").startswith("250 ")
    assert h.send("RCPT TO:<c@example.com> NOTIFY=SUCCESS,DELAY\r\n").startswith("250 ")
    h.send("DATA\r\n")
    assert h.send("Subject: x\r\n\r\nbody\r\n.\r\n").startswith("250 ")
    [stored] = h.store.messages
    assert stored.dsn == MessageDsn(
        ret=Ret.HDRS,
        envid="env+1",
        recipients=(
            ("a@example.com", RecipientDsn(frozenset({Notify.NEVER}), "rfc822;list@example.com")),
            ("c@example.com", RecipientDsn(frozenset({Notify.SUCCESS, Notify.DELAY}))),
        ),
    )


# -- 2. the queue ---------------------------------------------------------------

DSN = MessageDsn(
    ret=Ret.FULL,
    envid="env-1",
    recipients=(
        ("gone@one.test", RecipientDsn(frozenset({Notify.FAILURE}), "rfc822;orig@one.test")),
        ("never@one.test", RecipientDsn(frozenset({Notify.NEVER}))),
    ),
)


def test_dsn_json_round_trip() -> None:
    """When DSN parameters are written as the hash's field and read back, they are equal; none writes nothing."""
    assert dsn_from_json(dsn_to_json(DSN)) == DSN
    assert dsn_to_json(MessageDsn()) == "" and dsn_from_json(None) == MessageDsn()
    assert dsn_from_json(b"{not json") == MessageDsn()


def _failed(job_dsn: MessageDsn, *failures: str, full: bytes | None = None) -> FailedJob:
    return FailedJob(
        job_id="Q.1",
        queue_id="Q",
        sender="bob@sender.test",
        arrival=T0,
        failures=tuple((r, 550, "5.1.1", "no such user") for r in failures),
        headers=b"Subject: hello\r\n\r\n",
        dsn=job_dsn,
        full=full,
    )


def _bouncer() -> Bouncer:
    return Bouncer(queue=None, clock=Clock(), hostname="mx2.relayx.test", new_queue_id=lambda: "DSN1", interval=1)  # type: ignore[arg-type]


class QueueDsnTests(QueueCase):
    @deferred_test
    async def test_queue_round_trip_to_deliverer_and_bouncer(self) -> None:
        """When a message with DSN parameters is queued, load and the failed job return them, and RET=FULL the body."""
        q = await self.make_queue()
        await q.enqueue(attrs.evolve(message("M", "gone@one.test", "never@one.test"), dsn=DSN))
        [lease] = (await q.claim("n", T0, 10, {}, Throttle(1))).leases
        assert (await q.load(lease)).dsn == DSN
        failures = tuple((r, Reply(550, "5.1.1", "no such user")) for r in lease.recipients)
        await q.settle(lease, Outcome(failed=failures), T0)
        [job] = await q.failed(10)
        assert job.dsn == DSN and job.full == b"Subject: M\r\n\r\nbody\r\n"
        dsn = _bouncer().dsn_for(job, T0)
        assert dsn is not None
        parsed = email.message_from_bytes(dsn.body)
        # NOTIFY=NEVER: only gone@ is reported (flufl.bounce reads its ORCPT); RET=FULL: the whole message comes back
        assert all_failures(parsed) == (frozenset(), frozenset({b"orig@one.test"}))
        assert b"Final-Recipient: rfc822; gone@one.test" in dsn.body and b"never@one.test" not in dsn.body
        returned = parts(parsed)[2]
        assert returned.get_content_type() == "message/rfc822"
        assert b"body\r\n" in dsn.body

    @deferred_test
    async def test_message_without_dsn_parameters_has_no_field(self) -> None:
        """When a message gives no DSN parameters, its hash has no dsn field and load returns the defaults."""
        q = await self.make_queue()
        await q.enqueue(message("M", "a@one.test"))
        assert await q.redis.call("hexists", q.message_key("M"), "dsn") == 0
        [lease] = (await q.claim("n", T0, 10, {}, Throttle(1))).leases
        assert (await q.load(lease)).dsn == MessageDsn()


# -- 4. the DSNs sent -------------------------------------------------------------


def test_notify_never_sends_no_dsn() -> None:
    """When every failed recipient asked NOTIFY=NEVER, or NOTIFY without FAILURE, no DSN is built."""
    never = MessageDsn(recipients=(("a@one.test", RecipientDsn(frozenset({Notify.NEVER}))),))
    assert _bouncer().dsn_for(_failed(never, "a@one.test"), T0) is None
    success = MessageDsn(recipients=(("a@one.test", RecipientDsn(frozenset({Notify.SUCCESS, Notify.DELAY}))),))
    assert _bouncer().dsn_for(_failed(success, "a@one.test"), T0) is None


def test_no_delay_warning_without_delay() -> None:
    """When a recipient's NOTIFY lacks DELAY, no delay warning is built for it; the default still warns."""
    failure = MessageDsn(recipients=(("a@one.test", RecipientDsn(frozenset({Notify.FAILURE}))),))
    assert _bouncer().dsn_for(_failed(failure, "a@one.test"), T0, delayed=True) is None
    assert _bouncer().dsn_for(_failed(MessageDsn(), "a@one.test"), T0, delayed=True) is not None


def test_ret_hdrs_envid_and_orcpt_in_the_dsn() -> None:
    """When the sender gave RET=HDRS, ENVID and ORCPT, the DSN returns headers only, with both original fields."""
    asked = MessageDsn(
        ret=Ret.HDRS,
        envid="env-7",
        recipients=(("a@one.test", RecipientDsn(frozenset({Notify.FAILURE}), "rfc822;list@one.test")),),
    )
    dsn = _bouncer().dsn_for(_failed(asked, "a@one.test", full=b"Subject: hello\r\n\r\nsecret body\r\n"), T0)
    assert dsn is not None
    parsed = email.message_from_bytes(dsn.body, policy=email.policy.default)
    _, status, returned = parts(parsed)
    per_message, block = parts(status)
    assert per_message["Original-Envelope-Id"] == "env-7"
    assert block["Original-Recipient"] == "rfc822; list@one.test"
    assert block["Final-Recipient"] == "rfc822; a@one.test"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"secret body" not in dsn.body
    assert all_failures(email.message_from_bytes(dsn.body)) == (frozenset(), frozenset({b"list@one.test"}))


# -- 3. outbound ------------------------------------------------------------------

EHLO_DSN = b"250-dest.test\r\n250-PIPELINING\r\n250-DSN\r\n250 SIZE 1000000\r\n"
EHLO_NO_DSN = b"250-dest.test\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"
ACCEPT = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n250 2.0.0 queued\r\n250 ok\r\n"
PASSED = MessageDsn(
    ret=Ret.HDRS,
    envid="e+1",
    recipients=(("a@example.com", RecipientDsn(frozenset({Notify.SUCCESS, Notify.FAILURE}), "rfc822;o=1@x.test")),),
)


def _sent(ehlo: bytes) -> list[bytes]:
    s = Scripted({"a": b"220 dest.test\r\n" + ehlo + ACCEPT})
    d = Deferred.fromCoroutine(
        s.deliverer(["a"]).deliver("example.com", "bob@sender.test", ("a@example.com",), b"S: x\r\n\r\nb\r\n", PASSED)
    )
    outcomes: list[Outcome] = []
    d.addCallback(outcomes.append)
    assert outcomes and outcomes[0].delivered == ("a@example.com",)
    sent: bytes = s.transports["a"].value()
    return sent.split(b"\r\n")


def test_dsn_parameters_passed_to_a_primary_offering_dsn() -> None:
    """When the primary offers DSN, MAIL and RCPT carry RET, ENVID, NOTIFY and ORCPT, xtext encoded (RFC 3461 4)."""
    lines = _sent(EHLO_DSN)
    assert lines[1].endswith(b" RET=HDRS ENVID=e+2B1")
    assert lines[2] == b"RCPT TO:<a@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;o+3D1@x.test"


def test_dsn_parameters_not_sent_to_a_primary_without_dsn() -> None:
    """When the primary does not offer DSN, MAIL and RCPT carry no DSN parameter."""
    lines = _sent(EHLO_NO_DSN)
    assert b"RET=" not in lines[1] and lines[2] == b"RCPT TO:<a@example.com>"


class PassThroughEndToEnd(NodeCase):
    @deferred_test
    async def test_parameters_reach_a_primary_that_offers_dsn(self) -> None:
        """When a client sends DSN parameters over SMTP, the node passes them to a DSN-offering primary unchanged."""
        primary = LoopbackSink()
        primary.sink.dsn = True
        primary.start()
        await self.start_node(primary)

        def run() -> Any:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
                return client.sendmail(
                    "bob@sender.test",
                    ["a@example.com"],
                    b"Subject: dsn\r\n\r\nbody\r\n",
                    mail_options=["RET=HDRS", "ENVID=id+2B7"],
                    rcpt_options=["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;a+40example.com"],
                )

        assert await deferToThread(run) == {}
        await wait_for(lambda: len(primary.messages) == 1, 30, "the message at the primary")
        [received] = primary.messages
        assert "RET=HDRS" in received.mail_params and "ENVID=id+2B7" in received.mail_params
        assert received.rcpt_params == {"a@example.com": "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a@example.com"}


# -- relayed DSNs (RFC 3461 6.2.2) -------------------------------------------------


def _outcome(ehlo: bytes, asked: MessageDsn) -> Outcome:
    s = Scripted({"a": b"220 dest.test\r\n" + ehlo + ACCEPT})
    d = Deferred.fromCoroutine(
        s.deliverer(["a"]).deliver("example.com", "bob@sender.test", ("a@example.com",), b"S: x\r\n\r\nb\r\n", asked)
    )
    outcomes: list[Outcome] = []
    d.addCallback(outcomes.append)
    assert outcomes
    return outcomes[0]


def test_success_asked_of_a_primary_without_dsn_is_relayed() -> None:
    """When NOTIFY=SUCCESS meets a primary without DSN, the outcome owes a relayed DSN; with DSN, the primary does."""
    assert _outcome(EHLO_NO_DSN, PASSED).relayed == ("a@example.com",)
    assert _outcome(EHLO_DSN, PASSED).relayed == ()
    failure_only = MessageDsn(recipients=(("a@example.com", RecipientDsn(frozenset({Notify.FAILURE}))),))
    assert _outcome(EHLO_NO_DSN, failure_only).relayed == ()
    assert _outcome(EHLO_NO_DSN, MessageDsn()).relayed == ()


def test_relayed_dsn_is_queued_for_the_sender() -> None:
    """When a delivery owes a relayed DSN, the bouncer queues one: Action relayed, Status 2.0.0, no failure to flufl."""
    store = MemoryStore()
    bouncer = _bouncer()
    bouncer.store = store
    lease = Lease("Q.1", 1, T0 + 60, "Q", "example.com", ("a@example.com",), 0, T0)
    stored = StoredMessage(sender="bob@sender.test", body=b"Subject: hi\r\n\r\nsecret\r\n", dsn=PASSED)
    outcome = Outcome(
        delivered=("a@example.com",),
        destination="a [a]:25",
        accepted=Reply(250, "2.0.0", "queued as X"),
        relayed=("a@example.com",),
    )
    Deferred.fromCoroutine(bouncer.relayed(lease, stored, outcome))
    [dsn] = store.messages
    assert dsn.sender == "" and [str(r) for r in dsn.recipients] == ["bob@sender.test"]
    parsed = email.message_from_bytes(dsn.body)
    per_message, block = parts(parts(parsed)[1])
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")
    assert block["Original-Recipient"] == "rfc822; o=1@x.test" and per_message["Original-Envelope-Id"] == "e+1"
    assert all_failures(parsed) == (frozenset(), frozenset())
    assert b"secret" not in dsn.body


class RelayedEndToEnd(NodeCase):
    @deferred_test
    async def test_notify_success_to_a_primary_without_dsn_sends_a_relayed_dsn(self) -> None:
        """When NOTIFY=SUCCESS meets a primary without DSN, the sender's MX gets a relayed DSN after the 250."""
        primary = LoopbackSink()
        primary.start()
        senders_mx, delivery = self.start_senders_mx()
        await self.start_node(primary, delivery=delivery)

        def run() -> Any:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
                return client.sendmail(
                    "bob@sender.test",
                    ["a@example.com"],
                    b"Subject: relayed\r\n\r\nbody\r\n",
                    mail_options=["ENVID=e7"],
                    rcpt_options=["NOTIFY=SUCCESS"],
                )

        assert await deferToThread(run) == {}
        await wait_for(lambda: len(senders_mx.messages) == 1, 30, "the relayed DSN at the sender's MX")
        assert len(primary.messages) == 1 and primary.messages[0].rcpt_params == {"a@example.com": ""}
        dsn = senders_mx.messages[0]
        assert dsn.sender == "" and dsn.recipients == ["bob@sender.test"]
        per_message, block = parts(parts(email.message_from_bytes(dsn.body))[1])
        assert per_message["Original-Envelope-Id"] == "e7"
        assert (block["Final-Recipient"], block["Action"]) == ("rfc822; a@example.com", "relayed")
