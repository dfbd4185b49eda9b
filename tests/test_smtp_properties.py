"""
Random command streams against the SMTP protocol (hypothesis): whatever a
client sends, the server neither crashes nor says 250 to DATA for a message
the store does not hold, nor accepts a recipient it does not serve.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

from tests.test_smtp_server import Harness

ADDRESSES = st.sampled_from(
    [
        "<a@example.com>",
        "<alice@listed.test>",
        "<bob@listed.test>",
        "<x@other.test>",
        "<>",
        "<@relay.test:a@example.com>",
        "<no-at>",
        "a@example.com",
        "<a@example.com",
        '<"quoted local"@example.com>',
        "<jörg@example.com>",
        "<a@[127.0.0.1]>",
    ]
)
PARAMS = st.sampled_from(["", " SIZE=10", " SIZE=999999", " BODY=8BITMIME", " SMTPUTF8", " FOO=1", " SIZE="])
BODIES = st.lists(
    st.sampled_from(["Subject: x", "", ".", "..", ".dot", "x" * 300, "a\nb", "\0", "Received: y", "é"]),
    max_size=8,
).map(lambda lines: "\r\n".join(lines) + "\r\n.\r\n")

COMMANDS = st.one_of(
    st.sampled_from(["EHLO c.test", "HELO c.test", "EHLO", "RSET", "NOOP", "DATA", "QUIT", "VRFY a", "STARTTLS"]),
    st.sampled_from(["BDAT 5", "BDAT 7 LAST", "BDAT 0 LAST", "BDAT x", "BDAT 3 NOTLAST"]),
    st.builds(lambda a, p: f"MAIL FROM:{a}{p}", ADDRESSES, PARAMS),
    st.builds(lambda a: f"RCPT TO:{a}", ADDRESSES),
    st.text(max_size=40).map(lambda t: t.replace("\r", "").replace("\n", "")),
    st.just("X" * 700),
)
STEPS = st.lists(st.one_of(COMMANDS.map(lambda c: c + "\r\n"), BODIES), max_size=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, chunk=st.integers(min_value=1, max_value=64), outage=st.booleans())
def test_random_sessions_keep_the_promises(steps: list[str], chunk: int, outage: bool) -> None:
    """When a client sends any stream of commands in any chunking, no crash, no 250 without storage, no open relay."""
    failures: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        h = Harness()
        h.store.unavailable = outage
        data = "".join(steps).encode()
        output = ""
        for start in range(0, len(data), chunk):
            if h.transport.disconnecting:
                break
            output += h.send(data[start : start + chunk])
    finally:
        globalLogPublisher.removeObserver(observe)

    assert failures == []
    queued = re.findall(r"^250 2\.0\.0 Ok: queued as (\S+)", output, re.MULTILINE)
    assert queued == [m.queue_id for m in h.store.messages]
    for message in h.store.messages:
        for rcpt in message.recipients:
            assert rcpt.domain in ("example.com", "listed.test")
            if rcpt.domain == "listed.test":
                assert rcpt.canonical == "alice@listed.test"
    for line in output.splitlines():
        assert re.match(r"^\d{3}[ -]", line), line
        if line[0] in "45":
            assert re.match(r"^\d{3}[ -][45]\.\d{1,3}\.\d{1,3} ", line), f"no enhanced status code: {line}"
