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
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relayx.address import xtext_encode
from relayx.delivery.routes import Target, Undeliverable
from relayx.interfaces import NO_DSN, IDeliverer, MessageDsn, Notify, Outcome, Pushback
from relayx.message import header_section
from relayx.reply import Reply
from relayx.smtp.client import ConversationError, SMTPClientProtocol, dot_stuff, fold_long_lines

log = Logger()
T = TypeVar("T")

#: messages one session may carry before it is ended (Postfix has no limit by default)
REUSE_LIMIT = 100
#: how long an idle session is kept for the next message (Postfix: 2 s)
REUSE_IDLE = 2.0
#: idle sessions kept per host, at least: a domain delivers to different mailboxes in
#: parallel sessions, so a node keeps as many as it runs deliveries (``idle_sessions``)
REUSE_IDLE_SESSIONS = 4

Connect = Callable[[str, int], Awaitable[SMTPClientProtocol]]
Targets = Callable[[str], Awaitable[Sequence[Target]]]
#: the client TLS options for a host name and a policy (``verify`` checks the name)
ClientTLS = Callable[[str, str], Any]


class _TryNext(Exception):
    """
    This destination host cannot take the message now; try the next one.
    """


class _Busy(_TryNext):
    """
    The host answered "not now" (a ``4xx`` greeting, ``421`` to a command):
    a pushback, which slows the destination's pace, not a failure.
    """

    def __init__(self, kind: Pushback, reply: Reply, where: str) -> None:
        super().__init__(f"{where}: {reply}")
        self.kind = kind
        self.reply = reply
        self.where = where


class _TLSFailed(_TryNext):
    """
    The TLS handshake with the host failed after STARTTLS: under the
    ``opportunistic`` policy, the host is tried again in the clear.
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
        idle_sessions: int = REUSE_IDLE_SESSIONS,
    ) -> None:
        self._client_tls = client_tls
        self._idle_sessions = max(REUSE_IDLE_SESSIONS, idle_sessions)
        self._clock = clock
        self._helo = helo_name
        self._targets = targets
        self._connect = connect
        self._timeouts = timeouts
        #: idle sessions per host, kept for the next messages to it
        self._idle: dict[tuple[str, int, str], list[tuple[SMTPClientProtocol, IDelayedCall]]] = {}

    async def deliver(
        self, domain: str, sender: str, recipients: tuple[str, ...], body: bytes, dsn: MessageDsn = NO_DSN
    ) -> Outcome:
        async def transaction(conn: SMTPClientProtocol, target: Target) -> Outcome:
            if conn.extensions is None:
                conn.extensions = await self._hello(conn, target)
            outcome = await self._transaction(conn, target, conn.extensions, sender, recipients, body, dsn)
            await self._park_or_quit(conn, target)
            return outcome

        busy: list[_Busy] = []
        try:
            result = await self._first_answer(domain, transaction, reuse=True, busy=busy)
        except Undeliverable as e:
            log.info(
                "{domain}: {count} recipient(s) undeliverable: {reply}",
                domain=domain,
                count=len(recipients),
                reply=str(e.reply),
                code=e.reply.code,
            )
            return Outcome(failed=tuple((r, e.reply) for r in recipients))
        if isinstance(result, str) and busy:
            # a host answered, "not now": the job waits at its place, the pace slows
            last = busy[-1]
            return Outcome(
                deferred=tuple((r, last.reply) for r in recipients),
                pushback=last.kind,
                pushback_reply=last.reply,
                destination=last.where,
            )
        return Outcome(unreachable=result) if isinstance(result, str) else result

    async def _park_or_quit(self, conn: SMTPClientProtocol, target: Target) -> None:
        """
        Keep the session for the next message to the same host, as long as
        it is clean, has not carried ``REUSE_LIMIT`` messages, and the host
        has fewer than ``idle_sessions`` kept; else QUIT. RSET only after a
        transaction that did not end with a reply to its data (RFC 5321
        4.1.1.4: that reply ends it), as Postfix: a round trip per message.
        """
        key = (target.address, target.port, target.tls)
        kept = self._idle.setdefault(key, [])
        if conn.reusable and conn.messages < REUSE_LIMIT and len(kept) < self._idle_sessions:
            try:
                reset = await conn.command("RSET", self._timeouts.command) if conn.mid_transaction else None
            except ConversationError:
                conn.close()  # the outcome stands; only the session is lost
                return
            if reset is None or reset.positive:
                conn.mid_transaction = False
                timer = self._clock.callLater(REUSE_IDLE, self._expire, key, conn)
                kept.append((conn, timer))
                conn.parked = True
                return
        await self._quit(conn)

    def _expire(self, key: tuple[str, int, str], conn: SMTPClientProtocol) -> None:
        self._idle[key] = [(c, t) for c, t in self._idle.get(key, []) if c is not conn]
        conn.parked = False
        conn.send("QUIT")
        conn.close()

    def _take(self, target: Target) -> SMTPClientProtocol | None:
        kept = self._idle.get((target.address, target.port, target.tls))
        if not kept:
            return None
        conn, timer = kept.pop()
        if timer.active():
            timer.cancel()
        conn.parked = False
        return conn

    def _drop_idle(self, target: Target) -> None:
        """
        End the sessions kept for reuse with a host that refused a new one.
        """
        for conn, timer in self._idle.pop((target.address, target.port, target.tls), []):
            if timer.active():
                timer.cancel()
            conn.parked = False
            conn.send("QUIT")
            conn.close()

    def close_idle(self) -> None:
        """
        End the sessions kept for reuse at once (the node is stopping).
        """
        for kept in self._idle.values():
            for conn, timer in kept:
                if timer.active():
                    timer.cancel()
                conn.parked = False
                if conn.transport is not None:
                    conn.transport.abortConnection()  # type: ignore[attr-defined]
        self._idle.clear()

    async def probe(self, domain: str) -> str | None:
        async def hello(conn: SMTPClientProtocol, target: Target) -> bool:
            await self._hello(conn, target)
            await self._quit(conn)
            return True

        try:
            result = await self._first_answer(domain, hello)
        except Undeliverable as e:
            return str(e)
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
        except (TimeoutError, defer.TimeoutError, defer.CancelledError):
            return None
        except Exception:
            log.failure("callout for {rcpt}: unexpected error", rcpt=address)
            return None
        return None if isinstance(result, str) else result

    async def _first_answer(
        self,
        domain: str,
        attempt: Callable[[SMTPClientProtocol, Target], Awaitable[T]],
        reuse: bool = False,
        busy: list[_Busy] | None = None,
    ) -> T | str:
        """
        ``attempt`` on the domain's hosts in order until one answers; if
        none does, why (one reason per host), and the hosts that answered
        "not now" in ``busy``. With ``reuse``, a session kept from an
        earlier delivery to the host is used first, and a fresh one if the
        kept one turns out to be closed.
        """
        busy = [] if busy is None else busy
        try:
            targets = await self._targets(domain)
        except Undeliverable:
            raise
        except Exception as e:
            return f"no destination for {domain}: {e}"
        reasons = []
        for target in targets:
            where = f"{target.address}:{target.port}"
            kept = self._take(target) if reuse else None
            if kept is not None:
                answered = kept.replies
                try:
                    return await attempt(kept, target)
                except ConversationError as e:
                    if kept.replies > answered:
                        # it answered this transaction, then failed (a reply to the data
                        # that never came): as a new session's failure, not sent again at once
                        reasons.append(f"{where}: {e}")
                        continue
                    # else the host closed the kept session meanwhile: not a failure
                except _Busy as e:
                    busy.append(e)
                    reasons.append(str(e))
                    continue
                finally:
                    if not kept.parked:
                        kept.close()
            try:
                connection = await self._connect(target.address, target.port)
            except Exception as e:
                reasons.append(f"{where}: {e}")
                continue
            try:
                return await attempt(connection, target)
            except _TLSFailed as e:
                if target.tls != "opportunistic":
                    reasons.append(f"{where}: {e}")
                    continue
                # as Postfix and Exim do: a broken TLS stack is not a reason
                # to keep the mail; a new connection without STARTTLS
                log.info("{mx}: {why}; trying again without TLS", mx=where, why=str(e))
                clear = attrs.evolve(target, tls="none")
                try:
                    connection.close()
                    connection = await self._connect(target.address, target.port)
                    return await attempt(connection, clear)
                except (_TryNext, ConversationError, OSError) as e2:
                    reasons.append(f"{where}: {e}; without TLS: {e2}")
            except _Busy as e:
                busy.append(e)
                reasons.append(str(e))
                if e.kind is Pushback.SESSIONS:
                    self._drop_idle(target)  # our idle sessions are taking the host's slots
            except (_TryNext, ConversationError) as e:
                reasons.append(f"{where}: {e}")
            finally:
                if not connection.parked:
                    connection.close()
        return "; ".join(reasons) or f"no destination for {domain}"

    async def _hello(self, conn: SMTPClientProtocol, target: Target, timeout: float | None = None) -> set[str]:
        """
        Read the greeting, say EHLO (HELO if refused) and start TLS as the
        target's policy asks; the extensions offered.
        """
        wait = timeout or self._timeouts.command
        greeting = await conn.read(wait)
        if greeting.code // 100 == 4:
            raise _Busy(Pushback.SESSIONS, greeting, _where(target))
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
            raise _TLSFailed(f"TLS with {target.name} failed ({target.tls}): {e}") from None
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
        extensions: set[str],
        sender: str,
        recipients: tuple[str, ...],
        body: bytes,
        dsn: MessageDsn = NO_DSN,
    ) -> Outcome:
        t = self._timeouts
        where = _where(target)
        started = self._clock.seconds()

        body = fold_long_lines(body)
        params = ""
        if "SIZE" in extensions:
            params += f" SIZE={len(body)}"
        if "8BITMIME" in extensions and not body.isascii():
            params += " BODY=8BITMIME"
        # as Postfix (SMTPUTF8_README): SMTPUTF8 is asked for when the
        # envelope or the header section needs it and the host offers it;
        # only UTF-8 addresses make a host without it a failure (5.6.7),
        # UTF-8 headers alone go as 8BITMIME
        if not (sender.isascii() and all(r.isascii() for r in recipients)):
            if "SMTPUTF8" not in extensions:
                refused = Reply(553, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {where}")
                return Outcome(failed=tuple((r, refused) for r in recipients))
            params += " SMTPUTF8"
        elif "SMTPUTF8" in extensions and not header_section(body).isascii():
            params += " SMTPUTF8"

        # RFC 3461 4: a relaying MTA passes the DSN parameters on to a host that offers DSN
        passes = "DSN" in extensions and not dsn.empty
        if passes:
            params += _mail_dsn_params(dsn)
        commands = [
            f"MAIL FROM:<{sender}>{params}",
            *(f"RCPT TO:<{r}>{_rcpt_dsn_params(dsn, r) if passes else ''}" for r in recipients),
        ]
        pipelining = "PIPELINING" in extensions
        conn.mid_transaction = True
        if pipelining:
            conn.send(*commands, "DATA")
            replies = []
            for _ in commands:
                replies.append(await conn.read(t.command))
                if replies[-1].code == 421:
                    # the host closes the session: no further replies will come
                    raise _Busy(Pushback.RATE, replies[-1], where)
        else:
            replies = []
            for index, line in enumerate(commands):
                replies.append(await conn.command(line, t.command))
                if index == 0 and not replies[0].positive:
                    break

        mail = replies[0]
        if mail.code == 421:
            raise _Busy(Pushback.RATE, mail, where)
        if not mail.positive:
            if pipelining:
                await conn.read(t.command)  # the DATA reply, after the RCPTs read above
            if mail.code == 451:
                pushed = _all(recipients, mail)
                return attrs.evolve(pushed, pushback=Pushback.RATE, pushback_reply=mail, destination=where)
            return _all(recipients, mail)

        accepted, failed, deferred = [], [], []
        for rcpt, reply in zip(recipients, replies[1:], strict=True):
            if reply.code == 421:
                raise _Busy(Pushback.RATE, reply, where)
            if reply.positive:
                accepted.append(rcpt)
            elif reply.permanent:
                failed.append((rcpt, reply))
            else:
                deferred.append((rcpt, reply))

        if not accepted:
            if pipelining:
                await conn.read(t.command)  # the DATA reply: no valid recipients
            return Outcome(failed=tuple(failed), deferred=tuple(deferred))

        data = await conn.read(t.command) if pipelining else await conn.command("DATA", t.command)
        if data.code != 354:
            if data.code == 421:
                raise _Busy(Pushback.RATE, data, where)
            return _merge(_all(tuple(accepted), data), failed, deferred)

        conn.send_raw(dot_stuff(body))
        final = await conn.read(t.data)
        conn.mid_transaction = False
        took = self._clock.seconds() - started
        if final.code == 421:
            # the message was not taken; the session is over
            conn.reusable = False
            return Outcome(
                deferred=(*deferred, *((r, final) for r in accepted)),
                failed=tuple(failed),
                pushback=Pushback.RATE,
                pushback_reply=final,
                destination=where,
            )
        conn.messages += 1
        if final.positive:
            # logged once, with the job, by the scheduler
            return Outcome(
                delivered=tuple(accepted),
                failed=tuple(failed),
                deferred=tuple(deferred),
                destination=where,
                accepted=final,
                relayed=()
                if passes or dsn.empty
                else tuple(r for r in accepted if dsn.recipient(r).wants(Notify.SUCCESS)),
                reply_seconds=took,
                tls=conn.tls,
            )
        outcome = attrs.evolve(_merge(_all(tuple(accepted), final), failed, deferred), destination=where)
        if final.code == 451:
            return attrs.evolve(outcome, pushback=Pushback.RATE, pushback_reply=final)
        return outcome

    async def _quit(self, conn: SMTPClientProtocol) -> None:
        try:
            await conn.command("QUIT", self._timeouts.command)
        except ConversationError:
            pass


def _where(target: Target) -> str:
    return f"{target.name} [{target.address}]:{target.port}"


def _mail_dsn_params(dsn: MessageDsn) -> str:
    """
    MAIL's ``RET=`` and ``ENVID=`` as the sender gave them (xtext encoded again).
    """
    params = f" RET={dsn.ret.value}" if dsn.ret is not None else ""
    return params + (f" ENVID={xtext_encode(dsn.envid)}" if dsn.envid is not None else "")


def _rcpt_dsn_params(dsn: MessageDsn, recipient: str) -> str:
    """
    A recipient's ``NOTIFY=`` and ``ORCPT=`` as the sender gave them.
    """
    wanted = dsn.recipient(recipient)
    params = ""
    if wanted.notify is not None:
        order = [n for n in Notify if n in wanted.notify]
        params += " NOTIFY=" + ",".join(n.value for n in order)
    if wanted.orcpt is not None:
        addr_type, _, address = wanted.orcpt.partition(";")
        params += f" ORCPT={addr_type};{xtext_encode(address)}"
    return params


def _all(recipients: tuple[str, ...], reply: Reply) -> Outcome:
    """
    The same reply for every recipient: failed if permanent, else deferred.
    """
    pairs = tuple((r, reply) for r in recipients)
    return Outcome(failed=pairs) if reply.permanent else Outcome(deferred=pairs)


def _merge(outcome: Outcome, failed: list[tuple[str, Reply]], deferred: list[tuple[str, Reply]]) -> Outcome:
    return Outcome(failed=(*outcome.failed, *failed), deferred=(*outcome.deferred, *deferred))
