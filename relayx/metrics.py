"""
Prometheus metrics and health checks, served over HTTP (twisted.web) on
``[admin] listen``: ``/metrics``, ``/healthz`` (the process answers) and
``/readyz`` (it can take mail: Redis connected and SMTP listening, so a load
balancer takes a node without Redis out).

Metric names are stable; their labels never carry addresses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayx.interfaces import DomainState, StoreUnavailable

log = Logger()


class Metrics:
    """
    The node's counters, in a registry of its own.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Counter("relayx_smtp_sessions", "SMTP sessions accepted", registry=r)
        self.accepted = Counter("relayx_messages_accepted", "Messages committed and answered 250", registry=r)
        self.refused = Counter(
            "relayx_smtp_refused", "Replies refusing a recipient or a message, by class", ["reply"], registry=r
        )
        self.deliveries = Counter(
            "relayx_delivery_recipients",
            "Recipients by delivery result (delivered, failed, deferred, unreachable)",
            ["result"],
            registry=r,
        )
        self.delivery_seconds = Histogram("relayx_delivery_seconds", "Duration of a delivery attempt", registry=r)
        self.leases_lost = Counter("relayx_leases_lost", "Leases taken over before the delivery ended", registry=r)
        self.queue = Gauge("relayx_queue_jobs", "Delivery jobs by domain and state", ["domain", "state"], registry=r)
        self.held = Gauge("relayx_domain_held", "1 while the domain is held", ["domain"], registry=r)
        self.redis_up = Gauge("relayx_redis_up", "1 while Redis is connected", registry=r)

    def refuse(self, code: int) -> None:
        self.refused.labels(reply=f"{code // 100}xx").inc()


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
            request.write(generate_latest(self._metrics.registry))
            request.finish()

        Deferred.fromCoroutine(render())
        return NOT_DONE_YET


def admin_site(
    metrics: Metrics,
    *,
    ready: Callable[[], str | None],
    domains: Sequence[str],
    domain_state: Callable[[str], Awaitable[DomainState]],
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
            except StoreUnavailable:
                return
            metrics.queue.labels(domain=domain, state="ready").set(state.ready)
            metrics.queue.labels(domain=domain, state="in_flight").set(state.in_flight)
            metrics.held.labels(domain=domain).set(1 if state.held else 0)

    def readiness() -> tuple[int, bytes]:
        why = ready()
        return (200, b"ready\n") if why is None else (503, f"not ready: {why}\n".encode())

    root = Resource()
    if panel is not None:
        root.putChild(b"", panel)
    if api is not None:
        root.putChild(b"api", api)
    root.putChild(b"healthz", _Text(lambda: (200, b"ok\n")))
    root.putChild(b"readyz", _Text(readiness))
    root.putChild(b"metrics", _MetricsPage(metrics, refresh))
    return root
