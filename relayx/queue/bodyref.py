"""
A message whose body is in a body store keeps, in its Redis hash's ``body``
field, a stub instead: one marker line with the body's reference and size,
then the body's header section (for the message view, searches and DSNs,
which need no more). A body never starts with the marker's NUL byte, so a
hash written before body stores (or a DSN, kept in Redis whole) reads as it
always did.
"""

from __future__ import annotations

import attrs

from relayx.message import header_section

MARKER = b"\x00relayx-body "
#: the most of a header section a stub keeps (a message that is all header
#: must not bring its whole body back into Redis)
HEADERS_KEPT = 65536


@attrs.frozen
class BodyStub:
    ref: str
    size: int
    headers: bytes = attrs.field(repr=False)


def make_stub(ref: str, body: bytes) -> bytes:
    if any(c in ref for c in " \r\n"):
        raise ValueError(f"a body reference without spaces or line breaks, got {ref!r}")
    headers = header_section(body)
    if len(headers) > HEADERS_KEPT:
        headers = headers[: headers.rfind(b"\r\n", 0, HEADERS_KEPT) + 2]
    return MARKER + f"{ref} {len(body)}".encode("ascii") + b"\r\n" + headers


def read_stub(stored: bytes) -> BodyStub | None:
    """
    The stub in a hash's ``body`` field, or ``None`` when it holds the body itself.
    """
    if not stored.startswith(MARKER):
        return None
    line, _, headers = stored.partition(b"\r\n")
    ref, _, size = line[len(MARKER) :].decode("ascii", "replace").partition(" ")
    return BodyStub(ref, int(size) if size.isdigit() else 0, headers)
