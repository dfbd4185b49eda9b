"""
``relayx nodes|status|hold|release|route|audit``: operate the cluster's queue
from a shell; ``relayx check``: check a configuration and what it points at.

These talk to the queue's Redis directly (the node's configuration says
where; for an embedded Redis, the port its node recorded in the data
directory), so they work whichever nodes are up.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import ssl
import sys
import time
from datetime import UTC, datetime
from typing import Any

from twisted.internet.task import react

from relayx.address import AddressError, normalize_domain
from relayx.config import Config, ConfigError, load, parse_route
from relayx.dns import dns_lookup, dns_lookup_mx
from relayx.ops import check, preflight
from relayx.queue.redis import RedisQueue
from relayx.redis.connection import open_redis
from relayx.redis.embedded import EmbeddedRedis

COMMANDS = ("nodes", "status", "hold", "release", "route", "audit", "check", "preflight")


def _when(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time such as 2026-11-23T22:00+00:00, got {text!r}") from None


def _route(text: str) -> str:
    try:
        return str(parse_route(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected {e}") from None


def _operator() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"relayx {command}")
    parser.add_argument("--config", required=True, help="the node's TOML configuration")
    if command in ("status", "hold", "release", "route"):
        parser.add_argument("domain")
    if command == "route":
        parser.add_argument("routes", nargs="*", type=_route, help="smtp://host:port (several: tried in order) or mx")
        parser.add_argument("--reset", action="store_true", help="go back to the configured routes")
    if command == "audit":
        parser.add_argument("--limit", type=int, default=20)
    if command == "hold":
        parser.add_argument("--from", dest="start", type=_when, help="start of a scheduled hold (ISO 8601)")
        parser.add_argument("--until", dest="end", type=_when, help="end of the hold (ISO 8601)")
    if command in ("check", "preflight"):
        parser.add_argument("--json", action="store_true", help="the findings as a JSON array")
    if command == "preflight":
        parser.add_argument("domain")
    if command == "release":
        parser.add_argument("--rate", type=float, default=0.0, help="drain the backlog at this many messages/s")
    return parser


class UsageError(Exception):
    """
    The command line names something the configuration does not have.
    """


def configured_domain(config: Config, text: str) -> str:
    """
    ``text`` as a domain (or copy queue, ``example.org#1``) of the
    configuration, normalised; ``UsageError`` naming the problem otherwise.
    """
    name, hash_, copy = text.partition("#")
    try:
        domain = normalize_domain(name) + hash_ + copy
    except AddressError:
        raise UsageError(f"{text!r} is not a domain name") from None
    known = [queue for d in config.domains for queue in d.queues()]
    if domain not in known:
        listed = ", ".join(known) if known else "none"
        raise UsageError(f"{domain} is not a domain of {config.source} (its domains: {listed})")
    return domain


def describe(record: dict[str, object]) -> str:
    """
    One line for an audit record of any action.
    """
    try:
        when = datetime.fromtimestamp(int(str(record.get("at", 0))) / 1000).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        when = "?"
    action = str(record.get("action", "?"))
    target = record.get("domain", record.get("queue_id", ""))
    line = f"{when}  {record.get('who', '?')}  {action} {target}"
    if action == "route":
        listed = record.get("routes")
        routes = " ".join(str(r) for r in listed) if isinstance(listed, list) and listed else "configured routes"
        return f"{line}: {routes}"
    shown = {"at", "who", "action", "domain", "queue_id", "routes"}
    details = " ".join(f"{k}={v}" for k, v in record.items() if k not in shown and v not in (None, "", 0))
    return f"{line}: {details}" if details else line


async def _queue(reactor: Any, config: Config, diagnose: bool = False) -> RedisQueue:
    embedded = None
    if config.redis.embedded:
        embedded = EmbeddedRedis.recorded(config.node.data_dir)
        if embedded is None:
            raise ConfigError(
                f"{config.source}: no [redis] url and no embedded Redis running under {config.node.data_dir}"
            )
    # ``relayx check`` reads an evicting Redis to report it with everything else
    redis = await open_redis(config.redis, reactor, embedded, poolsize=1, evicting_ok=diagnose)
    if not await redis.wait_connected(config.redis.timeout):
        why = redis.refused or f"Redis at {redis.where} is not answering"
        await redis.disconnect()
        raise ConfigError(f"{config.source}: {why}")
    return RedisQueue.configured(redis, config)


async def _check(reactor: Any, options: argparse.Namespace, config: Config) -> None:
    """
    ``relayx check``: the findings, and exit status 1 when any is an error.
    """
    findings = check.check_files(config, datetime.now(UTC), os.geteuid() == 0)
    if config.redis.embedded and EmbeddedRedis.recorded(config.node.data_dir) is None:
        findings.append(check.Finding(check.Level.OK, "redis", "embedded Redis: started by the node (AOF always)"))
    else:
        try:
            queue = await _queue(reactor, config, diagnose=True)
        except ConfigError as e:
            findings.append(check.Finding(check.Level.ERROR, "redis", str(e), "start Redis, or fix [redis]"))
        else:
            try:
                findings += await check.check_redis(queue.redis, config)
            finally:
                await queue.redis.disconnect()
    print(json.dumps([f.as_json() for f in findings], indent=2) if options.json else check.render(findings))
    if any(f.level is check.Level.ERROR for f in findings):
        raise SystemExit(1)


async def _preflight(reactor: Any, options: argparse.Namespace, config: Config) -> None:
    """
    ``relayx preflight DOMAIN``: the checklist, and exit status 1 when any
    item is an error.
    """
    domain = config.domain(options.domain)
    if domain is None:
        print(f"relayx preflight: {options.domain} is not a domain of {config.source}", file=sys.stderr)
        raise SystemExit(2)
    names = {config.node.hostname}
    try:
        queue = await _queue(reactor, config)
    except ConfigError:
        pass  # the cluster's other nodes are unknown without Redis; this node's name is enough
    else:
        try:
            names |= {node.hostname for node in await queue.nodes(time.time(), 3 * config.queue.heartbeat)}
        finally:
            await queue.redis.disconnect()
    d = config.delivery
    lookup = dns_lookup(d.nameservers, d.connect_timeout)
    findings = await preflight.preflight(
        domain,
        sorted(names),
        lookup=lookup,
        lookup_mx=dns_lookup_mx(d.nameservers, d.connect_timeout),
        probe=preflight.make_probe(d.helo_name, d.connect_timeout),
        fetch_policy=preflight.make_fetch(lookup, ssl.create_default_context(), d.connect_timeout),
        mx_port=d.mx_port,
    )
    print(json.dumps([f.as_json() for f in findings], indent=2) if options.json else check.render(findings))
    if any(f.level is check.Level.ERROR for f in findings):
        raise SystemExit(1)


async def _run(reactor: Any, command: str, options: argparse.Namespace, config: Config) -> None:
    if command == "check":
        await _check(reactor, options, config)
        return
    if command == "preflight":
        await _preflight(reactor, options, config)
        return
    queue = await _queue(reactor, config)
    now = time.time()
    try:
        if command == "nodes":
            nodes = await queue.nodes(now, 3 * config.queue.heartbeat)
            print(f"{'NODE':<20} {'HOSTNAME':<30} {'SEEN':>8} {'LEASES':>6}")
            for node in nodes:
                print(f"{node.node:<20} {node.hostname:<30} {now - node.last_seen:>7.1f}s {len(node.leases):>6}")
        elif command == "status":
            s = await queue.domain_state(options.domain, now)
            print(f"domain        {s.domain}")
            print(f"ready         {s.ready}")
            print(f"in flight     {s.in_flight}")
            print(f"held          {'yes' if s.held else 'no'}")
            if s.hold_start or s.hold_end:
                start = datetime.fromtimestamp(s.hold_start).isoformat() if s.hold_start else "now"
                end = datetime.fromtimestamp(s.hold_end).isoformat() if s.hold_end else "until released"
                print(f"hold window   {start} to {end}")
            if s.paused_until:
                print(f"failing       retry by {datetime.fromtimestamp(s.paused_until).isoformat()}: {s.last_error}")
            if s.release_rate:
                print(f"release rate  {s.release_rate:g} msg/s")
        elif command == "hold":
            await queue.hold(options.domain, now, options.start, options.end, who=_operator())
            print(f"{options.domain}: held" + (" (scheduled)" if options.start and options.start > now else ""))
        elif command == "route":
            if options.reset == bool(options.routes):
                raise ConfigError("give the new routes, or --reset for the configured ones")
            await queue.set_routes(options.domain, tuple(options.routes) or None, now, _operator())
            target = " ".join(options.routes) if options.routes else "the configured routes"
            print(f"{options.domain}: queued and new mail goes to {target}")
        elif command == "audit":
            for record in await queue.audit(options.limit):
                print(describe(record))
        elif command == "release":
            was_held = await queue.release(options.domain, now, options.rate, who=_operator())
            rate = f" at {options.rate:g} msg/s" if options.rate else ""
            print(f"{options.domain}: released{rate}" if was_held else f"{options.domain}: was not held")
    finally:
        await queue.redis.disconnect()


def main(command: str, argv: list[str]) -> None:
    options = _parser(command).parse_args(argv)
    try:
        config = load(options.config)
    except ConfigError as e:
        print(f"relayx: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if command in ("status", "hold", "release", "route"):
        try:
            options.domain = configured_domain(config, options.domain)
        except UsageError as e:
            print(f"relayx {command}: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    async def run(reactor: Any) -> None:
        try:
            await _run(reactor, command, options, config)
        except SystemExit:
            raise
        except Exception as e:
            print(f"relayx {command}: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    react(lambda reactor: _deferred(run(reactor)))


def _deferred(coroutine: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coroutine)
