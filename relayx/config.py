"""
relayx's configuration: one TOML file validated into frozen objects.

Every problem is reported as one line that names the file, the key and what
was expected, because an operator reads it in a systemd journal at 3 a.m.
Unknown keys are fatal: a misspelt option silently ignored is how a backup MX
ends up as an open relay or with a retention of zero.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import attrs

from relayx.address import AddressError, Mailbox, normalize_domain
from relayx.interfaces import PacePolicy, Throttle

T = TypeVar("T")


class ConfigError(Exception):
    """
    The configuration cannot be used; ``str()`` is the one line to show.
    """


_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*(|k|m|g|kb|mb|gb|kib|mib|gib)\s*$", re.IGNORECASE)
_SIZE_FACTOR = {
    "": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """
    Seconds from a duration written as ``30s``, ``5m``, ``2h`` or ``5d``.

    Raises ``ValueError`` with the expectation spelled out.
    """
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"a duration such as '30s', '5m', '2h' or '5d', got {value!r}")


def parse_size(value: object) -> int:
    """
    Bytes from an integer or a string such as ``25MB`` or ``512k``.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_FACTOR[match.group(2).lower()]
    raise ValueError(f"a size in bytes such as 26214400 or '25MB', got {value!r}")


@attrs.frozen
class SMTPRoute:
    """
    One fixed destination (a smart host), written ``smtp://host:port``.
    """

    host: str
    port: int = 25

    def __str__(self) -> str:
        return f"smtp://{self.host}:{self.port}"


@attrs.frozen
class MXRoute:
    """
    Deliver to the domain's MX hosts, looked up in DNS.
    """

    def __str__(self) -> str:
        return "mx"


Route = SMTPRoute | MXRoute


def parse_route(value: object) -> Route:
    if value == "mx":
        return MXRoute()
    if isinstance(value, str) and value.startswith("smtp://"):
        parts = urlsplit(value)
        try:
            port = parts.port or 25
        except ValueError:
            port = -1
        if parts.hostname and 0 < port < 65536 and parts.path in ("", "/") and not parts.query:
            return SMTPRoute(parts.hostname, port)
    raise ValueError(f"'mx' or 'smtp://host:port', got {value!r}")


@attrs.frozen
class AnyRecipient:
    """
    Every local part of the domain is accepted (a backscatter risk: mail to
    addresses the primary later refuses has to bounce).
    """


@attrs.frozen
class RecipientList:
    """
    Only these addresses (compared case-insensitively) are accepted.
    """

    addresses: frozenset[str]


@attrs.frozen
class RecipientPattern:
    """
    Addresses whose lower-case form matches the regular expression in full.
    """

    pattern: re.Pattern[str]


@attrs.frozen
class RecipientVerify:
    """
    Ask the primary (a RCPT callout), and remember its answers: positive
    ones for ``positive_ttl``, negative ones for ``negative_ttl``. While the
    primary cannot be asked, the last answer it gave stands, and for an
    address it was never asked about, ``default`` (``accept``, ``reject``
    or ``tempfail``).
    """

    positive_ttl: float
    negative_ttl: float
    default: str
    timeout: float


RecipientRule = AnyRecipient | RecipientList | RecipientPattern | RecipientVerify


@attrs.frozen
class DomainConfig:
    name: str
    routes: tuple[Route, ...]
    recipients: RecipientRule
    throttle: Throttle
    #: outbound TLS policy (None: [delivery] tls), and the name to verify instead of the host's
    tls: str | None = None
    tls_name: str | None = None
    #: dual delivery: destinations that each get a copy of every message, tracked apart
    copy_to: tuple[SMTPRoute, ...] = ()
    #: this domain's own filtering ([filter] with its [domain.filter] over it), or None: [filter]
    filter: FilterConfig | None = None
    #: this domain's quota (0: none), by default [queue] domain_quota_*
    quota_messages: int = 0
    quota_bytes: int = 0

    def queues(self) -> list[str]:
        """
        The delivery queues of the domain: its own, then one per copy
        destination (``example.org#1``, ...).
        """
        return [self.name, *(f"{self.name}#{n}" for n in range(1, len(self.copy_to) + 1))]


@attrs.frozen
class NodeConfig:
    id: str
    hostname: str
    data_dir: Path
    #: "text" (twistd's lines) or "json" (one JSON object per line, with the events' fields)
    log_format: str = "text"
    #: processes taking SMTP (``relayx --config``; ``twistd -n relayx`` is always one)
    processes: int = 1


@attrs.frozen
class SMTPConfig:
    listen: tuple[str, ...]
    max_message_size: int
    max_recipients: int
    max_line_length: int
    max_errors: int
    max_hops: int
    command_timeout: float
    data_timeout: float
    max_connections: int
    max_connections_per_ip: int
    shutdown_grace: float
    bare_lf: str
    tls_certificate: Path | None
    tls_key: Path | None
    #: a message larger than this is written to node.data_dir/spool while it comes in
    spool_threshold: int = 1024 * 1024
    #: bytes/s a message must average once data_rate_grace has passed (0: no minimum)
    min_data_rate: int = 500
    data_rate_grace: float = 30.0


@attrs.frozen
class RedisConfig:
    """
    Where the queue lives: ``url``, or the master that ``sentinels`` name
    ``master_name``; neither means an embedded ``redis-server`` under the
    node's data directory. ``durability`` is what a ``250`` to DATA
    promises: ``aof`` (Redis's own persistence), or ``replicated`` (also
    acknowledged by ``replicas`` replicas within ``replication_timeout``).
    """

    url: str | None = attrs.field(repr=False)
    key_prefix: str
    timeout: float
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = "relayx"
    durability: str = "aof"
    replicas: int = 1
    replication_timeout: float = 2.0
    #: for ``rediss://``: the CA certificates (PEM) that sign the server's, or None: the system's
    tls_ca_file: Path | None = None
    #: the password read from ``password_file`` (Sentinel setups have no URL to carry one)
    password_from_file: str | None = attrs.field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        return self.url is None and not self.sentinels

    @property
    def host(self) -> str:
        return urlsplit(self.url or "").hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url or "").port or 6379

    @property
    def db(self) -> int:
        path = urlsplit(self.url or "").path.strip("/")
        return int(path) if path else 0

    @property
    def username(self) -> str | None:
        """
        The ACL user of ``redis://user:password@host``, URL-decoded, or None
        (the default user).
        """
        name = urlsplit(self.url or "").username
        return unquote(name) if name else None

    @property
    def password(self) -> str | None:
        """
        The password of the URL, URL-decoded (``%40`` is ``@``), else the
        one of ``password_file``, or None.
        """
        password = urlsplit(self.url or "").password
        if password is not None:
            return unquote(password)
        return self.password_from_file

    @property
    def tls(self) -> bool:
        """
        Whether the URL asks for TLS (``rediss://``).
        """
        return urlsplit(self.url or "").scheme == "rediss"


@attrs.frozen
class QueueConfig:
    retention: float
    retry_schedule: tuple[float, ...]
    lease: float
    workers: int
    poll_interval: float
    probe_interval: float
    heartbeat: float
    throttle: Throttle
    delay_warning: float
    #: cluster-wide and per-domain quotas (0: none); past one, mail gets 452 4.3.1
    quota_messages: int = 0
    quota_bytes: int = 0
    domain_quota_messages: int = 0
    domain_quota_bytes: int = 0
    #: the share of Redis's maxmemory kept free for delivery, settling and bounces
    memory_headroom: float = 0.1
    #: a quota this full is logged (once) as a warning
    quota_warning: float = 0.8


@attrs.frozen
class DeliveryConfig:
    helo_name: str
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    nameservers: tuple[tuple[str, int], ...]
    mx_port: int
    tls: str
    tls_ca_file: Path | None
    #: how destinations' adaptive pace reacts to pushback (settle.lua)
    pace: PacePolicy = attrs.field(factory=PacePolicy)


SPF_RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
SPF_ACTIONS = ("accept", "reject", "tempfail")
#: RFC 7208 section 8 leaves the action to the receiver; these are the
#: usual ones: refuse a hard fail, defer a DNS failure, accept the rest
DEFAULT_SPF_ACTIONS = (("fail", "reject"), ("temperror", "tempfail"))
#: the [filter] keys a domain may not override: they act before any recipient is known
CLIENT_LIMITS = ("connections_per_minute", "messages_per_minute")


@attrs.frozen
class DNSList:
    """
    A DNS list zone and, optionally, the answers that count as a listing,
    written as Postfix does: ``zen.spamhaus.org=127.0.0.[2..11]``, each
    octet a number or ``[n;m..o]``. Whatever the pattern, only answers in
    127.0.0.0/8 outside 127.255.255.0/24 (the lists' error codes) count.
    """

    zone: str
    #: the values each octet of a counting answer may have (``None``: any)
    octets: tuple[frozenset[int], ...] | None = None

    def counts(self, answer: str) -> bool:
        """
        Whether an answer matches the pattern (any does without one).
        """
        if self.octets is None:
            return True
        parts = answer.split(".")
        return len(parts) == 4 and all(p.isdigit() and int(p) in o for p, o in zip(parts, self.octets, strict=True))

    def __str__(self) -> str:
        return self.zone


def parse_dnslist(value: object) -> DNSList:
    """
    A ``zone`` or ``zone=d.d.d.d`` entry of ``dnsbl`` or ``dnswl``.
    """
    text = _string(value)
    zone, equals, pattern = text.partition("=")
    if not equals:
        return DNSList(_domain_name(zone))
    octet = r"(\d+|\[[^\]]*\])"
    parts = re.fullmatch(rf"{octet}\.{octet}\.{octet}\.{octet}", pattern)
    octets: list[frozenset[int]] = []
    for part in parts.groups() if parts is not None else ():
        values: set[int] = set()
        items = part[1:-1].split(";") if part.startswith("[") and part.endswith("]") else [part]
        for item in items:
            low, dots, high = item.partition("..")
            well_formed = low.isdigit() and (high.isdigit() if dots else not high)
            if not (well_formed and int(low) <= int(high or low) <= 255):
                values.clear()  # refused below
                break
            values.update(range(int(low), int(high or low) + 1))
        octets.append(frozenset(values))
    if len(octets) != 4 or not all(octets):
        raise ValueError(
            f"a zone such as 'zen.spamhaus.org' or 'zen.spamhaus.org=127.0.0.[2..11]' (answers that count), "
            f"got {value!r}"
        )
    return DNSList(_domain_name(zone), tuple(octets))


@attrs.frozen
class FilterConfig:
    """
    Filtering before the queue, all off by default: ``[filter]`` for every
    domain, and a domain's ``[domain.filter]`` over it.
    """

    dnsbl: tuple[DNSList, ...] = ()
    dnswl: tuple[DNSList, ...] = ()
    dns_timeout: float = 2.0
    greylist_delay: float = 0.0
    greylist_expiry: float = 36 * 3600.0
    greylist_networks: tuple[str, ...] = ()
    greylist_domains: tuple[str, ...] = ()
    connections_per_minute: int = 0
    messages_per_minute: int = 0
    spf: bool = False
    #: (result, action) pairs; results not named are accepted
    spf_actions: tuple[tuple[str, str], ...] = DEFAULT_SPF_ACTIONS
    rspamd_url: str | None = None
    rspamd_timeout: float = 10.0
    rspamd_fail_open: bool = True

    @property
    def active(self) -> bool:
        return bool(
            self.dnsbl
            or self.dnswl
            or self.greylist_delay
            or self.connections_per_minute
            or self.messages_per_minute
            or self.spf
            or self.rspamd_url
        )


@attrs.frozen
class AdminConfig:
    """
    The HTTP listener for /metrics, /healthz and /readyz (none by default).
    """

    listen: tuple[str, ...] = ()
    #: bearer tokens of the admin API by the name audited for changes made with them
    tokens: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    #: how long the queue's history (the panel's charts, a sample a minute) is kept; 0: none
    history: float = 7 * 86400.0
    #: whether /metrics, like the API, needs one of the tokens
    metrics_token_required: bool = False


BODY_BACKENDS = ("directory", "s3", "redis")


@attrs.frozen
class S3Config:
    """
    S3-compatible object storage for bodies (``[bodies.s3]``): ``bucket``
    under ``endpoint_url`` (``None``: AWS), keys starting with ``prefix``.
    Without ``access_key`` botocore's usual credential chain applies.
    """

    bucket: str | None = None
    prefix: str = "relayx/"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = attrs.field(default=None, repr=False)
    secret_key: str | None = attrs.field(default=None, repr=False)
    addressing_style: str = "auto"
    timeout: float = 30.0
    attempts: int = 3
    ca_file: Path | None = None


@attrs.frozen
class BodiesConfig:
    """
    Where message bodies live (``[bodies]``): ``directory`` (files under
    ``directory``), ``s3`` or ``redis`` (in the queue's message hashes, as
    before body stores). ``orphan_age``: how old a body with no message
    must be before the sweep removes it.
    """

    backend: str = "redis"
    directory: Path = Path("relayx-data/bodies")
    compression: str = "none"
    compression_level: int = 3
    orphan_age: float = 3600.0
    sweep_interval: float = 60.0
    sweep_batch: int = 500
    threads: int = 8
    s3: S3Config = S3Config()


@attrs.frozen
class Config:
    source: str
    node: NodeConfig
    smtp: SMTPConfig
    redis: RedisConfig
    queue: QueueConfig
    delivery: DeliveryConfig
    domains: tuple[DomainConfig, ...]
    filter: FilterConfig = FilterConfig()
    admin: AdminConfig = AdminConfig()
    bodies: BodiesConfig = BodiesConfig()

    def domain(self, name: str) -> DomainConfig | None:
        for domain in self.domains:
            if domain.name == name:
                return domain
        return None


def convert_value(section: _Section, name: str, convert: Callable[[object], T]) -> T:
    section.used.add(name)
    try:
        return convert(section.table[name])
    except ValueError as e:
        raise section.fail(name, str(e)) from None


class _Section:
    """
    Reads one TOML table, remembering which keys were used so that the rest
    can be reported as unknown.
    """

    def __init__(self, source: str, path: str, table: object) -> None:
        self.source = source
        self.path = path
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {path}: expected a table, got {table!r}")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(name)}: expected {expected}")

    def get(self, name: str, default: T, convert: Callable[[object], T]) -> T:
        self.used.add(name)
        if name not in self.table:
            return default
        return convert_value(self, name, convert)

    def require(self, name: str, convert: Callable[[object], T]) -> T:
        if name not in self.table:
            self.used.add(name)
            raise self.fail(name, "a value; the key is missing")
        return convert_value(self, name, convert)

    def sub(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.source, self.key(name), self.table.get(name, {}))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.source}: {self.key(unknown[0])}: unknown key (known keys here: {', '.join(sorted(self.used))})"
            )


def _string(value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"a non-empty string, got {value!r}")


def _file(base: Path) -> Callable[[object], Path]:
    def convert(value: object) -> Path:
        path = base / _string(value)
        if not path.is_file():
            raise ValueError(f"a readable file, {path} is not one")
        return path

    return convert


def _addresses(value: object) -> tuple[tuple[str, int], ...]:
    result = []
    for entry in _string_list(value):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"host:port entries such as '127.0.0.1:26379', got {entry!r}")
        result.append((host.strip("[]"), int(port)))
    return tuple(result)


def _copy_routes(value: object) -> tuple[SMTPRoute, ...]:
    routes = tuple(parse_route(v) for v in _string_list(value))
    if not all(isinstance(r, SMTPRoute) for r in routes):
        raise ValueError("smtp://host:port destinations (each gets its own copy)")
    return routes  # type: ignore[return-value]


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError(f"a list of strings, got {value!r}")


def _zones(value: object) -> tuple[str, ...]:
    return tuple(_domain_name(v) for v in _strings(value))


def _dnslists(value: object) -> tuple[DNSList, ...]:
    return tuple(parse_dnslist(v) for v in _strings(value))


def _networks(value: object) -> tuple[str, ...]:
    import ipaddress

    for entry in _strings(value):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"networks such as '192.0.2.0/24', got {entry!r}") from None
    return _strings(value)


def _secret_file(base: Path) -> Callable[[object], str]:
    """
    The first line of a file only its owner may read (a Redis password).
    """

    def convert(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"a file path, got {value!r}")
        path = base / value
        try:
            if path.stat().st_mode & 0o077:
                raise ValueError(f"a file only its owner can read (chmod 600 {path})")
            secret = path.read_text().splitlines()[0].strip() if path.read_text().strip() else ""
        except OSError as e:
            raise ValueError(f"a readable file, {path}: {e.strerror}") from None
        if not secret:
            raise ValueError(f"a file holding the password, {path} is empty")
        return secret

    return convert


def _fraction(low: float, high: float) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high:
            return float(value)
        raise ValueError(f"a fraction from {low:g} to {high:g} (e.g. 0.1 for 10 %), got {value!r}")

    return convert


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"a whole number, 0 for no limit, got {value!r}")


def _port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    raise ValueError(f"a TCP port from 1 to 65535, got {value!r}")


def _processes(value: object) -> int:
    """
    ``"auto"`` (one per core) or a whole number from 1 to 64.
    """
    if value == "auto":
        return max(1, min(64, os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f'expected "auto" or a whole number from 1 to 64, got {value!r}')
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"a whole number above 0, got {value!r}")


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"a duration above zero, got {value!r}")
    return seconds


def _string_list(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError(f"a non-empty list of strings, got {value!r}")


def _schedule(value: object) -> tuple[float, ...]:
    if not (isinstance(value, list) and value):
        raise ValueError(f"a non-empty list of durations such as ['1m', '5m'], got {value!r}")
    return tuple(_positive_duration(v) for v in value)


def _redis_url(value: object) -> str:
    if isinstance(value, str):
        parts = urlsplit(value)
        path = parts.path.strip("/")
        try:
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            port_ok = False
        if parts.scheme in ("redis", "rediss") and parts.hostname and port_ok and (path == "" or path.isdigit()):
            return value
    # the URL may hold a password: show it without
    shown = re.sub(r"//[^@/]*@", "//***@", value) if isinstance(value, str) else value
    raise ValueError(
        f"a URL such as 'redis://127.0.0.1:6379/0' or 'rediss://user:password@redis.example:6380/0', got {shown!r}"
    )


def _listen(value: object) -> tuple[str, ...]:
    endpoints = _string_list(value)
    for endpoint in endpoints:
        if not re.match(r"^(tcp|tcp6|ssl|unix|systemd):", endpoint):
            raise ValueError(f"Twisted endpoint strings such as 'tcp:2525:interface=127.0.0.1', got {endpoint!r}")
    return endpoints


def _listen_or_none(value: object) -> tuple[str, ...]:
    return () if value == [] else _listen(value)


def _key_prefix(value: object) -> str:
    prefix = _string(value)
    if not re.match(r"^[A-Za-z0-9_.:-]+$", prefix):
        raise ValueError(f"letters, digits and '_.:-', got {value!r}")
    return prefix


def _filter(section: _Section, defaults: FilterConfig) -> FilterConfig:
    """
    A filter table, each key given replacing the one of ``defaults``.
    """
    d = defaults
    config = FilterConfig(
        dnsbl=section.get("dnsbl", d.dnsbl, _dnslists),
        dnswl=section.get("dnswl", d.dnswl, _dnslists),
        dns_timeout=section.get("dns_timeout", d.dns_timeout, _positive_duration),
        greylist_delay=section.get("greylist_delay", d.greylist_delay, _duration_or_zero),
        greylist_expiry=section.get("greylist_expiry", d.greylist_expiry, _positive_duration),
        greylist_networks=section.get("greylist_networks", d.greylist_networks, _networks),
        greylist_domains=section.get("greylist_domains", d.greylist_domains, _zones),
        connections_per_minute=section.get("connections_per_minute", d.connections_per_minute, _count),
        messages_per_minute=section.get("messages_per_minute", d.messages_per_minute, _count),
        spf=section.get("spf", d.spf, _boolean),
        spf_actions=section.get("spf_actions", d.spf_actions, _spf_actions),
        rspamd_url=section.get("rspamd_url", d.rspamd_url, _http_url),
        rspamd_timeout=section.get("rspamd_timeout", d.rspamd_timeout, _positive_duration),
        rspamd_fail_open=section.get(
            "rspamd_failure", "accept" if d.rspamd_fail_open else "tempfail", _choice("accept", "tempfail")
        )
        == "accept",
    )
    return config


def _bodies(section: _Section, node: NodeConfig, redis: RedisConfig, base: Path) -> BodiesConfig:
    """
    ``[bodies]``: the default backend is a directory under the data
    directory with the embedded Redis (one node), Redis itself otherwise:
    a node's own disk is not shared with the other nodes, so with an
    external Redis a directory must be named explicitly (a shared filesystem).
    """
    backend = section.get("backend", "directory" if redis.embedded else "redis", _choice(*BODY_BACKENDS))
    if backend == "directory" and not redis.embedded and "directory" not in section.table:
        raise section.fail(
            "directory", "a directory all nodes share (backend = 'directory' with an external Redis), or backend = 's3'"
        )
    config = BodiesConfig(
        backend=backend,
        directory=node.data_dir / section.get("directory", "bodies", _string),
        compression=section.get("compression", "none", _choice("none", "zstd")),
        compression_level=section.get("compression_level", 3, _zstd_level),
        orphan_age=section.get("orphan_age", 3600.0, _positive_duration),
        sweep_interval=section.get("sweep_interval", 60.0, _positive_duration),
        sweep_batch=section.get("sweep_batch", 500, _sweep_batch),
        threads=section.get("threads", 8, _positive_int),
        s3=_s3(section, backend == "s3", base),
    )
    if config.backend == "redis" and config.compression != "none":
        raise section.fail("compression", "'none' with backend = 'redis' (bodies stay in the message hashes whole)")
    waits = redis.timeout + (redis.replication_timeout if redis.durability == "replicated" else 0.0)
    least = max(60.0, 10 * waits)
    if config.orphan_age < least:
        raise section.fail(
            "orphan_age",
            f"at least '{least:g}s' (a body is written before its message is queued), got {config.orphan_age:g}s",
        )
    return config


def _s3(bodies: _Section, wanted: bool, base: Path) -> S3Config:
    if "s3" not in bodies.table:
        bodies.used.add("s3")
        if wanted:
            raise bodies.fail("s3", "a [bodies.s3] table with at least bucket, for backend = 's3'")
        return S3Config()
    section = bodies.sub("s3")
    endpoint = section.get("endpoint_url", None, _http_url)
    config = S3Config(
        bucket=section.require("bucket", _bucket) if wanted else section.get("bucket", None, _bucket),
        prefix=section.get("prefix", "relayx/", _s3_prefix),
        endpoint_url=endpoint,
        region=section.get("region", "us-east-1", _string),
        access_key=section.get("access_key", None, _string),
        secret_key=section.get("secret_key", None, _string),
        addressing_style=section.get(
            "addressing_style", "path" if endpoint else "auto", _choice("auto", "path", "virtual")
        ),
        timeout=section.get("timeout", 30.0, _positive_duration),
        attempts=section.get("attempts", 3, _positive_int),
        ca_file=section.get("ca_file", None, _file(base)),
    )
    if (config.access_key is None) != (config.secret_key is None):
        raise section.fail("secret_key", "access_key and secret_key together, or neither (botocore's credential chain)")
    section.finish()
    return config


def _zstd_level(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 19:
        return value
    raise ValueError(f"a zstd level from 1 (fastest) to 19, got {value!r}")


def _sweep_batch(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000:
        return value
    raise ValueError(f"a whole number from 1 to 1000, got {value!r}")


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _bucket(value: object) -> str:
    if isinstance(value, str) and _BUCKET.match(value):
        return value
    raise ValueError(f"a bucket name (3 to 63 lower-case letters, digits, '.' and '-'), got {value!r}")


def _s3_prefix(value: object) -> str:
    if isinstance(value, str) and (value == "" or (re.match(r"^[A-Za-z0-9!_.*'()/-]+$", value) and "//" not in value)):
        return value if not value or value.endswith("/") else value + "/"
    raise ValueError(f"a key prefix such as 'relayx/' (letters, digits, '/', '-', '_', '.'), got {value!r}")


def _domain_filter(domain: _Section, defaults: FilterConfig) -> FilterConfig | None:
    if "filter" not in domain.table:
        domain.used.add("filter")
        return None
    section = domain.sub("filter")
    for name in CLIENT_LIMITS:
        if name in section.table:
            raise section.fail(name, "this key in [filter] only: client limits act before any recipient is known")
    config = _filter(section, defaults)
    section.finish()
    return config


def _spf_actions(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError(f'a table such as {{ fail = "reject" }}, got {value!r}')
    actions = dict(DEFAULT_SPF_ACTIONS)
    for result, action in value.items():
        if result not in SPF_RESULTS:
            raise ValueError(f"SPF results ({', '.join(SPF_RESULTS)}) as keys, got {result!r}")
        if action not in SPF_ACTIONS:
            raise ValueError(f"{' or '.join(SPF_ACTIONS)} for {result}, got {action!r}")
        actions[result] = action
    return tuple(sorted(actions.items()))


def _tokens(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError("a table of name = token, such as { ops = '<32 random characters>' }")
    tokens = []
    for name, token in value.items():
        if not isinstance(token, str) or len(token) < 16 or not token.isprintable() or " " in token:
            raise ValueError(f"a token of at least 16 printable characters without spaces for {name!r}")
        tokens.append((name, token))
    return tuple(tokens)


def _http_url(value: object) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an http:// URL such as 'http://127.0.0.1:11333', got {value!r}")
    return text.rstrip("/")


def _domain_name(value: object) -> str:
    try:
        return normalize_domain(_string(value))
    except AddressError as e:
        raise ValueError(f"a domain name, got {value!r} ({e})") from None


def _routes(value: object) -> tuple[Route, ...]:
    if not (isinstance(value, list) and value):
        raise ValueError(f"a non-empty list such as ['smtp://mail.example.com:25'] or ['mx'], got {value!r}")
    routes = tuple(parse_route(v) for v in value)
    if any(isinstance(r, MXRoute) for r in routes) and len(routes) > 1:
        raise ValueError("'mx' alone, not mixed with smtp:// destinations")
    return routes


def _recipient_rule(domain: str, base: Path) -> Callable[[object], RecipientRule]:
    def convert(value: object) -> RecipientRule:
        if value == "any":
            return AnyRecipient()
        if isinstance(value, list):
            addresses = [_address_in(domain, v) for v in value]
            return RecipientList(frozenset(addresses))
        raise ValueError(
            "'any', a list of addresses, { file = 'path' }, { pattern = 'regex' } or { verify = true }, "
            f"got {value!r}"
        )

    return convert


def _recipients(section: _Section, domain: str, base: Path) -> RecipientRule:
    """
    ``recipients``: a string or list, or a table naming one kind of rule.
    """
    if not isinstance(section.table.get("recipients"), dict):
        return section.require("recipients", _recipient_rule(domain, base))
    rule = section.sub("recipients")
    result: RecipientRule
    if "file" in rule.table:
        result = RecipientList(frozenset(rule.require("file", _address_file(domain, base))))
    elif "pattern" in rule.table:
        result = RecipientPattern(rule.require("pattern", _regex))
    elif "verify" in rule.table:
        if rule.require("verify", _boolean) is not True:
            raise rule.fail("verify", "true (leave the table out for no verification)")
        result = RecipientVerify(
            positive_ttl=rule.get("positive_ttl", 86400.0, _positive_duration),
            negative_ttl=rule.get("negative_ttl", 3600.0, _positive_duration),
            default=rule.get("default", "accept", _choice("accept", "reject", "tempfail")),
            timeout=rule.get("timeout", 10.0, _positive_duration),
        )
    else:
        raise section.fail("recipients", "a table with one of the keys file, pattern or verify")
    rule.finish()
    return result


def _address_file(domain: str, base: Path) -> Callable[[object], list[str]]:
    def convert(value: object) -> list[str]:
        path = (base / _string(value)).resolve()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"a readable file of addresses, {path}: {e.strerror}") from None
        entries = [line.strip() for line in lines]
        return [_address_in(domain, e) for e in entries if e and not e.startswith("#")]

    return convert


def _regex(value: object) -> re.Pattern[str]:
    try:
        return re.compile(_string(value), re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"a regular expression, {value!r} is not one ({e})") from None


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value in choices:
            return str(value)
        raise ValueError(f"one of {', '.join(repr(c) for c in choices)}, got {value!r}")

    return convert


_TLS_MODE = _choice("none", "opportunistic", "required", "verify")


def _address_in(domain: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"an address, got {value!r}")
    try:
        mailbox = Mailbox.parse(value)
    except AddressError as e:
        raise ValueError(f"an address, got {value!r} ({e})") from None
    if mailbox.domain != domain:
        raise ValueError(f"an address in {domain}, got {value!r}")
    return mailbox.canonical


def _rate(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValueError(f"messages per second, a number of 0 (no limit) or more, got {value!r}")


def _positive_rate(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ValueError(f"messages per second, a number above 0, got {value!r}")


def _factor(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 1:
        return float(value)
    raise ValueError(f"a factor above 1 (e.g. 4 for four times), got {value!r}")


def _duration_or_zero(value: object) -> float:
    return 0.0 if value in ("0", "0s") else parse_duration(value)


def _history(value: object) -> float:
    seconds = _duration_or_zero(value)
    if seconds and not 3600 <= seconds <= 90 * 86400:
        raise ValueError(f"0 (no history) or a duration from '1h' to '90d', got {value!r}")
    return seconds


def _throttle(section: _Section, default: Throttle) -> Throttle:
    return Throttle(
        concurrency=section.get("concurrency", default.concurrency, _positive_int),
        rate=section.get("rate", default.rate, _rate),
        ramp_up=section.get("ramp_up", default.ramp_up, _duration_or_zero),
    )


def load(path: str | Path, overrides: Mapping[str, object] | None = None) -> Config:
    """
    Read and validate the TOML file at ``path``.

    ``overrides`` hold command-line values by dotted key (``smtp.listen``,
    ``redis.url``, ``node.id``, ``node.data_dir``) and win over the file.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        table = data.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = value
    return parse(data, source, Path(path).resolve().parent)


def parse(data: dict[str, Any], source: str, base: Path) -> Config:
    """
    Validate an already-decoded TOML document; relative paths are taken
    from ``base``.
    """
    root = _Section(source, "", data)

    node = root.sub("node")
    host = socket.getfqdn()
    node_config = NodeConfig(
        id=node.get("id", socket.gethostname(), _string),
        hostname=node.get("hostname", host, _string),
        data_dir=base / node.get("data_dir", "relayx-data", _string),
        log_format=node.get("log_format", "text", _choice("text", "json")),
        processes=node.get("processes", 1, _processes),
    )
    node.finish()

    smtp = root.sub("smtp")
    smtp_config = SMTPConfig(
        listen=smtp.get("listen", ("tcp:25",), _listen),
        max_message_size=smtp.get("max_message_size", 25 * 1024 * 1024, parse_size),
        max_recipients=smtp.get("max_recipients", 100, _positive_int),
        max_line_length=smtp.get("max_line_length", 2048, _positive_int),
        max_errors=smtp.get("max_errors", 10, _positive_int),
        max_hops=smtp.get("max_hops", 50, _positive_int),
        command_timeout=smtp.get("command_timeout", 300.0, _positive_duration),
        data_timeout=smtp.get("data_timeout", 1800.0, _positive_duration),
        max_connections=smtp.get("max_connections", 1000, _positive_int),
        max_connections_per_ip=smtp.get("max_connections_per_ip", 50, _positive_int),
        shutdown_grace=smtp.get("shutdown_grace", 30.0, _positive_duration),
        bare_lf=smtp.get("bare_lf", "normalize", _choice("normalize", "reject")),
        tls_certificate=smtp.get("tls_certificate", None, _file(base)),
        tls_key=smtp.get("tls_key", None, _file(base)),
        spool_threshold=smtp.get("spool_threshold", 1024 * 1024, parse_size),
        min_data_rate=smtp.get("min_data_rate", 500, _count),
        data_rate_grace=smtp.get("data_rate_grace", 30.0, _positive_duration),
    )
    if (smtp_config.tls_certificate is None) != (smtp_config.tls_key is None):
        raise smtp.fail("tls_key", "tls_certificate and tls_key together, or neither")
    if smtp_config.max_line_length < 512:
        raise smtp.fail("max_line_length", "at least 512 (RFC 5321, section 4.5.3.1.4)")
    if smtp_config.data_rate_grace >= smtp_config.data_timeout:
        raise smtp.fail("data_rate_grace", f"less than smtp.data_timeout ({smtp_config.data_timeout:g}s)")
    smtp.finish()

    redis = root.sub("redis")
    redis_config = RedisConfig(
        url=redis.get("url", None, _redis_url),
        key_prefix=redis.get("key_prefix", "relayx", _key_prefix),
        timeout=redis.get("timeout", 5.0, _positive_duration),
        sentinels=redis.get("sentinels", (), _addresses),
        master_name=redis.get("master_name", "relayx", _string),
        durability=redis.get("durability", "aof", _choice("aof", "replicated")),
        replicas=redis.get("replicas", 1, _positive_int),
        replication_timeout=redis.get("replication_timeout", 2.0, _positive_duration),
        tls_ca_file=redis.get("tls_ca_file", None, _file(base)),
        password_from_file=redis.get("password_file", None, _secret_file(base)),
    )
    if redis_config.password_from_file is not None and urlsplit(redis_config.url or "").password is not None:
        raise redis.fail("password_file", "no password in the url as well: give it in one place")
    if redis_config.tls_ca_file is not None and not redis_config.tls:
        raise redis.fail("tls_ca_file", "a 'rediss://' url (TLS) to go with it")
    replicated = redis_config.durability == "replicated"
    if replicated and redis_config.replication_timeout >= redis_config.timeout:
        raise redis.fail("replication_timeout", f"less than redis.timeout ({redis_config.timeout:g}s)")
    if replicated and redis_config.embedded:
        raise redis.fail("durability", "'aof' for an embedded Redis, which has no replicas")
    redis.finish()

    queue = root.sub("queue")
    queue_config = QueueConfig(
        retention=queue.get("retention", 5 * 86400.0, _positive_duration),
        retry_schedule=queue.get("retry_schedule", (60.0, 300.0, 900.0, 1800.0, 3600.0), _schedule),
        lease=queue.get("lease", 60.0, _positive_duration),
        workers=queue.get("workers", 8, _positive_int),
        poll_interval=queue.get("poll_interval", 1.0, _positive_duration),
        probe_interval=queue.get("probe_interval", 5.0, _positive_duration),
        heartbeat=queue.get("heartbeat", 5.0, _positive_duration),
        throttle=_throttle(queue, Throttle(concurrency=1, rate=0.0, ramp_up=30.0)),
        delay_warning=queue.get("delay_warning", 0.0, _duration_or_zero),
        quota_messages=queue.get("quota_messages", 0, _count),
        quota_bytes=queue.get("quota_bytes", 0, parse_size),
        domain_quota_messages=queue.get("domain_quota_messages", 0, _count),
        domain_quota_bytes=queue.get("domain_quota_bytes", 0, parse_size),
        memory_headroom=queue.get("memory_headroom", 0.1, _fraction(0.01, 0.5)),
        quota_warning=queue.get("quota_warning", 0.8, _fraction(0.1, 1.0)),
    )
    if queue_config.lease < 3:
        raise queue.fail("lease", "at least '3s', so that it can be renewed in time")
    queue.finish()

    delivery = root.sub("delivery")
    delivery_config = DeliveryConfig(
        helo_name=delivery.get("helo_name", node_config.hostname, _string),
        connect_timeout=delivery.get("connect_timeout", 30.0, _positive_duration),
        command_timeout=delivery.get("command_timeout", 300.0, _positive_duration),
        data_timeout=delivery.get("data_timeout", 600.0, _positive_duration),
        nameservers=delivery.get("nameservers", (), _addresses),
        mx_port=delivery.get("mx_port", 25, _port),
        tls=delivery.get("tls", "opportunistic", _TLS_MODE),
        tls_ca_file=delivery.get("tls_ca_file", None, _file(base)),
        pace=PacePolicy(
            backoff=delivery.get("pace_backoff", 0.7, _fraction(0.1, 0.9)),
            interval=delivery.get("pace_interval", 1.0, _positive_duration),
            floor_rate=delivery.get("pace_floor_rate", 1.0, _positive_rate),
            slow=delivery.get("pace_slow", 4.0, _factor),
            start=delivery.get("pace_start", 0.5, _fraction(0.05, 1.0)),
            idle=delivery.get("pace_idle", 300.0, _positive_duration),
        ),
    )
    delivery.finish()

    filters = root.sub("filter")
    filter_config = _filter(filters, FilterConfig())
    filters.finish()

    admin = root.sub("admin")
    admin_config = AdminConfig(
        listen=admin.get("listen", (), _listen_or_none),
        tokens=admin.get("tokens", (), _tokens),
        history=admin.get("history", 7 * 86400.0, _history),
        metrics_token_required=admin.get("metrics_token_required", False, _boolean),
    )
    if admin_config.metrics_token_required and not admin_config.tokens:
        raise admin.fail("metrics_token_required", "[admin.tokens] to check the token against, or false")
    admin.finish()

    bodies = root.sub("bodies")
    bodies_config = _bodies(bodies, node_config, redis_config, base)
    bodies.finish()

    root.used.add("domain")
    raw_domains = data.get("domain", [])
    if not isinstance(raw_domains, list):
        raise ConfigError(f"{source}: domain: expected [[domain]] tables, got {raw_domains!r}")
    domains: list[DomainConfig] = []
    for index, raw in enumerate(raw_domains):
        section = _Section(source, f"domain[{index}]", raw)
        name = section.require("name", _domain_name)
        if any(d.name == name for d in domains):
            raise section.fail("name", f"each domain once, {name!r} is listed twice")
        domains.append(
            DomainConfig(
                name=name,
                routes=section.require("routes", _routes),
                recipients=_recipients(section, name, base),
                throttle=_throttle(section, queue_config.throttle),
                tls=section.get("tls", None, _TLS_MODE),
                tls_name=section.get("tls_name", None, _domain_name),
                copy_to=section.get("copy_to", (), _copy_routes),
                filter=_domain_filter(section, filter_config),
                quota_messages=section.get("quota_messages", queue_config.domain_quota_messages, _count),
                quota_bytes=section.get("quota_bytes", queue_config.domain_quota_bytes, parse_size),
            )
        )
        section.finish()
    root.finish()

    return Config(
        source=source,
        node=node_config,
        smtp=smtp_config,
        redis=redis_config,
        queue=queue_config,
        delivery=delivery_config,
        domains=tuple(domains),
        filter=filter_config,
        admin=admin_config,
        bodies=bodies_config,
    )
