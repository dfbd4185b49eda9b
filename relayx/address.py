"""
SMTP paths and mailboxes (RFC 5321 section 4.1.2, RFC 6531 for UTF-8).

The SMTP layer turns ``MAIL FROM:<...>`` and ``RCPT TO:<...>`` arguments into
these values; everything after it works with parsed, normalised addresses.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import attrs
import idna


class AddressError(ValueError):
    """
    The text is not an address; the message says why, for the log.
    """


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LITERAL = re.compile(r"^\[[^\[\]\\\s]+\]$")
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(=([\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+))?$")


@functools.lru_cache(maxsize=4096)
def client_ip(host: str) -> str:
    """
    A client's address as the checks and the ``Received:`` header see it:
    an IPv4 client on an IPv6 socket (``::ffff:192.0.2.7``, RFC 4291
    2.5.5.2) as the IPv4 address it is, so that SPF ``ip4:``, DNS lists,
    greylisting networks and rate limits treat it as IPv4.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def normalize_domain(domain: str) -> str:
    """
    The lower-case ASCII (A-label) form of ``domain``, or ``AddressError``.
    """
    if _LITERAL.match(domain):
        return domain.lower()
    name = domain.rstrip(".")
    try:
        # UTS 46 non-transitional (IDNA 2008), as browsers and current MTAs:
        # Python's "idna" codec is IDNA 2003 and maps faß.de to fass.de
        ascii_name = (
            idna.encode(name, uts46=True, transitional=False).decode("ascii") if not name.isascii() else name
        ).lower()
    except (UnicodeError, idna.IDNAError) as e:
        raise AddressError(f"bad domain {domain!r}: {e}") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"bad domain {domain!r}")
    return ascii_name


@attrs.frozen
class Mailbox:
    """
    ``local@domain``: ``local`` as the sender wrote it, ``domain`` normalised.
    """

    local: str
    domain: str

    @classmethod
    def parse(cls, text: str, utf8: bool = True) -> Mailbox:
        local, sep, domain = text.rpartition("@")
        if not sep or not local or not domain:
            raise AddressError(f"no local@domain in {text!r}")
        if len(local.encode("utf-8")) > 64:
            raise AddressError("local part longer than 64 octets")
        if not local.isascii() and not utf8:
            raise AddressError("non-ASCII address without SMTPUTF8")
        if not (_DOT_ATOM.match(local) or _QUOTED.match(local) or (not local.isascii() and _utf8_local(local))):
            raise AddressError(f"bad local part {local!r}")
        if not domain.isascii() and not utf8:
            raise AddressError("non-ASCII domain without SMTPUTF8")
        return cls(local, normalize_domain(domain))

    @property
    def unquoted_local(self) -> str:
        """
        The local part with its quotes and backslash escapes removed.
        """
        if self.local.startswith('"'):
            return re.sub(r"\\(.)", r"\1", self.local[1:-1])
        return self.local

    @property
    def routed(self) -> bool:
        """
        Whether the local part carries a route to another host:
        ``user%other@dom``, ``other!user@dom`` (UUCP) or ``"user@other"@dom``.
        A mail system behind a backup MX may act on them and relay the
        message on to ``other`` (Postfix's ``allow_untrusted_routing``).
        """
        return any(c in self.unquoted_local for c in "@%!")

    @property
    def canonical(self) -> str:
        """
        The form used to compare addresses: local parts are case-sensitive
        by the RFC, but no mail system an operator meets treats them so.
        """
        return f"{self.local.lower()}@{self.domain}"

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def _utf8_local(local: str) -> bool:
    return (
        not any(c in local for c in ' "(),:;<>@[\\]')
        and ".." not in local
        and not (local.startswith(".") or local.endswith("."))
    )


@attrs.frozen
class Path:
    """
    A parsed ``MAIL FROM`` or ``RCPT TO`` argument: the mailbox (``None``
    for the null reverse-path ``<>``) and the ESMTP parameters, keys upper-case.
    """

    mailbox: Mailbox | None
    params: dict[str, str | None] = attrs.field(factory=dict, hash=False)
    #: the hosts of a source route (``<@a,@b:user@dom>``), dropped from the address
    route: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "" if self.mailbox is None else str(self.mailbox)


def parse_path(argument: str, prefix: str, allow_null: bool, utf8: bool = False) -> Path:
    """
    Parse ``FROM:<a@b> SIZE=10`` (``prefix`` ``FROM:``) into a ``Path``.

    A source route (``<@relay:a@b>``) is accepted and dropped from the
    address, as RFC 5321 section 4.1.1.3 asks; its hosts are kept in
    ``route`` so that a recipient with one can be refused (3.6.1 allows it).
    Non-ASCII addresses are accepted only with the ``SMTPUTF8`` parameter,
    or ``utf8`` (for ``RCPT``, the transaction's MAIL had it).
    """
    if not argument[: len(prefix)].upper() == prefix:
        raise AddressError(f"expected {prefix}<address>")
    rest = argument[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        raise AddressError("address must be in angle brackets")
    end = _closing_bracket(rest)
    inner, params_text = rest[1:end], rest[end + 1 :]
    if params_text and not params_text.startswith(" "):
        raise AddressError("parameters must follow a space")
    params: dict[str, str | None] = {}
    for word in params_text.split():
        match = _PARAM.match(word)
        if not match:
            raise AddressError(f"bad parameter {word!r}")
        params[match.group(1).upper()] = match.group(3)
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        hops, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("bad source route")
        route = tuple(hop.lstrip("@") for hop in hops.split(","))
    if inner == "":
        if not allow_null or route:
            raise AddressError("null address not allowed here")
        return Path(None, params)
    return Path(Mailbox.parse(inner, utf8=utf8 or "SMTPUTF8" in params), params, route)


def _closing_bracket(text: str) -> int:
    quoted = False
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    raise AddressError("missing '>'")


_XTEXT_CHAR = re.compile(r"[!-*,-<>-~]")  # xchar: "!" to "~" except "+" and "="
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")


def xtext_decode(text: str) -> str:
    """
    The text an ``xtext`` value (RFC 3461 4) encodes: ``+XX`` (upper-case
    hex) for any octet, other printable ASCII but ``+`` and ``=`` as is.
    Raises ``AddressError`` for anything else, or an encoding that is not UTF-8.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "+":
            match = _XTEXT_HEX.match(text, i)
            if match is None:
                raise AddressError("bad xtext: '+' must be followed by two upper-case hex digits")
            out.append(int(match.group(1), 16))
            i += 3
        elif _XTEXT_CHAR.match(text[i]):
            out.append(ord(text[i]))
            i += 1
        else:
            raise AddressError(f"bad xtext character {text[i]!r}")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise AddressError("bad xtext: not UTF-8") from None


def xtext_encode(text: str) -> str:
    """
    ``text`` as xtext: octets outside ``!``-``~``, and ``+`` and ``=``, as ``+XX``.
    """
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}" for b in text.encode("utf-8"))
