"""
What relayx reads of a message's header for search: Message-ID and Subject,
folded, encoded or absent.
"""

from __future__ import annotations

import pytest

from relayx.message import search_fields


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            b"Received: x\r\nMessage-ID: <ABC.1@Example.COM>\r\nSubject: hello world\r\n\r\nbody",
            ("abc.1@example.com", "hello world"),
        ),
        (b"Subject: =?utf-8?q?caf=C3=A9_au_lait?=\r\n\r\nx", ("", "caf\u00e9 au lait")),
        (b"Subject: folded\r\n line two\r\nMessage-Id:\r\n <x@y>\r\n\r\n", ("x@y", "folded line two")),
        (b"From: a\r\n\r\nSubject: in the body\r\nMessage-ID: <b@c>\r\n", ("", "")),
        ("Subject: raw \u00fctf8\r\n\r\n".encode(), ("", "raw \u00fctf8")),
        (b"Subject: =?bad?x?zz?=\r\n\r\n", ("", "=?bad?x?zz?=")),
        (b"Subject: " + b"x" * 1000 + b"\r\n\r\n", ("", "x" * 256)),
    ],
)
def test_search_fields(message: bytes, expected: tuple[str, str]) -> None:
    """When a header has (or lacks) a Message-ID and Subject, they are read unfolded, decoded and cut to 256."""
    assert search_fields(message) == expected
