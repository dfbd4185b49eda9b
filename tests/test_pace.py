"""
The adaptive pace (settle.lua, claim.lua's allowance): AIMD per destination,
cluster-wide, at explicit times against a real Redis.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.logger import formatEvent

from relayx.interfaces import Lease, Outcome, PacePolicy, Pushback, Throttle
from relayx.queue.redis import RedisQueue
from relayx.reply import Reply
from tests.helpers import logged_events
from tests.test_queue_redis import T0, QueueCase, deferred_test, message

CEILING = Throttle(concurrency=8, rate=100)
THROTTLES = {"one.test": CEILING}
BUSY = Reply(421, "4.7.0", "too busy")
NO_SLOW_START = PacePolicy(start=1.0)


def pushed_back(kind: Pushback) -> Callable[[Lease], Outcome]:
    """The outcome of a 421 that cuts ``kind``: to MAIL (the rate) or at the greeting (the sessions)."""

    def outcome(lease: Lease) -> Outcome:
        return Outcome(
            deferred=tuple((r, BUSY) for r in lease.recipients),
            pushback=kind,
            pushback_reply=BUSY,
            destination="mx1 [10.0.0.1]:25",
        )

    return outcome


rate_busy = pushed_back(Pushback.RATE)
greeting_busy = pushed_back(Pushback.SESSIONS)


def delivered(lease: Lease, seconds: float = 0.01) -> Outcome:
    return Outcome(delivered=lease.recipients, destination="mx1 [10.0.0.1]:25", reply_seconds=seconds)


class PaceTests(QueueCase):
    async def queue_of(self, count: int, **kw: object) -> RedisQueue:
        # no slow start unless a test asks for it: the others are about the cut and the climb
        kw.setdefault("pace", NO_SLOW_START)
        q = await self.make_queue(**kw)
        # a mailbox each: order per mailbox would send one mailbox's mail one at a time
        for n in range(count):
            await q.enqueue(message(f"M{n:03}", f"r{n}@one.test"))
        return q

    async def claim(self, q: RedisQueue, now: float, limit: int = 100) -> list[Lease]:
        return list((await q.claim("n", now, limit, THROTTLES, CEILING)).leases)

    async def deliver_for(self, q: RedisQueue, start: float, seconds: int, per_second: int) -> float:
        """Deliver ``per_second`` messages in each second from ``start``; the time after."""
        now = start
        for _ in range(seconds):
            for k in range(per_second):
                at = now + k / per_second
                for lease in await self.claim(q, at, 1):
                    await q.settle(lease, delivered(lease), at + 0.001, CEILING)
            now += 1
        return now

    @deferred_test
    async def test_421_cuts_the_rate_and_puts_the_job_back_at_its_place(self) -> None:
        """
        When a 421 answers MAIL, the job goes back ahead of later ones, the domain is not paused, and the rate
        drops to 0.7 of what was accepted.
        """
        q = await self.queue_of(200)
        now = await self.deliver_for(q, T0, 3, 20)
        [first, second] = await self.claim(q, now, 2)
        assert await q.settle(first, rate_busy(first), now + 0.01, CEILING) == "ready"
        assert await q.failing_domains() == []
        pace = (await q.domain_state("one.test", now + 0.01)).pace
        assert pace.event == "cut" and pace.kind == "rate" and pace.concurrency is None
        assert pace.rate is not None and 12 <= pace.rate <= 15  # 0.7 x about 20 msg/s
        assert pace.why == "421 4.7.0 too busy from mx1 [10.0.0.1]:25"
        await q.settle(second, delivered(second), now + 0.02, CEILING)
        [again] = await self.claim(q, now + 1)
        assert again.job_id == first.job_id and again.attempts == 2

    @deferred_test
    async def test_one_cut_per_interval(self) -> None:
        """When a burst of 421s comes within one interval it is one cut; a 421 an interval later cuts again."""
        q = await self.queue_of(200)
        now = await self.deliver_for(q, T0, 3, 20)
        leases = await self.claim(q, now, 5)
        for n, lease in enumerate(leases[:4]):
            await q.settle(lease, rate_busy(lease), now + n * 0.1, CEILING)
        once = (await q.domain_state("one.test", now)).pace.rate
        assert once is not None
        [late] = await self.claim(q, now + 1.2, 1)
        await q.settle(late, rate_busy(late), now + 1.2, CEILING)
        twice = (await q.domain_state("one.test", now)).pace.rate
        # 0.7 of the lower of the pace and the rate the destination accepted lately
        assert twice is not None and twice <= once * 0.7 + 0.01

    @deferred_test
    async def test_claims_follow_the_cut_and_never_go_below_the_floor(self) -> None:
        """
        When 421s keep coming, the rate and sessions fall by 0.7 per interval to 1 msg/s and 1 session, and
        claims obey them.
        """
        q = await self.queue_of(400, pace=PacePolicy(floor_rate=1.0, start=1.0))
        now = await self.deliver_for(q, T0, 2, 20)
        for n in range(40):
            for lease in await self.claim(q, now + n, 1):
                # a delivery every fourth second keeps the destination "answering" (no pause)
                kind = (greeting_busy, rate_busy, delivered, rate_busy)[n % 4]
                await q.settle(lease, kind(lease), now + n + 0.5, CEILING)
        pace = (await q.domain_state("one.test", now + 40)).pace
        assert pace.rate is not None and pace.rate >= 1.0 and pace.concurrency is not None and pace.concurrency >= 1
        assert await q.failing_domains() == []
        # at 1 msg/s, a claim takes one job per second at most
        taken = sum([len(await self.claim(q, now + 100 + k / 10)) for k in range(10)], 0)
        assert taken <= 2

    @deferred_test
    async def test_sustained_success_climbs_back_to_the_ceiling(self) -> None:
        """
        When deliveries succeed after a cut, the pace climbs each interval until it is back at the configured
        ceiling.
        """
        q = await self.queue_of(600)
        now = await self.deliver_for(q, T0, 3, 20)
        [lease] = await self.claim(q, now, 1)
        await q.settle(lease, greeting_busy(lease), now, CEILING)
        assert await self.claim(q, now + 0.1, 1) == []  # a moment's pause after a pushback
        [lease] = await self.claim(q, now + 0.3, 1)
        await q.settle(lease, rate_busy(lease), now + 0.3, CEILING)
        rates = []
        for second in range(1, 30):
            at = now + 1 + second
            for lease in await self.claim(q, at, 1):
                await q.settle(lease, delivered(lease), at, CEILING)
            pace = (await q.domain_state("one.test", at)).pace
            rates.append(pace.rate)
            if pace.concurrency is None and pace.rate is None:
                break
        assert pace.event == "ceiling" and pace.concurrency is None and pace.rate is None
        climbing = [r for r in rates if r is not None]
        assert climbing == sorted(climbing) and len(rates) < 30

    @deferred_test
    async def test_greeting_421_does_not_pause_the_domain(self) -> None:
        """
        When a 421 greeting answers one attempt while others are delivered, the domain keeps delivering:
        sessions cut, no pause.
        """
        q = await self.queue_of(50)
        leases = await self.claim(q, T0) + await self.claim(q, T0 + 0.05)  # the rate's burst is 5
        assert len(leases) == 8
        await q.settle(leases[0], delivered(leases[0]), T0 + 0.1, CEILING)
        assert await q.settle(leases[1], greeting_busy(leases[1]), T0 + 0.2, CEILING) == "ready"
        assert await q.failing_domains() == []
        state = await q.domain_state("one.test", T0 + 0.2)
        assert state.paused_until is None and state.pace.concurrency == 4  # 0.7 x 7 in flight
        for lease in leases[2:]:
            await q.settle(lease, delivered(lease), T0 + 0.3, CEILING)
        assert await self.claim(q, T0 + 0.4) == []  # a moment's pause after a pushback
        again = await self.claim(q, T0 + 0.5)
        assert 1 <= len(again) <= 4 and again[0].job_id == leases[1].job_id
        assert len(again + await self.claim(q, T0 + 0.6)) == 4

    @deferred_test
    async def test_refused_connection_while_others_answer_is_a_pushback(self) -> None:
        """
        When one connection is refused while other sessions deliver, the job goes back and sessions are cut;
        the domain is not paused.
        """
        q = await self.queue_of(20)
        leases = await self.claim(q, T0)
        await q.settle(leases[0], delivered(leases[0]), T0 + 0.1, CEILING)
        fate = await q.settle(leases[1], Outcome(unreachable="mx1: connection refused"), T0 + 0.2, CEILING)
        assert fate == "ready" and await q.failing_domains() == []
        pace = (await q.domain_state("one.test", T0 + 0.2)).pace
        assert pace.kind == "sessions" and pace.why == "mx1: connection refused"

    @deferred_test
    async def test_unreachable_destination_still_pauses(self) -> None:
        """
        When every attempt fails to connect (nothing in flight answers), the domain pauses for the retry
        schedule as before.
        """
        q = await self.queue_of(5)
        [lease] = await self.claim(q, T0, 1)
        await q.settle(lease, delivered(lease), T0, CEILING)
        [lease] = await self.claim(q, T0 + 1, 1)
        assert await q.settle(lease, Outcome(unreachable="connection refused"), T0 + 1, CEILING) == "paused"
        assert await q.failing_domains() == ["one.test"]

    @deferred_test
    async def test_pushbacks_without_a_delivery_pause_the_domain(self) -> None:
        """
        When a destination answers nothing but 421 for ten intervals, its domain pauses and waits for the
        prober.
        """
        q = await self.queue_of(5)
        fates = []
        for n in range(12):
            leases = await self.claim(q, T0 + n, 1)
            fates += [await q.settle(lease, greeting_busy(lease), T0 + n, CEILING) for lease in leases]
            if fates[-1] == "paused":
                break
        assert fates == ["ready"] * 10 + ["paused"]
        assert await q.failing_domains() == ["one.test"]

    @deferred_test
    async def test_a_421_never_bounces(self) -> None:
        """
        When a job is answered 421 again and again, it is pushed back twenty times, then deferred by the retry
        schedule, never failed.
        """
        q = await self.queue_of(1)
        fates = []
        for n in range(23):
            for lease in await self.claim(q, T0 + n * 400, 1):
                # another message delivered meanwhile keeps the destination "answering"
                fates.append(await q.settle(lease, rate_busy(lease), T0 + n * 400 + 1, CEILING))
                await q.redis.call("hset", q.key("dom", "one.test"), "ok_at", int((T0 + n * 400 + 1) * 1000))
                await q.redis.call("hdel", q.key("dom", "one.test"), "busy_since")
        assert fates[:20] == ["ready"] * 20 and set(fates[20:]) == {"deferred"}
        assert await q.failed(10) == []

    @deferred_test
    async def test_slow_replies_cut_both(self) -> None:
        """When a reply takes four times its usual time (and half a second more), sessions and rate are cut."""
        q = await self.queue_of(100)
        now = await self.deliver_for(q, T0, 3, 10)
        [lease] = await self.claim(q, now, 1)
        await q.settle(lease, delivered(lease, seconds=2.0), now + 0.1, CEILING)
        pace = (await q.domain_state("one.test", now + 0.1)).pace
        assert pace.kind == "slow" and pace.concurrency == 1 and pace.rate is not None
        assert pace.why.startswith("replies in 2000 ms (usually 10 ms)")
        assert 9 <= pace.reply_ms <= 300

    @deferred_test
    async def test_each_cut_and_the_return_to_the_ceiling_are_logged(self) -> None:
        """When the pace is cut and later back at its ceiling, each is one log event with the mx and the code."""
        q = await self.queue_of(100)
        now = await self.deliver_for(q, T0, 2, 5)
        with logged_events() as events:
            [lease] = await self.claim(q, now, 1)
            await q.settle(lease, greeting_busy(lease), now, Throttle(concurrency=2))
            for second in range(1, 4):
                for lease in await self.claim(q, now + second, 1):
                    await q.settle(lease, delivered(lease), now + second, Throttle(concurrency=2))
        paced = [e for e in events if e.get("pace")]
        assert [(e["pace"], e["mx"], e["code"]) for e in paced] == [
            ("cut", "mx1 [10.0.0.1]:25", 421),
            ("ceiling", "mx1 [10.0.0.1]:25", 0),
        ]
        assert formatEvent(paced[0]).startswith("pace of one.test cut to 1 session(s), unlimited msg/s after 421")

    # the slow start: a destination with no recent delivery starts low and doubles

    async def deliver_each_second(
        self, q: RedisQueue, start: float, seconds: int, per_second: int, throttle: Throttle
    ) -> list[tuple[int | None, float | None]]:
        """Deliver ``per_second`` messages in each second from ``start``; the pace after each second."""
        paces = []
        for second in range(seconds):
            for k in range(per_second):
                at = start + second + k / per_second
                leases = (await q.claim("n", at, 1, {"one.test": throttle}, throttle)).leases
                for lease in leases:
                    await q.settle(lease, delivered(lease), at + 0.001, throttle)
            pace = (await q.domain_state("one.test", start + second + 1)).pace
            paces.append((pace.concurrency, pace.rate))
        return paces

    @deferred_test
    async def test_fresh_destination_starts_low_and_doubles_to_the_ceiling(self) -> None:
        """
        When a destination with no delivery yet answers, its pace starts at pace_start of the ceiling (sessions
        and rate), claims obey it, and each interval with deliveries doubles it: at the ceiling after two.
        """
        q = await self.queue_of(100, pace=PacePolicy(start=0.25))
        with logged_events() as events:
            [first] = await self.claim(q, T0, 1)
            await q.settle(first, delivered(first), T0 + 0.01, CEILING)
        pace = (await q.domain_state("one.test", T0 + 0.01)).pace
        assert (pace.concurrency, pace.rate, pace.event) == (2, 25.0, "start")
        assert pace.describe(CEILING).startswith("2 sessions, 25 msg/s: slow start")
        [logged] = [e for e in events if e.get("pace")]
        assert (logged["pace"], logged["mx"], logged["code"]) == ("start", "mx1 [10.0.0.1]:25", 0)
        assert formatEvent(logged) == "pace of one.test starts at 2 session(s), 25 msg/s: no delivery lately"
        # two sessions at once, whatever the claims ask for (25 msg/s: one lease per claim 0.1 s apart)
        taken = [len(await self.claim(q, T0 + 0.5 + k / 10)) for k in range(5)]
        assert taken == [1, 1, 0, 0, 0]
        q2 = await self.queue_of(100, pace=PacePolicy(start=0.25))
        paces = await self.deliver_each_second(q2, T0, 3, 10, CEILING)
        # 25 msg/s, then 50 after an interval of deliveries, then the ceiling (the fields gone)
        assert paces == [(2, 25.0), (4, 50.0), (None, None)]
        assert (await q2.domain_state("one.test", T0 + 3)).pace.event == "ceiling"

    @deferred_test
    async def test_a_421_cut_lands_at_the_rate_delivered(self) -> None:
        """
        When a 421 comes while the pace is far above what the destination took over the last second, the rate
        is cut to that delivered rate, not only to 0.7 of the pace.
        """
        high = Throttle(concurrency=8, rate=1000)
        q = await self.queue_of(200, pace=PacePolicy(start=0.05))
        paces = await self.deliver_each_second(q, T0, 3, 20, high)
        assert paces[-1][1] == 200.0  # 50, 100, 200: the slow start's doubling, far above 20 msg/s
        [lease] = (await q.claim("n", T0 + 3, 1, {"one.test": high}, high)).leases
        await q.settle(lease, rate_busy(lease), T0 + 3.01, high)
        pace = (await q.domain_state("one.test", T0 + 3.01)).pace
        assert pace.event == "cut" and pace.rate is not None and 18 <= pace.rate <= 21  # not 0.7 x 200 = 140

    @deferred_test
    async def test_a_destination_idle_for_long_starts_low_again(self) -> None:
        """
        When a destination at full pace has had no delivery for pace_idle, its next answer starts the slow
        start again; after a shorter pause it stays at full pace.
        """
        q = await self.queue_of(100, pace=PacePolicy(start=0.5, idle=60.0))
        assert await self.deliver_each_second(q, T0, 2, 5, CEILING) == [(4, 50.0), (None, None)]
        assert await self.deliver_each_second(q, T0 + 50, 1, 5, CEILING) == [(None, None)]
        paces = await self.deliver_each_second(q, T0 + 200, 2, 5, CEILING)
        assert paces == [(4, 50.0), (None, None)]

    @deferred_test
    async def test_pushbacks_before_the_first_delivery_do_not_restart_the_slow_start(self) -> None:
        """
        When a fresh destination answers 421 twice before any delivery, the second finds the first cut and
        keeps it: the slow start is not begun again over it.
        """
        q = await self.queue_of(20, pace=PacePolicy(start=0.5))
        [lease] = await self.claim(q, T0, 1)
        await q.settle(lease, rate_busy(lease), T0 + 0.01, CEILING)
        first = (await q.domain_state("one.test", T0 + 0.01)).pace
        assert first.event == "cut" and first.rate == 35.0  # 0.7 x the slow start's 50 msg/s
        [lease] = await self.claim(q, T0 + 0.5, 1)
        await q.settle(lease, rate_busy(lease), T0 + 0.5, CEILING)
        again = (await q.domain_state("one.test", T0 + 0.5)).pace
        assert again.event == "cut" and again.rate == 35.0

    @deferred_test
    async def test_after_an_outage_the_rate_doubles_and_the_sessions_ramp_from_one(self) -> None:
        """
        When a destination with a ramp_up comes back after an outage, its rate starts at pace_start of the
        ceiling and doubles each interval, while its sessions climb from one as ramp_up says (one per interval
        here).
        """
        ramped = attrs.evolve(CEILING, ramp_up=8.0)
        q = await self.queue_of(100, pace=PacePolicy(start=0.25))
        [lease] = await self.claim(q, T0, 1)
        assert await q.settle(lease, Outcome(unreachable="connection refused"), T0, ramped) == "paused"
        assert await q.take_probe("one.test", "node-a", 5) and await q.resume("one.test", T0 + 10, ramped)
        paces = await self.deliver_each_second(q, T0 + 10, 3, 10, ramped)
        assert paces == [(1, 25.0), (2, 50.0), (3, None)]

    @deferred_test
    async def test_after_an_outage_without_a_ramp_sessions_grow_per_delivery(self) -> None:
        """
        When a destination with ramp_up 0 comes back after an outage, it starts again at one session and gets
        one more per delivery (the ceiling, 8, after seven), while its rate starts at pace_start and doubles
        each interval.
        """
        q = await self.queue_of(100, pace=PacePolicy(start=0.25))
        [lease] = await self.claim(q, T0, 1)
        assert await q.settle(lease, Outcome(unreachable="connection refused"), T0, CEILING) == "paused"
        assert await q.take_probe("one.test", "node-a", 5) and await q.resume("one.test", T0 + 10, CEILING)
        assert (await q.domain_state("one.test", T0 + 10)).pace.concurrency == 1
        paces = await self.deliver_each_second(q, T0 + 10, 3, 10, CEILING)
        assert paces == [(None, 25.0), (None, 50.0), (None, None)]

    @deferred_test
    async def test_a_delivery_after_an_outage_without_a_ramp_grows_a_session_each(self) -> None:
        """
        When a destination with ramp_up 0 answers again after an outage without a probe, it goes on at one
        session after its first answer, one more per delivery, up to its ceiling; a pushback ends that growth.
        """
        q = await self.queue_of(100, pace=PacePolicy(start=0.25))
        await self.deliver_each_second(q, T0, 3, 10, CEILING)
        [lease] = await self.claim(q, T0 + 4, 1)
        assert await q.settle(lease, Outcome(unreachable="connection refused"), T0 + 4, CEILING) == "paused"
        sessions = []
        for n in range(8):
            [lease] = await self.claim(q, T0 + 70 + n / 100, 1)
            await q.settle(lease, delivered(lease), T0 + 70 + n / 100, CEILING)
            sessions.append((await q.domain_state("one.test", T0 + 70)).pace.concurrency)
        assert sessions == [1, 2, 3, 4, 5, 6, 7, None]

    @deferred_test
    async def test_a_pushback_ends_the_growth_per_delivery(self) -> None:
        """
        When a destination growing a session per delivery after an outage pushes back, its sessions are cut
        and the next delivery in the same interval adds none.
        """
        sessions_only = Throttle(concurrency=8)
        q = await self.queue_of(100, pace=PacePolicy(start=0.25))
        [lease] = await self.claim(q, T0, 1)
        assert await q.settle(lease, Outcome(unreachable="connection refused"), T0, sessions_only) == "paused"
        assert await q.take_probe("one.test", "node-a", 5) and await q.resume("one.test", T0 + 10, sessions_only)
        for n in range(3):
            [lease] = await self.claim(q, T0 + 10 + n / 100, 1)
            await q.settle(lease, delivered(lease), T0 + 10 + n / 100, sessions_only)
        assert (await q.domain_state("one.test", T0 + 10.1)).pace.concurrency == 4
        [lease] = await self.claim(q, T0 + 10.1, 1)
        await q.settle(lease, pushed_back(Pushback.SESSIONS)(lease), T0 + 10.1, sessions_only)
        cut = (await q.domain_state("one.test", T0 + 10.1)).pace
        assert cut.event == "cut"
        [lease] = await self.claim(q, T0 + 10.5, 1)
        await q.settle(lease, delivered(lease), T0 + 10.5, sessions_only)
        assert (await q.domain_state("one.test", T0 + 10.5)).pace.concurrency == cut.concurrency
