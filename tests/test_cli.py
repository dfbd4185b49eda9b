"""
``relayx hold|release|route|status|audit``: domain names are checked against
the configuration before Redis is asked, and every audit record prints.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relayx.config import load
from relayx.ops import cli

CONFIG = """
[redis]
url = "redis://127.0.0.1:1/0"

[[domain]]
name = "example.com"
routes = ["smtp://127.0.0.1:2526"]
copy_to = ["smtp://127.0.0.1:2527"]
recipients = "any"
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "relayx.toml"
    path.write_text(CONFIG)
    return path


def test_configured_domain_is_normalised(config_path: Path) -> None:
    """When a configured domain is named in capitals or with a final dot, it is accepted in its normal form."""
    config = load(config_path)
    assert cli.configured_domain(config, "Example.COM.") == "example.com"
    assert cli.configured_domain(config, "example.com#1") == "example.com#1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exmaple.com", "exmaple.com is not a domain of"),
        ("not a domain", "is not a domain name"),
        ("example.com#2", "not a domain of"),
    ],
)
def test_unknown_or_bad_domain_is_refused(config_path: Path, text: str, expected: str) -> None:
    """When the domain is misspelt, malformed or not configured, UsageError says which and lists the domains."""
    with pytest.raises(cli.UsageError, match=expected):
        cli.configured_domain(load(config_path), text)


@pytest.mark.parametrize("command", ["hold", "release", "status", "route"])
def test_typo_exits_2_with_one_line(config_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """When `relayx hold exmaple.com` has a typo, it exits 2 with one line, before asking Redis anything."""
    with pytest.raises(SystemExit) as caught:
        cli.main(command, ["--config", str(config_path), "exmaple.com", *(["mx"] if command == "route" else [])])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exmaple.com is not a domain of" in err and "example.com" in err


@pytest.mark.parametrize(
    ("record", "shown"),
    [
        ({"at": 1795400000000, "who": "ops@h", "action": "delete", "queue_id": "ABC"}, "delete ABC"),
        ({"at": 1795400000000, "who": "api:ops", "action": "bounce", "queue_id": "ABC"}, "bounce ABC"),
        ({"at": 1795400000000, "who": "ops@h", "action": "requeue", "queue_id": "ABC"}, "requeue ABC"),
        ({"at": 1795400000000, "who": "ops@h", "action": "flush", "domain": "example.com"}, "flush example.com"),
        ({"at": 1795400000000, "who": "ops@h", "action": "release", "domain": "example.com", "rate": 5}, "rate=5"),
        (
            {"at": 1795400000000, "who": "ops@h", "action": "route", "domain": "example.com", "routes": []},
            "configured routes",
        ),
        ({"action": "something new"}, "something new"),
    ],
)
def test_audit_prints_every_kind_of_record(record: dict[str, object], shown: str) -> None:
    """When the audit log holds delete, bounce, requeue or unknown records, each prints as one line."""
    line = cli.describe(record)
    assert shown in line and "\n" not in line
