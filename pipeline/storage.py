"""One small storage interface over local paths and ``s3://bucket/prefix`` URIs.

Everything that reads or writes a corpus or a source goes through :func:`storage_for`,
so the same code runs on a laptop folder and on S3 (or any S3-compatible store named
by ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``). Writes are atomic on both: a
reader sees the old object, the complete new one, or nothing; never a prefix.

    st = storage_for("s3://bucket/corpus")
    st.write(join("s3://bucket/corpus", "manifest.json"), b"{}")
    with st.open("s3://bucket/videos/a.mp4") as f:  # ranged GETs, bounded memory
        f.seek(1024)
        head = f.read(4096)
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, BinaryIO, Protocol, TypeVar, cast

__all__ = [
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_PART_SIZE",
    "DEFAULT_READ_AHEAD",
    "LocalStorage",
    "S3RangeReader",
    "S3Storage",
    "Storage",
    "StorageError",
    "is_s3",
    "join",
    "split_s3",
    "storage_for",
]

DEFAULT_MULTIPART_THRESHOLD = 64 << 20
DEFAULT_PART_SIZE = 16 << 20
MIN_PART_SIZE = 5 << 20  # S3's minimum for every part but the last
DEFAULT_READ_AHEAD = 4 << 20
_COPY_CHUNK = 1 << 20

T = TypeVar("T")


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the cause."""


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(root: str, *parts: str) -> str:
    """Join path parts under ``root``: ``/`` separators for ``s3://``, ``os.path`` otherwise."""
    if is_s3(root):
        out = root.rstrip("/")
        for part in parts:
            part = part.strip("/")
            if part:
                out = f"{out}/{part}"
        return out
    return os.path.join(_local(root), *parts)


def _local(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


class Storage(Protocol):
    """What the pipeline needs from a storage backend. URIs are full paths or ``s3://`` URIs."""

    def list(self, prefix: str) -> builtins.list[str]:
        """Every object below the folder ``prefix``, recursively, as full URIs, sorted."""
        ...

    def read(self, uri: str) -> bytes: ...

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (clipped to the object's size)."""
        ...

    def size(self, uri: str) -> int: ...

    def exists(self, uri: str) -> bool: ...

    def delete(self, uri: str) -> None:
        """Remove ``uri``; a missing object is fine."""
        ...

    def write(self, uri: str, data: bytes) -> None:
        """Atomically create or replace ``uri`` with ``data``."""
        ...

    def upload(self, local_path: str, uri: str) -> None:
        """Atomically copy a local file to ``uri``."""
        ...

    def download(self, uri: str, local_path: str) -> None: ...

    def open(self, uri: str) -> BinaryIO:
        """A seekable, read-only binary file object."""
        ...


# --- local --------------------------------------------------------------------------------


class LocalStorage:
    """Plain files. Atomic writes: temp file in the target's folder, fsync, ``os.replace``."""

    def __repr__(self) -> str:
        return "LocalStorage()"

    def list(self, prefix: str) -> builtins.list[str]:
        root = _local(prefix)
        out: builtins.list[str] = []
        for folder, _dirs, files in os.walk(root):
            out.extend(os.path.join(folder, name) for name in files)
        return sorted(out)

    def read(self, uri: str) -> bytes:
        with builtins.open(_local(uri), "rb") as f:
            return f.read()

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        with builtins.open(_local(uri), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def size(self, uri: str) -> int:
        return os.path.getsize(_local(uri))

    def exists(self, uri: str) -> bool:
        return os.path.isfile(_local(uri))

    def delete(self, uri: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local(uri))

    def write(self, uri: str, data: bytes) -> None:
        self._atomic(_local(uri), lambda f: f.write(data))

    def upload(self, local_path: str, uri: str) -> None:
        with builtins.open(local_path, "rb") as src:
            self._atomic(_local(uri), lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))

    def download(self, uri: str, local_path: str) -> None:
        self.upload(_local(uri), local_path)

    def open(self, uri: str) -> BinaryIO:
        return builtins.open(_local(uri), "rb")

    @staticmethod
    def _atomic(path: str, fill: Callable[[IO[bytes]], object]) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with builtins.open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        # Make the rename itself durable.
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- S3 -----------------------------------------------------------------------------------


def _s3_client(max_attempts: int) -> tuple[Any, Any]:
    """``(session, client)`` from the standard credential chain and environment."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    session = boto3.session.Session()
    region = session.region_name or "us-east-1"
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # S3-compatible stores behind a custom endpoint rarely have wildcard DNS.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    return session, session.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return str(status)
    return ""


def _is_missing(exc: BaseException) -> bool:
    return _error_code(exc) in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class S3Storage:
    """S3 through boto3 (standard credential chain, ``AWS_ENDPOINT_URL[_S3]``, region
    ``us-east-1`` when unset, botocore "standard" retries with backoff).

    Files above ``multipart_threshold`` are uploaded in ``part_size`` parts,
    ``max_concurrency`` at a time; a failed multipart upload is aborted, so nothing
    partial is ever visible. ``open`` streams with ranged GETs and a ``read_ahead`` buffer.
    """

    def __init__(
        self,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = 4,
        read_ahead: int = DEFAULT_READ_AHEAD,
        max_attempts: int = 8,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be >= {MIN_PART_SIZE} bytes (S3 minimum), got {part_size}"
            )
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max(1, max_concurrency)
        self.read_ahead = read_ahead
        self.max_attempts = max_attempts
        self._client: Any = None
        self._session: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # Never the credentials: only where we talk to.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return f"S3Storage(endpoint={endpoint or 'aws'!r})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use (thread-safe)."""
        with self._lock:
            if self._client is None:
                self._session, self._client = _s3_client(self.max_attempts)
            return self._client

    def _fail(self, op: str, uri: str, exc: BaseException) -> OSError:
        """An exception naming the operation, URI and cause, with any credential scrubbed."""
        msg = f"{op} {uri}: {type(exc).__name__}: {exc}"
        for secret in self._secrets():
            msg = msg.replace(secret, "***")
        if _is_missing(exc):
            return FileNotFoundError(msg)
        return StorageError(msg)

    def _secrets(self) -> builtins.list[str]:
        try:
            self.client  # noqa: B018 - creates the session
            creds = self._session.get_credentials()
            frozen = creds.get_frozen_credentials() if creds is not None else None
        except Exception:
            return []
        if frozen is None:
            return []
        return [s for s in (frozen.secret_key, frozen.access_key, frozen.token) if s]

    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (FileNotFoundError, StorageError):
            raise
        except Exception as exc:
            raise self._fail(op, uri, exc) from None

    # -- reads ---------------------------------------------------------------------------

    def list(self, prefix: str) -> builtins.list[str]:
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"  # a folder, not every key that merely starts with the same letters

        def go() -> builtins.list[str]:
            out: builtins.list[str] = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                for obj in page.get("Contents", ()):
                    name = obj["Key"]
                    if not name.endswith("/"):  # folder markers some stores list
                        out.append(f"s3://{bucket}/{name}")
            return sorted(out)

        return self._call("list", prefix, go)

    def read(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        return self._call(
            "read", uri, lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        )

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        bucket, key = split_s3(uri)

        def go() -> bytes:
            try:
                resp = self.client.get_object(
                    Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}"
                )
            except Exception as exc:
                if _error_code(exc) in {"InvalidRange", "416"}:
                    return b""  # start at or past the end, like a local read
                raise
            return cast(bytes, resp["Body"].read())

        return self._call("read_range", uri, go)

    def size(self, uri: str) -> int:
        bucket, key = split_s3(uri)
        return self._call(
            "size",
            uri,
            lambda: int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]),
        )

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        if not key:
            return False
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                return False
            raise self._fail("exists", uri, exc) from None
        return True

    def download(self, uri: str, local_path: str) -> None:
        bucket, key = split_s3(uri)

        def fill(f: IO[bytes]) -> None:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            shutil.copyfileobj(body, f, _COPY_CHUNK)

        self._call("download", uri, lambda: LocalStorage._atomic(local_path, fill))

    def open(self, uri: str) -> BinaryIO:
        return cast(BinaryIO, S3RangeReader(self, uri, self.read_ahead))

    # -- writes --------------------------------------------------------------------------

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if not _is_missing(exc):
                raise self._fail("delete", uri, exc) from None

    def write(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        # One PUT: S3 makes the object visible only once it is complete.
        self._call("write", uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data))

    def upload(self, local_path: str, uri: str) -> None:
        size = os.path.getsize(local_path)
        if size <= self.multipart_threshold:
            with builtins.open(local_path, "rb") as f:
                self.write(uri, f.read())
            return
        self._multipart(local_path, uri, size)

    def _multipart(self, local_path: str, uri: str, size: int) -> None:
        bucket, key = split_s3(uri)
        upload_id = self._call(
            "upload",
            uri,
            lambda: self.client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"],
        )
        offsets = range(0, size, self.part_size)

        def put_part(number: int, offset: int) -> dict[str, Any]:
            # Each worker reads its own part: memory is max_concurrency * part_size.
            with builtins.open(local_path, "rb") as f:
                f.seek(offset)
                body = f.read(self.part_size)
            resp = self.client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": resp["ETag"]}

        try:
            with ThreadPoolExecutor(self.max_concurrency) as pool:
                futures = [pool.submit(put_part, i + 1, off) for i, off in enumerate(offsets)]
                parts = [fut.result() for fut in futures]
            self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as exc:
            # The original failure is what matters; lifecycle rules reap an unaborted upload.
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            if isinstance(exc, Exception):
                raise self._fail("upload", uri, exc) from None
            raise


class S3RangeReader(io.RawIOBase):
    """A seekable read-only view of one S3 object, backed by ranged GETs.

    Reads are served from a buffer of up to ``read_ahead`` bytes fetched at the
    current position, so memory stays bounded whatever the object's size.
    ``bytes_fetched`` counts the bytes actually transferred.
    """

    def __init__(self, storage: S3Storage, uri: str, read_ahead: int = DEFAULT_READ_AHEAD) -> None:
        super().__init__()
        self.uri = uri
        self.read_ahead = max(1, read_ahead)
        self.bytes_fetched = 0
        self._storage = storage
        self._size = storage.size(uri)
        self._pos = 0
        self._buf = b""
        self._buf_start = 0

    def __repr__(self) -> str:
        return f"S3RangeReader({self.uri!r}, size={self._size})"

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos} in {self.uri}")
        self._pos = pos
        return pos

    def _fetch(self, start: int, length: int) -> bytes:
        data = self._storage.read_range(self.uri, start, start + length)
        self.bytes_fetched += len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        remaining = self._size - self._pos
        if remaining <= 0:
            return b""
        n = remaining if size is None or size < 0 else min(size, remaining)
        if n == 0:
            return b""
        offset = self._pos - self._buf_start
        if offset >= 0 and offset + n <= len(self._buf):
            out = self._buf[offset : offset + n]
        elif n >= self.read_ahead:
            out = self._fetch(self._pos, n)  # a big read: fetch it exactly, don't buffer it
        else:
            self._buf_start = self._pos
            self._buf = self._fetch(self._pos, min(self.read_ahead, remaining))
            out = self._buf[:n]
        self._pos += len(out)
        return out

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._buf = b""
        super().close()


def storage_for(uri: str, **s3_options: Any) -> Storage:
    """The backend for ``uri``: :class:`S3Storage` for ``s3://``, else :class:`LocalStorage`.

    ``s3_options`` go to :class:`S3Storage` (thresholds, part size, read-ahead).
    """
    if is_s3(uri):
        return S3Storage(**s3_options)
    return LocalStorage()
