"""
Background loops that outlive their errors.

A ``LoopingCall`` stops for good the first time its function raises, and
the Deferred that says so is easy to drop: that is how a heartbeat, a
scheduler or a bouncer dies silently. ``steady_loop`` logs an unexpected
error (with its traceback) and runs again at the next interval; ``logged``
is for a Deferred nobody waits for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def steady_loop(
    what: str,
    function: Callable[[], Awaitable[Any] | None],
    clock: IReactorTime,
    interval: float,
    now: bool = False,
) -> LoopingCall:
    """
    Call ``function`` every ``interval`` seconds (waiting for what it
    returns) until stopped; an exception is logged and the loop goes on.
    """

    async def once() -> None:
        try:
            result = function()
            if result is not None:
                await result
        except Exception:
            log.failure("{what}: unexpected error; it keeps going", what=what)

    loop = LoopingCall(lambda: Deferred.fromCoroutine(once()))
    loop.clock = clock
    logged(loop.start(interval, now=now), f"{what} loop")
    return loop


def logged(d: Deferred[Any], what: str) -> Deferred[None]:
    """
    Log a failure of ``d``, which nobody else waits for.
    """

    def failed(failure: Failure) -> None:
        log.failure("{what} failed", failure, what=what)

    return d.addErrback(failed)
