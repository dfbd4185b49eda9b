"""
Delivery status notifications (RFC 3464): the bounce a sender gets when
relayx could not deliver, as ``multipart/report; report-type=delivery-status``.

The DSN carries the original message's header section, not its body: enough
to identify the message, without sending a large message back.
"""

from __future__ import annotations

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


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


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
) -> bytes:
    """
    The DSN for ``failures`` of the message queued as ``queue_id``; with
    ``delayed``, a warning that they are not delivered yet but still tried.
    """
    boundary = f"{message_id}/{reporting_mta}"
    lines = ["This is the mail system at host " + reporting_mta + ".", ""]
    if delayed:
        lines += [
            "Your message could not be delivered yet to one or more recipients. It will be tried again;",
            "you do not need to send it again. Its headers are attached below.",
            "",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not be delivered to one or more",
            "recipients. It's attached below.",
            "",
        ]
    for f in failures:
        why = f"{f.code} {f.status} {f.text}".strip() if f.code else f"gave up: {f.text}"
        lines.append(f"<{f.recipient}>: {why}")
    human = "\r\n".join(lines) + "\r\n"

    per_message = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Relayx-Queue-ID: {queue_id}",
        f"X-Original-Sender: rfc822; {sender}",
        f"Arrival-Date: {_date(arrival)}",
    ]
    per_recipient = []
    for f in failures:
        status = f.status or ("5.0.0" if f.code >= 500 else "4.0.0")
        block = [
            f"Final-Recipient: rfc822; {f.recipient}",
            f"Action: {'delayed' if delayed else 'failed'}",
            f"Status: {status}",
        ]
        if f.code:
            block.append(f"Diagnostic-Code: smtp; {f.code} {f.status} {f.text}".replace("  ", " ").rstrip())
        else:
            block.append(f"Diagnostic-Code: x-relayx; {f.text}")
        block.append(f"Last-Attempt-Date: {_date(now)}")
        per_recipient.append("\r\n".join(block))
    status_part = "\r\n".join(per_message) + "\r\n\r\n" + "\r\n\r\n".join(per_recipient) + "\r\n"

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: " + ("Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"),
        f"Date: {_date(now)}",
        f"Message-ID: <{message_id}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    parts = [
        "\r\n".join(head).encode() + b"\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\nContent-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n".encode(),
        human.encode("utf-8"),
        f"\r\n--{boundary}\r\nContent-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n\r\n".encode(),
        status_part.encode("utf-8"),
        f"\r\n--{boundary}\r\nContent-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n".encode(),
        header_section(original),
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)
