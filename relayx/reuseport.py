"""
SMTP ports shared by the processes of one node: each process binds its own
socket to the same address with ``SO_REUSEPORT``, and the kernel spreads
new connections over them, so every core takes mail.

Only plain TCP endpoint descriptions (``tcp:PORT``, ``tcp6:PORT``, with
``interface`` and ``backlog``) can be shared; anything else stays with the
first process.
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory


@attrs.frozen
class TCPListen:
    """
    A parsed ``tcp:``/``tcp6:`` description.
    """

    family: socket.AddressFamily
    port: int
    interface: str
    backlog: int

    def description(self, port: int | None = None) -> str:
        """
        The Twisted description of this address, with ``port`` (the one a
        ``tcp:0`` got) instead of the configured one.
        """
        kind = "tcp6" if self.family == socket.AF_INET6 else "tcp"
        interface = self.interface.replace(":", "\\:")
        text = f"{kind}:{self.port if port is None else port}:backlog={self.backlog}"
        return f"{text}:interface={interface}" if interface else text


def _split(description: str) -> list[str]:
    """
    A description's fields: ``:`` separates them, ``\\:`` is a colon.
    """
    fields, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def parse_tcp(description: str) -> TCPListen | None:
    """
    The address of a plain TCP description, or ``None`` for any other kind
    (or options this module does not know, which stay with Twisted).
    """
    kind, *fields = _split(description)
    if kind not in ("tcp", "tcp6"):
        return None
    options: dict[str, str] = {}
    positional = ["port", "backlog", "interface"]
    for field in fields:
        key, sep, value = field.partition("=")
        if sep:
            options[key] = value
        elif positional:
            options[positional.pop(0)] = field
        else:
            return None
    if set(options) - {"port", "backlog", "interface"} or not options.get("port", "").isdigit():
        return None
    interface = options.get("interface", "")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    return TCPListen(family, int(options["port"]), interface, int(options.get("backlog", "50")))


def listen_shared(reactor: Any, address: TCPListen, factory: ServerFactory) -> IListeningPort:
    """
    Listen on ``address`` with ``SO_REUSEPORT`` (other processes of the node
    bind the same one) and hand the socket to the reactor.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            # as every relayx listener: tcp:25 and tcp6:25 side by side
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        host = address.interface or ("::" if address.family == socket.AF_INET6 else "")
        sock.bind((host, address.port))
        sock.listen(address.backlog)
        sock.setblocking(False)
        port: IListeningPort = reactor.adoptStreamPort(sock.fileno(), address.family, factory)
    finally:
        # the reactor has its own copy of the descriptor
        sock.close()
    return port
