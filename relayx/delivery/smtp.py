"""
Delivering one message over SMTP, and what each reply means for it.

The classification is the backup MX's promise in code: only a destination's
explicit ``5xx`` about a recipient or the message fails it; everything else
(no connection, a timeout, a ``4xx``, a ``421``, a greeting refused) waits
for a retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relayx.delivery.routes import Target
from relayx.interfaces import IDeliverer, Outcome
from relayx.reply import Reply
from relayx.smtp.client import ConversationError, SMTPClientProtocol, dot_stuff

log = Logger()
T = TypeVar("T")

Connect = Callable[[str, int], Awaitable[SMTPClientProtocol]]
Targets = Callable[[str], Awaitable[Sequence[Target]]]
#: the client TLS options for a host name and a policy (``verify`` checks the name)
ClientTLS = Callable[[str, str], Any]


class _TryNext(Exception):
    """
    This destination host cannot take the message now; try the next one.
    """


@attrs.frozen
class Timeouts:
    command: float
    data: float


@implementer(IDeliverer)
class SMTPDeliverer:
    """
    Tries a domain's destination hosts in order until one answers.
    """

    def __init__(
        self,
        *,
        helo_name: str,
        targets: Targets,
        connect: Connect,
        timeouts: Timeouts,
        clock: IReactorTime,
        client_tls: ClientTLS | None = None,
    ) -> None:
        self._client_tls = client_tls
        self._clock = clock
        self._helo = helo_name
        self._targets = targets
        self._connect = connect
        self._timeouts = timeouts

    async def deliver(self, domain: str, sender: str, recipients: tuple[str, ...], body: bytes) -> Outcome:
        async def transaction(conn: SMTPClientProtocol, target: Target) -> Outcome:
            return await self._transaction(conn, target, sender, recipients, body)

        result = await self._first_answer(domain, transaction)
        return Outcome(unreachable=result) if isinstance(result, str) else result

    async def probe(self, domain: str) -> str | None:
        async def hello(conn: SMTPClientProtocol, target: Target) -> bool:
            await self._hello(conn, target)
            await self._quit(conn)
            return True

        result = await self._first_answer(domain, hello)
        return result if isinstance(result, str) else None

    async def verify(self, domain: str, address: str, timeout: float) -> bool | None:
        """
        A RCPT callout: whether the destination accepts ``address`` (with the
        null sender, and no message sent); ``None`` when it cannot say.
        """

        async def ask(conn: SMTPClientProtocol, target: Target) -> bool | None:
            await self._hello(conn, target, timeout)
            mail = await conn.command("MAIL FROM:<>", timeout)
            rcpt = await conn.command(f"RCPT TO:<{address}>", timeout) if mail.positive else mail
            await self._quit(conn)
            if rcpt.code == 421 or not mail.positive:
                return None
            return True if rcpt.positive else (False if rcpt.permanent else None)

        d = Deferred.fromCoroutine(self._first_answer(domain, ask))
        d.addTimeout(timeout, self._clock)
        try:
            result = await d
        except Exception:
            return None
        return None if isinstance(result, str) else result

    async def _first_answer(
        self, domain: str, attempt: Callable[[SMTPClientProtocol, Target], Awaitable[T]]
    ) -> T | str:
        """
        ``attempt`` on the domain's hosts in order until one answers; if
        none does, why (one reason per host).
        """
        try:
            targets = await self._targets(domain)
        except Exception as e:
            return f"no destination for {domain}: {e}"
        reasons = []
        for target in targets:
            where = f"{target.address}:{target.port}"
            try:
                connection = await self._connect(target.address, target.port)
            except Exception as e:
                reasons.append(f"{where}: {e}")
                continue
            try:
                return await attempt(connection, target)
            except (_TryNext, ConversationError) as e:
                reasons.append(f"{where}: {e}")
            finally:
                connection.close()
        return "; ".join(reasons) or f"no destination for {domain}"

    async def _hello(self, conn: SMTPClientProtocol, target: Target, timeout: float | None = None) -> set[str]:
        """
        Read the greeting, say EHLO (HELO if refused) and start TLS as the
        target's policy asks; the extensions offered.
        """
        wait = timeout or self._timeouts.command
        greeting = await conn.read(wait)
        if not greeting.positive:
            raise _TryNext(f"greeting {greeting}")
        extensions = await self._ehlo(conn, wait)
        if target.tls == "none" or self._client_tls is None:
            return extensions
        if "STARTTLS" not in extensions:
            if target.tls in ("required", "verify"):
                raise _TryNext(f"TLS is {target.tls} for {target.name}, and STARTTLS is not offered")
            return extensions
        ready = await conn.command("STARTTLS", wait)
        if ready.code != 220:
            if target.tls in ("required", "verify"):
                raise _TryNext(f"TLS is {target.tls} for {target.name}, and STARTTLS got {ready}")
            return extensions
        conn.transport.startTLS(self._client_tls(target.name, target.tls))  # type: ignore[union-attr]
        try:
            extensions = await self._ehlo(conn, wait)
        except ConversationError as e:
            raise _TryNext(f"TLS with {target.name} failed ({target.tls}): {e}") from None
        conn.tls = True
        return extensions

    async def _ehlo(self, conn: SMTPClientProtocol, wait: float) -> set[str]:
        hello = await conn.command(f"EHLO {self._helo}", wait)
        if hello.positive:
            return {line.split(" ")[0].upper() for line in hello.text.split("\n")[1:]}
        hello = await conn.command(f"HELO {self._helo}", wait)
        if not hello.positive:
            raise _TryNext(f"HELO {hello}")
        return set()

    async def _transaction(
        self,
        conn: SMTPClientProtocol,
        target: Target,
        sender: str,
        recipients: tuple[str, ...],
        body: bytes,
    ) -> Outcome:
        t = self._timeouts
        where = f"{target.name} [{target.address}]:{target.port}"
        extensions = await self._hello(conn, target)

        params = ""
        if "SIZE" in extensions:
            params += f" SIZE={len(body)}"
        if "8BITMIME" in extensions and not body.isascii():
            params += " BODY=8BITMIME"
        if not (sender.isascii() and all(r.isascii() for r in recipients)):
            if "SMTPUTF8" not in extensions:
                refused = Reply(553, "5.6.7", f"{where} does not support SMTPUTF8")
                return Outcome(failed=tuple((r, refused) for r in recipients))
            params += " SMTPUTF8"

        commands = [f"MAIL FROM:<{sender}>{params}", *(f"RCPT TO:<{r}>" for r in recipients)]
        pipelining = "PIPELINING" in extensions
        if pipelining:
            conn.send(*commands, "DATA")
            replies = [await conn.read(t.command) for _ in commands]
        else:
            replies = []
            for index, line in enumerate(commands):
                replies.append(await conn.command(line, t.command))
                if index == 0 and not replies[0].positive:
                    break

        mail = replies[0]
        if mail.code == 421:
            raise _TryNext(f"MAIL {mail}")
        if not mail.positive:
            if pipelining:
                await conn.read(t.command)  # the DATA reply, after the RCPTs read above
            outcome = _all(recipients, mail)
            await self._quit(conn)
            return outcome

        accepted, failed, deferred = [], [], []
        for rcpt, reply in zip(recipients, replies[1:], strict=True):
            if reply.code == 421:
                raise _TryNext(f"RCPT {reply}")
            if reply.positive:
                accepted.append(rcpt)
            elif reply.permanent:
                failed.append((rcpt, reply))
            else:
                deferred.append((rcpt, reply))

        if not accepted:
            if pipelining:
                await conn.read(t.command)  # the DATA reply: no valid recipients
            await self._quit(conn)
            return Outcome(failed=tuple(failed), deferred=tuple(deferred))

        data = await conn.read(t.command) if pipelining else await conn.command("DATA", t.command)
        if data.code != 354:
            if data.code == 421:
                raise _TryNext(f"DATA {data}")
            await self._quit(conn)
            return _merge(_all(tuple(accepted), data), failed, deferred)

        conn.send_raw(dot_stuff(body))
        final = await conn.read(t.data)
        if final.code == 421:
            # the message was not taken; the session is over
            return Outcome(
                deferred=(*deferred, *((r, final) for r in accepted)),
                failed=tuple(failed),
            )
        await self._quit(conn)
        if final.positive:
            log.info(
                "delivered to {mx}{tls}: {count} recipient(s), {code}",
                mx=where,
                tls=" with TLS" if conn.tls else "",
                count=len(accepted),
                code=final.code,
            )
            return Outcome(delivered=tuple(accepted), failed=tuple(failed), deferred=tuple(deferred))
        return _merge(_all(tuple(accepted), final), failed, deferred)

    async def _quit(self, conn: SMTPClientProtocol) -> None:
        try:
            await conn.command("QUIT", self._timeouts.command)
        except ConversationError:
            pass


def _all(recipients: tuple[str, ...], reply: Reply) -> Outcome:
    """
    The same reply for every recipient: failed if permanent, else deferred.
    """
    pairs = tuple((r, reply) for r in recipients)
    return Outcome(failed=pairs) if reply.permanent else Outcome(deferred=pairs)


def _merge(outcome: Outcome, failed: list[tuple[str, Reply]], deferred: list[tuple[str, Reply]]) -> Outcome:
    return Outcome(failed=(*outcome.failed, *failed), deferred=(*outcome.deferred, *deferred))
