"""
What relayx reads of a message itself (RFC 5322), shared by the queue, the
operator views and the DSNs.
"""

from __future__ import annotations

import email.header
import re


def header_section(message: bytes) -> bytes:
    """
    The message's header section, ending in CRLF.
    """
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


#: the Message-ID and Subject fields of a header section, folded lines included
_SEARCHED = re.compile(rb"^(message-id|subject)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)


def search_fields(message: bytes) -> tuple[str, str]:
    """
    The header's Message-ID (lower case, without its angle brackets) and
    Subject (decoded, one line), each cut to 256 characters, for the queue's
    search; ``""`` for a field that is absent or cannot be read.

    A regular expression over the header section, not the ``email``
    package's parser: this runs for every accepted message, and only an
    encoded Subject (RFC 2047) needs decoding.
    """
    mid = subject = None
    for match in _SEARCHED.finditer(header_section(message), 0, 65536):
        value = match.group(2)
        if match.group(1).lower() == b"message-id":
            if mid is None:
                mid = value
        elif subject is None:
            subject = value
    return _message_id(mid), _subject(subject)


def _message_id(raw: bytes | None) -> str:
    if raw is None:
        return ""
    text = " ".join(raw.decode("utf-8", "replace").split())
    return text.strip().strip("<>").strip().lower()[:256]


def _subject(raw: bytes | None) -> str:
    if raw is None:
        return ""
    text = raw.decode("utf-8", "replace")
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except Exception:  # a malformed encoded word is searched as it stands
            pass
    return " ".join(text.split())[:256]


_CFWS = re.compile(rb"^(\s|\((?:[^()\\]|\\.)*\))*")


def authserv_id(value: bytes) -> str:
    """
    The authserv-id of an ``Authentication-Results`` field's value (RFC 8601
    2.2): its first token, after any comments, lower-cased.
    """
    rest = value[_CFWS.match(value).end() :]  # type: ignore[union-attr]
    token = re.match(rb'^("(?:[^"\\]|\\.)*"|[^\s;()]+)', rest)
    return token.group(1).strip(b'"').decode("utf-8", "replace").lower() if token else ""


def strip_authentication_results(message: bytes, authserv: str) -> bytes:
    """
    The message without the ``Authentication-Results`` fields of its header
    section that claim to come from ``authserv`` (RFC 8601 section 5: a
    receiver must remove them before adding its own, or a sender could
    forge a pass the primary trusts).
    """
    head = header_section(message)
    if b"authentication-results" not in head.lower():
        return message
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    wanted = authserv.lower()
    kept = []
    for field in fields:
        name, colon, value = field.partition(b":")
        if colon and name.strip().lower() == b"authentication-results" and authserv_id(value) == wanted:
            continue
        kept.append(field)
    return b"".join(kept) + message[len(head) :]
