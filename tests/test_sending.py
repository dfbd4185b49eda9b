"""
Writing to a connection at once (relayx.sending), against a transport that
records what its socket sent and what was left to ``write``.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from relayx.sending import send_now


class Socket:
    """
    A socket that takes at most ``room`` bytes per send, or raises ``error``.
    """

    def __init__(self, room: int = 1 << 20, error: OSError | None = None) -> None:
        self.room = room
        self.error = error
        self.sent = b""

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = data[: self.room]
        self.sent += taken
        return len(taken)


class Transport:
    """
    The parts of a Twisted TCP transport ``send_now`` looks at.
    """

    TLS = False
    connected = 1
    disconnecting = 0
    _writeDisconnected = False
    dataBuffer = b""
    offset = 0

    def __init__(self, sock: Socket | None) -> None:
        self.socket = sock
        self._tempDataBuffer: list[bytes] = []
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def test_sent_at_once_when_nothing_is_buffered() -> None:
    """When the transport holds nothing, the bytes go to the socket and nothing is buffered."""
    t = Transport(Socket())
    send_now(t, b"250 Ok\r\n")
    assert t.socket is not None and t.socket.sent == b"250 Ok\r\n"
    assert t.written == b""


def test_rest_of_a_partial_send_is_written() -> None:
    """When the kernel takes only part, the rest goes through the transport's buffer."""
    sock = Socket(room=3)
    t = Transport(sock)
    send_now(t, b"250 Ok\r\n")
    assert (sock.sent, t.written) == (b"250", b" Ok\r\n")


def test_buffered_bytes_are_never_overtaken() -> None:
    """When the transport still holds bytes, new ones queue behind them."""
    sock = Socket()
    t = Transport(sock)
    t._tempDataBuffer.append(b"earlier")
    send_now(t, b"later")
    assert (sock.sent, t.written) == (b"", b"later")
    t._tempDataBuffer.clear()
    t.dataBuffer, t.offset = b"earlier", 3
    send_now(t, b"later")
    assert (sock.sent, t.written) == (b"", b"laterlater")


def test_tls_closing_and_socketless_transports_write() -> None:
    """When the transport is TLS, closing, or has no socket (a test's), it writes as before."""
    for change in ({"TLS": True}, {"disconnecting": 1}, {"connected": 0}, {"_writeDisconnected": True}):
        sock = Socket()
        t = Transport(sock)
        for name, value in change.items():
            setattr(t, name, value)
        send_now(t, b"x")
        assert (sock.sent, t.written) == (b"", b"x"), change
    t = Transport(None)
    send_now(t, b"x")
    assert t.written == b"x"


def test_socket_errors_are_left_to_the_transport() -> None:
    """When the socket refuses (full, or reset), the bytes go to write, which finds the error itself."""
    for error in (BlockingIOError(errno.EAGAIN, "full"), ConnectionResetError(errno.ECONNRESET, "reset")):
        t = Transport(Socket(error=error))
        send_now(t, b"250 Ok\r\n")
        assert t.written == b"250 Ok\r\n"


class Echo(Protocol):
    """
    Sends back what it reads, its first byte on its own.
    """

    def dataReceived(self, data: bytes) -> None:
        for piece in (data[:1], data[1:]):
            send_now(self.transport, piece)


class OverLoopback(TestCase):
    def test_real_connection_in_order(self) -> Deferred[None]:
        """When a real TCP transport is used, everything sent at once or written arrives once and in order."""
        tcp: Any = reactor
        port = tcp.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=60) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
                return got

        d: Deferred[bytes] = deferToThread(talk)
        return d.addCallback(lambda got: self.assertEqual(got, payload))
