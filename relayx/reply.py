"""
SMTP replies as values: what the server says and what a destination said.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Reply:
    """
    A reply code, its RFC 3463 enhanced status code (``""`` where a peer
    sent none) and the text.
    """

    code: int
    status: str
    text: str

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def encode(self) -> bytes:
        """
        The reply as the server sends it, one line per text line.
        """
        prefix = f"{self.status} " if self.status else ""
        if "\n" not in self.text:
            return f"{self.code} {prefix}{self.text}\r\n".encode()
        lines = self.text.split("\n")
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}".replace("  ", " ")
