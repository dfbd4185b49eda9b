"""
SPF (RFC 7208): may this client address send mail for the sender's domain?

``check_host`` follows sections 4 to 7 of the RFC on an injected DNS
look-up: mechanisms ``all include a mx ptr ip4 ip6 exists``, modifiers
``redirect`` and ``exp`` (the explanation is not fetched: the reply text
stays generic), macros (section 7, ``p`` included), the limit of 10
DNS-querying terms, of 10 MX or PTR names and of 2 void look-ups (section
4.6.4). A record is parsed whole against the ABNF of section 12 before any
term is evaluated: any syntax error (a bad domain-spec, CIDR length, macro,
modifier, a control or non-ASCII character) is a ``permerror``. An
IPv4-mapped IPv6 client (``::ffff:192.0.2.1``) is checked as IPv4 (section 5).
The official RFC 7208 test suite runs in ``tests/test_spf_suite.py``.

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


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_QUALIFIERS = {"+": Result.PASS, "-": Result.FAIL, "~": Result.SOFTFAIL, "?": Result.NEUTRAL}
#: macro-expand (section 7.1): ``%{`` letter, transformers, delimiters ``}``, or ``%%``, ``%_``, ``%-``
_MACRO = re.compile(r"%(?:\{([A-Za-z])(\d*)([rR]?)([.\-+,/_=]*)\}|([%_\-]))")
#: macro letters in a domain-spec; ``c``, ``r`` and ``t`` only in explanation text (section 7.3)
_DOMAIN_LETTERS = frozenset("slodiphv")
_ALL_LETTERS = _DOMAIN_LETTERS | frozenset("crt")
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9]")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)", re.DOTALL)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.DOTALL)
#: ``a`` and ``mx``: [ ":" domain-spec ] [ dual-cidr-length ]
_DUAL_CIDR = re.compile(r"(?::(.*?))?(?:/(\d+))?(?://(\d+))?", re.DOTALL)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IP4 = re.compile(rf":({_QNUM}(?:\.{_QNUM}){{3}})(?:/(\d+))?")
_IP6 = re.compile(r":([0-9A-Fa-f:.]+)(?:/(\d+))?")


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
            Result.PERMERROR: f"permanent error in processing domain of {domain}: {_comment_text(self.reason)}",
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


def _comment_text(text: str) -> str:
    """
    A reason, which quotes DNS data, made safe for a header comment: visible
    ASCII without parentheses or backslashes, 100 characters at most.
    """
    safe = re.sub(r"[^\x20-\x7e]|[()\\]", "?", text)
    return safe if len(safe) <= 100 else safe[:97] + "..."


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9.\-_\[\]:]+", value) else '"' + value.replace('"', "") + '"'


@attrs.frozen
class _Directive:
    qualifier: Result
    mechanism: str
    #: the domain-spec of ``include a mx ptr exists`` (``None``: the current domain)
    domain_spec: str | None = None
    #: the network of ``ip4`` and ``ip6``
    network: Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@attrs.frozen
class _Record:
    directives: tuple[_Directive, ...]
    redirect: str | None
    explanation: str | None


def _scan_macros(text: str, letters: frozenset[str]) -> int:
    """
    Checks a macro-string (section 7.1): macro-literals are visible ASCII
    but ``%``; returns where the last macro-expand ends (-1: none).
    """
    end = -1
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%":
            match = _MACRO.match(text, i)
            if match is None:
                raise _PermError(f"bad macro in {text!r}")
            letter, digits = match.group(1), match.group(2)
            if letter is not None and letter.lower() not in letters:
                raise _PermError(f"macro %{{{letter}}} is not allowed in {text!r}")
            if digits and int(digits) == 0:
                raise _PermError(f"macro with 0 parts in {text!r}")
            i = end = match.end()
        elif "!" <= char <= "~":
            i += 1
        else:
            raise _PermError(f"bad character {char!r} in {text!r}")
    return end


def _check_domain_spec(spec: str) -> str:
    """
    A domain-spec (section 7.1): a macro-string ending in a macro-expand or
    in ``.`` toplabel, with an optional final dot.
    """
    if not spec:
        raise _PermError("empty domain-spec")
    end = _scan_macros(spec, _DOMAIN_LETTERS)
    if end == len(spec):
        return spec
    tail = spec[max(end, 0) :]
    if tail.endswith("."):
        tail = tail[:-1]
    if not tail and end >= 0:
        return spec  # "%{d}." : a macro-expand and the final dot
    head, dot, toplabel = tail.rpartition(".")
    if not dot or (not head and end < 0) or not _TOPLABEL.fullmatch(toplabel):
        raise _PermError(f"bad domain-spec {spec!r}")
    return spec


def _cidr(text: str | None, maximum: int, spec: str) -> int:
    if text is None:
        return maximum
    if (text != "0" and text.startswith("0")) or int(text) > maximum:
        raise _PermError(f"bad CIDR length in {spec!r}")
    return int(text)


def _parse_directive(term: str) -> _Directive:
    match = _MECHANISM.fullmatch(term)
    if match is None:
        raise _PermError(f"unknown term {term!r}")
    qualifier = _QUALIFIERS[match.group(1)] if match.group(1) else Result.PASS
    name, rest = match.group(2).lower(), match.group(3)
    if name == "all":
        if rest:
            raise _PermError(f"bad term {term!r}")
        return _Directive(qualifier, name)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs a domain in {term!r}")
        return _Directive(qualifier, name, _check_domain_spec(rest[1:]))
    if name == "ptr":
        if rest and not rest.startswith(":"):
            raise _PermError(f"bad term {term!r}")
        return _Directive(qualifier, name, _check_domain_spec(rest[1:]) if rest else None)
    if name in ("a", "mx"):
        dual = _DUAL_CIDR.fullmatch(rest)
        if dual is None:
            raise _PermError(f"bad term {term!r}")
        spec = dual.group(1)
        return _Directive(
            qualifier,
            name,
            _check_domain_spec(spec) if spec is not None else None,
            cidr4=_cidr(dual.group(2), 32, term),
            cidr6=_cidr(dual.group(3), 128, term),
        )
    if name in ("ip4", "ip6"):
        network = (_IP4 if name == "ip4" else _IP6).fullmatch(rest)
        if network is None:
            raise _PermError(f"bad network in {term!r}")
        length = _cidr(network.group(2), 32 if name == "ip4" else 128, term)
        try:
            address = ipaddress.ip_address(network.group(1))
        except ValueError:
            raise _PermError(f"bad network in {term!r}") from None
        if address.version != (4 if name == "ip4" else 6):
            raise _PermError(f"bad network in {term!r}")
        return _Directive(qualifier, name, network=ipaddress.ip_network(f"{address}/{length}", strict=False))
    raise _PermError(f"unknown mechanism {name!r}")


def _parse(record: str) -> _Record:
    """
    The directives and modifiers of an SPF record; any syntax error is a
    permanent error, found before anything is evaluated (section 4.6).
    """
    directives: list[_Directive] = []
    modifiers: dict[str, str] = {}
    for term in record.split(" ")[1:]:
        if not term:
            continue  # terms are separated by one or more spaces
        modifier = _MODIFIER.fullmatch(term)
        if modifier is None:
            directives.append(_parse_directive(term))
            continue
        name, value = modifier.group(1).lower(), modifier.group(2)
        if name in ("redirect", "exp"):
            if name in modifiers:
                raise _PermError(f"{name}= given twice")
            modifiers[name] = _check_domain_spec(value)
        else:
            _scan_macros(value, _ALL_LETTERS)  # unknown modifiers are ignored, but must be well-formed
    redirect = modifiers.get("redirect")
    if any(d.mechanism == "all" for d in directives):
        redirect = None  # section 6.1: "all" matches first, so redirect is never reached
    return _Record(tuple(directives), redirect, modifiers.get("exp"))


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
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # section 5: an IPv4-mapped IPv6 client is an IPv4 client
    state = _Check(lookup, address, full, helo)
    try:
        result = await state.check_host(domain)
        reason = ""
    except _TempError as e:
        result, reason = Result.TEMPERROR, str(e)
    except _PermError as e:
        result, reason = Result.PERMERROR, str(e)
    return Verdict(result=result, ip=str(address), identity=identity, sender=full, helo=helo, reason=reason)


def _well_formed(name: str) -> bool:
    """
    Whether a name can be looked up: ASCII (a macro may bring in a
    non-ASCII local part), labels of 1 to 63 octets, 253 in all, and an
    optional final dot.
    """
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return name.isascii() and 0 < len(name.rstrip(".")) <= 253 and all(0 < len(label) <= 63 for label in labels)


def _valid_domain(domain: str) -> bool:
    """
    Whether ``check_host`` may look a domain up (section 4.3): a
    well-formed multi-label name, not a domain literal.
    """
    labels = domain.rstrip(".").split(".")
    return (
        len(labels) > 1
        and all(0 < len(label.encode()) <= 63 for label in labels)
        and len(domain.encode()) <= 253
        and not domain.startswith("[")
    )


def _within(host: str, domain: str) -> bool:
    host, domain = host.lower().rstrip("."), domain.lower().rstrip(".")
    return host == domain or host.endswith("." + domain)


@attrs.define
class _Check:
    lookup: Lookup
    ip: Address
    sender: str
    helo: str
    lookups: int = 0
    void: int = 0
    _names: list[str] | None = None

    async def check_host(self, domain: str) -> Result:
        if not _valid_domain(domain):
            return Result.NONE
        try:
            texts = await self.lookup(domain, "TXT")
        except LookupFailed as e:
            raise _TempError(str(e)) from None
        records = [r for r in texts if _is_spf(r)]
        if not records:
            return Result.NONE
        if len(records) > 1:
            raise _PermError(f"{domain} publishes {len(records)} SPF records")
        record = _parse(records[0])
        for directive in record.directives:
            if await self._matches(directive, domain):
                return directive.qualifier
        if record.redirect is not None:
            self._count()
            target = await self._expand(record.redirect, domain)
            result = await self.check_host(target)
            if result is Result.NONE:
                raise _PermError(f"redirect to {target}, which has no SPF record")
            return result
        return Result.NEUTRAL

    async def _matches(self, directive: _Directive, domain: str) -> bool:
        name = directive.mechanism
        if name == "all":
            return True
        if directive.network is not None:
            return self.ip.version == directive.network.version and self.ip in directive.network
        self._count()
        target = domain if directive.domain_spec is None else await self._expand(directive.domain_spec, domain)
        if name == "include":
            result = await self.check_host(target)
            if result is Result.TEMPERROR:
                raise _TempError(f"include:{target}")
            if result in (Result.NONE, Result.PERMERROR):
                raise _PermError(f"include:{target} has no usable SPF record")
            return result is Result.PASS
        if name == "exists":
            return bool(await self._query(target, "A", void=True))
        if name == "ptr":
            return bool(await self._validated_names(target, void=True))
        prefix = directive.cidr4 if self.ip.version == 4 else directive.cidr6
        kind = "A" if self.ip.version == 4 else "AAAA"
        if name == "a":
            return self._in_any(await self._query(target, kind, void=True), prefix)
        hosts = await self._query(target, "MX", void=True)
        if len(hosts) > MAX_NAMES:
            raise _PermError(f"{target} has more than {MAX_NAMES} MX records")
        for host in hosts:
            if self._in_any(await self._query(host, kind), prefix):
                return True
        return False

    async def _validated_names(self, target: str | None, void: bool = False) -> list[str]:
        """
        The client's names (PTR) that resolve back to it, among the first
        10, that are ``target`` or below it (section 5.5); a failing PTR
        look-up gives none, a failing address look-up skips the name.
        """
        try:
            names = await self._query(self._reverse_name(), "PTR", void=void)
        except _TempError:
            return []
        kind = "A" if self.ip.version == 4 else "AAAA"
        validated = []
        for host in names[:MAX_NAMES]:
            if target is not None and not _within(host, target):
                continue
            try:
                if self._in_any(await self._query(host, kind), None):
                    validated.append(host)
            except _TempError:
                continue
        return validated

    async def _p(self, domain: str) -> str:
        """
        The ``p`` macro (section 7.3): a validated name of the client,
        ``domain`` itself or a name below it if it has one, else ``unknown``.
        """
        if self._names is None:
            self._names = await self._validated_names(None)
        exact = [n for n in self._names if n.lower().rstrip(".") == domain.lower().rstrip(".")]
        below = [n for n in self._names if _within(n, domain)]
        return (exact or below or self._names or ["unknown"])[0].rstrip(".")

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

    async def _query(self, name: str, rdtype: str, void: bool = False) -> list[str]:
        """
        A look-up for a term; a malformed name matches nothing (and is not
        looked up); an empty answer counts towards the void limit when
        ``void`` (the term's own query).
        """
        if _well_formed(name):
            try:
                answer = await self.lookup(name, rdtype)
            except LookupFailed as e:
                raise _TempError(str(e)) from None
        else:
            answer = []
        if not answer and void:
            self.void += 1
            if self.void > MAX_VOID:
                raise _PermError(f"more than {MAX_VOID} void DNS look-ups")
        return answer

    def _reverse_name(self) -> str:
        return ptr_name(self.ip)

    async def _expand(self, spec: str, domain: str) -> str:
        """
        Macro expansion (section 7) of a domain-spec checked by ``_parse``,
        shortened from the left to 253 characters.
        """
        local, _, sender_domain = self.sender.rpartition("@")
        dotted = str(self.ip) if self.ip.version == 4 else ".".join(self.ip.exploded.replace(":", ""))
        values = {
            "s": self.sender,
            "l": local,
            "o": sender_domain,
            "d": domain,
            "i": dotted,
            "v": "in-addr" if self.ip.version == 4 else "ip6",
            "h": self.helo,
        }
        if re.search(r"%\{[pP]", spec):
            values["p"] = await self._p(domain)

        def replace(match: re.Match[str]) -> str:
            letter, digits, reverse, delimiters, escape = match.groups()
            if escape is not None:
                return {"%": "%", "_": " ", "-": "%20"}[escape]
            parts = re.split("[" + re.escape(delimiters or ".") + "]", values[letter.lower()])
            if reverse:
                parts.reverse()
            if digits:
                parts = parts[-int(digits) :]
            text = ".".join(parts)
            return urllib.parse.quote(text, safe="") if letter.isupper() else text

        expanded = _MACRO.sub(replace, spec)
        while len(expanded.rstrip(".")) > 253 and "." in expanded:
            expanded = expanded.partition(".")[2]
        return expanded.rstrip(".")


def _is_spf(record: str) -> bool:
    lowered = record.lower()
    return lowered == "v=spf1" or lowered.startswith("v=spf1 ")
