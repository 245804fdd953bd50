"""Transient S3 failures, injected on loopback, are retried with backoff and logged.

A fault-injecting proxy (:mod:`faulty_s3`) sits between reelpack and a real SeaweedFS:
it answers 5xx and throttling errors, drops connections and cuts response bodies short.
Every storage operation must still return exact bytes, log each retry, fail at once on
errors that are not transient, and give up in bounded time naming what it tried. A
whole build reading and writing S3 through the proxy must equal a fault-free build.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from faulty_s3 import ERRORS, TRANSIENT, FaultyS3, Request, always, first_attempts

from pipeline.storage import (
    ENV_BACKOFF_BASE_S,
    ENV_BACKOFF_MAX_S,
    ENV_MAX_ATTEMPTS,
    S3Storage,
    StorageError,
    join,
    split_s3,
)

MiB = 1 << 20
LOGGER = "pipeline.storage"


@pytest.fixture
def proxy(s3_server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3]:
    """A fault-free proxy to the session's SeaweedFS; ``AWS_ENDPOINT_URL`` points at it."""
    with FaultyS3(s3_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        yield p


def _fast(**kwargs: int) -> S3Storage:
    """Retries with millisecond backoff, so tests spend their time on requests."""
    return S3Storage(max_attempts=8, backoff_base_s=0.001, backoff_max_s=0.01, **kwargs)


def _retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "retrying in" in r.getMessage()
    ]


def _seed(s3_server, uri: str, data: bytes) -> None:
    """Write straight to SeaweedFS, past the proxy."""
    bucket, key = split_s3(uri)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)


class _Echo(BaseHTTPRequestHandler):
    """An upstream that answers with the request it got: headers, then the raw body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_PUT(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            raw = b""
            while not raw.endswith(b"\r\n\r\n"):  # the last chunk, no trailers
                raw += self.rfile.read(1)
        else:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = str(self.headers).encode() + b"\n--\n" + raw
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")  # relayed with a Content-Length
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


def test_proxy_forwards_requests_byte_for_byte() -> None:
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with FaultyS3(f"http://127.0.0.1:{echo.server_port}") as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint.rsplit(":", 1)[1]))
            chunked = b"5;chunk-signature=ab\r\nhello\r\n0;chunk-signature=cd\r\n\r\n"
            headers = {
                "Host": "signed-host:1234",
                "Transfer-Encoding": "chunked",
                "Content-Encoding": "aws-chunked",
                "X-Amz-Decoded-Content-Length": "5",
            }
            conn.request("PUT", "/b/k?partNumber=1", body=chunked, headers=headers)
            resp = conn.getresponse()
            got_headers, got_body = resp.read().split(b"\n--\n", 1)
            assert resp.status == 200 and got_body == chunked  # framing and signatures kept
            for name, value in headers.items():
                assert f"{name}: {value}".encode() in got_headers
            conn.request("PUT", "/b/k", body=b"plain", headers={"Content-Length": "5"})
            assert conn.getresponse().read().endswith(b"\n--\nplain")  # same connection
            assert [r.query for r in proxy.requests] == ["partNumber=1", ""]
            conn.close()
    finally:
        echo.shutdown()
        echo.server_close()


def test_every_operation_survives_transient_faults(
    proxy: FaultyS3, s3_server, s3_bucket: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    st = _fast(multipart_threshold=5 * MiB, part_size=5 * MiB, read_ahead=64 << 10)
    small = os.urandom(300_000)
    big = os.urandom(11 * MiB + 17)  # three parts
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    uri, big_uri = join(s3_bucket, "a", "small.bin"), join(s3_bucket, "a", "big.bin")
    # The first two attempts of every distinct request fail, cycling through every kind.
    proxy.plan = first_attempts(2, TRANSIENT)

    st.write(uri, small)
    assert st.read(uri) == small
    assert st.read_range(uri, 1000, 5000) == small[1000:5000]
    assert st.size(uri) == len(small)
    assert st.exists(uri) and not st.exists(join(s3_bucket, "a", "missing.bin"))
    st.upload(str(src), big_uri)
    assert st.list(s3_bucket) == sorted([uri, big_uri])
    out = tmp_path / "back.bin"
    st.download(big_uri, str(out))
    assert out.read_bytes() == big
    with st.open(big_uri) as f:
        f.seek(6 * MiB)
        assert f.read(100_000) == big[6 * MiB : 6 * MiB + 100_000]
    st.delete(uri)
    assert not st.exists(uri)

    # What is on the server is exact, read past the proxy.
    bucket, key = split_s3(big_uri)
    direct = s3_server.client()
    assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == big
    assert direct.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    injected = proxy.injected()
    assert set(injected) == set(TRANSIENT), injected  # every kind really happened
    assert any(r.fault and "partNumber" in r.query for r in proxy.requests)
    lines = _retry_lines(caplog)
    assert len(lines) == sum(injected.values())  # one WARNING per retried failure
    for text in ("503 SlowDown", "500 InternalError", "400 RequestTimeout", "429"):
        assert any(text in line for line in lines), (text, lines)
    assert any("ResponseStreamingError" in line or "IncompleteRead" in line for line in lines)
    assert any(line.startswith(f"S3 write {uri}: attempt 1/8 failed") for line in lines)
    assert any(line.startswith(f"S3 upload part 2 {big_uri}: attempt 2/8") for line in lines)
    assert all("retrying in" in line and " s" in line for line in lines)
    for secret in (s3_server.secret_key, s3_server.access_key):
        assert not any(secret in line for line in lines)


def test_a_store_without_conditional_reads_is_read_unpinned(
    proxy: FaultyS3, s3_server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that answers If-Match with 501 NotImplemented: the reader's first pinned
    GET is made again without it, and later ones go without it, with one warning."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    data = os.urandom(700_000)
    uri = join(s3_bucket, "plain.bin")
    _seed(s3_server, uri, data)
    proxy.plan = always("nocond", match=lambda r: bool(r.if_match))
    st = _fast(read_ahead=128 << 10)
    with st.open(uri) as f:
        assert f.read() == data  # a big read: one GET
        f.seek(1000)
        assert f.read(200_000) == data[1000:201_000]
    assert proxy.injected() == {"nocond": 1} and not st.pin_versions
    assert [r.if_match for r in proxy.seen("GET")].count("") == len(proxy.seen("GET")) - 1
    warned = [r.getMessage() for r in caplog.records if "If-Match" in r.getMessage()]
    assert len(warned) == 1 and "read unpinned" in warned[0], warned


def test_bodies_cut_short_are_fetched_again(
    proxy: FaultyS3, s3_server, s3_bucket: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    data = os.urandom(3 * MiB + 5)
    uri, other = join(s3_bucket, "cut.bin"), join(s3_bucket, "cut-too.bin")
    _seed(s3_server, uri, data)
    _seed(s3_server, other, data)  # a download's GET is a read's: another object
    st = _fast(read_ahead=256 << 10)
    # Every GET's first attempt sends its head and half its body, then hangs up.
    proxy.plan = first_attempts(1, ["cut"], match=lambda r: r.method == "GET")

    assert st.read(uri) == data
    assert st.read_range(uri, 10, 2 * MiB) == data[10 : 2 * MiB]
    out = tmp_path / "cut.bin"
    st.download(other, str(out))
    assert out.read_bytes() == data
    with st.open(uri) as f:
        f.seek(MiB)
        assert f.read(1000) == data[MiB : MiB + 1000]
        assert f.read(300 << 10) == data[MiB + 1000 : MiB + 1000 + (300 << 10)]

    gets = proxy.seen("GET")
    assert proxy.injected()["cut"] == len({r.key for r in gets}) == 5
    assert all(r.attempt <= 2 for r in gets)  # one retry each, no more
    lines = _retry_lines(caplog)
    assert len(lines) == 5
    for op, name in (("read", uri), ("read_range", uri), ("download", other)):
        assert any(line.startswith(f"S3 {op} {name}: attempt 1/8 failed (") for line in lines)
    assert all("IncompleteRead" in line for line in lines)


@pytest.mark.parametrize("then", ["forward", "gone", "gone-elsewhere"])
def test_a_lost_reply_to_complete_is_recognised(
    proxy: FaultyS3, s3_server, s3_bucket: str, tmp_path, then: str
) -> None:
    data = os.urandom(10 * MiB + 1)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = join(s3_bucket, "lost-reply.bin")
    st = _fast(multipart_threshold=5 * MiB, part_size=5 * MiB)

    bucket, key = split_s3(uri)

    # The store completes the upload, but the reply never arrives. The retry is then
    # answered 200 (SeaweedFS, and S3 for a while) or 404 NoSuchUpload (S3 later): the
    # object's ETag, that of these very parts, shows the upload did complete, unless
    # the object there is another one by then.
    def plan(r: Request) -> str | None:
        if r.method != "POST" or "uploadId" not in r.query:
            return None
        if r.attempt == 1:
            return "drop"
        if then == "gone-elsewhere":
            s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"someone else")
        return None if then == "forward" else "gone"

    proxy.plan = plan
    if then == "gone-elsewhere":
        with pytest.raises(StorageError, match=r"upload .*lost-reply\.bin: .*NoSuchUpload"):
            st.upload(str(src), uri)
        return
    st.upload(str(src), uri)
    create, first, second = proxy.seen("POST", path_contains="lost-reply")
    assert "uploads" in create.query and first.fault == "drop" and first.status == 200
    assert second.status == (200 if then == "forward" else 404)
    assert st.read(uri) == data


@pytest.mark.parametrize(
    ("fault", "op", "expected", "exc"),
    [
        ("denied", "read", "AccessDenied", StorageError),
        ("denied", "size", "403", StorageError),
        ("invalid", "write", "InvalidArgument", StorageError),
        (None, "read", "NoSuchKey", FileNotFoundError),
        (None, "read_bucket", "NoSuchBucket", FileNotFoundError),
    ],
)
def test_errors_that_are_not_transient_fail_at_once(
    proxy: FaultyS3,
    s3_bucket: str,
    caplog: pytest.LogCaptureFixture,
    fault: str | None,
    op: str,
    expected: str,
    exc: type[Exception],
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    st = S3Storage(max_attempts=8, backoff_base_s=1.0)  # a retry would take seconds
    uri = join(s3_bucket, "no-such-object.bin")
    if fault is not None:
        proxy.plan = always(fault)
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        if op == "read":
            st.read(uri)
        elif op == "size":
            st.size(uri)
        elif op == "write":
            st.write(uri, b"x")
        else:
            uri = "s3://reelpack-no-such-bucket/k.bin"
            st.read(uri)
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert msg.startswith(f"{'read' if op == 'read_bucket' else op} {uri}: ")
    assert expected in msg and "attempts" not in msg
    assert len(proxy.requests) == 1  # never retried
    assert _retry_lines(caplog) == []


@pytest.mark.parametrize("fault", ["slowdown", "reset"])
def test_exhausted_retries_name_op_uri_and_attempts(
    proxy: FaultyS3, s3_bucket: str, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    st = S3Storage(max_attempts=4, backoff_base_s=0.05, backoff_max_s=0.1)
    uri = join(s3_bucket, "always-failing.bin")
    proxy.plan = always(fault)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        st.write(uri, b"payload")
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert msg.startswith(f"write {uri}: gave up after 4 attempts; last error "), msg
    assert (ERRORS["slowdown"][1] if fault == "slowdown" else "ConnectionClosedError") in msg
    assert len(proxy.seen("PUT")) == 4
    # three sleeps, each at most backoff_max_s: bounded, and really waited
    assert 0.05 <= elapsed < 3, elapsed
    lines = _retry_lines(caplog)
    assert [line.split(": attempt ")[1][:3] for line in lines] == ["1/4", "2/4", "3/4"]


def test_backoff_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    st = S3Storage(backoff_base_s=0.2, backoff_max_s=20.0)
    for retry, (low, high) in {1: (0.1, 0.2), 3: (0.4, 0.8), 7: (6.4, 12.8)}.items():
        delays = [st._delay(retry) for _ in range(50)]
        assert all(low <= d <= high for d in delays), (retry, delays)
        assert len(set(delays)) > 1  # jittered
    assert all(10.0 <= st._delay(n) <= 20.0 for n in (10, 50, 1000))  # capped
    defaults = S3Storage()
    assert (defaults.max_attempts, defaults.backoff_base_s, defaults.backoff_max_s) == (
        8,
        0.2,
        20.0,
    )

    monkeypatch.setenv(ENV_MAX_ATTEMPTS, "3")
    monkeypatch.setenv(ENV_BACKOFF_BASE_S, "0.5")
    monkeypatch.setenv(ENV_BACKOFF_MAX_S, "4")
    env = S3Storage()
    assert (env.max_attempts, env.backoff_base_s, env.backoff_max_s) == (3, 0.5, 4.0)
    assert S3Storage(max_attempts=5).max_attempts == 5  # an argument wins
    monkeypatch.setenv(ENV_MAX_ATTEMPTS, "0")
    with pytest.raises(ValueError, match=ENV_MAX_ATTEMPTS):
        S3Storage()
    monkeypatch.setenv(ENV_MAX_ATTEMPTS, "many")
    with pytest.raises(ValueError, match=ENV_MAX_ATTEMPTS):
        S3Storage()
    with pytest.raises(ValueError, match="backoff_base_s"):
        S3Storage(max_attempts=2, backoff_base_s=-1)


# --- a whole build through the faults ------------------------------------------------------


def _split_clip_ids(cfg, sources: list[str]) -> dict[str, str]:
    """clip_id -> source, from probe and split run here without Ray or faults: the clips
    any correct build of ``sources`` has in its index."""
    from pipeline.stages.base import rows_to_batch
    from pipeline.stages.probe import Probe
    from pipeline.stages.split import Split

    split = Split(cfg.split)(Probe(cfg.probe)(rows_to_batch([{"source": s} for s in sources])))
    return {c: s for c, s in zip(split["clip_id"], split["source"], strict=True) if c is not None}


def _shard_keys(st: S3Storage, root: str) -> list[str]:
    """The sample keys in every shard under ``root``, with repeats."""
    keys: list[str] = []
    for uri in st.list(join(root, "shards")):
        with tarfile.open(fileobj=io.BytesIO(st.read(uri))) as tar:
            keys.extend({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


@pytest.mark.slow
def test_build_through_faults_equals_a_fault_free_build(
    proxy: FaultyS3, s3_server, s3_bucket: str, tmp_path, monkeypatch, fresh_ray
) -> None:
    from pipeline.config import load_config
    from pipeline.graph import build
    from pipeline.synth import synth_video
    from pipeline.writer import read_index, read_sources

    monkeypatch.setenv(ENV_BACKOFF_BASE_S, "0.005")
    monkeypatch.setenv(ENV_BACKOFF_MAX_S, "0.05")
    videos = join(s3_bucket, "videos")
    for i, (w, h, shots) in enumerate([(128, 72, [24, 24]), (72, 128, [30])]):
        path = tmp_path / f"v{i}.mp4"
        synth_video(str(path), width=w, height=h, fps=12.0, shots=shots, seed=i)
        _seed(s3_server, join(videos, path.name), path.read_bytes())
    cfg = load_config(
        preset="tiny",
        model_cache=str(tmp_path / "models"),
        split={"min_clip_s": 1.0, "max_clip_s": 3.0},
        write={"shard_max_samples": 2},
    )
    sources = S3Storage().list(videos)
    expected = _split_clip_ids(cfg, sources)  # no faults yet
    assert len(expected) >= 3
    proxy.reset_counts()

    # Every distinct request fails once, by each kind of fault in turn: source reads in
    # the Ray workers (probe, split), corpus writes and listings on the driver.
    proxy.plan = first_attempts(1, TRANSIENT)
    root = join(s3_bucket, "corpus")
    summary = build([videos], root, cfg, echo=lambda _: None)
    proxy.plan = None

    injected = proxy.injected()
    assert set(injected) == set(TRANSIENT), injected
    faulted = [r for r in proxy.requests if r.fault]
    assert any(r.method == "GET" and r.range and "/videos/" in r.path for r in faulted)
    assert any(r.method == "PUT" and "/corpus/shards/" in r.path for r in faulted)
    assert any(r.method == "PUT" and "/corpus/index/" in r.path for r in faulted)
    assert summary["sources_built"] == 2 and summary["clips_by_status"].get("error", 0) == 0

    rows = read_index(root).to_pylist()
    ids = [r["clip_id"] for r in rows]
    assert sorted(ids) == sorted(expected)  # every clip, exactly once
    assert all(expected[r["clip_id"]] == r["source"] for r in rows)
    sources_rows = read_sources(root).to_pylist()
    assert sorted(r["source"] for r in sources_rows) == sources
    assert all(r["status"] != "error" for r in sources_rows)
    kept = sorted(r["key"] for r in rows if r["status"] == "kept")
    assert kept and sorted(_shard_keys(S3Storage(), root)) == kept  # each sample once
