"""
What one SMTP session may cost the node, driven over a StringTransport with a
Clock: large messages spooled to disk and always removed, the client paused
while its session waits, time limits that a trickle cannot reset, and
connection slots shared fairly between client addresses.
"""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from zope.interface import implementer

from relayx.checks.recipients import RecipientPolicy
from relayx.interfaces import IMessageStore, IncomingMessage, StoreUnavailable
from relayx.smtp.server import MAX_INPUT_WHILE_BUSY, Limits, SMTPServerFactory
from relayx.spool import Spool
from tests import test_smtp_server as smtp_server
from tests.helpers import logged_events
from tests.test_smtp_server import DOMAINS, Dialogue

LIMITS = attrs.evolve(
    smtp_server.LIMITS, max_message_size=10_000_000, data_timeout=1800, min_data_rate=500, data_rate_grace=30
)


@implementer(IMessageStore)
class GatedStore:
    """
    A store whose commits wait until the test opens the gate (or fails them).
    """

    def __init__(self) -> None:
        self.messages: list[IncomingMessage] = []
        self.waiting: list[Deferred[None]] = []
        self.gated = False
        self.unavailable = False

    async def enqueue(self, message: IncomingMessage) -> None:
        if self.gated:
            gate: Deferred[None] = Deferred()
            self.waiting.append(gate)
            await gate
        if self.unavailable:
            raise StoreUnavailable("store switched off by the test")
        self.messages.append(message)

    def open(self) -> None:
        waiting, self.waiting = self.waiting, []
        for gate in waiting:
            gate.callback(None)


class Node:
    """
    One factory, a clock, a spool and sessions from any address.
    """

    def __init__(self, spool_dir: Path, limits: Limits = LIMITS, threshold: int = 1000, read_back: int = 10**9) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = GatedStore()
        self.spool = Spool(spool_dir, threshold=threshold, read_back=read_back)
        self.spool.prepare()
        ids = itertools.count(1)
        self.factory = SMTPServerFactory(
            hostname="mx2.example.net",
            limits=limits,
            policy=RecipientPolicy(DOMAINS),
            store=self.store,
            clock=self.clock,
            new_queue_id=lambda: f"Q{next(ids)}",
            spool=self.spool,
        )

    def connect(self, ip: str = "192.0.2.7") -> Session:
        return Session(self, ip)

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.spool.directory.rglob("*") if p.is_file()) if self.spool.directory else []


class Session(Dialogue):
    def __init__(self, node: Node, ip: str) -> None:
        self.node = node
        super().__init__(node.factory, IPv4Address("TCP", ip, 40000))

    def lose(self) -> None:
        self.transport.loseConnection()
        self.protocol.connectionLost()


def body(size: int) -> bytes:
    line = b"x" * 70 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line))


# -- spooling -------------------------------------------------------------------


def test_large_message_spooled_private_and_removed(tmp_path: Path) -> None:
    """When a message grows past the threshold, it goes to a 0600 file in a 0700 spool, stored intact, then removed."""
    node = Node(tmp_path / "spool")
    s = node.connect()
    s.transaction()
    s.send("DATA\r\n")
    content = body(50_000) + b"..dot-stuffed\r\n"
    for start in range(0, len(content), 4096):
        assert s.send(content[start : start + 4096]) == ""
    [file] = node.spool_files()
    assert stat.S_IMODE(os.stat(node.spool.directory or "").st_mode) == 0o700
    assert stat.S_IMODE(file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert node.spool.in_memory == 0
    assert s.send(".\r\n").startswith("250 2.0.0")
    [message] = node.store.messages
    assert message.body.split(b"\r\n", 2)[2].endswith(content[:-15] + b".dot-stuffed\r\n")
    assert node.spool_files() == []
    assert node.spool.files == 0


def test_small_message_stays_in_memory(tmp_path: Path) -> None:
    """When a message stays under the threshold, no file is made and the memory it held is given back."""
    node = Node(tmp_path / "spool")
    s = node.connect()
    s.transaction()
    s.send("DATA\r\n")
    s.send(b"Subject: small\r\n\r\nhi\r\n")
    assert node.spool_files() == [] and node.spool.in_memory > 0
    assert s.send(".\r\n").startswith("250 2.0.0")
    assert node.spool.in_memory == 0


def test_memory_budget_spills_small_messages(tmp_path: Path) -> None:
    """When the messages held in memory by all sessions pass the spool's budget, the next one is spooled."""
    node = Node(tmp_path / "spool", threshold=10_000)
    node.spool.memory = 1500
    first, second = node.connect("192.0.2.1"), node.connect("192.0.2.2")
    for s in (first, second):
        s.transaction()
        s.send("DATA\r\n")
        s.send(body(900))
    assert len(node.spool_files()) == 1
    assert first.send(".\r\n").startswith("250") and second.send(".\r\n").startswith("250")
    assert node.spool_files() == [] and node.spool.in_memory == 0


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param("451", id="store-unavailable-451"),
        pytest.param("554", id="nul-554"),
        pytest.param("552", id="too-big-552"),
        pytest.param("disconnect", id="disconnect-mid-data"),
        pytest.param("disconnect-waiting", id="disconnect-while-stored"),
        pytest.param("timeout", id="timeout-mid-data"),
        pytest.param("bdat-rset", id="bdat-then-rset"),
        pytest.param("bdat-disconnect", id="bdat-then-disconnect"),
    ],
)
def test_spool_file_removed_on_every_path(tmp_path: Path, ending: str) -> None:
    """When a spooled message ends in any way (451, 5xx, disconnect, timeout, RSET), its file is removed."""
    node = Node(tmp_path / "spool", limits=attrs.evolve(LIMITS, max_message_size=20_000))
    s = node.connect()
    s.transaction()
    if ending.startswith("bdat"):
        s.send(b"BDAT 5000\r\n" + body(6000)[:5000])
        assert len(node.spool_files()) == 1
        if ending == "bdat-rset":
            assert s.send("RSET\r\n").startswith("250")
        else:
            s.lose()
    else:
        s.send("DATA\r\n")
        s.send(body(5000))
        assert len(node.spool_files()) == 1
        if ending == "451":
            node.store.unavailable = True
            assert s.send(".\r\n").startswith("451 4.3.0")
        elif ending == "554":
            assert s.send(b"\0\r\n.\r\n").startswith("554 5.6.0")
        elif ending == "552":
            s.send(body(30_000))
            assert node.spool_files() == []
            assert s.send(".\r\n").startswith("552 5.3.4")
        elif ending == "disconnect":
            s.lose()
        elif ending == "disconnect-waiting":
            node.store.gated = True
            s.send(".\r\n")
            s.lose()
            node.store.open()
        else:
            node.clock.advance(2000)
            assert s.take().startswith("421 4.4.2")
    assert node.spool_files() == []
    assert node.spool.files == 0 and node.spool.in_memory == 0


def test_client_gone_while_waiting_is_not_stored(tmp_path: Path) -> None:
    """When the client disconnects while its message waits for its turn, the message is not stored (no duplicate)."""
    node = Node(tmp_path / "spool", read_back=10)
    first, second = node.connect("192.0.2.1"), node.connect("192.0.2.2")
    node.store.gated = True
    for s in (first, second):
        s.transaction()
        s.send("DATA\r\n")
        s.send(body(5000))
        s.send(".\r\n")
    # one spooled message is read back at a time: the second waits its turn
    assert len(node.store.waiting) == 1 and node.spool.reading > 0
    second.lose()
    node.store.open()
    assert first.take().startswith("250 2.0.0")
    assert [m.queue_id for m in node.store.messages] == ["Q1"]
    assert node.spool_files() == [] and node.spool.reading == 0


def test_read_back_a_few_at_a_time(tmp_path: Path) -> None:
    """When many spooled messages end at once, they are read back into memory within the budget, in turn."""
    node = Node(tmp_path / "spool", read_back=12_000)
    node.store.gated = True
    sessions = [node.connect(f"192.0.2.{n}") for n in range(1, 5)]
    for s in sessions:
        s.transaction()
        s.send("DATA\r\n")
        s.send(body(5000))
        s.send(".\r\n")
    assert len(node.store.waiting) == 2
    for _ in range(2):
        node.store.open()
    assert [s.take()[:3] for s in sessions] == ["250"] * 4
    assert node.spool.reading == 0 and node.spool_files() == []


def test_prepare_clears_what_dead_processes_left(tmp_path: Path) -> None:
    """When the spool is prepared, files of this process's earlier run and of dead processes go; live ones stay."""
    base = tmp_path / "spool"
    gone, alive = base / "999999999", base / str(os.getppid())
    for folder in (gone, alive, base / str(os.getpid())):
        folder.mkdir(parents=True)
        (folder / "msg-left").write_bytes(b"x")
    Spool(base).prepare()
    assert sorted(str(p.relative_to(base)) for p in base.rglob("*")) == sorted(
        [str(os.getpid()), str(os.getppid()), f"{os.getppid()}/msg-left"]
    )


# -- back-pressure ----------------------------------------------------------------


def test_client_paused_while_store_waits(tmp_path: Path) -> None:
    """When a session waits for the store, its client is paused; pipelined input waits and is read after."""
    node = Node(tmp_path / "spool")
    node.store.gated = True
    s = node.connect()
    s.transaction()
    s.send("DATA\r\n")
    assert s.send(b"Subject: x\r\n\r\nhi\r\n.\r\nNOOP\r\n") == ""
    assert s.transport.producerState == "paused"
    node.store.open()
    assert s.take() == "250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok\r\n"
    assert s.transport.producerState == "producing"


def test_client_read_on_while_a_quiet_wait_lasts(tmp_path: Path) -> None:
    """When a session waits for the store with no input waiting, its client is not paused until input comes."""
    node = Node(tmp_path / "spool")
    node.store.gated = True
    s = node.connect()
    s.transaction()
    s.send("DATA\r\n")
    assert s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n") == ""
    assert s.transport.producerState == "producing"
    assert s.send(b"NOOP\r\n") == ""
    assert s.transport.producerState == "paused"
    node.store.open()
    assert s.take() == "250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok\r\n"
    assert s.transport.producerState == "producing"


def test_session_line_of_a_client_gone_during_commit(tmp_path: Path) -> None:
    """When a client leaves while its message is committed, the session's line comes after the commit, with its id."""
    with logged_events() as events:
        node = Node(tmp_path / "spool")
        node.store.gated = True
        s = node.connect()
        s.transaction()
        s.send("DATA\r\n")
        s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        s.lose()
        assert not [e for e in events if "queue_ids" in e]
        node.store.open()
        [line] = [e for e in events if "queue_ids" in e]
        assert (line["count"], line["queue_ids"]) == (1, "Q1")
        assert [m.queue_id for m in node.store.messages] == ["Q1"]
        assert s.take() == ""


def test_session_closed_by_the_node_during_commit_logged_at_once(tmp_path: Path) -> None:
    """When the node itself closes a session that waits (shutdown past its grace), its line is logged at once."""
    with logged_events() as events:
        node = Node(tmp_path / "spool")
        node.store.gated = True
        s = node.connect()
        s.transaction()
        s.send("DATA\r\n")
        s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        assert s.protocol.shut_down(force=True)
        s.protocol.connectionLost()
        [line] = [e for e in events if "queue_ids" in e]
        assert (line["count"], line["code"]) == (0, 421)


def test_input_while_paused_is_bounded(tmp_path: Path) -> None:
    """When a client somehow keeps sending while its session is paused, past the bound it gets 421 and is closed."""
    node = Node(tmp_path / "spool")
    node.store.gated = True
    s = node.connect()
    s.transaction()
    s.send("DATA\r\nx\r\n.\r\n")
    chunk = b"NOOP\r\n" * 10_000
    for _ in range(MAX_INPUT_WHILE_BUSY // len(chunk)):
        assert s.send(chunk) == ""
    assert s.send(chunk).startswith("421 4.7.0")
    assert s.transport.disconnecting


# -- time limits --------------------------------------------------------------------


def test_command_line_trickle_times_out(tmp_path: Path) -> None:
    """When a command line trickles in a byte at a time, the bytes do not reset its time: 421 4.4.2 at 300 s."""
    node = Node(tmp_path / "spool")
    s = node.connect()
    for byte in b"EHLO slowloris" + b"x" * 100:
        assert s.send(bytes([byte])) == ""
        node.clock.advance(15)
        if s.transport.disconnecting:
            break
    assert node.clock.seconds() - 1_700_000_000 <= 300
    assert s.take().startswith("421 4.4.2 mx2.example.net Error: timeout exceeded")


def test_each_command_line_gets_its_own_time(tmp_path: Path) -> None:
    """When a client sends whole commands with pauses under the limit, the session goes on."""
    node = Node(tmp_path / "spool")
    s = node.connect()
    for _ in range(5):
        node.clock.advance(250)
        assert s.send("NOOP\r\n").startswith("250")
    assert not s.transport.disconnecting


def test_data_below_minimum_rate_closed_after_grace(tmp_path: Path) -> None:
    """When DATA trickles slower than min_data_rate, the session gets 421 once the grace has passed."""
    node = Node(tmp_path / "spool")
    s = node.connect()
    s.transaction()
    s.send("DATA\r\n")
    for _ in range(14):
        s.send(b"x" * 100)
        node.clock.advance(2)
    assert not s.transport.disconnecting
    for _ in range(20):
        s.send(b"x" * 100)
        node.clock.advance(2)
        if s.transport.disconnecting:
            break
    assert s.take().startswith("421 4.4.2 mx2.example.net Error: data transfer too slow")
    assert node.clock.seconds() - 1_700_000_000 < 60
    assert node.spool_files() == []


def test_data_total_time_not_reset_by_a_steady_flow(tmp_path: Path) -> None:
    """When DATA keeps coming above the minimum rate but takes longer than data_timeout in all, it is closed."""
    limits = attrs.evolve(LIMITS, data_timeout=600)
    node = Node(tmp_path / "spool", limits=limits)
    s = node.connect()
    s.transaction()
    s.send("DATA\r\n")
    for _ in range(59):
        s.send((b"y" * 998 + b"\r\n") * 10)
        node.clock.advance(10)
    assert not s.transport.disconnecting
    s.send((b"y" * 998 + b"\r\n") * 10)
    node.clock.advance(11)
    assert s.take().startswith("421 4.4.2 mx2.example.net Error: timeout exceeded")


def test_bdat_chunks_share_one_clock(tmp_path: Path) -> None:
    """When a message comes in many small BDAT chunks slower than the minimum rate, the transaction is closed."""
    node = Node(tmp_path / "spool")
    s = node.connect()
    s.transaction()
    for _ in range(30):
        if s.transport.disconnecting:
            break
        s.send(b"BDAT 10\r\n0123456789")
        node.clock.advance(5)
    assert "421 4.4.2 mx2.example.net Error: data transfer too slow" in s.take()


def test_fast_message_after_slow_commands(tmp_path: Path) -> None:
    """When a client is slow between commands but sends its message quickly, it is accepted."""
    node = Node(tmp_path / "spool")
    s = node.connect()
    s.transaction()
    node.clock.advance(200)
    s.send("DATA\r\n")
    node.clock.advance(1)
    assert s.send(body(2000) + b".\r\n").startswith("250 2.0.0")
    node.clock.advance(200)
    assert s.send("QUIT\r\n").startswith("221")


# -- connection slots -----------------------------------------------------------------


def test_full_house_makes_room_for_another_address(tmp_path: Path) -> None:
    """When a few addresses take every slot, a client from another address gets in and the busiest loses its oldest."""
    limits = attrs.evolve(LIMITS, max_connections=6, max_connections_per_ip=4)
    node = Node(tmp_path / "spool", limits=limits)
    crowd = []
    for ip in ["198.51.100.1"] * 4 + ["198.51.100.2"] * 2:
        crowd.append(node.connect(ip))
        node.clock.advance(1)
    assert all(s.banner.startswith("220") for s in crowd)
    newcomer = node.connect("192.0.2.99")
    assert newcomer.banner.startswith("220")
    assert crowd[0].take().startswith("421 4.7.0")
    assert crowd[0].transport.disconnecting
    assert sum(s.transport.disconnecting for s in crowd) == 1
    # the busiest address now holds 3, the other 2: another from it is refused
    again = node.connect("198.51.100.2")
    assert again.banner.startswith("421 4.7.0 mx2.example.net Error: too many connections")
    newcomer.transaction()
    newcomer.send("DATA\r\n")
    assert newcomer.send(b"hi\r\n.\r\n").startswith("250 2.0.0")


def test_per_address_cap_holds(tmp_path: Path) -> None:
    """When one address opens more sessions than max_connections_per_ip, the extra ones get 421 4.7.0."""
    limits = attrs.evolve(LIMITS, max_connections_per_ip=2)
    node = Node(tmp_path / "spool", limits=limits)
    banners = [node.connect("198.51.100.1").banner[:9] for _ in range(3)]
    assert banners == ["220 mx2.e", "220 mx2.e", "421 4.7.0"]


def test_a_long_session_logs_its_queue_ids_as_it_goes(tmp_path: Path) -> None:
    """
    When one session queues 250 messages, its queue ids are logged 100 to a line as it goes and the rest with
    its end: neither a line nor what the session keeps grows with it, and every id is logged once.
    """
    with logged_events() as events:
        node = Node(tmp_path / "spool")
        s = node.connect()
        for _ in range(250):
            s.transaction()
            s.send("DATA\r\n")
            assert s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").startswith("250 2.0.0")
        assert len(s.protocol.session.queued) == 50
        s.lose()
        lines = [e for e in events if "queue_ids" in e]
    assert [len(e["queue_ids"].split()) for e in lines] == [100, 100, 50]
    assert lines[-1]["count"] == 250 and "earlier ones logged before" in formatEvent(lines[-1])
    assert " ".join(e["queue_ids"] for e in lines).split() == [f"Q{n}" for n in range(1, 251)]
