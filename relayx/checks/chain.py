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

from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
from twisted.logger import Logger

from relayx.address import Mailbox
from relayx.reply import Reply

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
