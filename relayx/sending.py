"""
Writing to a connection at once.

A Twisted TCP transport does not send what it is given: ``write`` buffers
the bytes and asks the reactor to watch the socket for writability, and the
next turn of the reactor sends them and stops watching it. For a short reply
to a client that is waiting for it (an SMTP server's reply) that is
two ``epoll_ctl`` calls, one more turn of the reactor and its dispatch per
write, which with a connection per message was more than the send itself.

``send_now`` sends at once when the transport has nothing buffered (so
nothing can be overtaken) and is a plain socket; whatever the kernel does
not take, and every other case (TLS, a buffer not yet flushed, a transport
without a socket such as a test's ``StringTransport``), goes through
``write`` as before. An error of the socket is left for the transport to
find on its own ``write``, so a connection ends the same way either way.
"""

from __future__ import annotations

from typing import Any


def send_now(transport: Any, data: bytes) -> None:
    """
    Send ``data`` on ``transport`` now if it can be done without reordering
    anything, else (or for the rest) ``transport.write(data)``.
    """
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or getattr(transport, "TLS", True)
        or not getattr(transport, "connected", False)
        or getattr(transport, "disconnecting", True)
        or getattr(transport, "_writeDisconnected", True)
        or getattr(transport, "_tempDataBuffer", True)
        or len(getattr(transport, "dataBuffer", b"x")) > getattr(transport, "offset", -1)
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except OSError:
        # EAGAIN (the kernel's buffer is full) or an error the transport will
        # find itself and end the connection for
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)
