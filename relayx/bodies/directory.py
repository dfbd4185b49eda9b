"""
Bodies as files in a directory: the embedded single-node default, or a
directory several nodes share on a shared filesystem (NFS, CephFS ...).

``<root>/<shard>/<queue id>``, 256 shards named by two hex digits. A body is
written to a temporary file in its shard, flushed (``fsync``), renamed into
place (``os.replace``, atomic on POSIX filesystems) and the shard directory
flushed, so a reader sees a whole body or none, and a ``put`` that resolved
survives a power cut. Files are 0600 and directories 0700: mail is readable
by relayx's user alone. All file I/O runs in a thread pool, never on the
reactor's thread.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayx.bodies import body_name, off_thread, split_ref
from relayx.interfaces import BodyNotFound, BodyPage, BodyStoreUnavailable, IBodyStore, StoredBody

T = TypeVar("T")

KIND = "file"
_TEMP = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


@implementer(IBodyStore)
class DirectoryBodyStore:
    """
    ``root`` is created (0700) when missing; its parent must exist.
    """

    def __init__(self, root: Path, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self.root = Path(root)
        self._reactor = reactor
        self._pool = pool

    def __repr__(self) -> str:
        return f"DirectoryBodyStore({str(self.root)!r})"

    def _run(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        return off_thread(self._reactor, self._pool, f"body directory {self.root}", f, *args)

    async def put(self, queue_id: str, body: bytes) -> str:
        name = body_name(queue_id)
        return await self._run(self._put, name, body)

    async def get(self, ref: str) -> bytes:
        shard, queue_id = split_ref(KIND, ref)
        return await self._run(self._get, shard, queue_id)

    async def delete(self, ref: str) -> None:
        shard, queue_id = split_ref(KIND, ref)
        await self._run(self._delete, shard, queue_id)

    async def list_older_than(self, cutoff: float, cursor: str | None, limit: int) -> BodyPage:
        return await self._run(self._list, cutoff, cursor, limit)

    async def check(self) -> None:
        await self._run(self._check)

    # the blocking halves, run in the pool

    def _mkdir(self, path: Path) -> None:
        """
        Create ``path`` (0700) and flush its parent, so the entry survives too.
        """
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        _fsync_dir(path.parent)

    def _put(self, name: str, body: bytes) -> str:
        shard, queue_id = name.split("/")
        directory = self.root / shard
        try:
            if not directory.is_dir():
                self._mkdir(self.root)
                self._mkdir(directory)
            temp = directory / f"{_TEMP}{queue_id}-{secrets.token_hex(4)}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                try:
                    view = memoryview(body)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(temp, directory / queue_id)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            _fsync_dir(directory)
        except OSError as e:
            raise BodyStoreUnavailable(f"body directory {self.root}: cannot store {name}: {_why(e)}") from e
        return f"{KIND}:{name}"

    def _get(self, shard: str, queue_id: str) -> bytes:
        path = self.root / shard / queue_id
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BodyNotFound(f"body directory {self.root}: no body {shard}/{queue_id}") from None
        except OSError as e:
            raise BodyStoreUnavailable(f"body directory {self.root}: cannot read {shard}/{queue_id}: {_why(e)}") from e

    def _delete(self, shard: str, queue_id: str) -> None:
        try:
            (self.root / shard / queue_id).unlink(missing_ok=True)
        except OSError as e:
            raise BodyStoreUnavailable(
                f"body directory {self.root}: cannot delete {shard}/{queue_id}: {_why(e)}"
            ) from e

    def _list(self, cutoff: float, cursor: str | None, limit: int) -> BodyPage:
        """
        Walk the shards in order, and each shard's names in order, from
        ``cursor`` (the last name looked at); look at ``limit`` names at
        most. Temporary files older than ``cutoff`` are of writes that never
        finished (a node died): they are removed as they are found.
        """
        after_shard, _, after_name = (cursor or "").partition("/")
        try:
            shards = sorted(
                entry.name
                for entry in os.scandir(self.root)
                if len(entry.name) == 2 and entry.name >= after_shard and entry.is_dir(follow_symlinks=False)
            )
        except FileNotFoundError:
            return BodyPage((), None)
        except OSError as e:
            raise BodyStoreUnavailable(f"body directory {self.root}: cannot list: {_why(e)}") from e
        found: list[StoredBody] = []
        looked = 0
        for shard in shards:
            directory = self.root / shard
            try:
                names = sorted(os.listdir(directory))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise BodyStoreUnavailable(f"body directory {self.root}: cannot list {shard}: {_why(e)}") from e
            for name in names:
                if shard == after_shard and name <= after_name:
                    continue
                looked += 1
                try:
                    info = os.stat(directory / name, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                    if name.startswith(_TEMP):
                        (directory / name).unlink(missing_ok=True)
                    else:
                        found.append(StoredBody(f"{KIND}:{shard}/{name}", name, info.st_mtime))
                if looked >= limit:
                    return BodyPage(tuple(found), f"{shard}/{name}")
        return BodyPage(tuple(found), None)

    def _check(self) -> None:
        """
        Create the root (and its parents) if needed, then write, read and
        remove a probe file.
        """
        try:
            if not self.root.is_dir():
                os.makedirs(self.root.parent, exist_ok=True)
                self._mkdir(self.root)
            mode = stat.S_IMODE(os.stat(self.root).st_mode)
            probe = self.root / f"{_TEMP}check-{secrets.token_hex(4)}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"relayx")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                if probe.read_bytes() != b"relayx":
                    raise OSError(errno.EIO, "a probe file read back differently")
            finally:
                probe.unlink()
        except OSError as e:
            raise BodyStoreUnavailable(f"body directory {self.root}: not usable: {_why(e)}") from e
        if mode & 0o077:
            raise BodyStoreUnavailable(
                f"body directory {self.root}: mode {mode:o} lets other users in; expected 700 (chmod 700 {self.root})"
            )
