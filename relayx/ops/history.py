"""
The queue's history, for the control panel's charts: once a minute one node
of the cluster records, per domain, its jobs by state and how many jobs it
has accepted and delivered so far, and the same summed over the cluster.

Each node's first process runs a ``History`` loop; each minute the node
whose loop comes first takes that minute (``SET NX`` on
``<p>:history:lock:<minute>``, expiring by itself), reads the counts
(``IQueueAdmin.counts``: O(queues), whatever the depth) and the traffic
counters (``IQueueAdmin.traffic``), and appends one entry per domain to a
capped stream ``<p>:history:d:<domain>`` and one to ``<p>:history:cluster``
(history.lua). A stream keeps ``[admin] history`` of minutes (default
``KEPT``, 7 days): at ~60 bytes an entry (measured), about 0.6 MB per domain.

Accepted and delivered are two counters that only grow (``<p>:accepted``,
``<p>:delivered``: jobs, one per message and destination; see
traffic.lua); a rate per minute is the difference between two samples.
Each process counts in memory once an enqueue or a settle has committed and
adds its counts to Redis once a second (``RedisQueue.flush_traffic``), so
mail's path gains no Redis call: a first attempt with one more call per
message doubled the Python CPU time of an enqueue (~300 us more, measured).
A process that dies loses at most its last second of counts; a rate then
comes out a little low. Depth differences alone could not tell arrivals
from deliveries apart.

Each domain entry also carries where the current drain began (``base``,
the delivered counter then, and ``began``): the last sample in which the
domain was held or waiting for its failing destination, or the last one
with nothing queued before mail queued up again. So the panel can show a
replay's progress after a hold or an outage: delivered since then over that
plus what is left, and its estimated end, what is left over the recent
delivery rate.

Reads are bounded: ``XRANGE`` with a ``COUNT`` of at most ``KEPT``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayx.interfaces import IQueueAdmin, StoreUnavailable
from relayx.queue.states import JobState
from relayx.redis.connection import RedisConnection
from relayx.redis.scripts import load_script

log = Logger()

#: seconds between two samples
INTERVAL = 60.0
#: entries kept per stream: 7 days of minutes
KEPT = 7 * 24 * 60
#: samples the recent delivery rate is measured over (the newest ones)
RECENT = 6
#: streams one history.lua call writes
BATCH = 500
STATES = tuple(str(state) for state in JobState)
#: a domain entry's fields, in the order written (streams store repeated field lists once)
FIELDS = (*STATES, "hold", "accepted", "delivered", "base", "began")

_RECORD = load_script("relayx.ops", "history.lua")


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[dict[str, Any]]:
    """
    Stream entries (``XRANGE``'s answer) as samples: ``at`` in seconds and
    the fields as numbers.
    """
    samples = []
    for entry_id, flat in reply or []:
        fields = [_text(f) for f in flat]
        sample: dict[str, Any] = {"at": int(_text(entry_id).split("-")[0]) / 1000}
        for name, value in zip(fields[::2], fields[1::2], strict=True):
            sample[name] = float(value) if "." in value else int(value)
        sample["total"] = sum(int(sample.get(s, 0)) for s in STATES)
        if "began" in sample:
            sample["began"] = sample["began"] / 1000
        samples.append(sample)
    return samples


def with_rates(samples: list[dict[str, Any]], before: dict[str, Any] | None) -> list[dict[str, Any]]:
    """
    Each sample with ``accepted_per_minute`` and ``delivered_per_minute``:
    the counters' growth since the sample before (``before`` for the first),
    per minute; ``None`` with no sample before or when a counter went down
    (its Redis key was lost).
    """
    previous = before
    for sample in samples:
        for name in ("accepted", "delivered"):
            rate = None
            if previous is not None and sample["at"] > previous["at"]:
                grown = sample.get(name, 0) - previous.get(name, 0)
                if grown >= 0:
                    rate = round(grown * 60 / (sample["at"] - previous["at"]), 2)
            sample[f"{name}_per_minute"] = rate
        previous = sample
    return samples


def delivery_rate(recent: Sequence[Mapping[str, Any]]) -> float | None:
    """
    Jobs delivered per minute over ``recent`` samples (oldest first), or
    ``None`` with fewer than two.
    """
    if len(recent) < 2 or recent[-1]["at"] <= recent[0]["at"]:
        return None
    grown = int(recent[-1].get("delivered", 0)) - int(recent[0].get("delivered", 0))
    return round(max(0, grown) * 60 / (float(recent[-1]["at"]) - float(recent[0]["at"])), 2)


def replay(latest: Mapping[str, Any] | None, rate: float | None, remaining: int, held: bool) -> dict[str, Any]:
    """
    The current drain of a domain's backlog: when it ``began``, how many
    jobs were ``delivered`` since, how many are ``remaining`` (now), the
    ``progress`` (0 to 1), the recent rate and the estimated seconds to the
    end (``eta``: remaining over the rate; ``None`` while held, without a
    rate, or with nothing left).
    """
    delivered = 0
    began = None
    if latest is not None and "base" in latest:
        delivered = max(0, int(latest["delivered"]) - int(latest["base"]))
        began = latest["began"]
    eta = None
    if not held and remaining and rate:
        eta = round(remaining / rate * 60)
    done = delivered + remaining
    return {
        "began": began,
        "delivered": delivered,
        "remaining": remaining,
        "progress": round(delivered / done, 4) if done else None,
        "delivered_per_minute": rate,
        "eta": eta,
        "held": held,
    }


class History:
    """
    Samples the queue each ``interval`` on one node of the cluster, and
    reads the samples back.
    """

    def __init__(
        self,
        queue: Any,
        redis: RedisConnection,
        prefix: str,
        domains: Mapping[str, Sequence[str]],
        owner: str,
        clock: IReactorTime,
        *,
        interval: float = INTERVAL,
        kept: int = KEPT,
    ) -> None:
        assert IQueueAdmin.providedBy(queue)
        self.queue = queue
        self.redis = redis
        self.prefix = prefix
        #: each domain and its delivery queues
        self.domains = {name: list(queues) for name, queues in domains.items()}
        self.owner = owner
        self.clock = clock
        self.interval = interval
        self.kept = kept
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.sample()))
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def stream(self, domain: str | None) -> str:
        """
        The stream of ``domain``'s samples, or of the cluster's (``None``).
        """
        return f"{self.prefix}:history:cluster" if domain is None else f"{self.prefix}:history:d:{domain}"

    async def sample(self, now: float | None = None) -> bool:
        """
        Record the sample of the interval ``now`` falls in, unless another
        node (or an earlier call) has taken it or a newer sample is recorded
        already (a clock behind); returns whether this call recorded it.
        Never raises: a sample that cannot be taken is logged.
        """
        now = self.clock.seconds() if now is None else now
        slot = int(now // self.interval)
        at = round(slot * self.interval * 1000)
        lock = f"{self.prefix}:history:lock:{slot}"
        try:
            if not await self.redis.call("set", lock, self.owner, None, round(self.interval * 2000), True):
                return False
            rows: list[list[str]] = []
            cluster = dict.fromkeys(STATES, 0)
            held = 0
            for domain, queues in self.domains.items():
                row, states, on_hold = await self._domain_row(domain, queues, now, at)
                rows.append(row)
                for name in STATES:
                    cluster[name] += states[name]
                held += on_hold
            traffic = await self.queue.traffic([])
            totals = {**cluster, "hold": held, "accepted": traffic["accepted"], "delivered": traffic["delivered"]}
            names = list(self.domains)
            keys = [self.stream(d) for d in names] + [self.stream(None)]
            rows.append([str(v) for pair in totals.items() for v in pair])
            written = 0
            for first in range(0, len(keys), BATCH):
                args = [at, self.kept, json.dumps(rows[first : first + BATCH])]
                written += int(await self.redis.script(_RECORD, keys[first : first + BATCH], args))
        except StoreUnavailable as e:
            log.warn("queue history: no sample at {at}: {why}", at=at / 1000, why=str(e))
            return False
        return written > 0

    async def _domain_row(
        self, domain: str, queues: Sequence[str], now: float, at: int
    ) -> tuple[list[str], dict[str, int], int]:
        counts = await self.queue.counts(queues, now)
        states = {name: int(counts["states"].get(name, 0)) for name in STATES}
        state = await self.queue.domain_state(domain, now)
        on_hold = 1 if state.held else 0
        traffic = await self.queue.traffic(queues)
        delivered, total = traffic["delivered"], int(counts["total"])
        found = await self._last(domain)
        last = found[0] if found else None
        # a drain (a replay) begins when the domain is no longer held or waiting
        # for its failing destination, or when mail queues up after none was queued
        base, began = delivered, at
        if on_hold or (state.paused_until or 0) > now or last is None or "base" not in last:
            pass
        elif last["total"] == 0 and total:
            base, began = int(last["delivered"]), round(last["at"] * 1000)
        elif delivered >= last["base"]:
            base, began = int(last["base"]), round(last["began"] * 1000)
        values = {
            **states,
            "hold": on_hold,
            "accepted": traffic["accepted"],
            "delivered": delivered,
            "base": base,
            "began": began,
        }
        return [str(v) for name in FIELDS for v in (name, values[name])], states, on_hold

    async def _last(self, domain: str | None, count: int = 1) -> list[dict[str, Any]]:
        """
        The newest ``count`` samples, oldest first.
        """
        reply = await self.redis.call("execute_command", "XREVRANGE", self.stream(domain), "+", "-", "COUNT", count)
        return _entries(reply)[::-1]

    async def read(self, domain: str | None, since: float, limit: int) -> list[dict[str, Any]]:
        """
        The samples of ``domain`` (``None``: the cluster's) from ``since``
        on, oldest first, at most ``limit`` (up to ``KEPT``), with their rates.
        """
        limit = max(1, min(limit, self.kept))
        start = round(since * 1000)
        key = self.stream(domain)
        samples = _entries(await self.redis.call("execute_command", "XRANGE", key, start, "+", "COUNT", limit))
        before: list[dict[str, Any]] = []
        if start > 0:
            before = _entries(
                await self.redis.call("execute_command", "XREVRANGE", key, f"({start}-0", "-", "COUNT", 1)
            )
        return with_rates(samples, before[0] if before else None)

    async def recent(self, domain: str | None) -> list[dict[str, Any]]:
        """
        The newest ``RECENT`` samples of ``domain`` (or the cluster's), oldest first.
        """
        return await self._last(domain, RECENT)
