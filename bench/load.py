"""
The load generator: S concurrent SMTP sessions sending M messages in all,
bounded in count and time, timing each message from MAIL to the reply to
the end of DATA.

It runs in a process of its own (``python -m bench.load``) so that the
client's CPU is never charged to, nor shares an event loop with, the server
it measures. It prints one JSON object: the per-message samples.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time


def header(n: int) -> bytes:
    return f"From: load@sender.test\r\nTo: rcpt@example.com\r\nSubject: bench {n:07}\r\n\r\n".encode()


def make_payload(size: int) -> bytes:
    """
    The part after the headers that makes a message ``size`` bytes long
    (the headers of every message are the same length).
    """
    room = size - len(header(0))
    line = b"x" * 76 + b"\r\n"
    payload = line * max(0, room // len(line))
    return payload + b"y" * max(0, room - len(payload) - 2) + b"\r\n"


async def read_reply(reader: asyncio.StreamReader) -> int:
    """The code of the next whole (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


def recipients(n: int, mailboxes: int) -> list[str]:
    """
    The recipients of message ``n``: a mailbox of its own (``mailboxes`` 0),
    or one of ``mailboxes`` in turn, every seventh message to a second one too
    (so the replay's order check sees mailboxes shared between messages).
    """
    if not mailboxes:
        return [f"u{n}@example.com"]
    first, second = n % mailboxes, (n * 3 + 1) % mailboxes
    return [f"m{first}@example.com"] + ([f"m{second}@example.com"] if n % 7 == 0 and second != first else [])


async def session(
    host: str,
    port: int,
    queue: asyncio.Queue[tuple[int, bytes]],
    samples: list[tuple[float, float, int, int]],
    deadline: float,
    mailboxes: int = 0,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await read_reply(reader)
        writer.write(b"EHLO load.test\r\n")
        await read_reply(reader)
        while time.monotonic() < deadline:
            try:
                n, payload = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            body = header(n) + payload
            start = time.monotonic()
            # pipelined envelope, as a real MTA client sends it
            to = recipients(n, mailboxes)
            rcpt = "".join(f"RCPT TO:<{r}>\r\n" for r in to)
            writer.write(f"MAIL FROM:<load@sender.test> SIZE={len(body)}\r\n{rcpt}DATA\r\n".encode())
            codes = [await read_reply(reader) for _ in range(len(to) + 2)]
            if codes[-1] != 354:
                samples.append((start, time.monotonic(), codes[-1], len(body)))
                writer.write(b"RSET\r\n")
                await read_reply(reader)
                continue
            writer.write(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            code = await read_reply(reader)
            samples.append((start, time.monotonic(), code, len(body)))
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


async def run(
    host: str, ports: list[int], sessions: int, count: int, sizes: list[int], seconds: float, mailboxes: int = 0
) -> dict[str, object]:
    rng = random.Random(1)
    payloads = {size: make_payload(size) for size in sizes}
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait((n, payloads[rng.choice(sizes)]))
    samples: list[tuple[float, float, int, int]] = []
    begin = time.monotonic()
    deadline = begin + seconds
    await asyncio.gather(
        *(session(host, ports[i % len(ports)], queue, samples, deadline, mailboxes) for i in range(sessions))
    )
    return {
        "begin": begin,
        "end": time.monotonic(),
        "samples": [[s - begin, e - begin, c, z] for s, e, c, z in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="SMTP load generator for relayx's benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, action="append")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--mailboxes", type=int, default=0, help="recipients' mailboxes (0: one per message)")
    options = parser.parse_args()
    sizes = options.size or [1024]
    result = asyncio.run(
        run(options.host, options.port, options.sessions, options.count, sizes, options.seconds, options.mailboxes)
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
