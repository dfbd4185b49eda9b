"""
The body stores: one contract every implementation passes (a directory, S3
on a loopback S3 API server, Redis, and zstd around a directory), then what
each one promises besides.

The S3 store runs against moto's S3 API server on 127.0.0.1; no real object
storage is involved.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import zstandard
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from relayx.bodies import shard
from relayx.bodies.compressed import MAGIC, CompressedBodyStore
from relayx.bodies.directory import DirectoryBodyStore
from relayx.bodies.redis import RedisBodyStore
from relayx.bodies.s3 import S3BodyStore
from relayx.bodies.sweep import OrphanSweep
from relayx.bodies.watched import WatchedBodyStore
from relayx.interfaces import BodyNotFound, BodyStoreUnavailable, IBodyStore, StoreUnavailable
from relayx.redis.connection import connect
from relayx.redis.embedded import free_port
from relayx.service import StartupError
from tests.helpers import LoopbackSink, NodeCase, RedisProcess, eventually, send, shared_redis, unique_prefix, wait_for
from tests.test_metrics import get
from tests.test_queue_redis import deferred_test

#: the global reactor, as the thread-pool and clock interfaces the stores take
reactor: Any = _reactor
BODY = b"Received: from client.test\r\nSubject: hello\r\n\r\n" + b"line of text\r\n" * 200
_names = itertools.count()


def qid() -> str:
    return f"{next(_names):04X}{os.urandom(6).hex().upper()}"


class SynchronousThreadPool(ThreadPool):
    """
    Runs each call at once on the calling thread: blocking I/O in a test
    happens in order, with nothing left running afterwards.
    """

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any, **kw: Any) -> None:
        try:
            result = func(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


def scratch(case: TestCase) -> Path:
    """
    A fresh directory, removed after the test.
    """
    path = Path(tempfile.mkdtemp(prefix="relayx-bodies-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


class BodyStoreContract:
    """
    What every ``IBodyStore`` does; a subclass says how to make one, and
    how to make one whose storage is gone.
    """

    #: how many more bodies than asked a page may hold (Redis's SCAN COUNT is a hint)
    page_slack = 0

    async def make_store(self) -> Any:
        raise NotImplementedError

    async def make_broken_store(self) -> Any:
        raise NotImplementedError

    @deferred_test
    async def test_provides_interface(self) -> None:
        """When a store is made, it provides IBodyStore."""
        assert verifyObject(IBodyStore, await self.make_store())

    @deferred_test
    async def test_round_trip(self) -> None:
        """When bodies are put, each reads back byte for byte by its reference, empty and 1 MiB ones too."""
        store = await self.make_store()
        bodies = {qid(): BODY, qid(): b"", qid(): os.urandom(1024 * 1024), qid(): b"\x00\xff\r\n.\r\n"}
        refs = {q: await store.put(q, body) for q, body in bodies.items()}
        assert len(set(refs.values())) == len(bodies)
        for q, body in bodies.items():
            assert isinstance(refs[q], str)
            assert await store.get(refs[q]) == body

    @deferred_test
    async def test_put_again_replaces(self) -> None:
        """When a queue id is put twice (a retry), the second body is the one read."""
        store = await self.make_store()
        q = qid()
        await store.put(q, b"first")
        ref = await store.put(q, b"second")
        assert await store.get(ref) == b"second"

    @deferred_test
    async def test_delete_is_idempotent(self) -> None:
        """When a body is deleted, reading it raises BodyNotFound, and deleting it again is no error."""
        store = await self.make_store()
        ref = await store.put(qid(), BODY)
        await store.delete(ref)
        with self.assertRaises(BodyNotFound):  # type: ignore[attr-defined]
            await store.get(ref)
        await store.delete(ref)

    @deferred_test
    async def test_missing_and_foreign_references(self) -> None:
        """When a reference names nothing, another store's body or a path outside, get raises BodyNotFound."""
        store = await self.make_store()
        ref = await store.put(qid(), BODY)
        kind = ref.partition(":")[0]
        missing = qid()
        for bad in [
            f"{kind}:{shard(missing)}/{missing}" if kind != "redis" else f"redis:{missing}",
            "other:00/ABC",
            f"{kind}:../../etc/passwd",
            f"{kind}:00/../../etc/passwd",
            f"{kind}:",
            "",
        ]:
            with self.assertRaises(BodyNotFound) as caught:  # type: ignore[attr-defined]
                await store.get(bad)
            assert isinstance(caught.exception, KeyError)
            text = str(caught.exception)
            assert text and "\n" not in text and not text.startswith("'"), text

    @deferred_test
    async def test_bad_queue_id_refused(self) -> None:
        """When a queue id could escape the store's namespace, put refuses it."""
        store = await self.make_store()
        for bad in ["../x", "a/b", "", ".hidden", "x" * 200]:
            with self.assertRaises(ValueError):  # type: ignore[attr-defined]
                await store.put(bad, BODY)

    @deferred_test
    async def test_listing_pages_through_old_bodies(self) -> None:
        """When the sweep lists bodies older than a cutoff, bounded pages find each once; newer ones are not listed."""
        store = await self.make_store()
        queue_ids = {qid() for _ in range(7)}
        refs = {await store.put(q, BODY) for q in queue_ids}
        found: list[Any] = []
        cursor = None
        # bounded: SCAN of the Redis store walks the test session's whole (small) keyspace
        for _ in range(10000):
            page = await store.list_older_than(time.time() + 3600, cursor, 3)
            assert len(page.bodies) <= 3 + self.page_slack
            found.extend(page.bodies)
            cursor = page.cursor
            if cursor is None:
                break
        assert cursor is None
        assert {b.ref for b in found} >= refs
        assert len(found) == len({b.ref for b in found})
        mine = [b for b in found if b.ref in refs]
        assert {b.queue_id for b in mine} == queue_ids
        assert all(abs(b.stored_at - time.time()) < 120 for b in mine)
        cursor = None
        for _ in range(10000):
            page = await store.list_older_than(time.time() - 3600, cursor, 50)
            assert not {b.ref for b in page.bodies} & refs
            cursor = page.cursor
            if cursor is None:
                break
        assert cursor is None

    @deferred_test
    async def test_check_passes(self) -> None:
        """When the storage is there, the start-up check passes and leaves no body behind."""
        store = await self.make_store()
        await store.check()
        page = await store.list_older_than(time.time() + 3600, None, 1000)
        assert page.bodies == ()

    @deferred_test
    async def test_unavailable_storage(self) -> None:
        """When the storage is gone, every operation raises a one-line BodyStoreUnavailable (a StoreUnavailable)."""
        store = await self.make_broken_store()
        q = qid()
        ref = f"{self.kind}:{shard(q)}/{q}" if self.kind != "redis" else f"redis:{q}"  # type: ignore[attr-defined]
        calls = [
            lambda: store.put(q, BODY),
            lambda: store.get(ref),
            lambda: store.delete(ref),
            lambda: store.list_older_than(time.time(), None, 10),
            store.check,
        ]
        for call in calls:
            with self.assertRaises(BodyStoreUnavailable) as caught:  # type: ignore[attr-defined]
                await call()
            assert isinstance(caught.exception, StoreUnavailable)
            text = str(caught.exception)
            assert text and "\n" not in text and "Traceback" not in text, text


class DirectoryBodyStoreTests(BodyStoreContract, TestCase):
    kind = "file"

    def root(self) -> Path:
        return scratch(self) / "bodies"

    async def make_store(self) -> DirectoryBodyStore:
        root = self.root()
        return DirectoryBodyStore(root, reactor, SynchronousThreadPool())

    async def make_broken_store(self) -> DirectoryBodyStore:
        # below a regular file: no directory can be made there, even by root
        blocker = self.root().parent / "file"
        blocker.write_bytes(b"")
        return DirectoryBodyStore(blocker / "bodies", reactor, SynchronousThreadPool())

    @deferred_test
    async def test_durable_before_put_returns(self) -> None:
        """When put resolves, the file is in place, was flushed before its rename, and its directory after."""
        store = await self.make_store()
        events: list[str] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
            real_fsync(fd)

        def replace(a: Any, b: Any) -> None:
            events.append("rename")
            real_replace(a, b)

        self.patch(os, "fsync", fsync)
        self.patch(os, "replace", replace)
        await store.put(qid(), BODY)  # the first put also makes the root and the shard
        events.clear()
        q = "00AA" + qid()
        ref = await store.put(q, BODY)
        path = store.root / shard(q) / q
        assert path.read_bytes() == BODY
        assert ref == f"file:{shard(q)}/{q}"
        assert events[-3:] == ["fsync file", "rename", "fsync dir"], events

    @deferred_test
    async def test_modes_and_no_leftovers(self) -> None:
        """When bodies are written, files are 0600 and directories 0700, and no temporary file is left."""
        store = await self.make_store()
        q = qid()
        await store.put(q, BODY)
        assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
        assert stat.S_IMODE((store.root / shard(q)).stat().st_mode) == 0o700
        assert stat.S_IMODE((store.root / shard(q) / q).stat().st_mode) == 0o600
        assert os.listdir(store.root / shard(q)) == [q]

    @deferred_test
    async def test_listing_removes_stale_temporary_files(self) -> None:
        """When a write never finished (a node died), the sweep's listing removes its temporary file once old."""
        store = await self.make_store()
        q = qid()
        await store.put(q, BODY)
        temp = store.root / shard(q) / f".tmp-{q}-dead"
        temp.write_bytes(b"half a bod")
        page = await store.list_older_than(time.time() - 3600, None, 100)
        assert page.bodies == () and temp.exists()
        page = await store.list_older_than(time.time() + 3600, None, 100)
        assert [b.queue_id for b in page.bodies] == [q]
        assert not temp.exists()

    @deferred_test
    async def test_check_refuses_open_directory(self) -> None:
        """When the body directory lets other users in, the start-up check says so in one line."""
        store = await self.make_store()
        await store.check()
        store.root.chmod(0o755)
        with self.assertRaises(BodyStoreUnavailable) as caught:
            await store.check()
        assert "expected 700" in str(caught.exception)

    @deferred_test
    async def test_shared_by_two_nodes(self) -> None:
        """When two nodes share the directory, each reads and deletes what the other wrote."""
        a = await self.make_store()
        b = DirectoryBodyStore(a.root, reactor, SynchronousThreadPool())
        ref = await a.put(qid(), BODY)
        assert await b.get(ref) == BODY
        await b.delete(ref)
        with self.assertRaises(BodyNotFound):
            await a.get(ref)

    @deferred_test
    async def test_real_thread_pool(self) -> None:
        """When the store runs in a real thread pool, bodies round-trip off the reactor thread."""
        pool = ThreadPool(minthreads=0, maxthreads=2, name="bodies-test")
        pool.start()
        self.addCleanup(pool.stop)
        store = DirectoryBodyStore(self.root(), reactor, pool)
        refs = [await store.put(qid(), BODY + bytes([n])) for n in range(5)]
        assert [await store.get(r) for r in refs] == [BODY + bytes([n]) for n in range(5)]


class _MotoServer:
    """
    moto's S3 API server on a free loopback port, for the test session.
    """

    server: ClassVar[Any] = None
    port: ClassVar[int] = 0

    @classmethod
    def endpoint(cls) -> str:
        if cls.server is None:
            cls.server, cls.port = start_moto()
            atexit.register(cls.server.stop)
        return f"http://127.0.0.1:{cls.port}"


def start_moto() -> tuple[Any, int]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
_S3_KEYS: dict[str, Any] = {
    "access_key": "testing",
    "secret_key": "testing",
    "region": "us-east-1",
    "addressing_style": "path",
}


class S3BodyStoreTests(BodyStoreContract, TestCase):
    kind = "s3"

    def pool(self) -> ThreadPool:
        pool = ThreadPool(minthreads=0, maxthreads=4, name="s3-test")
        pool.start()
        self.addCleanup(pool.stop)
        return pool

    def bucket(self, endpoint: str) -> str:
        import boto3

        name = f"relayx-{unique_prefix().lower()}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)
        return name

    async def make_store(self) -> S3BodyStore:
        endpoint = _MotoServer.endpoint()
        return S3BodyStore(
            self.bucket(endpoint), reactor, self.pool(), prefix="queue", endpoint_url=endpoint, **_S3_KEYS
        )

    async def make_broken_store(self) -> S3BodyStore:
        server, port = start_moto()
        endpoint = f"http://127.0.0.1:{port}"
        bucket = self.bucket(endpoint)
        server.stop()
        return S3BodyStore(bucket, reactor, self.pool(), endpoint_url=endpoint, timeout=2.0, attempts=1, **_S3_KEYS)

    @deferred_test
    async def test_objects_under_prefix(self) -> None:
        """When a body is put, it is one object named <prefix>/<shard>/<queue id>, there when put resolves."""
        import boto3

        store = await self.make_store()
        q = qid()
        ref = await store.put(q, BODY)
        assert ref == f"s3:{shard(q)}/{q}"
        client = boto3.client(
            "s3",
            endpoint_url=_MotoServer.endpoint(),
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        answer = client.get_object(Bucket=store.bucket, Key=f"queue/{shard(q)}/{q}")
        assert answer["Body"].read() == BODY

    @deferred_test
    async def test_missing_bucket(self) -> None:
        """When the bucket does not exist, the start-up check says so in one line."""
        store = S3BodyStore("no-such-bucket", reactor, self.pool(), endpoint_url=_MotoServer.endpoint(), **_S3_KEYS)
        with self.assertRaises(BodyStoreUnavailable) as caught:
            await store.check()
        assert "NoSuchBucket" in str(caught.exception)


class RedisBodyStoreTests(BodyStoreContract, TestCase):
    kind = "redis"
    page_slack = 10

    async def make_store(self) -> RedisBodyStore:
        server = shared_redis()
        redis = await connect("127.0.0.1", server.port, 0, None, reactor, 5.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        return RedisBodyStore(redis, unique_prefix(), reactor)

    async def make_broken_store(self) -> RedisBodyStore:
        redis = await connect("127.0.0.1", free_port(), 0, None, reactor, 1.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        return RedisBodyStore(redis, unique_prefix(), reactor)

    @deferred_test
    async def test_key_layout(self) -> None:
        """When a body is put, it is the hash <prefix>:body:<queue id> with the body and the time it was stored."""
        store = await self.make_store()
        q = qid()
        assert await store.put(q, BODY) == f"redis:{q}"
        stored = await store._redis.call("hgetall", f"{store.prefix}:body:{q}")
        assert stored[b"body"] == BODY and abs(int(stored[b"at"]) / 1000 - time.time()) < 60


class CompressedBodyStoreTests(BodyStoreContract, TestCase):
    kind = "file"

    async def make_store(self, level: int | None = 3) -> CompressedBodyStore:
        root = scratch(self) / "bodies"
        pool = SynchronousThreadPool()
        return CompressedBodyStore(DirectoryBodyStore(root, reactor, pool), reactor, pool, level=level)

    async def make_broken_store(self) -> CompressedBodyStore:
        inner = await DirectoryBodyStoreTests.make_broken_store(self)  # type: ignore[arg-type]
        return CompressedBodyStore(inner, reactor, SynchronousThreadPool())

    def root(self) -> Path:
        return scratch(self) / "bodies"

    @deferred_test
    async def test_stored_compressed(self) -> None:
        """When compression is on, a text body is stored as a smaller zstd frame and reads back as it was."""
        store = await self.make_store()
        q = qid()
        ref = await store.put(q, BODY)
        raw = await store.inner.get(ref)
        assert raw.startswith(MAGIC) and len(raw) < len(BODY) / 5
        assert await store.get(ref) == BODY

    @deferred_test
    async def test_old_and_new_bodies_read_either_way(self) -> None:
        """When compression is turned on or off with bodies queued, bodies stored either way still read."""
        on = await self.make_store()
        off = CompressedBodyStore(on.inner, reactor, SynchronousThreadPool(), level=None)
        plain = await on.inner.put(qid(), BODY)
        packed = await on.put(qid(), BODY)
        kept = await off.put(qid(), BODY)
        assert await on.inner.get(kept) == BODY
        for store in (on, off):
            for ref in (plain, packed, kept):
                assert await store.get(ref) == BODY

    @deferred_test
    async def test_incompressible_and_magic_bodies(self) -> None:
        """When a body would not shrink it is stored as it is; one starting with zstd's magic still round-trips."""
        store = await self.make_store()
        noise = os.urandom(4096)
        ref = await store.put(qid(), noise)
        assert await store.inner.get(ref) == noise
        tricky = MAGIC + os.urandom(64)
        ref = await store.put(qid(), tricky)
        assert await store.get(ref) == tricky

    @deferred_test
    async def test_damaged_or_oversized_frames(self) -> None:
        """When a stored frame is damaged or claims more than the limit, reading it is BodyStoreUnavailable."""
        store = await self.make_store()
        store.max_size = 1024 * 1024
        frame = zstandard.ZstdCompressor().compress(BODY)
        damaged = await store.inner.put(qid(), frame[:-8] + b"\x00" * 8)
        huge = await store.inner.put(qid(), zstandard.ZstdCompressor().compress(b"\x00" * (2 * 1024 * 1024)))
        for ref in (damaged, huge):
            with self.assertRaises(BodyStoreUnavailable):
                await store.get(ref)


def body_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def mail(n: int) -> bytes:
    return f"From: s{n}@sender.test\r\nSubject: body {n}\r\n\r\n".encode() + b"the same line again\r\n" * 500


class OrphanSweepTests(TestCase):
    """
    The sweep, over a directory store, at explicit times.
    """

    async def stored(self, *queue_ids: str) -> tuple[DirectoryBodyStore, dict[str, str]]:
        store = DirectoryBodyStore(scratch(self) / "bodies", reactor, SynchronousThreadPool())
        return store, {q: await store.put(q, BODY) for q in queue_ids}

    @deferred_test
    async def test_removes_only_old_bodies_without_message(self) -> None:
        """When the sweep runs, old bodies whose message is gone are removed; queued ones and young ones stay."""
        gone, queued = qid(), qid()
        store, refs = await self.stored(gone, queued)
        clock = Clock()
        clock.advance(time.time())

        async def is_queued(queue_id: str) -> bool:
            return queue_id == queued

        sweep = OrphanSweep(store, is_queued, clock, orphan_age=3600, interval=60, batch=1)
        for _ in range(4):
            assert await sweep.step() == 0  # younger than an hour: nothing, however often
        clock.advance(7200)
        for _ in range(4):
            await sweep.step()
        assert sweep.removed == 1
        with self.assertRaises(BodyNotFound):
            await store.get(refs[gone])
        assert await store.get(refs[queued]) == BODY

    @deferred_test
    async def test_doubt_keeps_bodies_and_the_loop_goes_on(self) -> None:
        """When the queue cannot say whether a message exists, or the store fails, nothing is removed; steps go on."""
        store, refs = await self.stored(qid())
        clock = Clock()
        clock.advance(time.time() + 7200)

        async def unsure(queue_id: str) -> bool:
            raise StoreUnavailable("Redis at 127.0.0.1:1: not connected")

        sweep = OrphanSweep(store, unsure, clock, orphan_age=3600, interval=60)
        sweep.start()
        self.addCleanup(sweep.stop)
        clock.advance(60)
        clock.advance(60)
        [ref] = refs.values()
        assert await store.get(ref) == BODY
        broken = DirectoryBodyStore(scratch(self) / "file", reactor, SynchronousThreadPool())
        (broken.root).write_bytes(b"")
        assert await OrphanSweep(broken, unsure, clock, 3600, 60).step() == 0


class NodeBodiesTests(NodeCase):
    """
    A whole node with its bodies in a body store: SMTP in, the primary down
    and back, bodies in the store and out of Redis, removed once delivered.
    """

    @deferred_test
    async def test_directory_bodies_out_of_redis_and_removed_after_delivery(self) -> None:
        """When mail is queued with a directory store, Redis holds stubs, delivery sends the bodies, then they go."""
        sink = LoopbackSink()
        root = scratch(self) / "bodies"
        node = await self.start_node(
            sink, bodies={"backend": "directory", "directory": str(root), "compression": "zstd"}
        )
        for n in range(3):
            assert await send(self.smtp_port, f"s{n}@sender.test", [f"u{n}@example.com"], mail(n)) == {}
        files = body_files(root)
        assert len(files) == 3
        assert all(f.read_bytes().startswith(MAGIC) for f in files)
        assert node.queue is not None
        [qid_] = [f.name for f in files if f.name == sorted(f.name for f in files)[0]]
        [stored] = await node.queue.message_fields(qid_, ["body"])
        assert stored.startswith(b"\x00file:") and len(stored) < 400, stored[:200]
        view = await node.queue.message(qid_, time.time())
        assert view is not None and view["size"] > 10000 and view["header"].startswith("Received: ")
        sink.start()
        await wait_for(lambda: len(sink.messages) >= 3, 30, "3 deliveries")
        got = sorted(m.body.split(b"\r\n", 3)[3] for m in sink.messages)
        assert got == sorted(mail(n) for n in range(3))
        await wait_for(lambda: body_files(root) == [], 10, "bodies removed after delivery")

    @deferred_test
    async def test_store_failure_is_451_until_it_is_back(self) -> None:
        """When the body directory cannot be written, DATA gets 451 4.3.0, nothing is queued and /readyz is 503."""
        sink = LoopbackSink()
        root = scratch(self) / "bodies"
        admin = free_port()
        node = await self.start_node(
            sink,
            bodies={"backend": "directory", "directory": str(root)},
            admin_listen=[f"tcp:{admin}:interface=127.0.0.1"],
        )
        assert await deferToThread(get, admin, "/readyz") == (200, "ready\n")
        shutil.rmtree(root)
        root.write_bytes(b"not a directory")
        result = await send(self.smtp_port, "s@sender.test", ["u@example.com"], mail(1))
        assert getattr(result, "smtp_code", None) == 451 and b"4.3.0" in result.smtp_error, result
        assert node.queue is not None
        assert await node.queue.redis.call("keys", f"{node.queue.prefix}:job:*") == []
        status, text = await deferToThread(get, admin, "/readyz")
        assert status == 503 and "body store failing: body directory" in text, text
        root.unlink()
        assert await send(self.smtp_port, "s@sender.test", ["u@example.com"], mail(2)) == {}
        assert await deferToThread(get, admin, "/readyz") == (200, "ready\n")
        sink.start()
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery")

    @deferred_test
    async def test_unusable_storage_stops_start_up(self) -> None:
        """When the body store cannot be written at start-up, the node does not start, with one line saying why."""
        blocker = scratch(self) / "file"
        blocker.write_bytes(b"")
        with self.assertRaises(StartupError) as caught:
            await self.start_node(LoopbackSink(), bodies={"backend": "directory", "directory": str(blocker / "x")})
        text = str(caught.exception)
        assert "bodies: body directory" in text and "\n" not in text, text

    @deferred_test
    async def test_s3_bodies(self) -> None:
        """When bodies go to S3 (moto on loopback), mail is queued, delivered whole, and its object removed."""
        import boto3

        endpoint = _MotoServer.endpoint()
        bucket = S3BodyStoreTests.bucket(self, endpoint)  # type: ignore[arg-type]
        sink = LoopbackSink()
        s3 = {"bucket": bucket, "endpoint_url": endpoint, "access_key": "testing", "secret_key": "testing"}
        await self.start_node(sink, bodies={"backend": "s3", "s3": s3})
        assert await send(self.smtp_port, "s@sender.test", ["u@example.com"], mail(7)) == {}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_CREDENTIALS)
        assert len(client.list_objects_v2(Bucket=bucket).get("Contents", [])) == 1
        sink.start()
        await wait_for(lambda: len(sink.messages) == 1, 30, "the delivery")
        assert sink.messages[0].body.split(b"\r\n", 3)[3] == mail(7)
        await eventually(
            lambda: deferToThread(lambda: not client.list_objects_v2(Bucket=bucket).get("Contents")), 10, "removal"
        )


class WatchedBodyStoreTests(BodyStoreContract, TestCase):
    kind = "file"

    async def make_store(self) -> WatchedBodyStore:
        return WatchedBodyStore(await DirectoryBodyStoreTests.make_store(self))  # type: ignore[arg-type]

    async def make_broken_store(self) -> WatchedBodyStore:
        return WatchedBodyStore(await DirectoryBodyStoreTests.make_broken_store(self))  # type: ignore[arg-type]

    def root(self) -> Path:
        return scratch(self) / "bodies"

    @deferred_test
    async def test_failing_until_success(self) -> None:
        """When an operation fails, the store says why until the next one succeeds; a missing body is no failure."""
        store = await self.make_store()
        assert store.failing is None
        inner = store.inner
        assert isinstance(inner, DirectoryBodyStore)
        inner.root.parent.joinpath("blocked").write_bytes(b"")
        store.inner = DirectoryBodyStore(inner.root.parent / "blocked" / "x", reactor, SynchronousThreadPool())
        with self.assertRaises(BodyStoreUnavailable):
            await store.put(qid(), BODY)
        assert store.failing is not None and "body directory" in store.failing
        store.inner = inner
        ref = await store.put(qid(), BODY)
        assert store.failing is None
        await store.delete(ref)
        with self.assertRaises(BodyNotFound):
            await store.get(ref)
        assert store.failing is None


def test_stub_is_the_reference_and_size_alone() -> None:
    """When a stub is made, it holds the reference and size only; a stub of before with a header section still reads."""
    from relayx.queue.bodyref import HEADERS_KEPT, kept_headers, make_stub, read_stub

    made = make_stub("file:ab/Q1", BODY)
    assert made == b"\x00relayx-body file:ab/Q1 %d" % len(BODY)
    stub = read_stub(made)
    assert stub is not None and (stub.ref, stub.size, stub.headers) == ("file:ab/Q1", len(BODY), b"")
    older = read_stub(made + b"\r\nSubject: hello\r\n")
    assert older is not None and (older.ref, older.size) == ("file:ab/Q1", len(BODY))
    assert older.headers == b"Subject: hello\r\n"
    assert kept_headers(BODY) == b"Received: from client.test\r\nSubject: hello\r\n"
    all_header = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"x" * 60) for n in range(5000))
    kept = kept_headers(all_header)
    assert len(kept) <= HEADERS_KEPT and kept.endswith(b"\r\n")
    assert read_stub(BODY) is None


class QueueWithBodiesTests(TestCase):
    """
    The Redis queue holding a body store: stubs in, bodies out.
    """

    async def queues(self) -> tuple[Any, Any, DirectoryBodyStore]:
        from relayx.queue.redis import RedisQueue

        server = shared_redis()
        redis = await connect("127.0.0.1", server.port, 0, None, reactor, 5.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        store = DirectoryBodyStore(scratch(self) / "bodies", reactor, SynchronousThreadPool())
        prefix = unique_prefix()
        options: dict[str, Any] = {"lease": 60, "retention": 3600, "retry_schedule": (60,), "randrange": lambda n: 0}
        return RedisQueue(redis, prefix, **options), RedisQueue(redis, prefix, bodies=store, **options), store

    @deferred_test
    async def test_stubs_old_messages_and_failures(self) -> None:
        """When a queue gains a body store, old messages still load, new ones load from the store, failures are 451s."""
        from relayx.address import Mailbox
        from relayx.interfaces import IncomingMessage, Throttle

        plain, stored, store = await self.queues()

        def message(queue_id: str) -> IncomingMessage:
            rcpt = Mailbox.parse(f"{queue_id.lower()}@one.test")  # mailboxes of their own: leased together
            return IncomingMessage(queue_id, "s@sender.test", (rcpt,), time.time(), BODY)

        await plain.enqueue(message("OLD"))
        await stored.enqueue(message("NEW"))
        claim = await stored.claim("n", time.time(), 10, {"one.test": Throttle(5)}, Throttle(5))
        loaded = {lease.queue_id: await stored.load(lease) for lease in claim.leases}
        assert {q: m.body for q, m in loaded.items()} == {"OLD": BODY, "NEW": BODY}
        [new] = [lease for lease in claim.leases if lease.queue_id == "NEW"]
        with self.assertRaises(StoreUnavailable) as caught:
            await plain.load(new)
        assert "none is set" in str(caught.exception)
        await store.delete(f"file:{shard('NEW')}/NEW")
        with self.assertRaises(StoreUnavailable):
            await stored.load(new)
        store.root = store.root.parent / "gone" / "deeper"
        with self.assertRaises(StoreUnavailable):
            await stored.enqueue(message("LOST"))
        assert await stored.message_exists("LOST") is False
        assert await stored.message_exists("NEW") is True

    @deferred_test
    async def test_header_section_read_from_the_store(self) -> None:
        """When a message's body is in the store, its hash stays compact and its view reads the header section there."""
        from relayx.address import Mailbox
        from relayx.interfaces import IncomingMessage

        _, stored, store = await self.queues()
        await stored.enqueue(IncomingMessage("HDR", "s@sender.test", (Mailbox.parse("u@one.test"),), time.time(), BODY))
        key = stored.message_key("HDR")
        assert await stored.redis.call("execute_command", "OBJECT", "ENCODING", key) in (b"listpack", b"ziplist")
        # the stub is kept as a NUL and the reference: the message's size field has the size
        assert await stored.redis.call("hget", key, "body") == b"\x00file:%s/HDR" % shard("HDR").encode()
        view = await stored.message("HDR", time.time())
        assert view is not None and view["size"] == len(BODY)
        assert view["header"] == "Received: from client.test\r\nSubject: hello\r\n"
        # a stub written before kept the header section itself
        older = b"\x00relayx-body file:%s/HDR %d\r\nSubject: kept\r\n" % (shard("HDR").encode(), len(BODY))
        await stored.redis.call("hset", key, "body", older)
        view = await stored.message("HDR", time.time())
        assert view is not None and view["header"] == "Subject: kept\r\n"
        # the body gone: the view goes without its header section
        await stored.redis.call("hset", key, "body", b"\x00file:%s/HDR" % shard("HDR").encode())
        await store.delete(f"file:{shard('HDR')}/HDR")
        view = await stored.message("HDR", time.time())
        assert view is not None and (view["header"], view["size"]) == ("", len(BODY))

    @deferred_test
    async def test_compact_hash_warning(self) -> None:
        """When Redis keeps hashes compact only up to 64-byte values, the node is told what to set; at 512 it is not."""
        from relayx.redis.connection import compact_hash_problem

        plain, _, _ = await self.queues()
        assert await compact_hash_problem(plain.redis) is None
        server = RedisProcess("--hash-max-ziplist-value", "64")
        server.start()
        self.addCleanup(server.stop)
        redis = await connect("127.0.0.1", server.port, 0, None, reactor, 5.0, poolsize=1)
        self.addCleanup(redis.disconnect)
        assert await redis.wait_connected(5)
        problem = await compact_hash_problem(redis)
        assert problem is not None and "hash-max-listpack-value 64" in problem and "512" in problem
