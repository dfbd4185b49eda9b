"""
The admin HTTP API (JSON over twisted.web), served by every node on
``[admin] listen`` under ``/api/v1/``, for ``relayctl`` and the control panel.

Every request carries ``Authorization: Bearer <token>``; a token is one of
``[admin] tokens``, compared in constant time, and its name is what the
audit log records for each change (with the client's address). Changes go
through the queue's Lua scripts, which write the audit record in the same
step as the change.

    GET    /api/v1/cluster                      nodes, Redis, durability
    GET    /api/v1/domains                      one summary per configured domain
    GET    /api/v1/domains/<domain>             one domain's summary
    GET    /api/v1/domains/<domain>/history?since=&limit=
                                                its samples, one a minute (ops/history.py), with the
                                                rates per minute and the current drain's progress
    POST   /api/v1/domains/<domain>/hold        {"start": epoch s, "end": epoch s, "replace": bool} (all optional;
                                                without replace, 409 instead of replacing a scheduled hold)
    POST   /api/v1/domains/<domain>/release     {"rate": messages/s} (optional)
    POST   /api/v1/domains/<domain>/flush       deliver now (ends the wait for a failing destination)
    POST   /api/v1/domains/<domain>/route       {"routes": ["smtp://host:port", ...] or null: configured}
    GET    /api/v1/domains/<domain>/report?from=&until=&format=json|csv|html
                                                proof of delivery for the mail accepted in a window
                                                (epoch seconds or ISO 8601; see relayx.ops.report;
                                                at most 50,000 messages, then next_from)
    GET    /api/v1/messages?domain=&state=&older_than=&newer_than=&cursor=&limit=
               &recipient=&message_id=                     exact (indexes)
               &sender=                                    exact (examined job by job)
               &sender_has=&recipient_has=&subject_has=    parts of them (examined job by job)
    GET    /api/v1/messages/<queue id>          envelope, header section, jobs and their history
    GET    /api/v1/messages/<queue id>/raw      the message as accepted (message/rfc822: an .eml file)
    DELETE /api/v1/messages/<queue id>          delete
    POST   /api/v1/messages/<queue id>/bounce   return to the sender with a DSN
    POST   /api/v1/messages/<queue id>/requeue  try deferred and failed recipients again now
    GET    /api/v1/audit?limit=                 the newest changes, each with what it changed from
    GET    /api/v1/history?since=&limit=        the cluster's samples (all domains summed)
    GET    /api/v1/qshape?domain=&state=&first=&buckets=   jobs by age per domain (see ``qshape``)
    POST   /api/v1/bulk                         {"action": "delete"|"bounce"|"requeue", "filter": {...}}
    GET    /api/v1/bulk                         the newest bulk actions and their progress
    GET    /api/v1/bulk/<id>                    one bulk action's progress
    DELETE /api/v1/bulk/<id>                    stop it (what is done stays done)

Listing and search come a page at a time in acceptance order: each answer
has ``next_cursor`` (``null`` at the end), which the next request passes as
``cursor``. No Redis call examines more than ``PAGE_BUDGET`` jobs; a request
makes at most ``PAGE_CALLS`` of them, so a page of a search that matches
rarely can hold fewer than ``limit`` messages and still have a next cursor.

``AdminAPI.call`` answers the same requests without HTTP: ``relayx VERB
--config FILE`` runs the operator's verbs through it straight over Redis, so
that they and ``relayctl`` share every check, answer and error.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayx.address import AddressError, normalize_domain
from relayx.config import DomainConfig, parse_duration, parse_route
from relayx.interfaces import HoldWindow, IBulkActions, IQueueAdmin, Pace, QueueCounts, StoreUnavailable, Throttle
from relayx.ops import report
from relayx.ops.bulk import ACTIONS
from relayx.ops.history import KEPT, History, delivery_rate, replay
from relayx.queue.states import JobState

log = Logger()

STATES = tuple(str(state) for state in JobState)
MAX_PAGE = 500
MAX_BODY = 64 * 1024
#: most jobs one Redis call of a listing examines, and most such calls per request
PAGE_BUDGET = 200
PAGE_CALLS = 15
#: most age buckets of a qshape (each edge costs a bisection per queue)
QSHAPE_MAX_BUCKETS = 20
#: the filter's names in a query string or a bulk action: exact ones, parts, the rest
EXACT = ("sender", "recipient", "message_id")
PARTS = ("sender_has", "recipient_has", "subject_has")
FILTERS = ("domain", *EXACT, *PARTS, "state", "older_than", "newer_than")


class APIError(Exception):
    """
    A request the API refuses: the HTTP status and a one-line reason.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@attrs.frozen
class Call:
    """
    One request, from HTTP or from ``AdminAPI.call``: the method, the path's
    parts after ``/api``, the query's arguments (the first of each) and the body.
    """

    method: str
    parts: list[str]
    args: Mapping[str, str]
    content: bytes

    @classmethod
    def of(cls, request: Request) -> Call:
        args = {k.decode(): v[0].decode("utf-8", "replace") for k, v in (request.args or {}).items() if v}
        content = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        parts = [p.decode("utf-8", "replace") for p in request.postpath or [] if p]
        return cls(request.method.decode(), parts, args, content)


@attrs.frozen
class RawBody:
    """
    An answer that is not JSON: a message as a file.
    """

    content_type: str
    filename: str
    body: bytes
    #: shown by a browser rather than saved (a printable page)
    inline: bool = False


@attrs.frozen
class Cluster:
    """
    What the API reports about where it runs, beyond the queue.
    """

    node_id: str
    durability: str
    redis_where: str
    redis_connected: Callable[[], bool]
    #: how long a node may be silent and still be listed
    node_silence: float


def authenticate(header: bytes | None, tokens: Sequence[tuple[str, str]]) -> str | None:
    """
    The name of the token a request's ``Authorization`` header carries, or
    ``None``. Every token is compared, each in constant time, so the answer
    takes as long whichever token (or none) matched.
    """
    if header is None or not header.startswith(b"Bearer "):
        return None
    given = header[len(b"Bearer ") :].strip()
    found = None
    for name, token in tokens:
        if hmac.compare_digest(given, token.encode()):
            found = name
    return found


def _pace(pace: Pace, throttle: Throttle) -> dict[str, Any]:
    """
    A destination's adaptive pace for the API: what is in force, the
    configured ceiling, the last cut (or return to the ceiling) and why.
    """
    concurrency, rate = pace.effective(throttle)
    return {
        "concurrency": concurrency,
        "rate": rate,
        "ceiling": {"concurrency": throttle.concurrency, "rate": throttle.rate},
        "full": pace.concurrency is None and pace.rate is None,
        "event": pace.event or None,
        "at": pace.at,
        "kind": pace.kind or None,
        "why": pace.why or None,
        "reply_ms": pace.reply_ms or None,
        "text": pace.describe(throttle),
    }


class AdminAPI(Resource):
    """
    ``/api/v1/...``: authentication, routing, JSON in and out; the work is
    the queue's (``IQueueAdmin``).
    """

    isLeaf = True

    def __init__(
        self,
        *,
        queue: IQueueAdmin,
        bulk: IBulkActions,
        domains: Sequence[DomainConfig],
        tokens: Sequence[tuple[str, str]],
        clock: IReactorTime,
        cluster: Cluster,
        history: History | None = None,
    ) -> None:
        super().__init__()
        self.queue = queue
        self.bulk = bulk
        self.history = history
        self.domains = {d.name: d for d in domains}
        self.tokens = tokens
        self.clock = clock
        self.cluster = cluster

    def render(self, request: Request) -> int | bytes:
        Deferred.fromCoroutine(self._answer(request))
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> None:
        peer = str(getattr(request.getClientAddress(), "host", "?"))
        try:
            if not self.tokens:
                raise APIError(403, "the admin API is off: no [admin] tokens are configured")
            name = authenticate(request.getHeader(b"authorization"), self.tokens)
            if name is None:
                request.setHeader(b"www-authenticate", b'Bearer realm="relayx"')
                raise APIError(401, "a valid bearer token is required")
            status, body = 200, await self._route(Call.of(request), f"{name} ({peer})")
        except APIError as e:
            status, body = e.status, {"error": e.reason}
        except StoreUnavailable as e:
            log.warn("admin API: queue unavailable: {why}", why=str(e))
            status, body = 503, {"error": "the queue (Redis) is unavailable, try again"}
        except Exception:
            log.failure("admin API: unexpected error on {path}", path=request.path.decode("latin-1"))
            status, body = 500, {"error": "internal error, see the node's log"}
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setResponseCode(status)
        request.setHeader(b"cache-control", b"no-store")
        if isinstance(body, RawBody):
            request.setHeader(b"content-type", body.content_type.encode())
            disposition = "inline" if body.inline else "attachment"
            request.setHeader(b"content-disposition", f'{disposition}; filename="{body.filename}"'.encode())
            request.write(body.body)
        else:
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(body).encode() + b"\n")
        request.finish()

    async def call(self, method: str, path: str, query: Mapping[str, str], body: Any, who: str) -> Any:
        """
        Answer one request without HTTP or a token (for ``relayx VERB
        --config``, which reaches Redis itself): ``path`` below
        ``/api/v1/``; the answer as HTTP would give it, a ``RawBody``, or
        ``APIError`` with the status and reason HTTP would give.
        """
        content = json.dumps(body).encode() if body is not None else b""
        return await self._route(Call(method, ["v1", *(p for p in path.split("/") if p)], query, content), who)

    async def _route(self, request: Call, who: str) -> Any:
        method, parts = request.method, request.parts
        if parts[:1] != ["v1"] or len(parts) < 2:
            raise APIError(404, "no such endpoint; see /api/v1/domains")
        kind, rest = parts[1], parts[2:]
        now = self.clock.seconds()
        if kind == "cluster" and not rest and method == "GET":
            return await self._cluster(now)
        if kind == "history" and not rest and method == "GET":
            return await self._history(request, None, now)
        if kind == "audit" and not rest and method == "GET":
            return {"records": await self.queue.audit(_int_arg(request, "limit", 50, 1, 1000))}
        if kind == "qshape" and not rest and method == "GET":
            return await self._qshape(request, now)
        if kind == "domains":
            if not rest and method == "GET":
                return {"domains": [await self._summary(d, now) for d in self.domains]}
            domain = self._domain(rest[0])
            if len(rest) == 1 and method == "GET":
                return await self._summary(domain, now)
            if len(rest) == 2 and rest[1] == "report" and method == "GET":
                return await self._report(domain, request, now)
            if len(rest) == 2 and rest[1] == "history" and method == "GET":
                return await self._history(request, domain, now)
            if len(rest) == 2 and method == "POST":
                return await self._domain_change(domain, rest[1], _json_body(request), now, who)
        if kind == "bulk":
            return await self._bulk(method, rest, _json_body(request) if method == "POST" else {}, now, who)
        if kind == "messages":
            if not rest and method == "GET":
                return await self._messages(request, now)
            queue_id = rest[0]
            if len(rest) == 1 and method == "GET":
                found = await self.queue.message(queue_id, self.clock.seconds())
                if found is None:
                    raise APIError(404, f"no message {queue_id} in the queue")
                found["received"] /= 1000
                for job in found["jobs"]:
                    job["history"] = [[at / 1000, what] for at, what in job["history"]]
                return {"queue_id": queue_id, **found}
            if len(rest) == 2 and rest[1] == "raw" and method == "GET":
                raw = await self.queue.raw(queue_id)
                if raw is None:
                    raise APIError(404, f"no message {queue_id} in the queue")
                return RawBody("message/rfc822", f"{_safe_name(queue_id)}.eml", raw)
            if len(rest) == 1 and method == "DELETE":
                return self._dropped(queue_id, await self.queue.drop(queue_id, now, who, bounce=False))
            if len(rest) == 2 and rest[1] == "bounce" and method == "POST":
                return self._dropped(queue_id, await self.queue.drop(queue_id, now, who, bounce=True))
            if len(rest) == 2 and rest[1] == "requeue" and method == "POST":
                return {"queue_id": queue_id, "requeued": await self.queue.requeue(queue_id, now, who)}
        raise APIError(404 if method in ("GET", "POST", "DELETE") else 405, f"no {method} /api/{'/'.join(parts)}")

    def _domain(self, name: str) -> str:
        try:
            domain = normalize_domain(name)
        except AddressError:
            raise APIError(404, f"{name!r} is not a domain name") from None
        if domain not in self.domains:
            raise APIError(404, unknown_domain(domain, list(self.domains)))
        return domain

    @staticmethod
    def _dropped(queue_id: str, jobs: int) -> dict[str, Any]:
        if not jobs:
            raise APIError(404, f"no message {queue_id} in the queue")
        return {"queue_id": queue_id, "jobs": jobs}

    async def _cluster(self, now: float) -> dict[str, Any]:
        nodes = await self.queue.nodes(now, self.cluster.node_silence)
        return {
            "node": self.cluster.node_id,
            "redis": {"where": self.cluster.redis_where, "connected": self.cluster.redis_connected()},
            "durability": self.cluster.durability,
            "nodes": [
                {"node": n.node, "hostname": n.hostname, "last_seen": n.last_seen, "leases": len(n.leases)}
                for n in nodes
            ],
        }

    async def _summary(self, domain: str, now: float) -> dict[str, Any]:
        config = self.domains[domain]
        queues = config.queues()
        state = await self.queue.domain_state(domain, now)
        counts = sum((await self.queue.queue_summary(queues, now)).values(), QueueCounts())
        oldest = counts.oldest
        override = await self.queue.route_override(domain)
        return {
            "domain": domain,
            "queues": queues,
            "total": counts.total,
            "jobs": counts.by_state(),
            "bytes": counts.bytes,
            "held": state.held,
            "hold_start": state.hold_start,
            "hold_end": state.hold_end,
            "paused_until": state.paused_until,
            "last_error": state.last_error,
            "release_rate": state.release_rate,
            "pace": _pace(state.pace, config.throttle),
            "oldest_age": round(now - oldest, 3) if oldest else None,
            "routes": list(override) if override else [str(r) for r in config.routes],
            "routes_overridden": bool(override),
        }

    async def _history(self, request: Call, domain: str | None, now: float) -> dict[str, Any]:
        """
        Samples from ``since`` (seconds since the epoch, or a duration back
        from now; default 3 hours back), at most ``limit``; for a domain, its
        current drain too (``replay``). Bounded: one XRANGE with a COUNT.
        """
        if self.history is None:
            raise APIError(404, "this node keeps no history")
        since = _since(request, now)
        limit = _int_arg(request, "limit", 1440, 1, KEPT)
        samples = await self.history.read(domain, since, limit)
        answer: dict[str, Any] = {
            "domain": domain,
            "interval": self.history.interval,
            "since": since,
            "samples": samples,
            "next_since": samples[-1]["at"] + 0.001 if len(samples) == limit else None,
        }
        if domain is not None:
            recent = await self.history.recent(domain)
            counts = await self.queue.counts(self.domains[domain].queues(), now)
            held = (await self.queue.domain_state(domain, now)).held
            answer["replay"] = replay(recent[-1] if recent else None, delivery_rate(recent), counts["total"], held)
        return answer

    async def _domain_change(
        self, domain: str, action: str, body: Mapping[str, Any], now: float, who: str
    ) -> dict[str, Any]:
        if action == "hold":
            start, end = _epoch(body, "start"), _epoch(body, "end")
            replace = body.get("replace", False)
            if not isinstance(replace, bool):
                raise APIError(400, "replace: expected true or false")
            if end is not None and end <= max(now, start or now):
                raise APIError(400, "end: expected a time after the start of the hold")
            change = await self.queue.hold(domain, now, start, end, who=who, replace=replace)
            previous = _window(change.previous)
            if not change.applied:
                if change.previous.start and change.previous.start > now:
                    what = f"a hold is scheduled from {_iso(change.previous.start)}"
                else:
                    what = f"{domain} is held now"
                what += f" until {_iso(change.previous.end)}" if change.previous.end else " until released"
                raise APIError(409, f"{what}; give replace (--replace) to replace it, or release it first")
            scheduled = bool(start and start > now)
            return {
                "domain": domain,
                "held": not scheduled,
                "scheduled": scheduled,
                "start": start if scheduled else None,
                "end": end,
                "previous": previous,
            }
        if action == "release":
            rate = body.get("rate", 0)
            if not _is_number(rate) or rate < 0:
                raise APIError(400, "rate: expected messages per second, a number of 0 or more")
            before = await self.queue.release(domain, now, float(rate), who=who)
            return {
                "domain": domain,
                "was_held": before.held,
                "cancelled_schedule": bool(not before.held and before.start),
                "rate": rate,
                "previous": _window(before),
            }
        if action == "flush":
            moved = 0
            for queue in self.domains[domain].queues():
                moved += await self.queue.flush(queue, now, who)
            return {"domain": domain, "deferred_jobs_due_now": moved}
        if action == "route":
            routes = body.get("routes", ...)
            configured = [str(r) for r in self.domains[domain].routes]
            if routes is None:
                was = await self.queue.set_routes(domain, None, now, who)
                return {"domain": domain, "routes": configured, "overridden": False, **_before(was, configured)}
            if not isinstance(routes, list) or not routes or not all(isinstance(r, str) for r in routes):
                raise APIError(
                    400, "routes: expected a list of smtp://host:port or mx, or null for the configured ones"
                )
            try:
                parsed = tuple(str(parse_route(r)) for r in routes)
            except ValueError as e:
                raise APIError(400, f"routes: expected {e}") from None
            was = await self.queue.set_routes(domain, parsed, now, who)
            return {"domain": domain, "routes": list(parsed), "overridden": True, **_before(was, configured)}
        raise APIError(404, f"no action {action!r}; expected hold, release, flush or route")

    async def _report(self, domain: str, request: Call, now: float) -> Any:
        """
        Proof of delivery for the mail ``domain`` accepted from ``from`` to
        ``until`` (default: the last day to now), read from its event log a
        page at a time (relayx.ops.report).
        """
        until = _moment(request.args, "until", now)
        start = _moment(request.args, "from", until - 86400)
        if start > until:
            raise APIError(400, "from: expected a time before until")
        kind = request.args.get("format", "json")
        if kind not in ("json", "csv", "html"):
            raise APIError(400, f"format: expected json, csv or html, got {kind!r}")
        answer = (await report.build(self.queue, domain, start, until)).as_json()
        name = f"report-{_safe_name(domain)}-{_iso(start)}".replace(":", "")
        if kind == "csv":
            return RawBody("text/csv; charset=utf-8", f"{name}.csv", report.as_csv(answer).encode())
        if kind == "html":
            return RawBody("text/html; charset=utf-8", f"{name}.html", report.as_html(answer).encode(), inline=True)
        return answer

    async def _qshape(self, request: Call, now: float) -> dict[str, Any]:
        """
        Every domain's jobs (or one's: ``domain``) by age: ``buckets`` age
        buckets whose edges start at ``first`` seconds and double, like
        Postfix's qshape; ``state=waiting`` counts only jobs waiting their
        turn (ready or held). A domain's copy queues count with it.
        """
        unknown = set(request.args) - {"domain", "state", "first", "buckets"}
        if unknown:
            raise APIError(400, f"unknown parameter {sorted(unknown)[0]!r}; expected domain, state, first, buckets")
        state = request.args.get("state", "all")
        if state not in ("all", "waiting"):
            raise APIError(400, "state: expected all or waiting")
        first = _int_arg(request, "first", 300, 1, 10 * 365 * 86400)
        count = _int_arg(request, "buckets", 10, 1, QSHAPE_MAX_BUCKETS)
        edges = [first * 2**i for i in range(count - 1)] if count > 1 else []
        if "domain" in request.args:
            names = [self._domain(d) for d in request.args["domain"].split(",") if d]
        else:
            names = list(self.domains)
        rows: list[dict[str, Any]] = []
        for name in names:
            counts = [0] * (len(edges) + 2)
            for queue in self.domains[name].queues():
                found = await self.queue.qshape(queue, now, edges, waiting=state == "waiting")
                counts = [a + b for a, b in zip(counts, found, strict=True)]
            rows.append({"domain": name, "total": counts[0], "buckets": counts[1:]})
        return {
            "state": state,
            "edges": edges,
            "total": {
                "total": sum(r["total"] for r in rows),
                "buckets": [sum(r["buckets"][i] for r in rows) for i in range(len(edges) + 1)],
            },
            "domains": rows,
        }

    def _search(self, args: Mapping[str, object], now: float) -> tuple[list[str], dict[str, object]]:
        """
        The queues and the page.lua filter that a query string's or a bulk
        action's filter names.
        """
        unknown = set(args) - set(FILTERS)
        if unknown:
            raise APIError(400, f"unknown filter {sorted(unknown)[0]!r}; expected {', '.join(FILTERS)}")
        for name, value in args.items():
            if not isinstance(value, str):
                raise APIError(400, f"{name}: expected a string")
        text = {name: str(value) for name, value in args.items()}
        if text.get("domain"):
            queues = self.domains[self._domain(text["domain"])].queues()
        else:
            queues = [q for d in self.domains.values() for q in d.queues()]
        search: dict[str, object] = {}
        for name in EXACT:
            if name in text:
                value = text[name].strip().lower()
                if name == "sender" and value == "<>":
                    value = ""
                if name == "message_id":
                    value = value.strip("<>").strip()
                if not value and name != "sender":
                    raise APIError(400, f"{name}: expected an address or id, got nothing")
                search[name] = value
        for name in PARTS:
            if text.get(name):
                search[name] = text[name].lower()
        if "state" in text:
            if text["state"] not in STATES:
                raise APIError(400, f"state: expected one of {', '.join(STATES)}")
            search["state"] = text["state"]
        if "older_than" in text:
            search["before"] = int((now - _seconds(text, "older_than")) * 1000)
        if "newer_than" in text:
            search["after"] = int((now - _seconds(text, "newer_than")) * 1000)
        return queues, search

    async def _messages(self, request: Call, now: float) -> dict[str, Any]:
        args = dict(request.args)
        for name in ("offset",):
            if name in args:
                raise APIError(400, "offset: pages now go by cursor; pass the answer's next_cursor as cursor")
        filters = {k: v for k, v in args.items() if k not in ("cursor", "limit")}
        unknown = set(filters) - set(FILTERS)
        if unknown:
            raise APIError(400, f"unknown parameter {sorted(unknown)[0]!r}")
        queues, search = self._search(filters, now)
        cursor = _int_arg(request, "cursor", 0, 0, 2**53)
        limit = _int_arg(request, "limit", 50, 1, MAX_PAGE)
        jobs: list[dict[str, Any]] = []
        examined, more, position = 0, True, cursor
        for _ in range(PAGE_CALLS):
            found = await self.queue.page(queues, search, position, limit - len(jobs), now, budget=PAGE_BUDGET)
            jobs += found["jobs"]
            examined += int(found["examined"])
            position, more = int(found["cursor"]), bool(found["more"])
            if not more or len(jobs) >= limit:
                break
        rows = [
            {
                "queue_id": job["qid"],
                "job": job["jid"],
                "domain": job["domain"],
                "state": job["state"],
                "sender": job["sender"],
                "subject": job["subject"],
                "recipients": job["rcpts"],
                "owed": job["owed"],
                "received": job["created"] / 1000,
                "age": round(now - job["created"] / 1000, 3),
                "attempts": job["attempts"],
                "error": job["error"],
            }
            for job in jobs
        ]
        answer: dict[str, Any] = {
            "cursor": cursor,
            "messages": rows,
            "next_cursor": position if more else None,
            "examined": examined,
        }
        if not search:
            answer["total"] = (await self.queue.counts(queues, now))["total"]
        return answer

    async def _bulk(self, method: str, rest: list[str], body: Mapping[str, Any], now: float, who: str) -> Any:
        if not rest and method == "GET":
            return {"bulk": await self.bulk.bulks(50)}
        if not rest and method == "POST":
            action = body.get("action")
            if action not in ACTIONS:
                raise APIError(400, f"action: expected one of {', '.join(ACTIONS)}")
            unknown = set(body) - {"action", "filter"}
            if unknown:
                raise APIError(400, f"unknown field {sorted(unknown)[0]!r}; expected action and filter")
            given = body.get("filter")
            if not isinstance(given, dict) or not given:
                raise APIError(400, "filter: expected an object with at least one of " + ", ".join(FILTERS))
            queues, search = self._search(given, now)
            first = await self.queue.page(queues, search, 0, 1, now, budget=PAGE_BUDGET)
            if not first["jobs"] and not first["more"]:
                return {
                    "id": None,
                    "action": action,
                    "state": "done",
                    "matched": 0,
                    "message": "nothing in the queue matches the filter; nothing was changed",
                }
            bulk_id = await self.bulk.bulk_start(str(action), queues, search, now, who)
            return await self.bulk.bulk(bulk_id)
        if len(rest) == 1:
            found = await self.bulk.bulk(rest[0])
            if found is None:
                raise APIError(404, f"no bulk action {rest[0]}")
            if method == "GET":
                return found
            if method == "DELETE":
                stopped = await self.bulk.bulk_cancel(rest[0], now, who)
                return {**(await self.bulk.bulk(rest[0]) or found), "stopped": stopped}
        raise APIError(
            404 if method in ("GET", "POST", "DELETE") else 405, f"no {method} /api/v1/bulk/{'/'.join(rest)}"
        )


def unknown_domain(name: str, known: Sequence[str]) -> str:
    """
    The one answer to a domain the cluster does not have, naming a few it has.
    """
    listed = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
    return f"{name} is not a domain of this cluster (its domains: {listed or 'none'})"


def _window(window: HoldWindow) -> dict[str, Any]:
    return {"held": window.held, "start": window.start, "end": window.end}


def _before(routes: tuple[str, ...] | None, configured: list[str]) -> dict[str, Any]:
    """
    The routes before a change: the ones set at run time, or the configured ones.
    """
    return {"previous": list(routes) if routes else configured, "previous_overridden": routes is not None}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _safe_name(queue_id: str) -> str:
    return "".join(c for c in queue_id if c.isalnum() or c in "-_.") or "message"


def _json_body(request: Call) -> Mapping[str, Any]:
    content = request.content
    if len(content) > MAX_BODY:
        raise APIError(413, f"a request body of at most {MAX_BODY} bytes")
    if not content.strip():
        return {}
    try:
        body = json.loads(content)
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body: expected a JSON object")
    return body


def _int_arg(request: Call, name: str, default: int, low: int, high: int) -> int:
    text = request.args.get(name)
    if not text:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise APIError(400, f"{name}: expected a whole number from {low} to {high}, got {text!r}")
    return int(text)


def _seconds(args: Mapping[str, str], name: str) -> float:
    try:
        return parse_duration(args[name])
    except ValueError:
        raise APIError(400, f"{name}: expected a duration such as '30s', '5m', '2h' or '5d'") from None


def _moment(args: Mapping[str, str], name: str, default: float) -> float:
    """
    A time given as epoch seconds or ISO 8601 (UTC unless it says).
    """
    text = args.get(name, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise APIError(400, _moment_error(name, text))
        return seconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise APIError(400, _moment_error(name, text)) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _moment_error(name: str, text: str) -> str:
    return f"{name}: expected epoch seconds or a time such as 2026-11-23T22:00Z, got {text!r}"


def _since(request: Call, now: float) -> float:
    text = request.args.get("since", "").strip()
    if not text:
        return now - 3 * 3600
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else now - parse_duration(text)
    except ValueError:
        raise APIError(
            400, f"since: expected seconds since the epoch or a duration back from now ('3h'), got {text!r}"
        ) from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _epoch(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or value <= 0:
        raise APIError(400, f"{name}: expected a time in seconds since the epoch")
    return float(value)
