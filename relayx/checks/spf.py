"""
SPF (RFC 7208): may this client address send mail for the sender's domain?

``check_host`` follows section 4 and 5 of the RFC on an injected DNS
look-up: mechanisms ``all include a mx ptr ip4 ip6 exists``, modifiers
``redirect`` and ``exp`` (the explanation is not fetched: the reply text
stays generic), macros (section 7), the limit of 10 DNS-querying terms, of
10 MX or PTR names and of 2 void look-ups (section 4.6.4). ``p`` in a macro
expands to ``unknown``, which section 7.3 allows.

The result goes into a ``Received-SPF`` and an ``Authentication-Results``
header, so that the primary, which sees this node as the client, can use
the verdict that was reached against the real client.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import urllib.parse

import attrs

from relayx.dns import Lookup, LookupFailed, ptr_name

MAX_LOOKUPS = 10
MAX_NAMES = 10
MAX_VOID = 2


class Result(enum.Enum):
    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


_QUALIFIERS = {"+": Result.PASS, "-": Result.FAIL, "~": Result.SOFTFAIL, "?": Result.NEUTRAL}
_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_MACRO = re.compile(r"%(?:\{([slodiphcrtv])(\d*)(r?)([.\-+,/_=]*)\}|(.))", re.IGNORECASE)
_CIDR = re.compile(r"^(.*?)(?:/(\d+))?(?://(\d+))?$")


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


@attrs.frozen
class Verdict:
    """
    The result of a check, and what was checked (for the headers).
    """

    result: Result
    ip: str
    identity: str  # "mailfrom" or "helo"
    sender: str
    helo: str
    reason: str = ""

    def received_spf(self, receiver: str) -> str:
        """
        The ``Received-SPF`` header line (RFC 7208 section 9.1).
        """
        domain = self.sender.rpartition("@")[2]
        comment = {
            Result.PASS: f"domain of {self.sender} designates {self.ip} as permitted sender",
            Result.FAIL: f"domain of {self.sender} does not designate {self.ip} as permitted sender",
            Result.SOFTFAIL: f"domain of transitioning {self.sender} does not designate {self.ip} as permitted sender",
            Result.NEUTRAL: f"{self.ip} is neither permitted nor denied by domain of {self.sender}",
            Result.NONE: f"domain of {self.sender} does not publish SPF",
            Result.TEMPERROR: f"error in processing during lookup of {domain}",
            Result.PERMERROR: f"permanent error in processing domain of {domain}: {self.reason}",
        }[self.result]
        envelope_from = self.sender if self.identity == "mailfrom" else ""
        return (
            f"Received-SPF: {self.result.value} ({receiver}: {comment})\r\n"
            f'\tclient-ip={self.ip}; envelope-from="{envelope_from}"; helo={_quote(self.helo)};\r\n'
            f"\treceiver={receiver}; identity={self.identity}"
        )

    def authentication_results(self, receiver: str) -> str:
        """
        The ``Authentication-Results`` header line (RFC 8601).
        """
        prop = f"smtp.mailfrom={self.sender}" if self.identity == "mailfrom" else f"smtp.helo={self.helo}"
        return f"Authentication-Results: {receiver}; spf={self.result.value} {prop}"


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9.\-_\[\]:]+", value) else '"' + value.replace('"', "") + '"'


async def check(lookup: Lookup, ip: str, sender: str, helo: str) -> Verdict:
    """
    The SPF verdict for a client: of the MAIL FROM domain, or of the HELO
    name for the null sender (section 2.4).
    """
    if sender:
        identity = "mailfrom"
        full = sender
    else:
        identity = "helo"
        full = f"postmaster@{helo}"
    local, _, domain = full.rpartition("@")
    if not local:
        full = f"postmaster@{domain}"
    state = _Check(lookup, ipaddress.ip_address(ip), full, helo)
    try:
        result = await state.check_host(domain)
        reason = ""
    except _TempError as e:
        result, reason = Result.TEMPERROR, str(e)
    except _PermError as e:
        result, reason = Result.PERMERROR, str(e)
    return Verdict(result=result, ip=ip, identity=identity, sender=full, helo=helo, reason=reason)


def _valid_domain(domain: str) -> bool:
    labels = domain.rstrip(".").split(".")
    return len(labels) > 1 and all(0 < len(label) <= 63 for label in labels) and len(domain) <= 253


@attrs.define
class _Check:
    lookup: Lookup
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    helo: str
    lookups: int = 0
    void: int = 0

    async def check_host(self, domain: str) -> Result:
        if not _valid_domain(domain):
            return Result.NONE
        records = [r for r in await self._query(domain, "TXT", counted=False) if _is_spf(r)]
        if not records:
            return Result.NONE
        if len(records) > 1:
            raise _PermError(f"{domain} publishes {len(records)} SPF records")
        directives, redirect = self._parse(records[0])
        for qualifier, name, argument in directives:
            if await self._matches(name, argument, domain):
                return qualifier
        if redirect is not None:
            self._count()
            target = self._expand(redirect, domain)
            result = await self.check_host(target)
            if result is Result.NONE:
                raise _PermError(f"redirect to {target}, which has no SPF record")
            return result
        return Result.NEUTRAL

    @staticmethod
    def _parse(record: str) -> tuple[list[tuple[Result, str, str | None]], str | None]:
        """
        The directives and the redirect of a record; any syntax error is a
        permanent error, found before anything is evaluated (section 4.6).
        """
        directives: list[tuple[Result, str, str | None]] = []
        modifiers: dict[str, str] = {}
        for term in record.split()[1:]:
            modifier = re.fullmatch(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)", term)
            if modifier is not None:
                name = modifier.group(1).lower()
                if name in modifiers and name in ("redirect", "exp"):
                    raise _PermError(f"{name}= given twice")
                modifiers[name] = modifier.group(2)
                continue
            qualifier = _QUALIFIERS.get(term[0], None)
            if qualifier is not None:
                term = term[1:]
            match = re.fullmatch(r"([A-Za-z0-9]+)([:/].*)?", term)
            if match is None or match.group(1).lower() not in _MECHANISMS:
                raise _PermError(f"unknown term {term!r}")
            name, argument = match.group(1).lower(), match.group(2)
            if name in ("include", "exists", "ip4", "ip6") and not (argument or "").startswith(":"):
                raise _PermError(f"{name} needs an argument")
            if name == "all" and argument:
                raise _PermError("all takes no argument")
            directives.append((qualifier or Result.PASS, name, argument))
        redirect = modifiers.get("redirect")
        if any(name == "all" for _, name, _ in directives):
            redirect = None  # section 6.1: ignored when "all" is present
        return directives, redirect

    async def _matches(self, name: str, argument: str | None, domain: str) -> bool:
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            assert argument is not None
            try:
                network = ipaddress.ip_network(argument[1:], strict=False)
            except ValueError:
                raise _PermError(f"bad {name} network {argument[1:]!r}") from None
            if (name == "ip4") != (network.version == 4):
                raise _PermError(f"{name} with {argument[1:]!r}")
            return self.ip.version == network.version and self.ip in network
        self._count()
        if name == "include":
            assert argument is not None
            target = self._expand(argument[1:], domain)
            result = await self.check_host(target)
            if result is Result.TEMPERROR:
                raise _TempError(f"include:{target}")
            if result in (Result.NONE, Result.PERMERROR):
                raise _PermError(f"include:{target} has no usable SPF record")
            return result is Result.PASS
        if name == "exists":
            assert argument is not None
            return bool(await self._query(self._expand(argument[1:], domain), "A"))
        target, v4, v6 = self._target(argument, domain)
        prefix = v4 if self.ip.version == 4 else v6
        kind = "A" if self.ip.version == 4 else "AAAA"
        if name == "a":
            return self._in_any(await self._query(target, kind), prefix)
        if name == "mx":
            hosts = await self._query(target, "MX")
            if len(hosts) > MAX_NAMES:
                raise _PermError(f"{target} has more than {MAX_NAMES} MX records")
            for host in hosts:
                if self._in_any(await self._query(host, kind), prefix):
                    return True
            return False
        # ptr: validated names of the client that end in the target domain
        try:
            names = await self._query(self._reverse_name(), "PTR")
        except _TempError:
            return False  # section 5.5: a failure here is no match
        for host in names[:MAX_NAMES]:
            if not (host.lower() == target.lower() or host.lower().endswith("." + target.lower())):
                continue
            try:
                if self._in_any(await self._query(host, kind, counted=False), None):
                    return True
            except _TempError:
                continue
        return False

    def _target(self, argument: str | None, domain: str) -> tuple[str, int | None, int | None]:
        """
        The domain and the CIDR lengths of ``a``, ``mx`` and ``ptr``.
        """
        spec = argument or ""
        match = _CIDR.match(spec)
        assert match is not None
        name, v4, v6 = match.group(1), match.group(2), match.group(3)
        if name and not name.startswith(":"):
            raise _PermError(f"bad argument {spec!r}")
        target = self._expand(name[1:], domain) if name else domain
        v4_length = int(v4) if v4 else None
        v6_length = int(v6) if v6 else None
        if (v4_length is not None and v4_length > 32) or (v6_length is not None and v6_length > 128):
            raise _PermError(f"bad prefix length in {spec!r}")
        return target, v4_length, v6_length

    def _in_any(self, addresses: list[str], prefix: int | None) -> bool:
        for text in addresses:
            try:
                network = ipaddress.ip_network(
                    f"{text}/{prefix if prefix is not None else 128 if ':' in text else 32}", strict=False
                )
            except ValueError:
                continue
            if network.version == self.ip.version and self.ip in network:
                return True
        return False

    def _count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise _PermError(f"more than {MAX_LOOKUPS} DNS-querying terms")

    async def _query(self, name: str, rdtype: str, counted: bool = True) -> list[str]:
        try:
            answer = await self.lookup(name, rdtype)
        except LookupFailed as e:
            raise _TempError(str(e)) from None
        if not answer and counted:
            self.void += 1
            if self.void > MAX_VOID:
                raise _PermError(f"more than {MAX_VOID} void DNS look-ups")
        return answer

    def _reverse_name(self) -> str:
        return ptr_name(self.ip)

    def _expand(self, spec: str, domain: str) -> str:
        """
        Macro expansion (section 7) of a domain-spec, shortened from the
        left to 253 characters.
        """
        local, _, sender_domain = self.sender.rpartition("@")
        dotted = str(self.ip) if self.ip.version == 4 else ".".join(self.ip.exploded.replace(":", ""))
        values = {
            "s": self.sender,
            "l": local,
            "o": sender_domain,
            "d": domain,
            "i": dotted,
            "p": "unknown",
            "v": "in-addr" if self.ip.version == 4 else "ip6",
            "h": self.helo,
        }

        def replace(match: re.Match[str]) -> str:
            letter, digits, reverse, delimiters, other = match.groups()
            if other is not None:
                escapes = {"%": "%", "_": " ", "-": "%20"}
                if other not in escapes:
                    raise _PermError(f"bad macro %{other}")
                return escapes[other]
            value = values.get(letter.lower())
            if value is None:
                raise _PermError(f"macro %{{{letter}}} is not allowed here")
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                count = int(digits)
                if count == 0:
                    raise _PermError("macro with 0 parts")
                parts = parts[-count:]
            text = ".".join(parts)
            return urllib.parse.quote(text, safe="") if letter.isupper() else text

        if "%" in spec and re.search(r"%(?![{%_\-])", spec):
            raise _PermError(f"bad macro in {spec!r}")
        expanded = _MACRO.sub(replace, spec)
        while len(expanded) > 253 and "." in expanded:
            expanded = expanded.partition(".")[2]
        return expanded.rstrip(".")


def _is_spf(record: str) -> bool:
    lowered = record.lower()
    return lowered == "v=spf1" or lowered.startswith("v=spf1 ")
