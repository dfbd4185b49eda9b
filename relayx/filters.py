"""
Filtering before the queue: what a client may send is decided while it is
connected, so that spam the primary would refuse is never queued, let alone
replayed when it comes back.

Filters answer at four points of the session (connection, MAIL, RCPT, end
of DATA) with a reply to send instead of the normal one, ``None`` to pass,
``AddHeaders`` to pass with header lines for the message (an SPF result, a
spam score), or ``ALLOW`` to end the chain (a whitelisted client). Their
shared state (greylisting, rate counters) lives in Redis, so every node of
the cluster decides the same. A filter that fails (DNS timeout, Redis
hiccup) is logged and skipped: it never blocks mail, unless it was told to
fail closed and answers ``451`` itself.

A domain may have a chain of its own (``[domain.filter]``); the connection
and MAIL points run before any recipient is known, so they use the default.
"""

from __future__ import annotations

import io
import ipaddress
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from relayx import spf
from relayx.address import Mailbox
from relayx.config import DNSList
from relayx.lookup import Lookup, LookupFailed
from relayx.queue.redis import load_script
from relayx.reply import Reply

_RATE_SCRIPT = load_script("ratelimit.lua")

log = Logger()


class _Allow:
    def __repr__(self) -> str:
        return "ALLOW"


#: a verdict that ends the chain: the client is trusted
ALLOW = _Allow()


@attrs.frozen
class AddHeaders:
    """
    Pass, and put these header lines (``Name: value``, folded with CRLF
    and a tab) at the top of the message.
    """

    lines: tuple[str, ...]


Verdict = Reply | _Allow | AddHeaders | None


def add_lines(headers: list[str], lines: Sequence[str]) -> None:
    """
    Append the header lines not already there: two filters (or a domain's
    chain and the default) may ask for the same one.
    """
    headers += [line for line in lines if line not in headers]


@attrs.frozen
class Client:
    """
    Who is sending: the address and the name it gave in HELO/EHLO.
    """

    ip: str
    helo: str


@attrs.frozen
class Decision:
    """
    What a chain decided at one point: a reply that refuses (``None``:
    go on) and header lines for the message.
    """

    reply: Reply | None = None
    headers: tuple[str, ...] = ()


class Filter:
    """
    A filter answers at any of the four points; the default passes.
    """

    name = "filter"

    async def connection(self, client: str) -> Verdict:
        return None

    async def mail(self, client: Client, sender: str) -> Verdict:
        return None

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        return None

    async def message(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> Verdict:
        return None


class FilterChain:
    """
    Runs the filters in order; the first reply or ``ALLOW`` decides, and
    the header lines of the filters that ran are kept.
    """

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = list(filters)
        #: whether a filter looks at the message itself (end of DATA)
        self.scans_content = any(type(f).message is not Filter.message for f in self.filters)

    async def _run(self, point: str, call: Callable[[Filter], Awaitable[Verdict]]) -> Decision:
        headers: list[str] = []
        for f in self.filters:
            try:
                verdict = await call(f)
            except Exception as e:
                log.warn("filter {filter} skipped at {point}: {why}", filter=f.name, point=point, why=repr(e))
                continue
            if isinstance(verdict, AddHeaders):
                add_lines(headers, verdict.lines)
            elif verdict is ALLOW:
                break
            elif isinstance(verdict, Reply):
                return Decision(verdict, tuple(headers))
        return Decision(None, tuple(headers))

    async def connection(self, client: str) -> Decision:
        return await self._run("connection", lambda f: f.connection(client))

    async def mail(self, client: Client, sender: str) -> Decision:
        return await self._run("MAIL", lambda f: f.mail(client, sender))

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Decision:
        return await self._run("RCPT", lambda f: f.recipient(client, sender, recipient))

    async def message(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> Decision:
        return await self._run("DATA", lambda f: f.message(client, sender, recipients, content))


@attrs.frozen
class FilterChains:
    """
    The default chain and the chains of the domains that have their own.
    """

    default: FilterChain
    domains: Mapping[str, FilterChain] = attrs.field(factory=dict)

    def for_recipient(self, recipient: Mailbox) -> FilterChain:
        return self.domains.get(recipient.domain, self.default)

    @property
    def scans_content(self) -> bool:
        """
        Whether any chain has an end-of-DATA filter: when none has, the
        message is not assembled for them.
        """
        return self.default.scans_content or any(c.scans_content for c in self.domains.values())

    async def message(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> Decision:
        """
        The end-of-DATA check of each chain the recipients' domains use: a
        message is one, so any chain's refusal refuses it.
        """
        chains: list[FilterChain] = []
        for recipient in recipients:
            chain = self.for_recipient(recipient)
            if chain not in chains:
                chains.append(chain)
        headers: list[str] = []
        for chain in chains:
            decision = await chain.message(client, sender, recipients, content)
            add_lines(headers, decision.headers)
            if decision.reply is not None:
                return Decision(decision.reply, tuple(headers))
        return Decision(None, tuple(headers))


def reversed_ip(client: str) -> str | None:
    """
    The DNSBL query name of an address: ``4.3.2.1`` for 1.2.3.4, nibbles for IPv6.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return None
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


#: a DNS list's answers that may mean "listed"; in 127.255.255.0/24 they are
#: error codes (Spamhaus: 127.255.255.254 "queried through a public resolver",
#: 127.255.255.255 "over the free quota"), which would list every client
LISTED_ANSWERS = ipaddress.IPv4Network("127.0.0.0/8")
LIST_ERROR_ANSWERS = ipaddress.IPv4Network("127.255.255.0/24")


@attrs.define
class DNSLists(Filter):
    """
    DNSWL zones first (a listed client is trusted), then DNSBL zones (a
    listed client's recipients get 554 5.7.1 naming the zone). Only an
    answer in 127.0.0.0/8, outside the error codes of 127.255.255.0/24 and
    matching the list's pattern if it has one, is a listing; any other is
    not, with a warning naming the list at most once per ``warn_every``
    seconds for each list. Answers are remembered per client for ``cache_for`` seconds.
    """

    blocklists: Sequence[DNSList]
    allowlists: Sequence[DNSList]
    lookup: Lookup
    clock: IReactorTime
    cache_for: float = 300.0
    warn_every: float = 3600.0
    name = "dnsbl"
    _cache: dict[str, tuple[float, Verdict]] = attrs.field(factory=dict)
    _warned: dict[str, float] = attrs.field(factory=dict)

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        now = self.clock.seconds()
        cached = self._cache.get(client.ip)
        if cached is not None and cached[0] > now:
            return cached[1]
        verdict = await self._check(client.ip)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[client.ip] = (now + self.cache_for, verdict)
        return verdict

    async def _listed(self, dnslist: DNSList, client: str, query: str) -> str | None:
        """
        The answer that lists the client, or ``None``.
        """
        try:
            answers = await self.lookup(f"{query}.{dnslist.zone}", "A")
        except LookupFailed:
            log.warn("DNS list {zone} did not answer for {client}; not used", zone=dnslist.zone, client=client)
            return None
        for answer in answers:
            try:
                address = ipaddress.IPv4Address(answer)
            except ValueError:
                continue
            if address in LISTED_ANSWERS and address not in LIST_ERROR_ANSWERS:
                if dnslist.counts(answer):
                    return answer
            else:
                self._warn(dnslist.zone, answer)
        return None

    def _warn(self, zone: str, answer: str) -> None:
        now = self.clock.seconds()
        if now < self._warned.get(zone, float("-inf")) + self.warn_every:
            return
        self._warned[zone] = now
        meaning = (
            "an error code: the list refuses this resolver (a public one?) or its query quota is used up"
            if ipaddress.IPv4Address(answer) in LIST_ERROR_ANSWERS
            else "not a listing code (a resolver that rewrites unknown names?)"
        )
        log.warn(
            "DNS list {zone} answered {answer}, {meaning}; taken as not listed",
            zone=zone,
            answer=answer,
            meaning=meaning,
        )

    async def _check(self, client: str) -> Verdict:
        query = reversed_ip(client)
        if query is None:
            return None
        for dnslist in self.allowlists:
            if await self._listed(dnslist, client, query) is not None:
                return ALLOW
        for dnslist in self.blocklists:
            answer = await self._listed(dnslist, client, query)
            if answer is not None:
                log.info("client {client} listed in {zone} ({answer})", client=client, zone=dnslist.zone, answer=answer)
                zone = dnslist.zone
                return Reply(554, "5.7.1", f"Service unavailable; client host [{client}] blocked using {zone}")
        return None


def _network(client: str) -> str:
    """
    The client's network for greylisting: senders retry from pools of hosts.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@attrs.define
class Greylist(Filter):
    """
    The first attempt of a (client network, sender, recipient) triplet is
    deferred; a retry after ``delay`` passes, from any node of the cluster,
    and the triplet stays known for ``expiry``.
    """

    redis: Any
    prefix: str
    delay: float
    expiry: float
    clock: IReactorTime
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
    domains: frozenset[str] = frozenset()
    name = "greylist"

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        try:
            address = ipaddress.ip_address(client.ip)
        except ValueError:
            return None
        if any(address in network for network in self.networks):
            return None
        if sender and sender.rpartition("@")[2].lower() in self.domains:
            return None
        key = f"{self.prefix}:grey:{_network(client.ip)}:{sender.lower()}:{recipient.canonical}"
        now_ms = int(self.clock.seconds() * 1000)
        expiry_ms = int(self.expiry * 1000)
        first = await self.redis.call("set", key, now_ms, None, expiry_ms, True)
        if first:
            return self._wait(self.delay)
        seen = int(await self.redis.call("get", key) or now_ms)
        waited = (now_ms - seen) / 1000
        if waited < self.delay:
            return self._wait(self.delay - waited)
        await self.redis.call("pexpire", key, expiry_ms)
        return None

    @staticmethod
    def _wait(seconds: float) -> Reply:
        return Reply(450, "4.2.0", f"Greylisted, please try again in {int(seconds) + 1} seconds")


RATE_WINDOW = 60.0


@attrs.define
class RateLimit(Filter):
    """
    Connections and messages per client address in the last minute (a
    sliding window, so no burst at a minute's turn), counted across the
    cluster; past the limit, ``421`` for a connection and ``450`` for a message.
    """

    redis: Any
    prefix: str
    clock: IReactorTime
    connections_per_minute: int = 0
    messages_per_minute: int = 0
    name = "ratelimit"
    _events: int = 0

    async def _count(self, kind: str, client: str) -> int:
        self._events += 1
        now_ms = int(self.clock.seconds() * 1000)
        keys = [f"{self.prefix}:rate:{kind}:{client}"]
        args = [now_ms, int(RATE_WINDOW * 1000), f"{now_ms}:{id(self)}:{self._events}"]
        return int(await self.redis.script(_RATE_SCRIPT, keys, args))

    async def connection(self, client: str) -> Verdict:
        if self.connections_per_minute and await self._count("conn", client) > self.connections_per_minute:
            return Reply(421, "4.7.0", f"Error: too many connections from {client}, try again later")
        return None

    async def mail(self, client: Client, sender: str) -> Verdict:
        if self.messages_per_minute and await self._count("msg", client.ip) > self.messages_per_minute:
            return Reply(450, "4.7.1", f"Error: too much mail from {client.ip}, try again later")
        return None


def spf_reply(action: str, result: spf.Result) -> Reply | None:
    """
    What an SPF result's configured action makes of the recipient: ``None``
    (accept), a refusal (RFC 7372 codes) or a deferral.
    """
    if action == "reject":
        if result is spf.Result.PERMERROR:
            return Reply(550, "5.7.24", "SPF validation error")
        return Reply(550, "5.7.23", "SPF validation failed")
    if action == "tempfail":
        return Reply(451, "4.7.24", "SPF validation error, try again later")
    return None


@attrs.define
class SPFCache:
    """
    SPF results by (client, sender, HELO), for ``keep`` seconds: every
    recipient of a transaction, and of each domain's chain, asks the same.
    """

    lookup: Lookup
    clock: IReactorTime
    keep: float = 60.0
    _results: dict[tuple[str, str, str], tuple[float, spf.Verdict]] = attrs.field(factory=dict)

    async def check(self, client: Client, sender: str) -> spf.Verdict:
        key = (client.ip, sender.lower(), client.helo.lower())
        cached = self._results.get(key)
        if cached is not None and cached[0] > self.clock.seconds():
            return cached[1]
        verdict = await spf.check(self.lookup, client.ip, sender, client.helo)
        if verdict.result is not spf.Result.TEMPERROR:
            if len(self._results) > 10000:
                self._results.clear()
            self._results[key] = (self.clock.seconds() + self.keep, verdict)
        return verdict


@attrs.define
class SPF(Filter):
    """
    The client checked against the sender domain's SPF record (the HELO
    name's for the null sender), at RCPT so that each domain applies its
    own ``actions``: ``{"fail": "reject", ...}`` (results not named pass).
    The result is recorded in ``Received-SPF`` and ``Authentication-Results``.
    """

    cache: SPFCache
    receiver: str
    actions: Mapping[str, str]
    name = "spf"

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        verdict = await self.cache.check(client, sender)
        reply = spf_reply(self.actions.get(verdict.result.value, "accept"), verdict.result)
        if reply is not None:
            log.info(
                "SPF {result} for {sender} from {client}: {code}",
                result=verdict.result.value,
                sender=verdict.sender,
                client=client.ip,
                code=reply.code,
            )
            return reply
        return AddHeaders((verdict.received_spf(self.receiver), verdict.authentication_results(self.receiver)))


#: rspamd's actions (https://rspamd.com/doc/configuration/metrics.html)
RSPAMD_REPLIES = {
    "reject": Reply(554, "5.7.1", "Message rejected as spam"),
    "soft reject": Reply(451, "4.7.1", "Message deferred, try again later"),
    "greylist": Reply(451, "4.7.1", "Message deferred, try again later"),
}
RSPAMD_UNAVAILABLE = Reply(451, "4.7.1", "Content scanner unavailable, try again later")


@attrs.define
class Rspamd(Filter):
    """
    The whole message scanned by rspamd (``POST /checkv2``) at the end of
    DATA; its action decides: reject (554), soft reject or greylist (451),
    add header or rewrite subject (``X-Spam: Yes``), else accept. The score
    is recorded in ``X-Rspamd-Score``. When rspamd does not answer within
    ``timeout``, the message passes (``fail_open``) or is deferred with 451.
    """

    url: str
    timeout: float
    fail_open: bool
    clock: IReactorTime
    agent: IAgent
    hostname: str
    name = "rspamd"

    async def message(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> Verdict:
        try:
            answer = await self._scan(client, sender, recipients, content)
        except Exception as e:
            if self.fail_open:
                raise
            log.warn("rspamd did not answer ({why}); message deferred", why=repr(e), code=451)
            return RSPAMD_UNAVAILABLE
        action = str(answer.get("action", "no action"))
        score = f"X-Rspamd-Score: {float(answer.get('score', 0)):.2f} / {float(answer.get('required_score', 0)):.2f}"
        reply = RSPAMD_REPLIES.get(action)
        if reply is not None:
            log.info(
                "rspamd: {action} for mail from {client} ({score})",
                action=action,
                client=client.ip,
                score=answer.get("score"),
                code=reply.code,
            )
            return reply
        if action in ("add header", "rewrite subject"):
            return AddHeaders(("X-Spam: Yes", score))
        return AddHeaders((score,))

    async def _scan(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> dict[str, Any]:
        headers = Headers(
            {
                b"IP": [client.ip.encode()],
                b"Helo": [client.helo.encode()],
                b"From": [sender.encode() or b"<>"],
                b"Rcpt": [str(r).encode() for r in recipients],
                b"MTA-Name": [self.hostname.encode()],
                b"Content-Type": [b"message/rfc822"],
            }
        )
        started = self.clock.seconds()
        request: Deferred[Any] = self.agent.request(
            b"POST", self.url.rstrip("/").encode() + b"/checkv2", headers, FileBodyProducer(io.BytesIO(content))
        )
        request.addTimeout(self.timeout, self.clock)
        response = await request
        remaining = max(0.1, self.timeout - (self.clock.seconds() - started))
        body: Deferred[bytes] = readBody(response)
        body.addTimeout(remaining, self.clock)
        data = await body
        if response.code != 200:
            raise RuntimeError(f"rspamd answered HTTP {response.code}")
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise RuntimeError("rspamd's answer is not a JSON object")
        return answer
