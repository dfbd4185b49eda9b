"""
What relayx reads of a message itself (RFC 5322), shared by the queue, the
operator views and the DSNs.
"""

from __future__ import annotations

import email.policy
from email.parser import BytesHeaderParser


def header_section(message: bytes) -> bytes:
    """
    The message's header section, ending in CRLF.
    """
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def search_fields(message: bytes) -> tuple[str, str]:
    """
    The header's Message-ID (lower case, without its angle brackets) and
    Subject (decoded, one line), each cut to 256 characters, for the queue's
    search; ``""`` for a field that is absent or cannot be read.
    """
    try:
        header = BytesHeaderParser(policy=email.policy.default).parsebytes(header_section(message))
        mid, subject = header.get("message-id", ""), header.get("subject", "")
    except Exception:  # a header the parser cannot read is not a reason to refuse mail
        return "", ""
    mid = str(mid).strip().strip("<>").strip().lower()
    subject = " ".join(str(subject).split())
    return mid[:256], subject[:256]
