"""
``relayx preflight DOMAIN``: before a cutover window, or when relayx is
added as a backup MX, check what senders will see and what relayx will
reach, and say how to fix each problem.

- The domain's MX records as the configured resolver sees them: a primary at
  the lowest preference, relayx's names at a higher one, and TTLs short
  enough to change in time (over an hour is a warning: lower them a day ahead).
- Each relayx MX name resolves to an address.
- The primary (the domain's routes, else its most preferred MX) answers:
  banner, EHLO, STARTTLS and the names its certificate gives.
- An MTA-STS policy (RFC 8461), if the domain has one, lists relayx's MX
  names: a sender enforcing it would otherwise refuse to use relayx.

Every network step goes through a function given to ``preflight``, so the
tests run it against a DNS server, an SMTP server and an HTTPS server on
loopback.
"""

from __future__ import annotations

import fnmatch
import smtplib
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence

import attrs
from cryptography import x509
from twisted.internet.threads import deferToThread

from relayx.config import DomainConfig, MXRoute, SMTPRoute
from relayx.dns import Lookup, LookupFailed, LookupMX
from relayx.ops.check import Finding, Level

#: an MX TTL above this is too long to change just before a window
LONG_TTL = 3600


@attrs.frozen
class SMTPProbe:
    """
    What a destination said: its banner, whether it offered STARTTLS and
    the DNS names of its certificate (empty when TLS failed: ``tls_error``).
    """

    banner: str
    starttls: bool
    names: tuple[str, ...] = ()
    tls_error: str = ""


#: ``await probe(host, port)``: raises OSError (or smtplib's errors) when it does not answer
ProbeSMTP = Callable[[str, int], Awaitable[SMTPProbe]]
#: ``await fetch(policy_host)``: the MTA-STS policy text; raises OSError when there is none
FetchPolicy = Callable[[str], Awaitable[str]]


def smtp_probe_blocking(host: str, port: int, helo: str, timeout: float) -> SMTPProbe:
    """
    Banner, EHLO and STARTTLS with smtplib (run in a thread); the
    certificate is read, not verified: its names are reported.
    """
    with smtplib.SMTP(timeout=timeout, local_hostname=helo) as client:
        _, banner = client.connect(host, port)
        client._host = host  # type: ignore[attr-defined]  # smtplib sets it only when given to the constructor; STARTTLS sends it as SNI
        client.ehlo()
        if not client.has_extn("starttls"):
            return SMTPProbe(banner.decode("utf-8", "replace"), False)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            client.starttls(context=context)
        except (ssl.SSLError, smtplib.SMTPException, OSError) as e:
            return SMTPProbe(banner.decode("utf-8", "replace"), True, tls_error=str(e))
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
        names: tuple[str, ...] = ()
        if der:
            cert = x509.load_der_x509_certificate(der)
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                names = tuple(san.get_values_for_type(x509.DNSName))
            except x509.ExtensionNotFound:
                names = ()
        return SMTPProbe(banner.decode("utf-8", "replace"), True, names)


def mx_patterns(policy: str) -> tuple[str | None, list[str]]:
    """
    The mode and the ``mx:`` patterns of an MTA-STS policy (RFC 8461 3.2).
    """
    mode, patterns = None, []
    for line in policy.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "mode":
            mode = value
        elif key == "mx":
            patterns.append(value.lower())
    return mode, patterns


def _covered(name: str, patterns: Sequence[str]) -> bool:
    name = name.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            head, _, rest = name.partition(".")
            if head and rest == pattern[2:]:
                return True
        elif fnmatch.fnmatchcase(name, pattern) and "*" not in pattern:
            return True
    return False


async def preflight(
    domain: DomainConfig,
    relayx_names: Sequence[str],
    *,
    lookup: Lookup,
    lookup_mx: LookupMX,
    probe: ProbeSMTP,
    fetch_policy: FetchPolicy,
    mx_port: int = 25,
) -> list[Finding]:
    """
    The checklist for ``domain``; ``relayx_names`` are the MX names of the
    relayx nodes (the configured hostname and those of the live nodes).
    """
    name = domain.name
    found: list[Finding] = []
    ours = {n.lower().rstrip(".") for n in relayx_names}
    try:
        records, ttl = await lookup_mx(name)
    except LookupFailed as e:
        return [Finding(Level.ERROR, "mx", f"MX look-up for {name} failed: {e}", "check the resolver and the zone")]
    records = [(pref, host.lower().rstrip(".")) for pref, host in records]
    listing = ", ".join(f"{pref} {host}" for pref, host in sorted(records)) or "none"
    relayx_prefs = [pref for pref, host in records if host in ours]
    others = [(pref, host) for pref, host in records if host not in ours]
    if not records:
        found.append(Finding(Level.ERROR, "mx", f"{name} has no MX records", f"publish MX records for {name}"))
    elif not relayx_prefs:
        found.append(
            Finding(
                Level.ERROR,
                "mx",
                f"no MX of {name} is a relayx node ({listing}); senders will never fall back to relayx",
                f"add 'MX 20 {sorted(ours)[0] if ours else 'relayx.example.net'}.' to {name}'s zone",
            )
        )
    elif not others:
        found.append(
            Finding(
                Level.WARNING,
                "mx",
                f"only relayx is an MX of {name} ({listing}): right during a cutover window, wrong otherwise",
                f"publish the primary at a lower preference than {min(relayx_prefs)} after the window",
            )
        )
    elif min(p for p, _ in others) >= min(relayx_prefs):
        found.append(
            Finding(
                Level.ERROR,
                "mx",
                f"relayx is preferred over the primary ({listing}): mail comes to relayx first",
                "give the primary the lowest preference, relayx a higher one",
            )
        )
    else:
        found.append(Finding(Level.OK, "mx", f"{name}: {listing}"))
    if records and ttl > LONG_TTL:
        found.append(
            Finding(
                Level.WARNING,
                "mx ttl",
                f"MX TTL of {name} is {ttl:.0f} s: a change takes that long to reach every sender",
                "lower it to 300 s a full TTL before the window",
            )
        )
    elif records:
        found.append(Finding(Level.OK, "mx ttl", f"{ttl:.0f} s"))
    for host in sorted(ours & {h for _, h in records}):
        try:
            addresses = await lookup(host, "A") + await lookup(host, "AAAA")
        except LookupFailed as e:
            addresses, why = [], str(e)
        else:
            why = "no A or AAAA records"
        if addresses:
            found.append(Finding(Level.OK, f"mx {host}", f"resolves to {', '.join(addresses)}"))
        else:
            found.append(
                Finding(Level.ERROR, f"mx {host}", f"{host} does not resolve: {why}", f"add an A record for {host}")
            )
    found += await _primary(domain, others, probe, mx_port)
    found += await _mta_sts(name, lookup, fetch_policy, sorted(ours & {h for _, h in records}) or sorted(ours))
    return found


async def _primary(
    domain: DomainConfig, others: list[tuple[int, str]], probe: ProbeSMTP, mx_port: int
) -> list[Finding]:
    routes = [r for r in domain.routes if isinstance(r, SMTPRoute)]
    if routes:
        targets = [(r.host, r.port) for r in routes]
    elif others and any(isinstance(r, MXRoute) for r in domain.routes):
        best = min(p for p, _ in others)
        targets = [(host, mx_port) for p, host in others if p == best]
    else:
        return [
            Finding(Level.ERROR, "primary", f"no primary known for {domain.name}", "configure routes or MX records")
        ]
    found = []
    for host, port in targets:
        subject = f"primary {host}:{port}"
        try:
            answer = await probe(host, port)
        except (OSError, smtplib.SMTPException) as e:
            found.append(
                Finding(
                    Level.WARNING,
                    subject,
                    f"not reachable ({e.__class__.__name__}: {e}); relayx will hold mail until it is",
                    "expected during an outage; otherwise check the route and firewall",
                )
            )
            continue
        found.append(Finding(Level.OK, subject, f"answers: {answer.banner[:80]}"))
        if not answer.starttls:
            found.append(Finding(Level.WARNING, subject, "does not offer STARTTLS", "mail to it travels in the clear"))
        elif answer.tls_error:
            found.append(Finding(Level.WARNING, subject, f"STARTTLS fails: {answer.tls_error}", "fix its certificate"))
        else:
            found.append(Finding(Level.OK, subject, f"STARTTLS, certificate names {', '.join(answer.names) or 'none'}"))
    return found


async def _mta_sts(name: str, lookup: Lookup, fetch_policy: FetchPolicy, relayx_hosts: Sequence[str]) -> list[Finding]:
    try:
        records = [t for t in await lookup(f"_mta-sts.{name}", "TXT") if t.lower().startswith("v=stsv1")]
    except LookupFailed as e:
        return [Finding(Level.WARNING, "mta-sts", f"_mta-sts.{name} look-up failed: {e}", "")]
    if not records:
        return [Finding(Level.OK, "mta-sts", f"{name} publishes no MTA-STS policy")]
    try:
        policy = await fetch_policy(f"mta-sts.{name}")
    except OSError as e:
        return [
            Finding(
                Level.ERROR,
                "mta-sts",
                f"{name} announces MTA-STS but its policy cannot be fetched: {e}",
                f"serve https://mta-sts.{name}/.well-known/mta-sts.txt",
            )
        ]
    mode, patterns = mx_patterns(policy)
    missing = [host for host in relayx_hosts if not _covered(host, patterns)]
    if missing and mode != "none":
        level = Level.ERROR if mode == "enforce" else Level.WARNING
        return [
            Finding(
                level,
                "mta-sts",
                f"the {mode} policy of {name} does not list {', '.join(missing)} (mx: {', '.join(patterns)}); "
                "senders that enforce it will not use relayx",
                f"add 'mx: {missing[0]}' to the policy and change the id in _mta-sts.{name}",
            )
        ]
    return [Finding(Level.OK, "mta-sts", f"mode {mode}, lists {', '.join(relayx_hosts)}")]


def make_fetch(lookup: Lookup, context: ssl.SSLContext, timeout: float, port: int = 443) -> FetchPolicy:
    """
    A ``FetchPolicy`` that finds the policy host with the configured
    resolver and fetches it over HTTPS in a thread.
    """

    async def fetch(host: str) -> str:
        try:
            addresses = await lookup(host, "A") + await lookup(host, "AAAA")
        except LookupFailed as e:
            raise OSError(f"{host}: {e}") from None
        if not addresses:
            raise OSError(f"{host} does not resolve")
        return await deferToThread(fetch_policy_blocking, host, addresses[0], context, timeout, port)

    return fetch


def make_probe(helo: str, timeout: float) -> ProbeSMTP:
    """
    A ``ProbeSMTP`` with smtplib in a thread.
    """

    async def probe(host: str, port: int) -> SMTPProbe:
        return await deferToThread(smtp_probe_blocking, host, port, helo, timeout)

    return probe


def fetch_policy_blocking(host: str, address: str, context: ssl.SSLContext, timeout: float, port: int = 443) -> str:
    """
    GET ``https://<host>/.well-known/mta-sts.txt`` from ``address`` (as the
    configured resolver found it), verifying the certificate for ``host``.
    """
    with socket.create_connection((address, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            chunks: list[bytes] = []
            while len(b"".join(chunks)) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise OSError(f"https://{host}/.well-known/mta-sts.txt answered {status.decode('latin-1')}")
    return body.decode("utf-8", "replace")
