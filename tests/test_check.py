"""
``relayx check``: the TLS chain, the data directory and Redis's settings,
checked with real certificates and a real ``redis-server``.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

from relayx.ops.check import Finding, Level, check_data_dir, check_tls
from tests.certs import CA
from tests.helpers import RedisProcess

NOW = datetime.datetime.now(datetime.UTC)


def chain(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """
    A leaf for mx2.example.net issued by an intermediate of a root: the
    leaf's file, its key, and the intermediate's PEM.
    """
    root = CA()
    intermediate = root.intermediate()
    cert, key, _ = intermediate.issue(tmp_path, "mx2.example.net")
    return cert, key, intermediate.pem()


def levels(findings: list[Finding]) -> set[Level]:
    return {f.level for f in findings}


def test_full_chain_is_ok(tmp_path: Path) -> None:
    """When the file has the leaf then its intermediate, and names the node, the chain is ok."""
    cert, key, intermediate = chain(tmp_path)
    cert.write_bytes(cert.read_bytes() + intermediate)
    findings = check_tls(cert, key, ["mx2.example.net"], NOW)
    assert levels(findings) == {Level.OK}, findings
    assert "chain of 2" in findings[0].text


def test_leaf_alone_warns_about_intermediates(tmp_path: Path) -> None:
    """When the file has only the leaf of an intermediate, check warns that verifying senders cannot build a chain."""
    cert, key, _ = chain(tmp_path)
    findings = check_tls(cert, key, ["mx2.example.net"], NOW)
    assert [f.level for f in findings] == [Level.WARNING]
    assert "no intermediate" in findings[0].text and "fullchain" in findings[0].fix


def test_wrong_order_wrong_key_and_missing_name(tmp_path: Path) -> None:
    """When the intermediate comes first, the key is another's and the node's name is absent, each is reported."""
    cert, _key, intermediate = chain(tmp_path)
    _, other_key, _ = CA().issue(tmp_path, "other.example", stem="other")
    cert.write_bytes(intermediate + cert.read_bytes())
    findings = check_tls(cert, other_key, ["mx3.example.net"], NOW)
    texts = " | ".join(f.text for f in findings)
    assert Level.ERROR in levels(findings)
    assert "did not issue it" in texts and "is not the key" in texts and "does not name mx3.example.net" in texts


def test_expired_and_soon_expiring(tmp_path: Path) -> None:
    """When the certificate is checked 40 days on it is expired; 20 days on it expires soon."""
    cert, key, intermediate = chain(tmp_path)
    cert.write_bytes(cert.read_bytes() + intermediate)
    later = check_tls(cert, key, ["mx2.example.net"], NOW + datetime.timedelta(days=40))
    assert Level.ERROR in levels(later) and any("expired" in f.text for f in later)
    soon = check_tls(cert, key, ["mx2.example.net"], NOW + datetime.timedelta(days=20))
    assert levels(soon) == {Level.WARNING} and any("expires on" in f.text for f in soon)


def test_not_pem(tmp_path: Path) -> None:
    """When the certificate file is not PEM, one error names the file."""
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    [finding] = check_tls(bad, bad, [], NOW)
    assert finding.level is Level.ERROR and str(bad) in finding.text


def test_data_dir(tmp_path: Path) -> None:
    """When the data directory cannot be made it is an error; readable by others, a warning; 0700, ok."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert levels(check_data_dir(blocker / "data")) == {Level.ERROR}
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    assert levels(check_data_dir(open_dir)) == {Level.WARNING}
    open_dir.chmod(0o700)
    assert levels(check_data_dir(open_dir)) == {Level.OK}


def test_relayx_check_names_an_evicting_redis(tmp_path: Path) -> None:
    """When Redis may evict keys and fsyncs every second, `relayx check` exits 1 naming both settings."""
    redis = RedisProcess("--maxmemory-policy", "allkeys-lru", fsync="everysec")
    redis.start()
    try:
        data = tmp_path / "data"
        data.mkdir(mode=0o700)
        config = tmp_path / "relayx.toml"
        config.write_text(
            f'[node]\nid = "n1"\nhostname = "mx.test"\ndata_dir = "{data}"\n'
            f'[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n[redis]\nurl = "{redis.url}"\n'
            '[[domain]]\nname = "example.com"\nroutes = ["smtp://127.0.0.1:2526"]\nrecipients = "any"\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "relayx", "check", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert "maxmemory-policy allkeys-lru" in result.stdout and "noeviction" in result.stdout
        assert "appendfsync everysec" in result.stdout
        assert "Traceback" not in result.stderr
        listed = subprocess.run(
            [sys.executable, "-m", "relayx", "check", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert '"level": "error"' in listed.stdout
    finally:
        redis.stop()
