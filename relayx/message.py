"""
What relayx reads of a message itself (RFC 5322), shared by the queue, the
operator views and the DSNs.
"""

from __future__ import annotations


def header_section(message: bytes) -> bytes:
    """
    The message's header section, ending in CRLF.
    """
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]
