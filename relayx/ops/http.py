"""
The admin HTTP tree (twisted.web) on ``[admin] listen``: ``/metrics``,
``/healthz`` (the process answers) and ``/readyz`` (it can take mail: Redis
connected and SMTP listening, so a load balancer takes a node without Redis
out), the admin API under ``/api`` and the control panel at ``/``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayx.interfaces import QueueCounts, StoreUnavailable
from relayx.metrics import Metrics
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


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics, refresh: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self._metrics = metrics
        self._refresh = refresh

    def render_GET(self, request: Request) -> int:
        async def render() -> None:
            try:
                await self._refresh()
            except Exception as e:
                log.warn("metrics refresh failed: {why}", why=repr(e))
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(generate_latest(self._metrics.exposition))
            request.finish()

        Deferred.fromCoroutine(render())
        return NOT_DONE_YET


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
) -> Resource:
    """
    The HTTP tree: ``ready`` says why the node is not ready, or ``None``;
    the admin ``api`` under ``/api`` and the control ``panel`` at ``/``.
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
    root.putChild(b"metrics", _MetricsPage(metrics, refresh))
    return root
