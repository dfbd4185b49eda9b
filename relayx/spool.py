"""
Messages being received, held in memory while they are small and streamed
to a file in the spool directory once they grow past a threshold, so that a
node's memory does not grow with the size (or number) of the messages its
clients are sending.

A ``SpooledMessage`` is written once (``write`` ... ``finish``), then read
(``size``, ``open()``, ``read()``, ``peek()``) by whoever takes the message
on, and always ``discard``-ed (``close`` is the same), whatever the outcome:
its file is removed then. ``Spool.prepare`` makes the directory (0700) and
removes files left by a node that died mid-message; files are 0600.

The ``Spool`` also keeps two budgets shared by all sessions: bytes held in
memory by messages not (yet) spooled (past it, a message spills to disk
whatever its size), and bytes of spooled messages read back into memory at
once (``read_back``): a session past it waits its turn, so a thousand large
messages ending together are committed a few at a time, not all at once.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import Deferred, succeed

#: how spool files are named, so that ``prepare`` removes only ours
PREFIX = "msg-"
DEFAULT_THRESHOLD = 1024 * 1024
DEFAULT_MEMORY = 32 * 1024 * 1024
DEFAULT_READ_BACK = 16 * 1024 * 1024


class Spool:
    """
    Where messages too large to hold in memory are written while they come in.

    ``directory`` ``None``: a private temporary directory, made on first use.
    """

    def __init__(
        self,
        directory: Path | None,
        threshold: int = DEFAULT_THRESHOLD,
        memory: int = DEFAULT_MEMORY,
        read_back: int = DEFAULT_READ_BACK,
    ) -> None:
        self.directory = directory
        self.threshold = threshold
        self.memory = memory
        #: bytes held in memory by messages not spooled, across all sessions
        self.in_memory = 0
        #: spool files open now
        self.files = 0
        self._gate = _Budget(read_back)

    def prepare(self) -> None:
        """
        Make the directory (0700) and this process's folder in it, and
        remove what was left by processes that are gone (a node's SMTP
        processes share the directory, each writing in a folder named by
        its process id). Raises ``OSError`` when it cannot be done.
        """
        own = self._directory()
        assert self.directory is not None
        for entry in self.directory.iterdir():
            if entry == own:
                _empty(entry)
            elif entry.is_dir() and entry.name.isdigit() and not _alive(int(entry.name)):
                _empty(entry)
                entry.rmdir()

    def _directory(self) -> Path:
        """
        This process's folder of the spool, made if need be.
        """
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="relayx-spool-"))
        own = self.directory / str(os.getpid())
        for folder in (self.directory, own):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        return own

    def new(self) -> SpooledMessage:
        """
        An empty message to write into.
        """
        return SpooledMessage(self)

    def _spill(self) -> tuple[BinaryIO, Path]:
        own = None if self.directory is None else self.directory / str(os.getpid())
        if own is None or not own.is_dir():
            own = self._directory()
        # mkstemp: O_EXCL, mode 0600
        fd, name = tempfile.mkstemp(prefix=PREFIX, dir=own)
        self.files += 1
        return os.fdopen(fd, "w+b"), Path(name)

    @asynccontextmanager
    async def read_back(self, size: int) -> AsyncIterator[None]:
        """
        Wait until ``size`` bytes of spooled message may be held in memory
        (first come, first served; one message alone always may).
        """
        await self._gate.acquire(size)
        try:
            yield
        finally:
            self._gate.release(size)

    @property
    def reading(self) -> int:
        """
        Bytes of spooled messages read back into memory now.
        """
        return self._gate.used


class SpooledMessage:
    """
    One message: in memory until it passes the spool's threshold, then in a
    file of the spool directory. Write, ``finish``, read, ``discard``.
    """

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0
        self.discarded = False

    @property
    def spooled(self) -> bool:
        """
        Whether the message is in a file rather than in memory.
        """
        return self._file is not None

    def write(self, data: bytes) -> None:
        if self.discarded or not data:
            return
        spool = self._spool
        memory = self._memory
        if memory is not None and (
            len(memory) + len(data) > spool.threshold or spool.in_memory + len(data) > spool.memory
        ):
            self._file, self.path = spool._spill()
            self._file.write(memory)
            spool.in_memory -= len(memory)
            self._memory = memory = None
        if memory is not None:
            memory += data
            spool.in_memory += len(data)
        else:
            assert self._file is not None
            self._file.write(data)
        self.size += len(data)

    def finish(self) -> None:
        """
        Everything is written: make it readable.
        """
        if self._file is not None:
            self._file.flush()

    def open(self) -> BinaryIO:
        """
        A reader of the whole message from its first byte (the caller closes it).
        """
        if self.discarded:
            raise ValueError("message discarded")
        if self._file is None:
            return io.BytesIO(bytes(self._memory or b""))
        assert self.path is not None
        return open(self.path, "rb")

    def read(self) -> bytes:
        """
        The whole message.
        """
        if self.discarded:
            raise ValueError("message discarded")
        if self._file is None:
            return bytes(self._memory or b"")
        return os.pread(self._file.fileno(), self.size, 0)

    def after(self, head: bytes) -> bytes:
        """
        ``head`` followed by the whole message, in one copy.
        """
        if self.discarded:
            raise ValueError("message discarded")
        if self._file is None:
            return head + (self._memory or b"")
        return head + os.pread(self._file.fileno(), self.size, 0)

    def peek(self, count: int) -> bytes:
        """
        The first ``count`` bytes (or fewer) of what is written so far.
        """
        if self.discarded:
            return b""
        if self._file is None:
            with memoryview(self._memory or b"") as view:
                return bytes(view[:count])
        self._file.flush()
        return os.pread(self._file.fileno(), count, 0)

    def discard(self) -> None:
        """
        Drop the message and remove its file; doing so twice is harmless.
        """
        if self.discarded:
            return
        self.discarded = True
        if self._memory is not None:
            self._spool.in_memory -= len(self._memory)
            self._memory = None
        if self._file is not None:
            self._spool.files -= 1
            self._file.close()
            self._file = None
            assert self.path is not None
            self.path.unlink(missing_ok=True)

    close = discard


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.name.startswith(PREFIX) and entry.is_file():
            entry.unlink(missing_ok=True)


class _Budget:
    """
    A count of units handed out first come, first served, up to ``total``
    (a request larger than ``total`` waits until it is alone).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiting: deque[tuple[int, Deferred[None]]] = deque()

    def _fits(self, amount: int) -> bool:
        return self.used == 0 or self.used + amount <= self.total

    def acquire(self, amount: int) -> Deferred[None]:
        if not self._waiting and self._fits(amount):
            self.used += amount
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append((amount, waiter))
        return waiter

    def release(self, amount: int) -> None:
        self.used -= amount
        while self._waiting and self._fits(self._waiting[0][0]):
            amount, waiter = self._waiting.popleft()
            self.used += amount
            waiter.callback(None)
