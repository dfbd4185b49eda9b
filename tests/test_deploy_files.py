"""
The files in deploy/ stay true to the code: every metric the alert rules and
the Grafana dashboard name is one relayx exports, and the shipped
configurations load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from relayx.config import load
from relayx.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def exported_names() -> set[str]:
    metrics = Metrics()
    metrics.queue.labels(domain="example.com", state="ready").set(1)
    metrics.oldest.labels(domain="example.com").set(1)
    metrics.held.labels(domain="example.com").set(0)
    metrics.refused.labels(reply="4xx").inc()
    metrics.deliveries.labels(result="failed").inc()
    metrics.redis_seconds.observe(0.001)
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def named(text: str) -> set[str]:
    return set(re.findall(r"\b(relayx_[a-z_]+)", text))


def test_alerts_and_dashboard_name_real_metrics() -> None:
    """When the alert rules and the dashboard are read, every relayx_ metric they use is exported."""
    exported = exported_names()
    alerts = (DEPLOY / "prometheus" / "relayx-alerts.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana" / "relayx-dashboard.json").read_text())
    used = named(alerts) | named(json.dumps(dashboard))
    assert used, "the files name no metric"
    assert used - exported == set()


def test_example_configuration_loads() -> None:
    """When the example configuration is loaded as shipped, it has no error (the cluster's: test_config)."""
    assert load(DEPLOY / "relayx.example.toml").domains
