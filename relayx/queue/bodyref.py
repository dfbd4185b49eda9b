"""
A message whose body is in a body store keeps, in its Redis hash's ``body``
field, a stub instead: a marker with the body's reference and size, nothing
more. What views and searches need from the header section (Message-ID and
Subject) is in fields of their own; the message view and DSNs read the header
section from the body store. So a queued message costs Redis a few dozen bytes
for its body whatever its headers, and its hash stays small enough for Redis's
compact encoding (``hash-max-listpack-value``, see relayx/redis/embedded.py).

The stub handed to enqueue.lua carries the size; the message's hash keeps only
the NUL and the reference (its ``size`` field has the size: common.lua's
stored_body). Stubs written before kept the marker and their size, and older
ones the header section after a CRLF; they still read (``BodyStub.size``,
``BodyStub.headers``). A stored body starts with relayx's trace header, never
with a NUL, so a hash written before body stores (or a DSN, kept in Redis
whole) reads as it always did.
"""

from __future__ import annotations

import attrs

from relayx.message import header_section

MARKER = b"\x00relayx-body "
#: the most of a header section an operator's view shows (a message that is
#: all header must not come back whole)
HEADERS_KEPT = 65536


@attrs.frozen
class BodyStub:
    ref: str
    #: 0 for a stub as the message's hash keeps it now (its ``size`` field has it)
    size: int
    #: the header section an older stub carried; empty in the stubs written now
    headers: bytes = attrs.field(default=b"", repr=False)


def make_stub(ref: str, body: bytes) -> bytes:
    if any(c in ref for c in " \r\n"):
        raise ValueError(f"a body reference without spaces or line breaks, got {ref!r}")
    return MARKER + f"{ref} {len(body)}".encode("ascii")


def kept_headers(body: bytes) -> bytes:
    """
    The header section of a body, at most ``HEADERS_KEPT`` bytes of it, whole lines.
    """
    headers = header_section(body)
    if len(headers) > HEADERS_KEPT:
        headers = headers[: headers.rfind(b"\r\n", 0, HEADERS_KEPT) + 2]
    return headers


def read_stub(stored: bytes) -> BodyStub | None:
    """
    The stub in a hash's ``body`` field, or ``None`` when it holds the body itself.
    """
    if not stored.startswith(MARKER):
        if stored.startswith(b"\x00"):
            # as enqueue_message stores a stub: a NUL and the reference (size: the "size" field)
            return BodyStub(stored[1:].decode("ascii", "replace"), 0)
        return None
    line, _, headers = stored.partition(b"\r\n")
    ref, _, size = line[len(MARKER) :].decode("ascii", "replace").partition(" ")
    return BodyStub(ref, int(size) if size.isdigit() else 0, headers)
