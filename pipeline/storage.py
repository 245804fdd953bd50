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

Transient S3 failures (5xx, throttling, request timeouts, dropped connections, a
response body cut short) are retried with capped exponential backoff and jitter, each
retry logged as one WARNING on this module's logger; see :class:`S3Storage`.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import http.client
import io
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, BinaryIO, Protocol, TypeVar, cast

import schemas

__all__ = [
    "DEFAULT_BACKOFF_BASE_S",
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_PART_SIZE",
    "DEFAULT_READ_AHEAD",
    "ENV_BACKOFF_BASE_S",
    "ENV_BACKOFF_MAX_S",
    "ENV_MAX_ATTEMPTS",
    "LocalStorage",
    "ObjectChanged",
    "S3RangeReader",
    "S3Storage",
    "Storage",
    "StorageError",
    "is_s3",
    "join",
    "read_limited",
    "split_s3",
    "storage_for",
]

DEFAULT_MULTIPART_THRESHOLD = 64 << 20
DEFAULT_PART_SIZE = 16 << 20
MIN_PART_SIZE = 5 << 20  # S3's minimum for every part but the last
DEFAULT_READ_AHEAD = 4 << 20
_COPY_CHUNK = 1 << 20

# Retries of transient S3 failures: attempts in all (first try included), and the
# backoff before retry n (1-based), min(max, base * 2**(n-1)) scaled by a jitter in [0.5, 1].
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_BACKOFF_BASE_S = 0.2
DEFAULT_BACKOFF_MAX_S = 20.0
# Environment overrides, read when an S3Storage is created (forwarded to Ray workers).
ENV_MAX_ATTEMPTS = "REELPACK_S3_MAX_ATTEMPTS"
ENV_BACKOFF_BASE_S = "REELPACK_S3_BACKOFF_BASE_S"
ENV_BACKOFF_MAX_S = "REELPACK_S3_BACKOFF_MAX_S"

T = TypeVar("T")

log = logging.getLogger(__name__)


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the cause."""


class ObjectChanged(StorageError):
    """An S3 object was replaced while it was being read: the bytes read so far belong
    to another version than the rest would."""


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


def naming(error: OSError, path: str, temp: str | None = None) -> OSError:
    """``error`` with ``path`` as its file name: a failed write (no space left, a file
    size limit, an I/O error, ``path`` a folder) says which file. Unchanged when it names
    another file already; one that names ``temp`` (the hidden file written first) names
    ``path`` instead."""
    if error.filename is not None and error.filename != temp:
        return error
    return OSError(error.errno, error.strerror or str(error), path)  # same subclass by errno


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
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            if isinstance(e, OSError):
                raise naming(e, path, temp=tmp) from e
            raise
        # Make the rename itself durable.
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- S3 -----------------------------------------------------------------------------------


def _s3_client() -> tuple[Any, Any]:
    """``(session, client)`` from the standard credential chain and environment.

    The client makes one attempt per call: :class:`S3Storage` owns the retries, so that
    they also cover response bodies cut short, and each one is logged.
    """
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    session = boto3.session.Session()
    region = session.region_name or "us-east-1"
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
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


# Answers worth another attempt: throttling, failures on the server's side, timeouts.
# Every other answer (403, 404, 400, ...) fails at once.
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)


@functools.cache
def _network_errors() -> tuple[type[BaseException], ...]:
    """Failures with no answer, or an answer (head or body) cut short: refused, reset or
    closed connections, timeouts, a body shorter than its ``Content-Length``."""
    from botocore import exceptions as bx
    from urllib3 import exceptions as ux

    return (
        bx.ConnectionError,  # endpoint unreachable, connect timeout
        bx.HTTPClientError,  # connection closed, read timeout, response stream broken
        bx.IncompleteReadError,
        ux.ProtocolError,
        ux.TimeoutError,
        http.client.IncompleteRead,
    )


def _transient_cause(exc: BaseException) -> str | None:
    """Why ``exc`` deserves another attempt (``"503 SlowDown"``,
    ``"ResponseStreamingError: ..."``), or None when it does not."""
    from botocore.exceptions import ChecksumError, ClientError, FlexibleChecksumError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code not in _TRANSIENT_CODES and status not in _TRANSIENT_STATUSES:
            return None
        parts = [str(status)] if status else []
        if code and code not in parts:
            parts.append(code)
        return " ".join(parts)
    # A body whose checksum does not match was damaged on the way: fetch it again.
    mismatch = isinstance(exc, FlexibleChecksumError) and "did not match" in str(exc)
    if isinstance(exc, (*_network_errors(), ChecksumError)) or mismatch:
        return _describe(exc)
    return None


def _describe(exc: BaseException) -> str:
    """``"Type: message"``, without botocore's note on its own retries (it makes none)."""
    return re.sub(r" \(reached max retries: \d+\)", "", f"{type(exc).__name__}: {exc}")


def _multipart_etag(parts: builtins.list[dict[str, Any]]) -> str | None:
    """The ETag S3 gives an object completed from ``parts``: the MD5 of the parts' binary
    MD5s, ``-<number of parts>``; None when a part's ETag is not a plain MD5."""
    try:
        digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
    except ValueError:
        return None
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


def _setting(name: str, value: float | None, env: str, default: float, minimum: float) -> float:
    """``value``, else ``$env``, else ``default``; at least ``minimum``."""
    source = name
    if value is None:
        raw = os.environ.get(env, "").strip()
        if not raw:
            return default
        source = f"${env}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{source} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also rejects NaN
        raise ValueError(f"{source} must be >= {minimum}, got {value}")
    return value


class S3Storage:
    """S3 through boto3 (standard credential chain, ``AWS_ENDPOINT_URL[_S3]``, region
    ``us-east-1`` when unset).

    Files above ``multipart_threshold`` are uploaded in ``part_size`` parts,
    ``max_concurrency`` at a time; a failed multipart upload is aborted, so nothing
    partial is ever visible. ``open`` streams with ranged GETs and a ``read_ahead`` buffer.

    Transient failures are retried: HTTP 500/502/503/504/429, throttling (``SlowDown``)
    and timeout (``RequestTimeout``) codes, connections refused, reset or closed, and
    response bodies cut short (a GET is repeated whole, body included). Every operation
    gets up to ``max_attempts`` attempts in all (each multipart part and each page of a
    listing its own); before retry ``n`` it sleeps ``min(backoff_max_s, backoff_base_s *
    2**(n-1))`` times a random factor in [0.5, 1], and logs one WARNING on the
    ``pipeline.storage`` logger naming the operation, URI, cause, attempt and delay. Other
    errors (403, 404, 400, ...) fail at once. When attempts run out, the
    :class:`StorageError` names the operation, URI, attempts and last cause. Settings left
    None come from ``$REELPACK_S3_MAX_ATTEMPTS``, ``$REELPACK_S3_BACKOFF_BASE_S`` and
    ``$REELPACK_S3_BACKOFF_MAX_S``, else the ``DEFAULT_*`` constants.
    """

    def __init__(
        self,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = 4,
        read_ahead: int = DEFAULT_READ_AHEAD,
        max_attempts: int | None = None,
        backoff_base_s: float | None = None,
        backoff_max_s: float | None = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be >= {MIN_PART_SIZE} bytes (S3 minimum), got {part_size}"
            )
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max(1, max_concurrency)
        self.read_ahead = read_ahead
        # ranged reads ask for the version a reader opened, unless the store turns that down
        self.pin_versions = True
        attempts = _setting(
            "max_attempts", max_attempts, ENV_MAX_ATTEMPTS, DEFAULT_MAX_ATTEMPTS, minimum=1
        )
        if attempts != int(attempts):
            raise ValueError(f"max_attempts must be a whole number, got {attempts}")
        self.max_attempts = int(attempts)
        self.backoff_base_s = _setting(
            "backoff_base_s", backoff_base_s, ENV_BACKOFF_BASE_S, DEFAULT_BACKOFF_BASE_S, 0.0
        )
        self.backoff_max_s = _setting(
            "backoff_max_s", backoff_max_s, ENV_BACKOFF_MAX_S, DEFAULT_BACKOFF_MAX_S, 0.0
        )
        self._client: Any = None
        self._session: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # Never the credentials: only where we talk to.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return f"S3Storage(endpoint={endpoint or 'aws'!r})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use (thread-safe). It makes one attempt
        per call: the retries are this class's methods'."""
        with self._lock:
            if self._client is None:
                self._session, self._client = _s3_client()
            return self._client

    def _fail(
        self, op: str, uri: str, exc: BaseException, attempts: int = 1, exhausted: bool = False
    ) -> OSError:
        """An exception naming the operation, URI and cause (and the attempts made, when
        more than one), with any credential scrubbed."""
        cause = _describe(exc)
        if exhausted:
            tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
            msg = f"{op} {uri}: gave up after {tries}; last error {cause}"
        elif attempts > 1:
            msg = f"{op} {uri}: {cause} (on attempt {attempts})"
        else:
            msg = f"{op} {uri}: {cause}"
        msg = self._scrub(msg)
        if _is_missing(exc):
            return FileNotFoundError(msg)
        return StorageError(msg)

    def _scrub(self, text: str) -> str:
        """``text`` with every credential that appears as a whole token masked; a short
        test key such as ``x`` leaves the ``x`` in ``exist`` alone."""
        for secret in self._secrets():
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
        return text

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

    def _delay(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based): capped exponential
        backoff, jittered so that many clients throttled together spread out."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(retry - 1, 60))
        return ceiling * random.uniform(0.5, 1.0)

    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        """``fn()``, attempted up to ``max_attempts`` times while it fails transiently.

        Any failure leaves as a :class:`StorageError` (``FileNotFoundError`` for a missing
        object) naming ``op`` and ``uri``. ``fn`` must be safe to repeat: every S3 call
        here is idempotent, and reads consume their whole body inside ``fn``.
        """
        attempt = 1
        while True:
            try:
                return fn()
            except (FileNotFoundError, StorageError):
                raise  # already named: a nested call, which did its own retries
            except Exception as exc:
                cause = _transient_cause(exc)
                if cause is None:
                    raise self._fail(op, uri, exc, attempt) from None
                if attempt >= self.max_attempts:
                    raise self._fail(op, uri, exc, attempt, exhausted=True) from None
                delay = self._delay(attempt)
                log.warning(
                    "S3 %s %s: attempt %d/%d failed (%s); retrying in %.2f s",
                    op,
                    uri,
                    attempt,
                    self.max_attempts,
                    self._scrub(cause),
                    delay,
                )
                time.sleep(delay)
                attempt += 1

    # -- reads ---------------------------------------------------------------------------

    def list(self, prefix: str) -> builtins.list[str]:
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"  # a folder, not every key that merely starts with the same letters
        out: builtins.list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
            if token:
                kwargs["ContinuationToken"] = token
            # Each page is its own retried call: a fault late in a long listing repeats one page.
            page = self._call(
                "list", prefix, functools.partial(self.client.list_objects_v2, **kwargs)
            )
            for obj in page.get("Contents", ()):
                name = obj["Key"]
                if not name.endswith("/"):  # folder markers some stores list
                    out.append(f"s3://{bucket}/{name}")
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(out)

    def read(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        # The body is read inside the retried call, so a body cut short is fetched again.
        return self._call(
            "read", uri, lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        )

    def read_range(self, uri: str, start: int, end: int, *, etag: str | None = None) -> bytes:
        """Bytes ``[start, end)``; with ``etag``, only of that version of the object
        (:class:`ObjectChanged` once it has been replaced)."""
        if end <= start:
            return b""
        bucket, key = split_s3(uri)
        byte_range = f"bytes={start}-{end - 1}"

        def go() -> bytes:
            pinned = etag if etag and self.pin_versions else None
            try:
                resp = self.client.get_object(
                    Bucket=bucket,
                    Key=key,
                    Range=byte_range,
                    **({"IfMatch": pinned} if pinned else {}),
                )
            except Exception as exc:
                code = _error_code(exc)
                if code in {"InvalidRange", "416"}:
                    return b""  # start at or past the end, like a local read
                if pinned and code in {"PreconditionFailed", "412"}:
                    raise ObjectChanged(
                        f"read_range {uri}: the object was replaced while it was read "
                        "(its ETag changed): read it again once it stays put"
                    ) from None
                if pinned and code in {"NotImplemented", "501"}:
                    self.pin_versions = False  # a store without conditional reads
                    log.warning(
                        "the S3 store does not take If-Match on reads (%s): sources are "
                        "read unpinned, so one replaced while it is read goes unnoticed",
                        code,
                    )
                    resp = self.client.get_object(Bucket=bucket, Key=key, Range=byte_range)
                    return cast(bytes, resp["Body"].read())
                raise
            return cast(bytes, resp["Body"].read())

        return self._call("read_range", uri, go)

    def size(self, uri: str) -> int:
        return self.stat(uri)[0]

    def stat(self, uri: str) -> tuple[int, str | None]:
        """The object's size and ETag (the version a reader pins)."""
        bucket, key = split_s3(uri)
        head = self._call("size", uri, lambda: self.client.head_object(Bucket=bucket, Key=key))
        return int(head["ContentLength"]), head.get("ETag")

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        if not key:
            return False

        def go() -> bool:
            try:
                self.client.head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                if _is_missing(exc):
                    return False
                raise
            return True

        return self._call("exists", uri, go)

    def download(self, uri: str, local_path: str) -> None:
        bucket, key = split_s3(uri)

        def fill(f: IO[bytes]) -> None:
            def go() -> None:
                f.seek(0)  # a retry starts over: what an earlier attempt wrote may be damaged
                f.truncate()
                body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                shutil.copyfileobj(body, f, _COPY_CHUNK)

            self._call("download", uri, go)

        self._call("download", uri, lambda: LocalStorage._atomic(local_path, fill))

    def open(self, uri: str) -> BinaryIO:
        return cast(BinaryIO, S3RangeReader(self, uri, self.read_ahead))

    # -- writes --------------------------------------------------------------------------

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)

        def go() -> None:
            try:
                self.client.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:
                if not _is_missing(exc):
                    raise

        self._call("delete", uri, go)

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
            resp = self._call(
                f"upload part {number}",
                uri,
                lambda: self.client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                ),
            )
            return {"PartNumber": number, "ETag": resp["ETag"]}

        try:
            with ThreadPoolExecutor(self.max_concurrency) as pool:
                futures = [pool.submit(put_part, i + 1, off) for i, off in enumerate(offsets)]
                try:
                    parts = [fut.result() for fut in futures]
                except BaseException:
                    for fut in futures:  # parts not yet started would be wasted work
                        fut.cancel()
                    raise
            self._complete(uri, upload_id, parts)
        except BaseException as exc:
            # The original failure is what matters; lifecycle rules reap an unaborted upload.
            with contextlib.suppress(Exception):
                if isinstance(exc, Exception):
                    self.abort_upload(uri, upload_id)
                else:  # interrupted: one attempt, no waiting
                    self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            if isinstance(exc, (FileNotFoundError, StorageError)):
                raise
            if isinstance(exc, Exception):
                raise self._fail("upload", uri, exc) from None
            raise

    def _complete(self, uri: str, upload_id: str, parts: builtins.list[dict[str, Any]]) -> None:
        """Complete a multipart upload, retried. If an attempt completed it but its answer
        was lost, the next one finds no such upload: success when the object there has the
        ETag these parts give."""
        bucket, key = split_s3(uri)
        attempts = 0

        def go() -> None:
            nonlocal attempts
            attempts += 1
            try:
                self.client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
            except Exception as exc:
                if attempts == 1 or _error_code(exc) != "NoSuchUpload":
                    raise
                expected = _multipart_etag(parts)
                head = self.client.head_object(Bucket=bucket, Key=key)
                if expected is None or str(head.get("ETag", "")).strip('"') != expected:
                    raise

        self._call("upload", uri, go)

    def abort_uploads(self, prefix: str) -> int:
        """Abort every unfinished multipart upload below the folder ``prefix`` (what a
        killed writer leaves); returns how many."""
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
        aborted = 0
        while True:
            page = self._call(
                "list uploads",
                prefix,
                functools.partial(self.client.list_multipart_uploads, **kwargs),
            )
            for upload in page.get("Uploads", ()):
                self.abort_upload(f"s3://{bucket}/{upload['Key']}", upload["UploadId"])
                aborted += 1
            if not page.get("IsTruncated") or not page.get("NextKeyMarker"):
                return aborted
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

    def abort_upload(self, uri: str, upload_id: str) -> None:
        """Abort the multipart upload ``upload_id`` to ``uri``; one already gone is fine."""
        bucket, key = split_s3(uri)

        def go() -> None:
            try:
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as exc:
                if _error_code(exc) != "NoSuchUpload":
                    raise

        self._call("upload abort", uri, go)


class S3RangeReader(io.RawIOBase):
    """A seekable read-only view of one S3 object, backed by ranged GETs.

    Reads are served from a buffer of up to ``read_ahead`` bytes fetched at the
    current position, so memory stays bounded whatever the object's size.
    ``bytes_fetched`` counts the bytes actually transferred. Every GET asks for the
    version the reader opened (its ETag): an object replaced while it is read raises
    :class:`ObjectChanged` rather than mixing two versions' bytes.
    """

    def __init__(self, storage: S3Storage, uri: str, read_ahead: int = DEFAULT_READ_AHEAD) -> None:
        super().__init__()
        self.uri = uri
        self.read_ahead = max(1, read_ahead)
        self.bytes_fetched = 0
        self._storage = storage
        self._size, self._etag = storage.stat(uri)
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
        data = self._storage.read_range(self.uri, start, start + length, etag=self._etag)
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
        head = b""
        if 0 <= offset < len(self._buf):
            # Serve what the buffer holds; only the rest is fetched (never bytes twice).
            head = self._buf[offset : offset + n]
            self._pos += len(head)
            n -= len(head)
            remaining -= len(head)
            if n == 0:
                return head
        if n >= self.read_ahead:
            out = self._fetch(self._pos, n)  # a big read: fetch it exactly, don't buffer it
        else:
            self._buf_start = self._pos
            self._buf = self._fetch(self._pos, min(self.read_ahead, remaining))
            out = self._buf[:n]
        self._pos += len(out)
        return head + out if head else out

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


def read_limited(uri: str, max_bytes: int, what: str = "a file") -> bytes:
    """The whole file or object at ``uri``, for a reader that needs it in memory. One
    over ``max_bytes`` is not read: ``ValueError`` says what it is (``what``), its size
    and the limit."""
    storage = storage_for(uri)
    size = storage.size(uri)
    if size > max_bytes:
        raise ValueError(
            f"{what} of {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB "
            "it may take in memory"
        )
    return storage.read(uri)


def storage_for(uri: str, **s3_options: Any) -> Storage:
    """The backend for ``uri``: :class:`S3Storage` for ``s3://``, else :class:`LocalStorage`.

    ``s3_options`` go to :class:`S3Storage` (thresholds, part size, read-ahead).
    """
    schemas.storage_location(uri)  # another scheme raises, never becomes a local folder
    if is_s3(uri):
        return S3Storage(**s3_options)
    return LocalStorage()
