"""
Per-client rate limits over a sliding minute, shared by the cluster in Redis.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayx.checks.chain import Client, Filter, Verdict
from relayx.redis.scripts import load_script
from relayx.reply import Reply

log = Logger()

_RATE_SCRIPT = load_script("relayx.checks", "ratelimit.lua")


RATE_WINDOW = 60.0


@attrs.define
class RateLimit(Filter):
    """
    Connections and messages per client address in the last minute (a
    sliding window, so no burst at a minute's turn), counted across the
    cluster; past the limit, ``421`` for a connection and ``450`` for a message.
    """

    redis: Any
    prefix: str
    clock: IReactorTime
    connections_per_minute: int = 0
    messages_per_minute: int = 0
    name = "ratelimit"
    _events: int = 0

    async def _count(self, kind: str, client: str) -> int:
        self._events += 1
        now_ms = int(self.clock.seconds() * 1000)
        keys = [f"{self.prefix}:rate:{kind}:{client}"]
        args = [now_ms, int(RATE_WINDOW * 1000), f"{now_ms}:{id(self)}:{self._events}"]
        return int(await self.redis.script(_RATE_SCRIPT, keys, args))

    async def connection(self, client: str) -> Verdict:
        if self.connections_per_minute and await self._count("conn", client) > self.connections_per_minute:
            return Reply(421, "4.7.0", f"Error: too many connections from {client}, try again later")
        return None

    async def mail(self, client: Client, sender: str) -> Verdict:
        if self.messages_per_minute and await self._count("msg", client.ip) > self.messages_per_minute:
            return Reply(450, "4.7.1", f"Error: too much mail from {client.ip}, try again later")
        return None
