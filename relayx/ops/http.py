"""
The admin HTTP tree (twisted.web) on ``[admin] listen``: ``/metrics``,
``/healthz`` (the process answers) and ``/readyz`` (it can take and deliver
mail: Redis connected, answering, not evicting, accepting its credentials,
and SMTP listening, so a load balancer takes such a node out), the admin
API under ``/api`` and the control panel at ``/``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayx.interfaces import DomainState, StoreUnavailable
from relayx.loops import logged
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
            if request.finished or request.channel is None:
                return  # the client went away while Redis was asked
            try:
                body = generate_latest(self._metrics.exposition)
            except Exception:
                log.failure("metrics page failed")
                request.setResponseCode(500)
                body = b"metrics unavailable\n"
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(body)
            request.finish()

        logged(Deferred.fromCoroutine(render()), "metrics page")
        return NOT_DONE_YET


def admin_site(
    metrics: Metrics,
    *,
    ready: Callable[[], str | None],
    domains: Sequence[str],
    domain_state: Callable[[str], Awaitable[DomainState]],
    queue_jobs: Callable[[str], Awaitable[Mapping[str, Any]]],
    clock: IReactorTime,
    redis_connected: Callable[[], bool],
    api: Resource | None = None,
    panel: Resource | None = None,
) -> Resource:
    """
    The HTTP tree: ``ready`` says why the node is not ready, or ``None``;
    the admin ``api`` under ``/api`` and the control ``panel`` at ``/``.
    """

    async def refresh() -> None:
        metrics.redis_up.set(1 if redis_connected() else 0)
        for domain in domains:
            try:
                state = await domain_state(domain)
                jobs = await queue_jobs(domain)
            except StoreUnavailable:
                return
            for name in JobState:
                metrics.queue.labels(domain=domain, state=name).set(jobs["states"].get(name, 0))
            oldest = jobs["oldest"] / 1000
            metrics.oldest.labels(domain=domain).set(max(0.0, clock.seconds() - oldest) if oldest else 0)
            metrics.held.labels(domain=domain).set(1 if state.held else 0)

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
