"""
``relayx check``: the configuration and everything it points at, checked
before a node is started on it, like ``postfix check``.

Each finding is one line with what was checked, the verdict and, for a
problem, the fix. Errors make a node refuse mail or lose it (an evicting
Redis, an expired certificate, a data directory it cannot write); warnings
weaken a promise (``appendfsync everysec``, a certificate without its
intermediates). The configuration itself was validated when it was loaded.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relayx.config import Config
from relayx.interfaces import StoreUnavailable
from relayx.redis.connection import RedisConnection

#: a certificate that expires sooner than this is a warning
EXPIRY_WARNING = datetime.timedelta(days=14)


class Level(enum.Enum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


@attrs.frozen
class Finding:
    """
    One check's verdict: ``subject`` names the configuration key or the
    thing checked, ``fix`` says what to do when it is not ok.
    """

    level: Level
    subject: str
    text: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return {"level": self.level.value, "subject": self.subject, "text": self.text, "fix": self.fix}


def _ok(subject: str, text: str) -> Finding:
    return Finding(Level.OK, subject, text)


def check_tls(
    certificate: Path, key: Path, names: Sequence[str], now: datetime.datetime, subject: str = "smtp.tls_certificate"
) -> list[Finding]:
    """
    The certificate chain: it parses, its key matches, each certificate is
    signed by the next, intermediates are there, it is valid now and for a
    while, and it names the node.
    """
    try:
        chain = x509.load_pem_x509_certificates(certificate.read_bytes())
    except (OSError, ValueError) as e:
        return [Finding(Level.ERROR, subject, f"{certificate}: not a PEM certificate chain ({e})", "fix the file")]
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        return [
            Finding(Level.ERROR, "smtp.tls_key", f"{key}: not an unencrypted PEM private key ({e})", "fix the file")
        ]
    found: list[Finding] = []
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, public) != private.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        found.append(
            Finding(Level.ERROR, "smtp.tls_key", f"{key} is not the key of {certificate}'s first certificate", "")
        )
    for lower, upper in itertools.pairwise(chain):
        if lower.issuer != upper.subject:
            found.append(
                Finding(
                    Level.ERROR,
                    subject,
                    f"{certificate}: {lower.subject.rfc4514_string()} is followed by one that did not issue it",
                    "order the file: the server's certificate first, then each issuer",
                )
            )
            break
    self_signed = leaf.issuer == leaf.subject
    if len(chain) == 1 and not self_signed:
        found.append(
            Finding(
                Level.WARNING,
                subject,
                f"{certificate} has no intermediate certificates: senders that verify (MTA-STS, DANE) may not "
                "build a chain to their trust store",
                "use the full chain (fullchain.pem), the server's certificate first",
            )
        )
    for cert in chain:
        name = cert.subject.rfc4514_string()
        if cert.not_valid_after_utc <= now:
            found.append(
                Finding(Level.ERROR, subject, f"{name} expired on {cert.not_valid_after_utc:%Y-%m-%d}", "renew it")
            )
        elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
            found.append(
                Finding(Level.WARNING, subject, f"{name} expires on {cert.not_valid_after_utc:%Y-%m-%d}", "renew it")
            )
        if cert.not_valid_before_utc > now:
            found.append(Finding(Level.ERROR, subject, f"{name} is not valid before {cert.not_valid_before_utc}", ""))
    try:
        listed = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    except x509.ExtensionNotFound:
        listed = []
    missing = [n for n in names if not any(_name_matches(pattern, n) for pattern in listed)]
    if missing:
        found.append(
            Finding(
                Level.WARNING,
                subject,
                f"the certificate does not name {', '.join(missing)} (it names {', '.join(listed) or 'nothing'})",
                "include every MX name this node answers as",
            )
        )
    if not any(f.level is not Level.OK for f in found):
        found.append(
            _ok(
                subject,
                f"chain of {len(chain)}, valid until {leaf.not_valid_after_utc:%Y-%m-%d}, names {', '.join(listed)}",
            )
        )
    return found


def _name_matches(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def check_data_dir(directory: Path) -> list[Finding]:
    """
    The data directory exists (or can be made) and the node can write and
    sync a file in it.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".relayx-check-") as f:
            f.write(b"check")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return [
            Finding(Level.ERROR, "node.data_dir", f"{directory}: {e.strerror}", "make it writable by the node's user")
        ]
    mode = directory.stat().st_mode & 0o777
    if mode & 0o077:
        return [
            Finding(
                Level.WARNING,
                "node.data_dir",
                f"{directory} is mode {mode:o}: other local users can read queued mail",
                f"chmod 700 {directory}",
            )
        ]
    return [_ok("node.data_dir", f"{directory} is writable")]


def check_listen(descriptions: Sequence[str], key: str, is_root: bool) -> list[Finding]:
    """
    Ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd unit
    grants it).
    """
    found = []
    for description in descriptions:
        parts = description.split(":")
        if parts[0] in ("tcp", "tcp6", "ssl") and len(parts) > 1 and parts[1].isdigit():
            port = int(parts[1])
            if port < 1024 and not is_root:
                found.append(
                    Finding(
                        Level.WARNING,
                        key,
                        f"{description!r}: port {port} needs root or CAP_NET_BIND_SERVICE",
                        "run under the shipped systemd unit (AmbientCapabilities=CAP_NET_BIND_SERVICE)",
                    )
                )
                continue
        found.append(_ok(key, f"{description!r}"))
    return found


async def check_redis(redis: RedisConnection, config: Config) -> list[Finding]:
    """
    Redis answers, keeps what it is given (AOF, ``appendfsync always``),
    never evicts, and has the replicas ``durability`` needs.
    """
    subject = "redis"
    try:
        raw = await redis.call("execute_command", "CONFIG", "GET", "*")
    except StoreUnavailable as e:
        return [Finding(Level.ERROR, subject, str(e), "start Redis, or fix [redis] url / password")]
    settings = {_text(k): _text(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}
    found = []
    policy = settings.get("maxmemory-policy", "")
    if policy != "noeviction":
        found.append(
            Finding(
                Level.ERROR,
                subject,
                f"Redis at {redis.where} has maxmemory-policy {policy}: it may evict queued mail",
                "set maxmemory-policy noeviction",
            )
        )
    if settings.get("appendonly") != "yes":
        found.append(
            Finding(
                Level.ERROR,
                subject,
                f"Redis at {redis.where} has appendonly {settings.get('appendonly')}: a restart loses accepted mail",
                "set appendonly yes and appendfsync always",
            )
        )
    elif settings.get("appendfsync") != "always":
        found.append(
            Finding(
                Level.WARNING,
                subject,
                f"Redis at {redis.where} has appendfsync {settings.get('appendfsync')}: a crash can lose the "
                "last second of accepted mail",
                "set appendfsync always",
            )
        )
    if config.redis.durability == "replicated":
        info = _text(await redis.call("execute_command", "INFO", "replication"))
        connected = next(
            (int(line.split(":")[1]) for line in info.splitlines() if line.startswith("connected_slaves:")), 0
        )
        if connected < config.redis.replicas:
            found.append(
                Finding(
                    Level.ERROR,
                    subject,
                    f"durability replicated needs {config.redis.replicas} replica(s); {redis.where} has {connected}",
                    "start the replicas, or lower [redis] replicas",
                )
            )
    if not found:
        found.append(_ok(subject, f"Redis at {redis.where}: AOF always, noeviction"))
    return found


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def check_files(config: Config, now: datetime.datetime, is_root: bool) -> list[Finding]:
    """
    Everything ``check`` can tell without Redis.
    """
    found = [_ok("config", f"{config.source} is valid")]
    found += check_data_dir(config.node.data_dir)
    found += check_listen(config.smtp.listen, "smtp.listen", is_root)
    found += check_listen(config.admin.listen, "admin.listen", is_root)
    s = config.smtp
    if s.tls_certificate is not None and s.tls_key is not None:
        found += check_tls(s.tls_certificate, s.tls_key, [config.node.hostname], now)
    else:
        found.append(
            Finding(Level.WARNING, "smtp.tls_certificate", "no certificate: STARTTLS is not offered", "configure one")
        )
    return found


def render(findings: Sequence[Finding]) -> str:
    """
    One line a finding, ``warning``/``error`` lines with their fix.
    """
    lines = []
    for f in findings:
        fix = f" (fix: {f.fix})" if f.fix and f.level is not Level.OK else ""
        lines.append(f"{f.level.value:<8} {f.subject}: {f.text}{fix}")
    return "\n".join(lines)
