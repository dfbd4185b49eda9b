"""
Greylisting: the first attempt of a (client network, sender, recipient)
triplet is deferred; its state lives in Redis so every node decides the same.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayx.address import Mailbox
from relayx.checks.chain import Client, Filter, Verdict
from relayx.reply import Reply

log = Logger()


def _network(client: str) -> str:
    """
    The client's network for greylisting: senders retry from pools of hosts.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


_BATV = re.compile(r"^(?:prvs|msprvs1|btv1)=[^=@]*=")
_SRS = re.compile(r"^(srs[01])=[^=@]+=[^=@]+=")
_DIGITS = re.compile(r"\b\d+\b")


def sender_key(sender: str) -> str:
    """
    The sender as greylisting remembers it, as postgrey does: a BATV tag
    (``prvs=1234abcdef=user@dom``) and an SRS hash and timestamp removed, an
    address extension (``+...``) dropped and numbers (VERP) replaced by
    ``#``, so that a retry with a fresh tag or bounce address still matches.
    """
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        return sender.lower()
    local = _BATV.sub("", local)
    local = _SRS.sub(r"\1=#=#=", local)
    local = local.split("+", 1)[0] if not local.startswith("+") else local
    return f"{_DIGITS.sub('#', local)}@{domain}"


@attrs.define
class Greylist(Filter):
    """
    The first attempt of a (client network, sender, recipient) triplet is
    deferred; a retry after ``delay`` passes, from any node of the cluster,
    and the triplet stays known for ``expiry``.
    """

    redis: Any
    prefix: str
    delay: float
    expiry: float
    clock: IReactorTime
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
    domains: frozenset[str] = frozenset()
    name = "greylist"

    async def recipient(self, client: Client, sender: str, recipient: Mailbox) -> Verdict:
        try:
            address = ipaddress.ip_address(client.ip)
        except ValueError:
            return None
        if any(address in network for network in self.networks):
            return None
        if sender and sender.rpartition("@")[2].lower() in self.domains:
            return None
        key = f"{self.prefix}:grey:{_network(client.ip)}:{sender_key(sender)}:{recipient.canonical}"
        now_ms = int(self.clock.seconds() * 1000)
        expiry_ms = int(self.expiry * 1000)
        first = await self.redis.call("set", key, now_ms, None, expiry_ms, True)
        if first:
            return self._wait(self.delay)
        seen = int(await self.redis.call("get", key) or now_ms)
        waited = (now_ms - seen) / 1000
        if waited < self.delay:
            return self._wait(self.delay - waited)
        await self.redis.call("pexpire", key, expiry_ms)
        return None

    @staticmethod
    def _wait(seconds: float) -> Reply:
        return Reply(450, "4.2.0", f"Greylisted, please try again in {int(seconds) + 1} seconds")
