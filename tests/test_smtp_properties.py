"""
Random command streams against the SMTP protocol (hypothesis): whatever a
client sends, the server neither crashes nor says 250 to DATA for a message
the store does not hold, nor accepts a recipient it does not serve.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from pathlib import Path
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


PIECES = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"x", b"yz", b"\0", b"Received: h\r\n", b"\r\n.\r"])


def unstuffed(stream: bytes) -> tuple[bytes, bytes]:
    """
    The message in a DATA stream and what follows it, found all at once.
    """
    buffer = b"\r\n" + stream
    end = buffer.find(b"\r\n.\r\n")
    return buffer[: end + 2].replace(b"\r\n.", b"\r\n")[2:], buffer[end + 5 :]


def stored_content(body: bytes) -> bytes:
    """
    A stored message without our Received: header (three lines).
    """
    return body.split(b"\r\n", 3)[3]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(PIECES, max_size=60),
    cuts=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8),
    threshold=st.sampled_from([0, 7, 10**6]),
    bdat=st.booleans(),
)
def test_streamed_message_is_the_message_read_whole(
    pieces: list[bytes], cuts: list[int], threshold: int, bdat: bool
) -> None:
    """When a message comes in any chunking, in memory or spooled, what is stored is what reading it whole gives."""
    from relayx.smtp.server import _BARE_LF, HOP_SCAN, count_hops
    from tests.test_smtp_limits import Node

    raw = b"".join(pieces)
    if bdat:
        content = raw
        stream = b"BDAT %d LAST\r\n" % len(raw) + raw + b"NOOP\r\n"
        after = b"NOOP\r\n"
    else:
        content, after = unstuffed(raw + b"\r\n.\r\nNOOP\r\n")
        stream = b"DATA\r\n" + raw + b"\r\n.\r\nNOOP\r\n"
    with tempfile.TemporaryDirectory() as directory:
        node = Node(Path(directory) / "spool", threshold=threshold)
        s = node.connect()
        s.transaction()
        output = ""
        position = 0
        for cut in itertools.cycle(cuts):
            if position >= len(stream) or s.transport.disconnecting:
                break
            output += s.send(stream[position : position + cut])
            position += cut
        assert node.spool_files() == [] and node.spool.in_memory == 0
    normal = _BARE_LF.sub(b"\r\n", content)
    if b"\0" in content:
        assert "554 5.6.0" in output
    elif count_hops(normal[:HOP_SCAN]) >= 5:
        assert "554 5.4.6" in output
    else:
        [message] = node.store.messages
        assert stored_content(message.body) == normal, output
    if after.startswith(b"NOOP"):
        assert output.endswith("250 2.0.0 Ok\r\n"), output
