"""
Delivery status notifications (RFC 3464): the bounce a sender gets when
relayx could not deliver, as ``multipart/report; report-type=delivery-status``.

The DSN carries the original message's header section, not its body: enough
to identify the message, without sending a large message back.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime

import attrs

from relayx.message import header_section


@attrs.frozen
class FailedRecipient:
    """
    One recipient that will not be delivered: the destination's reply
    (``code`` 0 when relayx gave up after the retention, without a final reply).
    """

    recipient: str
    code: int
    status: str
    text: str
    #: the sender's ORCPT for it (``addr-type;address``), for Original-Recipient
    orcpt: str | None = None


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """
    A destination's reply text on one line: a multi-line reply (Gmail sends
    them) joined with spaces as Postfix does, no CR, LF or other control
    character left to become a bare LF in the DSN.
    """
    return " ".join(_UNPRINTABLE.sub(" ", text).split())


def fold(field: str, width: int = 78) -> str:
    """
    A header-style field folded at spaces into lines of at most ``width``
    octets where it can be (CRLF and four spaces, as Postfix folds them).
    """
    words = field.split(" ")
    lines: list[str] = []
    line = words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "    " + word
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines)


def _address_type(address: str) -> str:
    """
    ``rfc822; a@b``, or ``utf-8; ...`` for an internationalised address (RFC 6533 3).
    """
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def _original(orcpt: str) -> str:
    """
    An ORCPT as an Original-Recipient value: ``addr-type; address``.
    """
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type}; {one_line(address)}"


def build_dsn(
    *,
    reporting_mta: str,
    message_id: str,
    queue_id: str,
    sender: str,
    arrival: float,
    now: float,
    failures: list[FailedRecipient],
    original: bytes,
    delayed: bool = False,
    relayed: bool = False,
    envid: str | None = None,
    full: bytes | None = None,
) -> bytes:
    """
    The DSN for ``failures`` of the message queued as ``queue_id``; with
    ``delayed``, a warning that they are not delivered yet but still tried.

    When an address or the original header section is not ASCII (mail
    received with SMTPUTF8), the report is ``message/global-delivery-status``
    with ``message/global-headers`` (RFC 6533), as Postfix sends them.

    With ``relayed``, a success notice (RFC 3461 6.2.2): the recipients were
    handed to a host that will not report their delivery.

    RFC 3461: ``envid`` (the sender's ENVID) becomes Original-Envelope-Id,
    a recipient's ORCPT its Original-Recipient; with ``full`` (RET=FULL) the
    whole message is returned as ``message/rfc822`` instead of its headers.
    """
    headers = header_section(original) if full is None else full
    utf8 = not (
        sender.isascii() and all(f.recipient.isascii() for f in failures) and header_section(original).isascii()
    )
    boundary = f"{message_id}/{reporting_mta}"
    lines = ["This is the mail system at host " + reporting_mta + ".", ""]
    if relayed:
        lines += [
            "Your message was relayed to the following recipients' mail system, which",
            "does not send delivery notifications; you may get no further notice.",
            "",
        ]
    elif delayed:
        lines += [
            "Your message could not be delivered yet to one or more recipients.",
            "The mail system is still trying; you do not need to send it again.",
            "It will tell you if it gives up. The message's headers are attached below.",
            "",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not be delivered to one or more",
            "recipients. It's attached below.",
            "",
        ]
    for f in failures:
        text = one_line(f.text)
        if f.code:
            why = f"{f.code} {f.status} {text}".replace("  ", " ").strip()
        else:
            why = f"still trying: {text}" if delayed else f"gave up: {text}"
        lines.append(fold(f"<{f.recipient}>: {why}", 76).replace("\r\n    ", "\r\n  "))
    human = "\r\n".join(lines) + "\r\n"

    per_message = [f"Original-Envelope-Id: {envid}"] if envid is not None else []
    per_message += [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Relayx-Queue-ID: {queue_id}",
        f"X-Original-Sender: {_address_type(sender)}",
        f"Arrival-Date: {_date(arrival)}",
    ]
    per_recipient = []
    for f in failures:
        status = f.status or ("5.0.0" if f.code >= 500 else "4.0.0")
        text = one_line(f.text)
        block = [f"Original-Recipient: {_original(f.orcpt)}"] if f.orcpt is not None else []
        block += [
            f"Final-Recipient: {_address_type(f.recipient)}",
            f"Action: {'relayed' if relayed else 'delayed' if delayed else 'failed'}",
            f"Status: {status}",
        ]
        if f.code:
            block.append(fold(f"Diagnostic-Code: smtp; {f.code} {f.status} {text}".replace("  ", " ").rstrip()))
        else:
            block.append(fold(f"Diagnostic-Code: x-relayx; {text}"))
        block.append(f"Last-Attempt-Date: {_date(now)}")
        per_recipient.append("\r\n".join(block))
    status_part = "\r\n".join(per_message) + "\r\n\r\n" + "\r\n\r\n".join(per_recipient) + "\r\n"

    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    returned_description = ("Relayed" if relayed else "Undelivered") + (
        " Message" if full is not None else " Message Headers"
    )
    if full is None:
        headers_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    else:
        headers_type = "message/global" if utf8 else "message/rfc822"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: "
        + (
            "Successful Mail Delivery Report"
            if relayed
            else "Delayed Mail (still being retried)"
            if delayed
            else "Undelivered Mail Returned to Sender"
        ),
        f"Date: {_date(now)}",
        f"Message-ID: <{message_id}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        # report-type stays delivery-status for a global report, as in Postfix
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
    ]
    parts = [
        "\r\n".join(head).encode("utf-8") + b"\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\nContent-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {'8bit' if not human.isascii() else '7bit'}\r\n\r\n".encode(),
        human.encode("utf-8"),
        f"\r\n--{boundary}\r\nContent-Description: {'Delayed' if delayed else 'Delivery'} report\r\n"
        f"Content-Type: {status_type}\r\n\r\n".encode(),
        status_part.encode("utf-8"),
        f"\r\n--{boundary}\r\nContent-Description: {returned_description}\r\n"
        f"Content-Type: {headers_type}\r\n"
        f"{'Content-Transfer-Encoding: 8bit' + chr(13) + chr(10) if not headers.isascii() else ''}\r\n".encode(),
        headers,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)
