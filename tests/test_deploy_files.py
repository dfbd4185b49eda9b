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


def test_shipped_configurations_load(tmp_path: Path) -> None:
    """When the example and the cluster configuration are loaded, neither has an error."""
    assert load(DEPLOY / "relayx.example.toml").domains
    # the files the cluster template names exist only on a real host: made here
    text = (DEPLOY / "relayx.cluster.toml").read_text().replace("/etc/relayx/", f"{tmp_path}/")
    (tmp_path / "tls").mkdir()
    for name in ("tls/fullchain.pem", "tls/privkey.pem", "example.org.recipients"):
        (tmp_path / name).write_text("someone@example.org\n")
    # the password the shipped Redis and Sentinel configurations set
    secret = re.search(r"^requirepass (\S+)", (DEPLOY / "redis" / "redis-aof.conf").read_text(), re.M)
    assert secret is not None
    (tmp_path / "redis.password").write_text(secret.group(1) + "\n")
    (tmp_path / "redis.password").chmod(0o600)
    (tmp_path / "relayx.toml").write_text(text)
    cluster = load(tmp_path / "relayx.toml")
    assert cluster.redis.sentinels and cluster.redis.password == secret.group(1)
    assert cluster.admin.listen, "the cluster template serves metrics, health and the panel"
