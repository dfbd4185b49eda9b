"""
Bodies as objects in S3-compatible object storage (AWS S3, MinIO, Ceph RGW,
SeaweedFS, Garage ...), for clusters: every node reads what any node wrote.

``<prefix><shard>/<queue id>``, written with one ``PutObject`` carrying the
body's MD5, so the server refuses a body damaged on the way. A ``put``
resolves when the server has acknowledged the object: as durable as that
server makes its writes. The client is botocore's (through boto3), whose
calls block: they run in a thread pool, never on the reactor's thread.

relayx's tests run against an S3 API server on loopback (moto); no real
object storage is part of them.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayx.bodies import body_name, off_thread, split_ref
from relayx.interfaces import BodyNotFound, BodyPage, BodyStoreUnavailable, IBodyStore, StoredBody

KIND = "s3"
_MISSING = ("NoSuchKey", "404", "NotFound")


@implementer(IBodyStore)
class S3BodyStore:
    """
    ``endpoint_url`` ``None`` is AWS itself; ``access_key`` ``None`` takes
    botocore's usual credential chain (environment, instance profile ...).
    ``addressing_style`` is ``path`` (most self-hosted servers), ``virtual``
    or ``auto``. ``timeout`` bounds connecting and each read; botocore
    retries a failed call ``attempts`` times in all before giving up.
    """

    def __init__(
        self,
        bucket: str,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        addressing_style: str = "auto",
        timeout: float = 30.0,
        attempts: int = 3,
        ca_file: Path | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.where = f"S3 bucket {bucket!r} at {endpoint_url or 'AWS'}"
        self._reactor = reactor
        self._pool = pool
        config = Config(
            region_name=region,
            s3={"addressing_style": addressing_style},
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": attempts, "mode": "standard"},
            max_pool_connections=max(10, pool.max),
            # many S3-compatible servers refuse the newer CRC checksums
            # botocore adds by default; PutObject carries an MD5 instead
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
            verify=str(ca_file) if ca_file is not None else None,
        )

    def __repr__(self) -> str:
        return f"S3BodyStore({self.where}, prefix={self.prefix!r})"

    async def put(self, queue_id: str, body: bytes) -> str:
        name = body_name(queue_id)
        return await off_thread(self._reactor, self._pool, self.where, self._put, name, body)

    async def get(self, ref: str) -> bytes:
        shard, queue_id = split_ref(KIND, ref)
        return await off_thread(self._reactor, self._pool, self.where, self._get, f"{shard}/{queue_id}")

    async def delete(self, ref: str) -> None:
        shard, queue_id = split_ref(KIND, ref)
        await off_thread(self._reactor, self._pool, self.where, self._delete, f"{shard}/{queue_id}")

    async def list_older_than(self, cutoff: float, cursor: str | None, limit: int) -> BodyPage:
        return await off_thread(self._reactor, self._pool, self.where, self._list, cutoff, cursor, limit)

    async def check(self) -> None:
        await off_thread(self._reactor, self._pool, self.where, self._check)

    # the blocking halves, run in the pool

    def _fail(self, what: str, e: Exception) -> Exception:
        """
        ``BodyNotFound`` for a missing object, else ``BodyStoreUnavailable``
        with the server's error code and message on one line.
        """
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _MISSING:
                return BodyNotFound(f"{self.where}: no body {what}")
            message = str(error.get("Message", "")) or str(e)
            return BodyStoreUnavailable(f"{self.where}: {what}: {code} {message}".strip())
        return BodyStoreUnavailable(f"{self.where}: {what}: {type(e).__name__}: {e}")

    def _put(self, name: str, body: bytes) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        digest = base64.b64encode(hashlib.md5(body).digest()).decode("ascii")
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=body, ContentMD5=digest)
        except (BotoCoreError, ClientError) as e:
            raise self._fail(f"cannot store {name}", e) from e
        return f"{KIND}:{name}"

    def _get(self, name: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self.prefix + name)
            return bytes(answer["Body"].read())
        except (BotoCoreError, ClientError) as e:
            raise self._fail(name, e) from e

    def _delete(self, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # S3 answers 204 for a key that is not there too
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + name)
        except (BotoCoreError, ClientError) as e:
            error = self._fail(f"cannot delete {name}", e)
            if not isinstance(error, BodyNotFound):
                raise error from e

    def _list(self, cutoff: float, cursor: str | None, limit: int) -> BodyPage:
        from botocore.exceptions import BotoCoreError, ClientError

        options: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": max(1, min(limit, 1000))}
        if cursor:
            options["StartAfter"] = self.prefix + cursor
        try:
            answer = self._client.list_objects_v2(**options)
        except (BotoCoreError, ClientError) as e:
            raise self._fail("cannot list", e) from e
        found: list[StoredBody] = []
        last = None
        for entry in answer.get("Contents", []):
            last = entry["Key"][len(self.prefix) :]
            ref = f"{KIND}:{last}"
            try:
                _, queue_id = split_ref(KIND, ref)
            except BodyNotFound:
                continue  # not a body of ours (a check's probe, something else under the prefix)
            stored_at = entry["LastModified"].timestamp()
            if stored_at < cutoff:
                found.append(StoredBody(ref, queue_id, stored_at))
        return BodyPage(tuple(found), last if answer.get("IsTruncated") and last else None)

    def _check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        probe = f"{self.prefix}check/{secrets.token_hex(8)}"
        try:
            self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"relayx")
            try:
                if self._client.get_object(Bucket=self.bucket, Key=probe)["Body"].read() != b"relayx":
                    raise BodyStoreUnavailable(f"{self.where}: a probe object read back differently")
            finally:
                self._client.delete_object(Bucket=self.bucket, Key=probe)
        except (BotoCoreError, ClientError) as e:
            error = self._fail("not usable", e)
            raise BodyStoreUnavailable(str(error)) from e
