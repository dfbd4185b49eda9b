"""
The admin HTTP tree (twisted.web) on ``[admin] listen``: ``/metrics``,
``/healthz`` (the process answers) and ``/readyz`` (it can take and deliver
mail: Redis connected, answering, not evicting, accepting its credentials,
and SMTP listening, so a load balancer takes such a node out), the admin
API under ``/api`` and the control panel at ``/``.

Served by ``admin_http``: a request body over ``MAX_BODY`` is refused with
``413`` as it arrives (chunked or not), before any token is looked at and
without being written anywhere (twisted.web would spool it to a temporary
file). ``/metrics`` may need a token too, and concurrent scrapes share one
refresh from Redis.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable, Mapping, Sequence

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from relayx.interfaces import Pace, QueueCounts, StoreUnavailable, Throttle
from relayx.loops import logged
from relayx.metrics import Metrics
from relayx.ops.api import MAX_BODY, authenticate
from relayx.queue.states import JobState

log = Logger()


class _Root(Resource):
    """
    The admin tree's root: an unknown path is a plain 404.
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class _Text(Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, bytes]]) -> None:
        super().__init__()
        self._answer = answer

    def render_GET(self, request: Request) -> bytes:
        code, body = self._answer()
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return body


class CappedRequest(Request):
    """
    A request whose body may be at most ``max_body`` bytes: a larger one
    (declared by Content-Length, or found while chunks arrive) is answered
    ``413`` and the connection closed at once; a body is held in memory,
    never in a temporary file.
    """

    max_body = MAX_BODY
    _body: io.BytesIO
    _body_bytes = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        self.content = self._body = io.BytesIO()
        if length is not None and length > self.max_body:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.max_body:
            self._refuse()
            return
        self._body.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        self.content = io.BytesIO()
        log.info(
            "admin HTTP: request body over {limit} bytes from {peer} refused",
            limit=self.max_body,
            peer=str(getattr(self.getClientAddress(), "host", "?")),
        )
        body = f"a request body of at most {self.max_body} bytes\n".encode()
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
            + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        self.channel.loseConnection()


def admin_http(resource: Resource) -> Site:
    """
    The admin listener's site: ``resource`` behind capped request bodies.
    """
    site = Site(resource, requestFactory=CappedRequest)
    site.noisy = False
    return site


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(
        self,
        metrics: Metrics,
        refresh: Callable[[], Awaitable[None]],
        tokens: Sequence[tuple[str, str]] | None,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._refresh = refresh
        self._tokens = tokens
        #: scrapes waiting for the refresh under way; they all get its result
        self._waiting: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        if self._tokens is not None and authenticate(request.getHeader(b"authorization"), self._tokens) is None:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="relayx"')
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"a valid bearer token is required\n"
        self._waiting.append(request)
        if len(self._waiting) == 1:
            logged(Deferred.fromCoroutine(self._render()), "metrics page")
        return NOT_DONE_YET

    async def _render(self) -> None:
        try:
            await self._refresh()
        except Exception as e:
            log.warn("metrics refresh failed: {why}", why=repr(e))
        code = 200
        try:
            body = generate_latest(self._metrics.exposition)
        except Exception:
            log.failure("metrics page failed")
            code, body = 500, b"metrics unavailable\n"
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            if request.finished or request.channel is None or getattr(request, "_disconnected", False):
                continue  # the client went away while Redis was asked
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(body)
            request.finish()


def admin_site(
    metrics: Metrics,
    *,
    ready: Callable[[], str | None],
    domains: Sequence[str],
    queue_summary: Callable[[Sequence[str]], Awaitable[Mapping[str, QueueCounts]]],
    clock: IReactorTime,
    redis_connected: Callable[[], bool],
    api: Resource | None = None,
    panel: Resource | None = None,
    metrics_tokens: Sequence[tuple[str, str]] | None = None,
    paces: Callable[[Sequence[str]], Awaitable[Mapping[str, Pace]]] | None = None,
    throttle: Callable[[str], Throttle] | None = None,
) -> Resource:
    """
    The HTTP tree: ``ready`` says why the node is not ready, or ``None``;
    the admin ``api`` under ``/api`` and the control ``panel`` at ``/``;
    ``/metrics`` needs one of ``metrics_tokens`` unless that is ``None``.
    A scrape reads the queue's counters (``queue_summary``, one small
    read-only script over the delivery queues), never its jobs.
    """

    async def refresh() -> None:
        metrics.redis_up.set(1 if redis_connected() else 0)
        try:
            summary = await queue_summary(domains)
        except StoreUnavailable:
            return
        for domain, counts in summary.items():
            by_state = counts.by_state()
            for name in JobState:
                metrics.queue.labels(domain=domain, state=name).set(by_state[name])
            oldest = counts.oldest
            metrics.oldest.labels(domain=domain).set(max(0.0, clock.seconds() - oldest) if oldest else 0)
            metrics.held.labels(domain=domain).set(1 if counts.on_hold else 0)
            metrics.queue_bytes.labels(domain=domain).set(counts.bytes)
        if paces is None or throttle is None:
            return
        try:
            current = await paces(domains)
        except StoreUnavailable:
            return
        for domain, pace in current.items():
            concurrency, rate = pace.effective(throttle(domain))
            metrics.destination_concurrency.labels(domain=domain).set(concurrency)
            metrics.destination_rate.labels(domain=domain).set(rate)
            metrics.destination_paced.labels(domain=domain).set(
                0 if pace.concurrency is None and pace.rate is None else 1
            )
            if pace.event == "cut" and pace.at is not None and pace.kind:
                metrics.destination_last_cut.labels(domain=domain, kind=pace.kind).set(pace.at)

    def readiness() -> tuple[int, bytes]:
        why = ready()
        return (200, b"ready\n") if why is None else (503, f"not ready: {why}\n".encode())

    root = _Root()
    if panel is not None:
        root.putChild(b"", panel)
    if api is not None:
        root.putChild(b"api", api)
    root.putChild(b"healthz", _Text(lambda: (200, b"ok\n")))
    root.putChild(b"readyz", _Text(readiness))
    root.putChild(b"metrics", _MetricsPage(metrics, refresh, metrics_tokens))
    return root
