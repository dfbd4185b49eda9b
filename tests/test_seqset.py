"""
The seqsets of common.lua (a queue's two orders: chunk zsets of at most 128
members and a directory of the non-empty chunks), against a real
``redis-server``: each function through a small script, and the upgrade of a
queue written by an earlier relayx (plain zsets) through the queue itself.
"""

from __future__ import annotations

import random
from importlib.resources import files
from typing import Any, cast

import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from relayx.interfaces import Throttle
from relayx.queue import redis as queue_redis
from relayx.queue.redis import RedisQueue
from tests.helpers import LoopbackSink, NodeCase, shared_redis, unique_prefix, wait_for
from tests.test_paging import BOTH, mail
from tests.test_queue_redis import T0, QueueCase, deferred_test, take

#: each seqset function by name, after the shared helpers
CALL = (
    files("relayx.queue").joinpath("common.lua").read_text()
    + """
local op, base = ARGV[1], KEYS[1]
if op == 'add' then seqset_add(base, ARGV[2], ARGV[3]) return 1 end
if op == 'remove' then seqset_remove(base, ARGV[2], ARGV[3]) return 1 end
if op == 'has' then return seqset_has(base, ARGV[2], ARGV[3]) and 1 or 0 end
if op == 'empty' then return seqset_empty(base) and 1 or 0 end
if op == 'first' then
  local id, seq = seqset_first(base)
  if not id then return false end
  return {id, seq}
end
local out = {}
for _, e in ipairs(seqset_range(base, ARGV[2], tonumber(ARGV[3]))) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2]
end
return out
"""
)


class Seqset:
    """One seqset on the shared Redis, each function a script call."""

    def __init__(self) -> None:
        self.r = redis.Redis(port=shared_redis().port)
        self.base = f"{unique_prefix()}:aq:example.test"

    def call(self, *args: Any) -> Any:
        return self.r.eval(CALL, 1, self.base, *args)

    def add(self, seq: int, jid: str) -> None:
        self.call("add", seq, jid)

    def remove(self, seq: int, jid: str) -> None:
        self.call("remove", seq, jid)

    def has(self, seq: int, jid: str) -> bool:
        return bool(self.call("has", seq, jid))

    def empty(self) -> bool:
        return bool(self.call("empty"))

    def first(self) -> tuple[str, int] | None:
        got = self.call("first")
        return None if got is None else (got[0].decode(), int(got[1]))

    def range(self, after: int, limit: int) -> list[tuple[str, int]]:
        flat = self.call("range", after, limit)
        return [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    def chunks(self) -> list[int]:
        return [int(n) for n in cast(list[bytes], self.r.zrange(self.base, 0, -1))]


def check(s: Seqset) -> int:
    """The invariant of common.lua (chunks non-empty, compact, each in its range); the member count."""
    starts = s.chunks()
    assert [
        int(score) for _, score in cast(list[tuple[bytes, float]], s.r.zrange(s.base, 0, -1, withscores=True))
    ] == starts
    total = 0
    for start, end in zip(starts, [*starts[1:], None][: len(starts)], strict=True):
        chunk = f"{s.base}:{start}"
        members = cast(list[tuple[bytes, float]], s.r.zrange(chunk, 0, -1, withscores=True))
        assert 0 < len(members) <= 128, chunk
        assert s.r.object("encoding", chunk) == b"listpack", chunk
        assert all(start <= seq and (end is None or seq < end) for _, seq in members), chunk
        total += len(members)
    return total


def test_range_crosses_chunk_boundaries() -> None:
    """When members are appended past a full chunk, a range from any sequence gives the next ones in order."""
    s = Seqset()
    for seq in range(1, 301):
        s.add(seq, f"J{seq}")
    assert s.chunks() == [1, 129, 257]
    assert s.range(0, 2) == [("J1", 1), ("J2", 2)]
    assert s.range(127, 3) == [("J128", 128), ("J129", 129), ("J130", 130)]
    assert [q for _, q in s.range(250, 10)] == list(range(251, 261))
    assert [q for _, q in s.range(0, 1000)] == list(range(1, 301))
    assert s.range(300, 10) == [] and s.range(0, 0) == []
    assert check(s) == 300


def test_sparse_sequences_still_fill_chunks() -> None:
    """When a queue gets one sequence in a hundred (other queues took the rest), its chunks still fill to 128."""
    s = Seqset()
    seqs = list(range(7, 100 * 300, 100))
    for seq in seqs:
        s.add(seq, f"J{seq}")
    assert len(s.chunks()) == 3 and check(s) == 300
    assert [q for _, q in s.range(seqs[127], 2)] == seqs[128:130]


def test_a_member_inside_a_full_chunk_splits_it() -> None:
    """When a member is added between the members of a full chunk, the chunk splits in halves, each compact."""
    s = Seqset()
    for seq in range(2, 258, 2):
        s.add(seq, f"J{seq}")
    assert s.chunks() == [2]
    s.add(101, "J101")
    assert s.chunks() == [2, 130]
    assert check(s) == 129
    assert [q for _, q in s.range(98, 3)] == [100, 101, 102]
    s.add(1, "J1")  # below every chunk: the first (64 members) takes it and starts at 1
    assert s.chunks() == [1, 130] and s.first() == ("J1", 1)
    assert check(s) == 130


def test_removal_that_empties_a_chunk_drops_it_from_the_directory() -> None:
    """When a chunk's last member is removed, the chunk leaves the directory and its key is gone."""
    s = Seqset()
    for seq in (5, 130, 131):
        s.add(seq, f"J{seq}")
    s.add(400, "J400")  # past a chunk that is not full: it joins it
    assert s.chunks() == [5]
    for seq in range(1000, 1200):
        s.add(seq, f"J{seq}")
    assert s.chunks() == [5, 1124]  # 4 + 124 members fill the first
    for seq in range(1124, 1200):
        s.remove(seq, f"J{seq}")
    assert s.chunks() == [5] and not s.r.exists(f"{s.base}:1124")
    s.remove(1100, "J1100")  # again: nothing to do
    s.remove(6, "nobody")
    assert s.chunks() == [5] and s.has(5, "J5") and not s.has(1100, "J1100")
    for seq in (130, 131, 400, *range(1000, 1124)):
        s.remove(seq, f"J{seq}")
    assert s.chunks() == [5] and check(s) == 1
    s.remove(5, "J5")
    assert s.empty() and not s.r.exists(s.base) and s.first() is None


def test_first_after_removals() -> None:
    """When the first members are removed, first is the lowest one left, across chunks."""
    s = Seqset()
    for seq in range(1, 300):
        s.add(seq, f"J{seq}")
    assert s.first() == ("J1", 1)
    for seq in range(1, 129):
        s.remove(seq, f"J{seq}")
    assert s.first() == ("J129", 129) and s.chunks() == [129, 257]
    for seq in range(129, 257, 2):
        s.remove(seq, f"J{seq}")
    assert s.first() == ("J130", 130)
    s.add(2, "J2")  # below every chunk: the first, with room, takes it
    assert s.first() == ("J2", 2) and s.chunks() == [2, 257]
    assert check(s) == 299 - 128 - 64 + 1


def test_retries_below_every_chunk_share_one() -> None:
    """
    When members come back below every chunk in falling order (retries due in another order than
    their sequence's), they join the first chunk while it has room: no chunk of one member each.
    """
    s = Seqset()
    for seq in range(1000, 1100):
        s.add(seq, f"J{seq}")
    for seq in range(999, 899, -1):
        s.add(seq, f"J{seq}")
    # 28 filled the first chunk (now from 972), the other 72 share one chunk from 900
    assert s.chunks() == [900, 972] and check(s) == 200
    assert [q for _, q in s.range(0, 300)] == list(range(900, 1100))
    for seq in range(899, 843, -1):
        s.add(seq, f"J{seq}")
    assert s.chunks() == [844, 972] and check(s) == 256
    s.add(5, "J5")  # the first chunk is full: a chunk of its own
    assert s.chunks() == [5, 844, 972] and s.first() == ("J5", 5) and check(s) == 257


def test_a_full_chunk_stays_compact() -> None:
    """When a chunk holds its 128 members, Redis keeps it listpack-encoded (the memory goal)."""
    s = Seqset()
    for seq in range(128, 256):
        s.add(seq, f"J{seq}")
    assert s.chunks() == [128]
    assert s.r.object("encoding", f"{s.base}:128") == b"listpack"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=1, max_value=2000)), max_size=400), st.randoms())
def test_seqset_against_a_sorted_list(ops: list[tuple[bool, int]], rnd: random.Random) -> None:
    """When members are added and removed at random, every range and first equal a sorted list's."""
    s = Seqset()
    model: set[int] = set()
    for adding, seq in ops:
        if adding:
            s.add(seq, f"J{seq}")
            model.add(seq)
        else:
            s.remove(seq, f"J{seq}")
            model.discard(seq)
    ordered = sorted(model)
    assert check(s) == len(model)
    assert s.first() == (None if not ordered else (f"J{ordered[0]}", ordered[0]))
    for _ in range(5):
        after, limit = rnd.randrange(0, 2100), rnd.randrange(0, 20)
        assert [q for _, q in s.range(after, limit)] == [q for q in ordered if q > after][:limit]


def to_old_layout(q: RedisQueue, queues: list[str]) -> None:
    """Rewrite the queues' orders as an earlier relayx kept them: one zset each."""
    r = redis.Redis(port=shared_redis().port)
    for queue in queues:
        for new, old in (("rq", "ready"), ("aq", "q")):
            base = q.key(new, queue)
            for n in cast(list[bytes], r.zrange(base, 0, -1)):
                chunk = f"{base}:{n.decode()}"
                for jid, seq in cast(list[tuple[bytes, float]], r.zrange(chunk, 0, -1, withscores=True)):
                    r.zadd(q.key(old, queue), {jid: seq})
                r.delete(chunk)
            r.delete(base)


class UpgradeTests(QueueCase):
    @deferred_test
    async def test_a_queue_written_by_the_previous_version_is_claimed_and_listed(self) -> None:
        """When a queue's orders are old-style zsets, the upgrade moves them in batches: all listed, claimed."""
        self.patch(queue_redis, "MIGRATE_BATCH", 7)
        q = await self.make_queue()
        for n in range(300):
            await q.enqueue(mail(f"M{n:03d}", f"u{n}@one.test" if n % 3 else f"u{n}@two.test", at=T0 + n))
        [leased] = await take(q, "n", T0 + 400, 1)
        to_old_layout(q, BOTH)
        assert await q.upgrade() == 2
        assert await q.upgrade() == 0  # done: nothing left to move
        listed: list[str] = []
        cursor = 0
        while True:
            page = await q.page(BOTH, {}, cursor, 100, T0 + 400)
            listed += [j["jid"] for j in page["jobs"]]
            cursor = page["cursor"]
            if not page["more"]:
                break
        assert listed == [f"M{n:03d}.1" for n in range(300)]
        assert (await q.check_queue(BOTH)).consistent
        claimed: list[str] = []
        while batch := await take(q, "n", T0 + 401, 100, dict.fromkeys(BOTH, Throttle(concurrency=1000))):
            claimed += [lease.job_id for lease in batch]
        assert sorted([*claimed, leased.job_id]) == sorted(listed)
        assert leased.job_id not in claimed


class DeepQueueTests(QueueCase):
    @deferred_test
    async def test_qshape_and_after_bound_across_chunks(self) -> None:
        """When a queue spans several chunks, qshape (in slices) and the "after" bisection agree with a count by age."""
        self.patch(queue_redis, "QSHAPE_CHUNKS", 2)
        q = await self.make_queue()
        ages = [3000 - 5 * n for n in range(600)]  # oldest first: acceptance order is time order
        for n, age in enumerate(ages):
            await q.enqueue(mail(f"M{n:03d}", f"u{n}@one.test", at=T0 - age))
        edges = [300.0, 900.0, 2000.0]
        expected = [sum(1 for a in ages if a <= edges[0])]
        expected += [sum(1 for a in ages if lo < a <= hi) for lo, hi in zip(edges, [*edges[1:], 1e9], strict=True)]
        assert await q.qshape("one.test", T0, edges) == [600, *expected]
        assert await q.qshape("one.test", T0, edges, waiting=True) == [600, *expected]
        # the first page of jobs accepted at or after a moment starts at it (give or take the skew)
        after = T0 - 1000
        page = await q.page(["one.test"], {"after": int(after * 1000)}, 0, 5, T0)
        first = min(n for n, a in enumerate(ages) if T0 - a >= after)
        assert [j["qid"] for j in page["jobs"]] == [f"M{n:03d}" for n in range(first, first + 5)]
        skipped = await q.page(["one.test"], {"after": int((T0 + 100) * 1000)}, 0, 5, T0)
        assert skipped["jobs"] == []


class UpgradeAtStartTests(NodeCase, QueueCase):
    @deferred_test
    async def test_a_node_upgrades_the_queue_when_it_starts(self) -> None:
        """When a node starts on a queue the previous version wrote, it upgrades it first and delivers every message."""
        q = await self.make_queue()
        for n in range(5):
            await q.enqueue(mail(f"OLD{n}", f"u{n}@example.com", at=reactor.seconds()))
        to_old_layout(q, ["example.com"])
        sink = LoopbackSink()
        sink.start()
        node = await self.start_node(sink, key_prefix=q.prefix)
        await wait_for(lambda: len(sink.messages) == 5, 30, "the five messages queued before the upgrade")
        assert sorted(m.recipients[0] for m in sink.messages) == [f"u{n}@example.com" for n in range(5)]
        assert node.queue is not None and await node.queue.upgrade() == 0
