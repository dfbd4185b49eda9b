"""
Body stores: where message bodies live, apart from the queue's metadata
(``IBodyStore``). One module each: a directory (``directory``), S3-compatible
object storage (``s3``), Redis itself (``redis``), and zstd compression
around any of them (``compressed``).

A reference names its store's kind (``file:``, ``s3:``, ``redis:``), so a
reference handed to the wrong store is a clear error, not a wrong read.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from relayx.interfaces import BodyNotFound, BodyStoreUnavailable

T = TypeVar("T")

#: what a queue id may look like to be a file or object name: relayx's own
#: are 16 hex digits; letters, digits, ``-`` and ``_`` leave room for others
_QUEUE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_SHARD = re.compile(r"^[0-9a-f]{2}$")


def check_queue_id(queue_id: str) -> str:
    if not _QUEUE_ID.match(queue_id):
        raise ValueError(f"not a queue id usable as a body's name: {queue_id!r}")
    return queue_id


def shard(queue_id: str) -> str:
    """
    Two hex digits spreading queue ids over 256 subdirectories (or key
    prefixes): from a hash, so that any queue id spreads evenly.
    """
    return hashlib.sha256(queue_id.encode("ascii")).hexdigest()[:2]


def body_name(queue_id: str) -> str:
    """
    ``<shard>/<queue id>``: a body's path below the store's root.
    """
    return f"{shard(check_queue_id(queue_id))}/{queue_id}"


def split_ref(kind: str, ref: str) -> tuple[str, str]:
    """
    The shard and queue id of a ``<kind>:<shard>/<queue id>`` reference;
    ``BodyNotFound`` for anything else (a reference from another store, or
    one that would leave the store's root).
    """
    scheme, _, name = ref.partition(":")
    shard_, _, queue_id = name.partition("/")
    if scheme != kind or not _SHARD.match(shard_) or not _QUEUE_ID.match(queue_id) or shard(queue_id) != shard_:
        raise BodyNotFound(f"not a reference to a body of a {kind} store: {ref!r}")
    return shard_, queue_id


def off_thread(
    reactor: IReactorFromThreads, pool: ThreadPool, where: str, f: Callable[..., T], *args: object
) -> Deferred[T]:
    """
    Run blocking ``f`` in ``pool``; an unexpected exception becomes
    ``BodyStoreUnavailable`` naming ``where`` (``BodyNotFound`` and
    ``BodyStoreUnavailable`` pass as they are).
    """

    def guarded() -> T:
        try:
            return f(*args)
        except (BodyNotFound, BodyStoreUnavailable):
            raise
        except Exception as e:
            raise BodyStoreUnavailable(f"{where}: {type(e).__name__}: {e}") from e

    return deferToThreadPool(reactor, pool, guarded)
