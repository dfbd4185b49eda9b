"""
Configuration: defaults, durations and sizes, and one clear line for every
mistake.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from relayx.config import (
    AnyRecipient,
    ConfigError,
    MXRoute,
    RecipientList,
    SMTPRoute,
    load,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = """
[[domain]]
name = "Example.COM"
routes = ["smtp://primary.example.com:2526"]
recipients = "any"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relayx.toml"
    path.write_text(text)
    return path


def test_example_file_loads() -> None:
    """When the shipped example is loaded, every section parses and the domains are as written."""
    config = load(ROOT / "deploy" / "relayx.example.toml")
    assert config.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.redis.url is None
    assert config.queue.retry_schedule == (60, 300, 900, 1800, 3600)
    assert config.domains[0].routes == (SMTPRoute("127.0.0.1", 2526),)
    assert config.domains[1].routes == (MXRoute(),)
    assert isinstance(config.domains[1].recipients, RecipientList)
    assert config.delivery.pace.start == 0.5 and config.delivery.pace.idle == 300


def test_defaults(tmp_path: Path) -> None:
    """When only a domain is configured, the documented defaults apply and names are normalised."""
    config = load(write(tmp_path, MINIMAL))
    assert config.queue.retention == 5 * 86400
    assert config.queue.lease == 60
    assert config.smtp.max_message_size == 25 * 1024 * 1024
    assert config.redis.key_prefix == "relayx"
    assert config.domains[0].name == "example.com"
    assert config.domains[0].recipients == AnyRecipient()
    assert config.node.data_dir == tmp_path / "relayx-data"
    assert (config.smtp.spool_threshold, config.smtp.min_data_rate, config.smtp.data_rate_grace) == (1024**2, 500, 30)
    assert (config.smtp.command_timeout, config.smtp.data_timeout) == (300, 1800)
    assert config.admin.metrics_token_required is False


def test_recipient_file_and_overrides(tmp_path: Path) -> None:
    """When recipients come from a file and options from the command line, both are used."""
    (tmp_path / "rcpts.txt").write_text("# staff\nAlice@example.com\n\nbob@example.com\n")
    text = MINIMAL.replace('recipients = "any"', 'recipients = { file = "rcpts.txt" }')
    config = load(write(tmp_path, text), {"redis.url": "redis://10.0.0.5:6380/2", "node.id": "n9"})
    assert config.domains[0].recipients == RecipientList(frozenset({"alice@example.com", "bob@example.com"}))
    assert (config.redis.host, config.redis.port, config.redis.db) == ("10.0.0.5", 6380, 2)
    assert config.node.id == "n9"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[queue]\nretention = 5\n" + MINIMAL, "relayx.toml: queue.retention: expected a duration such as"),
        ("[queue]\nretry_schedule = []\n" + MINIMAL, "queue.retry_schedule: expected a non-empty list"),
        ("[queue]\nlease = '1s'\n" + MINIMAL, "queue.lease: expected at least '3s'"),
        ("[queue]\nrate = -1\n" + MINIMAL, "queue.rate: expected messages per second"),
        ("[delivery]\npace_start = 0\n" + MINIMAL, "delivery.pace_start: expected a fraction from 0.05 to 1"),
        ("[delivery]\npace_idle = 300\n" + MINIMAL, "delivery.pace_idle: expected a duration such as"),
        (MINIMAL + "ramp_up = 'slow'\n", "domain[0].ramp_up: expected a duration"),
        ("[queue]\nworkers = 0\n" + MINIMAL, "queue.workers: expected a whole number above 0, got 0"),
        ("[smtp]\nmax_message_size = 'big'\n" + MINIMAL, "smtp.max_message_size: expected a size in bytes"),
        ("[smtp]\nlisten = ['2525']\n" + MINIMAL, "smtp.listen: expected Twisted endpoint strings"),
        ("[smtp]\nmax_line_length = 100\n" + MINIMAL, "smtp.max_line_length: expected at least 512"),
        ("[smtp]\nspool_threshold = 'lots'\n" + MINIMAL, "smtp.spool_threshold: expected a size in bytes"),
        ("[smtp]\nmin_data_rate = -1\n" + MINIMAL, "smtp.min_data_rate: expected a whole number, 0 for no limit"),
        ("[smtp]\ndata_rate_grace = '0s'\n" + MINIMAL, "smtp.data_rate_grace: expected"),
        ("[smtp]\ndata_rate_grace = '40m'\n" + MINIMAL, "smtp.data_rate_grace: expected less than smtp.data_timeout"),
        ("[admin]\nmetrics_token_required = 'yes'\n" + MINIMAL, "admin.metrics_token_required: expected true or"),
        ("[admin]\nmetrics_token_required = true\n" + MINIMAL, "admin.metrics_token_required: expected [admin.tokens]"),
        ("[redis]\nurl = 'http://x'\n" + MINIMAL, "redis.url: expected a URL such as 'redis://"),
        ("[redis]\nkey_prefix = 'a b'\n" + MINIMAL, "redis.key_prefix: expected letters, digits"),
        ("[smtp]\nlisen = ['tcp:25']\n" + MINIMAL, "smtp.lisen: unknown key"),
        ("[surprise]\n" + MINIMAL, "relayx.toml: surprise: unknown key"),
        (MINIMAL.replace("routes = [", "routs = ["), "domain[0].routes: expected a value; the key is missing"),
        (MINIMAL.replace("smtp://primary.example.com:2526", "ftp://x"), "domain[0].routes: expected 'mx' or"),
        (MINIMAL.replace('"any"', '["bob@other.test"]'), "domain[0].recipients: expected an address in example.com"),
        (MINIMAL.replace('"any"', '{ file = "missing.txt" }'), "domain[0].recipients.file: expected a readable file"),
        (MINIMAL.replace("Example.COM", "not a domain"), "domain[0].name: expected a domain name"),
        (MINIMAL + MINIMAL, "domain[1].name: expected each domain once"),
        ("[node\n", "relayx.toml: not valid TOML"),
        ("[filter]\nspf_actions = { fial = 'reject' }\n" + MINIMAL, "filter.spf_actions: expected SPF results"),
        ("[filter]\nspf_actions = { fail = 'bounce' }\n" + MINIMAL, "filter.spf_actions: expected accept or reject"),
        ("[filter]\nrspamd_url = '127.0.0.1:11333'\n" + MINIMAL, "filter.rspamd_url: expected an http:// URL"),
        ("[filter]\nrspamd_failure = 'open'\n" + MINIMAL, "filter.rspamd_failure: expected one of"),
        (MINIMAL + "filter = { messages_per_minute = 5 }\n", "domain[0].filter.messages_per_minute: expected this"),
        (MINIMAL + "filter = { dnsbl = 'zen' }\n", "domain[0].filter.dnsbl: expected a list of strings"),
        (MINIMAL + "filter = { spam = true }\n", "domain[0].filter.spam: unknown key"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    """When a value is wrong, the error is one line naming the file, the key and what was expected."""
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text))
    text_of_error = str(caught.value)
    assert message in text_of_error
    assert "\n" not in text_of_error


def test_domain_filter_over_defaults(tmp_path: Path) -> None:
    """When a domain has a filter table, its keys replace [filter]'s and the rest are inherited."""
    text = "[filter]\nspf = true\ndnsbl = ['bl.example']\nmessages_per_minute = 9\n" + MINIMAL
    text += "filter = { dnsbl = [], rspamd_url = 'http://127.0.0.1:11333/', spf_actions = { softfail = 'tempfail' } }\n"
    config = load(write(tmp_path, text))
    own = config.domains[0].filter
    assert own is not None and own.spf and own.dnsbl == () and own.rspamd_url == "http://127.0.0.1:11333"
    assert dict(own.spf_actions) == {"fail": "reject", "temperror": "tempfail", "softfail": "tempfail"}
    assert own.messages_per_minute == 9 and own.rspamd_fail_open
    assert load(write(tmp_path, MINIMAL)).domains[0].filter is None


def test_missing_file() -> None:
    """When the file does not exist, the error names it."""
    with pytest.raises(ConfigError, match=r"nowhere\.toml: cannot read"):
        load("nowhere.toml")


def test_durations_and_sizes() -> None:
    """When durations and sizes are written in their units, they convert to seconds and bytes."""
    assert [parse_duration(v) for v in ("30s", "5m", "2h", "5d", "250ms")] == [30, 300, 7200, 432000, 0.25]
    assert [parse_size(v) for v in (1000, "25MB", "512k", "1GiB")] == [1000, 25 * 1024**2, 512 * 1024, 1024**3]
    for bad in ("5", "5 weeks", "-1s", 5):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_command_line_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    """When `relayx --config` is given a bad file, it exits 2 with one line naming the file and key."""
    path = write(tmp_path, "[queue]\nretention = 'forever'\n" + MINIMAL)
    result = subprocess.run(
        [sys.executable, "-m", "relayx", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"relayx: {path}: queue.retention: expected a duration such as '30s', '5m', '2h' or '5d', got 'forever'"
    ]


def test_cluster_example_loads(tmp_path: Path) -> None:
    """When the cluster example is loaded (with its files present), it validates as shipped."""
    text = (ROOT / "deploy" / "relayx.cluster.toml").read_text()
    for name in ("/etc/relayx/tls/fullchain.pem", "/etc/relayx/tls/privkey.pem", "/etc/relayx/example.org.recipients"):
        local = tmp_path / Path(name).name
        local.write_text("alice@example.org\n" if name.endswith("recipients") else "")
        text = text.replace(name, str(local))
    # the password the shipped Redis and Sentinel configurations set, in a private file
    secret = re.search(r"^requirepass (\S+)", (ROOT / "deploy" / "redis" / "redis-aof.conf").read_text(), re.M)
    assert secret is not None
    password = tmp_path / "redis.password"
    password.write_text(secret.group(1) + "\n")
    password.chmod(0o600)
    text = text.replace("/etc/relayx/redis.password", str(password))
    config = load(write(tmp_path, text))
    assert config.redis.password == secret.group(1)
    assert config.admin.listen, "the cluster template serves metrics, health and the panel"
    assert config.redis.sentinels == (("10.0.0.11", 26379), ("10.0.0.12", 26379), ("10.0.0.13", 26379))
    assert config.redis.durability == "replicated"
    assert config.smtp.listen == ("tcp:25", "tcp6:25:interface=\\:\\:")


def test_replicated_needs_a_real_redis(tmp_path: Path) -> None:
    """When replicated durability is asked of the embedded Redis, the error says it has no replicas."""
    with pytest.raises(ConfigError, match=r"redis\.durability: expected 'aof' for an embedded Redis"):
        load(write(tmp_path, "[redis]\ndurability = 'replicated'\n" + MINIMAL))


def test_redis_url_user_and_password_are_decoded(tmp_path: Path) -> None:
    """When the URL has an ACL user and a URL-encoded password, both are read decoded."""
    url = "redis://relay%2Bx:p%40ss%2Fw%3Ard@10.0.0.5:6380/2"
    config = load(write(tmp_path, f"[redis]\nurl = '{url}'\n" + MINIMAL))
    r = config.redis
    assert (r.username, r.password, r.host, r.port, r.db, r.tls) == ("relay+x", "p@ss/w:rd", "10.0.0.5", 6380, 2, False)
    assert "p@ss" not in repr(r) and "p%40ss" not in repr(r)


def test_redis_url_password_only_is_the_default_user(tmp_path: Path) -> None:
    """When the URL has a password and no user, the user is the default one (None)."""
    config = load(write(tmp_path, "[redis]\nurl = 'redis://:secret@127.0.0.1/0'\n" + MINIMAL))
    assert (config.redis.username, config.redis.password) == (None, "secret")


def test_rediss_with_ca_file(tmp_path: Path) -> None:
    """When the URL is rediss:// with a CA file, TLS is on and the file is kept."""
    (tmp_path / "ca.pem").write_text("x")
    config = load(write(tmp_path, "[redis]\nurl = 'rediss://u:p@redis.test:6380'\ntls_ca_file = 'ca.pem'\n" + MINIMAL))
    assert config.redis.tls and config.redis.tls_ca_file == tmp_path / "ca.pem"


def test_ca_file_without_tls_is_an_error(tmp_path: Path) -> None:
    """When tls_ca_file is given with a redis:// URL, the error says it needs rediss://."""
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"redis\.tls_ca_file: expected a 'rediss://' url"):
        load(write(tmp_path, "[redis]\nurl = 'redis://redis.test'\ntls_ca_file = 'ca.pem'\n" + MINIMAL))


def test_bad_redis_url_hides_the_password(tmp_path: Path) -> None:
    """When the URL is refused, the one-line error does not show its password."""
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, "[redis]\nurl = 'http://u:topsecret@redis.test'\n" + MINIMAL))
    assert "topsecret" not in str(caught.value) and "redis.url" in str(caught.value)


def test_bodies_defaults(tmp_path: Path) -> None:
    """When [bodies] is absent, bodies go to a directory under data_dir with the embedded Redis, else stay in Redis."""
    config = load(write(tmp_path, MINIMAL))
    assert config.bodies.backend == "directory"
    assert config.bodies.directory == tmp_path / "relayx-data" / "bodies"
    assert (config.bodies.compression, config.bodies.orphan_age) == ("none", 3600)
    external = load(write(tmp_path, "[redis]\nurl = 'redis://10.0.0.5:6379/0'\n" + MINIMAL))
    assert external.bodies.backend == "redis"


def test_bodies_s3(tmp_path: Path) -> None:
    """When [bodies.s3] names a self-hosted server, path addressing is the default and the prefix ends in a slash."""
    text = (
        "[bodies]\nbackend = 's3'\ncompression = 'zstd'\n[bodies.s3]\nbucket = 'mail-bodies'\nprefix = 'mx2'\n"
        "endpoint_url = 'http://127.0.0.1:9000'\naccess_key = 'relayx'\nsecret_key = 'secret-secret'\n" + MINIMAL
    )
    config = load(write(tmp_path, text))
    s3 = config.bodies.s3
    assert (s3.bucket, s3.prefix, s3.addressing_style, s3.endpoint_url) == (
        "mail-bodies",
        "mx2/",
        "path",
        "http://127.0.0.1:9000",
    )
    assert config.bodies.compression == "zstd"
    assert "secret-secret" not in repr(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[bodies]\nbackend = 'disk'\n", "bodies.backend: expected one of 'directory', 's3', 'redis'"),
        ("[bodies]\ncompression = 'gzip'\n", "bodies.compression: expected one of 'none', 'zstd'"),
        ("[bodies]\ncompression_level = 22\n", "bodies.compression_level: expected a zstd level"),
        ("[bodies]\norphan_age = '10s'\n", "bodies.orphan_age: expected at least '60s'"),
        ("[bodies]\nsweep_batch = 5000\n", "bodies.sweep_batch: expected a whole number from 1 to 1000"),
        ("[bodies]\nbackend = 's3'\n", "bodies.s3: expected a [bodies.s3] table"),
        ("[bodies]\nbackend = 's3'\n[bodies.s3]\nprefix = 'x/'\n", "bodies.s3.bucket: expected a value"),
        ("[bodies.s3]\nbucket = 'Bad_Bucket'\n", "bodies.s3.bucket: expected a bucket name"),
        ("[bodies.s3]\naccess_key = 'a'\n", "bodies.s3.secret_key: expected access_key and secret_key together"),
        ("[bodies.s3]\nendpoint_url = 's3.example:9000'\n", "bodies.s3.endpoint_url: expected an http:// URL"),
        ("[bodies.s3]\nbuckett = 'x'\n", "bodies.s3.buckett: unknown key"),
        ("[bodies]\nbackends = 's3'\n", "bodies.backends: unknown key"),
        ("[bodies]\nbackend = 'redis'\ncompression = 'zstd'\n", "bodies.compression: expected 'none' with backend"),
        ("[redis]\nurl = 'redis://10.0.0.5:6379/0'\n[bodies]\nbackend = 'directory'\n", "bodies.directory: expected"),
    ],
)
def test_bad_bodies_settings(tmp_path: Path, text: str, message: str) -> None:
    """When a [bodies] setting makes no sense, the error is one line naming the key."""
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text + MINIMAL))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_redis_password_file(tmp_path: Path) -> None:
    """When [redis] password_file names a private file, its first line is the password; else refused."""
    secret = tmp_path / "redis.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    sentinels = '[redis]\nsentinels = ["127.0.0.1:26379"]\npassword_file = "redis.password"\n'
    assert load(write(tmp_path, sentinels + MINIMAL)).redis.password == "s3cret"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"redis.password_file: expected a file only its owner can read"):
        load(write(tmp_path, sentinels + MINIMAL))
    secret.chmod(0o600)
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load(write(tmp_path, sentinels + MINIMAL))
    secret.write_text("s3cret\n")
    doubled = '[redis]\nurl = "redis://:other@127.0.0.1:6379/0"\npassword_file = "redis.password"\n'
    with pytest.raises(ConfigError, match="give it in one place"):
        load(write(tmp_path, doubled + MINIMAL))
