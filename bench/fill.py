"""
Fill a node's queue directly through the queue's enqueue path (``RedisQueue.enqueue``,
the same Lua script the SMTP front door commits with), many at once on one
connection pool so that Redis sees them pipelined: how the depth benchmark
reaches 1,000,000 queued messages in minutes instead of through SMTP.

    python -m bench.fill --config node-0.toml --start 0 --count 100000 [--size 1024]

Message n: from sender<n % 1000>@load.test to rcpt<n>@example.com, with
``Message-ID: <n.depth@bench.test>`` and ``Subject: depth n``. Prints
``{"filled": n, "seconds": s}``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import react
from twisted.python.threadpool import ThreadPool

from relayx.address import Mailbox
from relayx.config import load
from relayx.interfaces import IncomingMessage
from relayx.queue.redis import RedisQueue
from relayx.redis.connection import open_redis
from relayx.service import body_store


def message(n: int, size: int, now: float) -> IncomingMessage:
    header = f"Message-ID: <{n}.depth@bench.test>\r\nSubject: depth {n}\r\nFrom: <sender{n % 1000}@load.test>\r\n\r\n"
    body = header.encode() + b"x" * max(0, size - len(header) - 2) + b"\r\n"
    return IncomingMessage(
        queue_id=f"D{n:09d}",
        sender=f"sender{n % 1000}@load.test",
        recipients=(Mailbox.parse(f"rcpt{n}@example.com"),),
        received_at=now,
        body=body,
    )


async def fill(reactor: Any, options: argparse.Namespace) -> None:
    config = load(options.config)
    redis = await open_redis(config.redis, reactor, None, poolsize=4)
    assert await redis.wait_connected(10), "Redis is not answering"
    # the node's own body store ([bodies]), so that Redis holds what a node's enqueue leaves there
    pool = ThreadPool(minthreads=0, maxthreads=config.bodies.threads, name="fill-bodies")
    pool.start()
    queue = RedisQueue.configured(redis, config, body_store(config, reactor, pool))
    started = time.monotonic()
    n, end = options.start, options.start + options.count
    while n < end:
        batch = range(n, min(end, n + options.batch))
        now = reactor.seconds()
        await DeferredList(
            [Deferred.fromCoroutine(queue.enqueue(message(i, options.size, now))) for i in batch],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        n = batch.stop
    print(json.dumps({"filled": options.count, "seconds": round(time.monotonic() - started, 3)}))
    pool.stop()
    await redis.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fill")
    parser.add_argument("--config", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=500, help="enqueues in flight at once")
    options = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(fill(reactor, options)))


if __name__ == "__main__":
    main()
