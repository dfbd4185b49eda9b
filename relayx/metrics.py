"""
The node's Prometheus metrics: one registry, updated by the SMTP front door,
the scheduler and the Redis connection, served by ``relayx.ops.http``.

Metric names are stable; their labels never carry addresses.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from twisted.logger import Logger

log = Logger()


class Metrics:
    """
    The node's counters, in a registry of its own. When the node runs in
    several processes (``[node] processes``), ``PROMETHEUS_MULTIPROC_DIR`` is
    set for all of them and ``exposition`` adds up every process's values.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        #: what /metrics serves
        self.exposition = r
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.exposition = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposition)
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
        self.lease_takeovers = Counter(
            "relayx_lease_takeovers", "Expired leases of silent nodes taken back by this node", registry=r
        )
        self.throttle_waits = Counter(
            "relayx_throttle_waits", "Claims that left work waiting for a domain's rate limit", registry=r
        )
        self.redis_seconds = Histogram(
            "relayx_redis_seconds",
            "Latency of Redis commands and scripts",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.oldest = Gauge(
            "relayx_queue_oldest_seconds",
            "Age of the oldest queued job by domain",
            ["domain"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.queue = Gauge(
            "relayx_queue_jobs",
            "Delivery jobs by domain and state (ready, held, deferred, in_flight, failed)",
            ["domain", "state"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.held = Gauge(
            "relayx_domain_held", "1 while the domain is held", ["domain"], registry=r, multiprocess_mode="mostrecent"
        )
        self.quota = Gauge(
            "relayx_quota_used_ratio",
            "How full each quota is (1: at its limit; memory: of maxmemory less the headroom)",
            ["scope"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.redis_up = Gauge(
            "relayx_redis_up", "1 while Redis is connected", registry=r, multiprocess_mode="mostrecent"
        )
        self.queue_bytes = Gauge(
            "relayx_queue_bytes",
            "Bytes of the messages queued by domain (each job counts its message)",
            ["domain"],
            registry=r,
            multiprocess_mode="mostrecent",
        )

        self.pushbacks = Counter(
            "relayx_delivery_pushbacks",
            'Delivery attempts a destination answered "not now", by what it cuts (sessions, rate)',
            ["kind"],
            registry=r,
        )
        self.destination_concurrency = Gauge(
            "relayx_destination_concurrency",
            "Deliveries at once each destination may have now (its adaptive pace, at most the configured)",
            ["domain"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.destination_rate = Gauge(
            "relayx_destination_rate",
            "Messages per second each destination may take now (0: no limit)",
            ["domain"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.destination_last_cut = Gauge(
            "relayx_destination_pace_cut_timestamp_seconds",
            "When each destination's pace was last cut (0: never), by the cut's kind (sessions, rate, slow)",
            ["domain", "kind"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.destination_paced = Gauge(
            "relayx_destination_paced",
            "1 while a destination runs below its configured pace after a pushback",
            ["domain"],
            registry=r,
            multiprocess_mode="mostrecent",
        )

    def refuse(self, code: int) -> None:
        self.refused.labels(reply=f"{code // 100}xx").inc()
