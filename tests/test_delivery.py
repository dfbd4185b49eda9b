"""
Outbound delivery: what each destination reply means for each recipient,
with the destination scripted over a StringTransport.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relayx.config import MXRoute, SMTPRoute
from relayx.delivery.routes import RouteTable, Target, Undeliverable
from relayx.delivery.smtp import SMTPDeliverer, Timeouts
from relayx.interfaces import IDeliverer, Outcome, Pushback
from relayx.reply import Reply
from relayx.smtp.client import SMTPClientProtocol, dot_stuff, parse_reply

EHLO_PIPELINING = b"250-dest.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000000\r\n"
EHLO_PLAIN = b"250-dest.test\r\n250 SIZE 1000000\r\n"


class Scripted:
    """
    Destinations whose replies are queued up front; a host listed in
    ``down`` refuses the connection.
    """

    def __init__(self, replies: dict[str, bytes], down: Sequence[str] = ()) -> None:
        self.replies = replies
        self.down = set(down)
        self.clock = Clock()
        self.transports: dict[str, StringTransport] = {}
        self.connections = 0
        self.protocols: dict[str, SMTPClientProtocol] = {}

    async def connect(self, host: str, port: int) -> SMTPClientProtocol:
        self.connections += 1
        if host in self.down:
            raise ConnectionRefusedError(f"{host} refused")
        protocol = self.protocols[host] = SMTPClientProtocol(self.clock)
        transport = self.transports[host] = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(self.replies[host])
        return protocol

    def deliverer(self, hosts: list[str]) -> SMTPDeliverer:
        async def targets(domain: str) -> list[Target]:
            return [Target(h, 25, h, "none") for h in hosts]

        return SMTPDeliverer(
            helo_name="mx2.example.net",
            targets=targets,
            connect=self.connect,
            timeouts=Timeouts(60, 60),
            clock=self.clock,
        )


def run(d: SMTPDeliverer, recipients: tuple[str, ...], body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> Outcome:
    result = Deferred.fromCoroutine(d.deliver("example.com", "bob@sender.test", recipients, body))
    outcomes: list[Outcome] = []
    result.addCallback(outcomes.append)
    assert outcomes, "delivery did not complete on the scripted replies"
    return outcomes[0]


def test_deliverer_provides_interface() -> None:
    """When built, the SMTP deliverer provides IDeliverer."""
    assert verifyObject(IDeliverer, Scripted({}).deliverer([]))


def test_pipelined_delivery_with_per_recipient_outcomes() -> None:
    """When the destination accepts one recipient, defers one and refuses one, each is reported so."""
    s = Scripted(
        {
            "a": b"220 dest.test\r\n" + EHLO_PIPELINING + b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n"
            b"452 4.2.2 mailbox full\r\n550 5.1.1 no such user\r\n354 go\r\n250 2.0.0 queued\r\n221 bye\r\n"
        }
    )
    outcome = run(s.deliverer(["a"]), ("x@example.com", "y@example.com", "z@example.com"))
    assert outcome.delivered == ("x@example.com",)
    assert outcome.deferred == (("y@example.com", Reply(452, "4.2.2", "mailbox full")),)
    assert outcome.failed == (("z@example.com", Reply(550, "5.1.1", "no such user")),)
    sent = s.transports["a"].value()
    # one write for the whole envelope: PIPELINING used
    assert b"MAIL FROM:<bob@sender.test> SIZE=18\r\nRCPT TO:<x@example.com>\r\n" in sent
    # the session is kept for the next message to the host: the reply to the data ended the transaction
    assert sent.endswith(b"Subject: x\r\n\r\nhi\r\n.\r\n")


def test_no_pipelining_stops_after_refused_mail() -> None:
    """When MAIL FROM gets a 5xx from a destination without PIPELINING, every recipient fails and no RCPT is sent."""
    s = Scripted({"a": b"220 dest.test\r\n" + EHLO_PLAIN + b"550 5.7.1 sender refused\r\n221 bye\r\n"})
    outcome = run(s.deliverer(["a"]), ("x@example.com",))
    assert outcome.failed == (("x@example.com", Reply(550, "5.7.1", "sender refused")),)
    assert b"RCPT" not in s.transports["a"].value()


def test_4xx_after_data_defers() -> None:
    """When the end of DATA gets 451, the accepted recipients are deferred, not failed."""
    s = Scripted({"a": b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n250 ok\r\n354 go\r\n451 4.3.0 try later\r\n221 bye\r\n"})
    outcome = run(s.deliverer(["a"]), ("x@example.com",))
    assert outcome.deferred == (("x@example.com", Reply(451, "4.3.0", "try later")),)
    assert outcome.delivered == () and outcome.failed == ()


def test_5xx_after_data_fails() -> None:
    """When the end of DATA gets 554, the accepted recipients fail with that reply."""
    s = Scripted({"a": b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n250 ok\r\n354 go\r\n554 5.6.0 rejected\r\n221 bye\r\n"})
    outcome = run(s.deliverer(["a"]), ("x@example.com",))
    assert outcome.failed == (("x@example.com", Reply(554, "5.6.0", "rejected")),)


def test_greeting_refused_tries_next_host() -> None:
    """When the first host answers 554 to the connection and the second is up, the second gets the message."""
    s = Scripted(
        {
            "a": b"554 5.3.2 not now\r\n",
            "b": b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n",
        }
    )
    outcome = run(s.deliverer(["a", "b"]), ("x@example.com",))
    assert outcome.delivered == ("x@example.com",)


def test_all_hosts_down_is_unreachable() -> None:
    """When no host accepts a connection, the outcome is unreachable with each host's reason."""
    s = Scripted({}, down=["a", "b"])
    outcome = run(s.deliverer(["a", "b"]), ("x@example.com",))
    assert outcome.unreachable == "a:25: a refused; b:25: b refused"
    assert outcome.delivered == () and outcome.failed == () and outcome.deferred == ()


def test_421_mid_session_is_a_pushback() -> None:
    """When the destination says 421 to RCPT, it is a pushback on the rate: deferred, never the recipient refused."""
    s = Scripted({"a": b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n421 4.3.2 shutting down\r\n"})
    outcome = run(s.deliverer(["a"]), ("x@example.com",))
    busy = Reply(421, "4.3.2", "shutting down")
    assert outcome.pushback is Pushback.RATE and outcome.pushback_reply == busy
    assert outcome.deferred == (("x@example.com", busy),) and outcome.failed == () and outcome.unreachable is None
    assert outcome.destination == "a [a]:25"


def test_greeting_421_is_a_pushback_on_sessions() -> None:
    """
    When every host greets with 421, the outcome is a pushback on sessions (deferred), not an unreachable
    destination.
    """
    s = Scripted({"a": b"421 4.7.0 too many sessions\r\n", "b": b"421 4.7.0 busy\r\n"})
    outcome = run(s.deliverer(["a", "b"]), ("x@example.com",))
    assert outcome.pushback is Pushback.SESSIONS and outcome.unreachable is None
    assert outcome.pushback_reply == Reply(421, "4.7.0", "busy") and outcome.destination == "b [b]:25"
    assert [r.code for _, r in outcome.deferred] == [421]


def test_greeting_421_tries_next_host() -> None:
    """When the first host greets with 421 and the second is up, the second gets the message, with no pushback."""
    s = Scripted(
        {
            "a": b"421 4.7.0 busy\r\n",
            "b": b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n250 ok\r\n",
        }
    )
    outcome = run(s.deliverer(["a", "b"]), ("x@example.com",))
    assert outcome.delivered == ("x@example.com",) and outcome.pushback is None


def test_451_to_mail_and_to_the_message_are_pushbacks() -> None:
    """When MAIL or the end of DATA gets 451, the recipients are deferred (never failed) and the rate is pushed back."""
    at_mail = Scripted({"a": b"220 d\r\n" + EHLO_PLAIN + b"451 4.7.1 slow down\r\n250 ok\r\n"})
    outcome = run(at_mail.deliverer(["a"]), ("x@example.com",))
    assert outcome.pushback is Pushback.RATE and outcome.failed == () and len(outcome.deferred) == 1
    at_data = Scripted(
        {"a": b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n250 ok\r\n354 go\r\n451 4.3.0 later\r\n250 ok\r\n"}
    )
    outcome = run(at_data.deliverer(["a"]), ("x@example.com",))
    assert outcome.pushback is Pushback.RATE and outcome.pushback_reply == Reply(451, "4.3.0", "later")
    assert outcome.failed == () and outcome.deferred == (("x@example.com", Reply(451, "4.3.0", "later")),)


def test_rcpt_451_is_not_a_pushback() -> None:
    """
    When one recipient gets 451 (greylisting, a full mailbox), it is deferred as before and the pace is left
    alone.
    """
    s = Scripted({"a": b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n451 4.7.1 greylisted\r\n250 ok\r\n"})
    outcome = run(s.deliverer(["a"]), ("x@example.com",))
    assert outcome.pushback is None and outcome.deferred[0][1].code == 451


def test_ehlo_refused_falls_back_to_helo() -> None:
    """When EHLO gets 502, HELO is tried and the delivery goes on."""
    s = Scripted({"a": b"220 d\r\n502 no\r\n250 d\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n"})
    outcome = run(s.deliverer(["a"]), ("x@example.com",))
    assert outcome.delivered == ("x@example.com",)
    assert b"HELO mx2.example.net\r\n" in s.transports["a"].value()


def test_reply_timeout_is_unreachable() -> None:
    """When the destination goes silent, the read times out, the connection is aborted and the host counts as down."""
    s = Scripted({"a": b"220 d\r\n"})
    result = Deferred.fromCoroutine(s.deliverer(["a"]).deliver("example.com", "b@s.test", ("x@example.com",), b"x"))
    outcomes: list[Outcome] = []
    result.addCallback(outcomes.append)
    assert not outcomes
    s.clock.advance(61)
    transport = s.transports["a"]
    assert transport.disconnecting or getattr(transport, "disconnected", False)
    assert outcomes and outcomes[0].unreachable is not None and "no reply within 60s" in outcomes[0].unreachable


def test_dot_stuffing_and_reply_parsing() -> None:
    """When a body has leading dots or no final CRLF, it is stuffed and terminated; replies parse with status codes."""
    assert dot_stuff(b".a\r\n..b\r\nc") == b"..a\r\n...b\r\nc\r\n.\r\n"
    assert parse_reply([b"250-first", b"250 2.0.0 last"]) == Reply(250, "2.0.0", "first\nlast")
    assert parse_reply([b"550 no status"]) == Reply(550, "", "no status")


lookups: list[str] = []


def _table(records: list[tuple[int, str]], own: set[str], clock: Clock | None = None) -> RouteTable:
    async def lookup(domain: str) -> tuple[list[tuple[int, str]], float]:
        lookups.append(domain)
        return records, 300.0

    return RouteTable(
        {"fixed.test": (SMTPRoute("a.test", 2525), SMTPRoute("b.test", 25)), "mx.test": (MXRoute(),)},
        lookup_mx=lookup,
        own_names=frozenset(own),
        shuffle=random.Random(3).shuffle,
        clock=clock,
    )


def _targets(table: RouteTable, domain: str) -> list[tuple[str, int]] | Exception:
    result: list[list[tuple[str, int]] | Exception] = []
    Deferred.fromCoroutine(table.targets(domain)).addCallbacks(
        lambda targets: result.append([(t.address, t.port) for t in targets]), lambda f: result.append(f.value)
    )
    return result[0]


def test_routes_fixed_and_mx_below_our_preference() -> None:
    """When this node is MX 20, delivery goes to the MX 10 hosts only, never to itself or another 20/30."""
    table = _table(
        [(20, "mx2.example.net."), (10, "primary.mx.test."), (30, "mx3.test"), (20, "peer.test")], {"mx2.example.net"}
    )
    assert _targets(table, "fixed.test") == [("a.test", 2525), ("b.test", 25)]
    assert _targets(table, "mx.test") == [("primary.mx.test", 25)]


def test_run_time_route_is_read_once_a_second() -> None:
    """
    When a domain has a run-time route (a cutover), deliveries within a second use it as last read, and the
    first delivery after that second reads it again: a re-route applies within a second, at one read a second.
    """
    clock = Clock()
    stored: dict[str, tuple[str, ...]] = {"fixed.test": ("smtp://new.test:2526",)}
    reads: list[str] = []

    async def override(domain: str) -> tuple[str, ...] | None:
        reads.append(domain)
        return stored.get(domain)

    table = RouteTable(
        {"fixed.test": (SMTPRoute("a.test", 2525),)},
        lookup_mx=lambda domain: Deferred(),
        own_names=frozenset(),
        shuffle=random.Random(3).shuffle,
        overrides=override,
        clock=clock,
    )
    for _ in range(50):
        assert _targets(table, "fixed.test") == [("new.test", 2526)]
    assert reads == ["fixed.test"]
    del stored["fixed.test"]
    clock.advance(0.5)
    assert _targets(table, "fixed.test") == [("new.test", 2526)]
    clock.advance(0.6)
    assert _targets(table, "fixed.test") == [("a.test", 2525)]
    assert _targets(table, "fixed.test") == [("a.test", 2525)]
    assert reads == ["fixed.test", "fixed.test"]


def test_routes_we_are_best_mx() -> None:
    """When this node is the most preferred MX, the mail is undeliverable (5.4.4, RFC 5321 5.1), not looped to us."""
    table = _table([(10, "mx2.example.net")], {"mx2.example.net"})
    error = _targets(table, "mx.test")
    assert isinstance(error, Undeliverable) and error.reply.status == "5.4.4"


def test_routes_implicit_mx() -> None:
    """When a domain has no MX records, its own name is the destination (RFC 5321 5.1)."""
    assert _targets(_table([], set()), "mx.test") == [("mx.test", 25)]


def _verify(replies: bytes, down: Sequence[str] = ()) -> tuple[bool | None, bytes]:
    s = Scripted({"a": replies}, down=down)
    result: list[bool | None] = []
    Deferred.fromCoroutine(s.deliverer(["a"]).verify("example.com", "x@example.com", 10)).addCallback(result.append)
    assert result, "callout did not complete"
    return result[0], s.transports["a"].value() if "a" in s.transports else b""


def test_callout_answers() -> None:
    """When asked about a recipient, the callout says yes to 250, no to 550, and does not know on 450 or when down."""
    known, sent = _verify(b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n250 ok\r\n221 bye\r\n")
    assert known is True
    assert b"MAIL FROM:<>\r\nRCPT TO:<x@example.com>\r\nQUIT\r\n" in sent and b"DATA" not in sent
    assert _verify(b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n550 5.1.1 unknown\r\n221 bye\r\n")[0] is False
    assert _verify(b"220 d\r\n" + EHLO_PLAIN + b"250 ok\r\n450 4.2.0 later\r\n221 bye\r\n")[0] is None
    assert _verify(b"", down=["a"])[0] is None


def test_mx_records_cached_for_their_ttl() -> None:
    """When MX records were looked up, they are reused until their TTL runs out, then looked up again."""
    clock = Clock()
    table = _table([(10, "primary.mx.test")], set(), clock)
    del lookups[:]
    _targets(table, "mx.test")
    clock.advance(299)
    _targets(table, "mx.test")
    assert lookups == ["mx.test"]
    clock.advance(2)
    _targets(table, "mx.test")
    assert lookups == ["mx.test", "mx.test"]


def test_session_reused_for_the_next_message() -> None:
    """
    When two messages go to the same host in turn, the second uses the first's session, with no RSET between:
    the reply to the first's data ended its transaction.
    """
    one = b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n"
    s = Scripted({"a": b"220 d\r\n" + EHLO_PIPELINING + one + one})
    d = s.deliverer(["a"])
    assert run(d, ("x@example.com",)).delivered == ("x@example.com",)
    assert run(d, ("y@example.com",)).delivered == ("y@example.com",)
    assert s.connections == 1
    sent = s.transports["a"].value()
    assert sent.count(b"EHLO") == 1 and sent.count(b"RSET") == 0
    # an idle session is ended after its time
    s.clock.advance(3)
    assert s.transports["a"].value().endswith(b"QUIT\r\n")


def test_session_reset_after_a_transaction_without_data() -> None:
    """
    When every recipient of a message is refused, the session is reset (RSET) before it carries the next
    message: MAIL was accepted and no reply to data ended that transaction.
    """
    refused = b"250 ok\r\n550 5.1.1 no such user\r\n503 5.5.1 no valid recipients\r\n250 reset\r\n"
    one = b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n"
    s = Scripted({"a": b"220 d\r\n" + EHLO_PIPELINING + refused + one})
    d = s.deliverer(["a"])
    assert run(d, ("x@example.com",)).failed[0][0] == "x@example.com"
    assert run(d, ("y@example.com",)).delivered == ("y@example.com",)
    sent = s.transports["a"].value()
    assert s.connections == 1 and sent.count(b"RSET") == 1
    assert sent.index(b"RSET") < sent.rindex(b"MAIL FROM")


def test_closed_kept_session_is_not_a_failure() -> None:
    """When the host closed the kept session meanwhile, the next message opens a new one and goes through."""
    one = b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n"
    s = Scripted({"a": b"220 d\r\n" + EHLO_PIPELINING + one})
    d = s.deliverer(["a"])
    run(d, ("x@example.com",))
    s.protocols["a"].connectionLost(Failure(ConnectionDone()))
    s.replies["a"] = b"220 d\r\n" + EHLO_PIPELINING + one
    assert run(d, ("y@example.com",)).delivered == ("y@example.com",)
    assert s.connections == 2


def test_reset_lost_keeps_the_outcome() -> None:
    """
    When every recipient is refused and the session is lost while it is reset for reuse, the refusals
    still stand: the recipients fail, the destination is not taken for unreachable.
    """
    refused = b"250 ok\r\n550 5.1.1 no such user\r\n503 5.5.1 no valid recipients\r\n"
    s = Scripted({"a": b"220 d\r\n" + EHLO_PIPELINING + refused})
    outcomes: list[Outcome] = []
    d = s.deliverer(["a"])
    Deferred.fromCoroutine(d.deliver("example.com", "b@sender.test", ("x@example.com",), b"x")).addCallback(
        outcomes.append
    )
    assert outcomes == [] and s.transports["a"].value().endswith(b"RSET\r\n")
    s.protocols["a"].connectionLost(Failure(ConnectionDone()))
    assert [r for r, _ in outcomes[0].failed] == ["x@example.com"] and outcomes[0].unreachable is None


def test_kept_session_failing_after_its_answers_is_not_resent_at_once() -> None:
    """
    When a kept session answers a message's envelope and DATA, then never answers its data, the message is
    not sent again at once on a new session (the host may have taken it): the attempt ends unanswered.
    """
    one = b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n"
    s = Scripted({"a": b"220 d\r\n" + EHLO_PIPELINING + one + b"250 ok\r\n250 ok\r\n354 go\r\n"})
    d = s.deliverer(["a"])
    assert run(d, ("x@example.com",)).delivered == ("x@example.com",)
    outcomes: list[Outcome] = []
    Deferred.fromCoroutine(d.deliver("example.com", "b@sender.test", ("y@example.com",), b"y")).addCallback(
        outcomes.append
    )
    assert outcomes == []
    s.clock.advance(61)
    assert outcomes[0].unreachable and not outcomes[0].delivered
    assert s.connections == 1


def test_parallel_sessions_are_all_kept_for_reuse() -> None:
    """When six deliveries to one host run at once, all six sessions carry the next six messages: none is ended."""
    clock = Clock()
    one = b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n"
    opened: list[SMTPClientProtocol] = []

    async def connect(host: str, port: int) -> SMTPClientProtocol:
        protocol = SMTPClientProtocol(clock)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"220 d\r\n" + EHLO_PIPELINING)
        opened.append(protocol)
        return protocol

    async def targets(domain: str) -> list[Target]:
        return [Target("a", 25, "a", "none")]

    d = SMTPDeliverer(
        helo_name="mx2.example.net",
        targets=targets,
        connect=connect,
        timeouts=Timeouts(60, 60),
        clock=clock,
        idle_sessions=8,
    )
    for _ in range(2):
        outcomes: list[Outcome] = []
        for n in range(6):
            delivery = Deferred.fromCoroutine(d.deliver("example.com", "b@sender.test", (f"u{n}@example.com",), b"x"))
            delivery.addCallback(outcomes.append)
        for protocol in opened:
            protocol.dataReceived(one)
        assert len(outcomes) == 6 and all(o.delivered for o in outcomes)
    assert len(opened) == 6


def test_pipelined_421_to_mail_is_a_pushback() -> None:
    """
    When a pipelining host answers MAIL with 421 and closes the session, the outcome is a pushback on the rate,
    not an unreachable destination (the RCPT and DATA replies never come).
    """
    s = Scripted({"a": b"220 d\r\n" + EHLO_PIPELINING + b"421 4.7.0 rate limit exceeded\r\n"})
    result = Deferred.fromCoroutine(s.deliverer(["a"]).deliver("example.com", "b@s.test", ("x@example.com",), b"x"))
    outcomes: list[Outcome] = []
    result.addCallback(outcomes.append)
    s.protocols["a"].connectionLost(Failure(ConnectionDone()))
    assert outcomes and outcomes[0].pushback is Pushback.RATE and outcomes[0].unreachable is None
