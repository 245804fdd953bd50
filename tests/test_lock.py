"""One writer per corpus: the lock file, its heartbeat, and taking over a dead run's lock."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import schemas
from pipeline.lock import CorpusLock, CorpusLocked
from pipeline.storage import S3Storage, join, storage_for
from pipeline.writer import CorpusWriter, read_index
from reelpack.cli import main


def _hold(root: str, *, host: str, pid: int, age_s: float = 0.0) -> None:
    """A lock as another writer leaves it (in this process's pid namespace)."""
    body = {"run": "other-run", "host": host, "pid": pid, "started": "earlier"}
    body["pidns"] = CorpusLock(root, storage_for(root)).pidns
    body["heartbeat"] = time.time() - age_s
    storage_for(root).write(join(root, schemas.LOCK_NAME), json.dumps(body).encode())


def _lock(root: str) -> dict | None:
    st = storage_for(root)
    uri = join(root, schemas.LOCK_NAME)
    return json.loads(st.read(uri)) if st.exists(uri) else None


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A process of this host that is alive until the test ends."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_while_the_holder_lives(tmp_path: Path, live_pid: int) -> None:
    root = str(tmp_path / "corpus")
    _hold(root, host=socket.gethostname(), pid=live_pid)
    (tmp_path / "corpus" / "shards").mkdir()
    in_progress = tmp_path / "corpus" / "shards" / ".shard-000000.tar.tmp-abc"
    in_progress.write_bytes(b"the other run's shard")
    with pytest.raises(
        CorpusLocked, match=rf"another run \(run other-run on host .*pid {live_pid}"
    ):
        CorpusWriter(root)
    assert in_progress.exists()  # refused before cleaning up anything
    assert _lock(root)["run"] == "other-run"


def test_a_dead_runs_lock_is_taken_over_and_released(tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    proc = subprocess.Popen(["true"])
    proc.wait()  # a process of this host that has exited
    _hold(root, host=socket.gethostname(), pid=proc.pid)
    writer = CorpusWriter(root)
    held = _lock(root)
    assert held["run"] != "other-run" and held["pid"] != proc.pid
    writer.close()
    assert _lock(root) is not None  # closing commits; the lock stays until unlock
    writer.unlock()
    assert _lock(root) is None


def test_another_hosts_lock_is_waited_for_until_released_or_stale(tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    st = storage_for(root)
    # a holder that keeps beating: refused once the wait (stale_s) is over
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.05):
            _hold(root, host="some-other-pod", pid=1)

    _hold(root, host="some-other-pod", pid=1)
    beating = threading.Thread(target=beat)
    beating.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(CorpusLocked, match="being written by another run"):
            CorpusLock(root, st, stale_s=0.6).acquire()
    finally:
        stop.set()
        beating.join()
    assert time.monotonic() - t0 >= 0.6
    # a holder that stopped beating (its driver died in another pod): taken over
    _hold(root, host="some-other-pod", pid=1)
    lock = CorpusLock(root, st, stale_s=0.6)
    lock.acquire()
    assert _lock(root)["run"] == lock.run
    lock.release()
    # pid 1 of this host is alive and its heartbeat fresh: refused at once
    _hold(root, host=socket.gethostname(), pid=1)
    with pytest.raises(CorpusLocked):
        CorpusLock(root, st, stale_s=30.0).acquire()
    # ... but a host of the same name with another pid namespace (a container on host
    # networking) is another host: its pid 1 is not ours, so its heartbeat decides
    held = _lock(root)
    held["pidns"] = "another-container"
    st.write(join(root, schemas.LOCK_NAME), json.dumps(held).encode())
    lock = CorpusLock(root, st, stale_s=0.6)
    lock.acquire()
    lock.release()
    assert _lock(root) is None


def test_the_heartbeat_refreshes_and_a_writer_that_lost_the_lock_stops(tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    lock = CorpusLock(root, storage_for(root), stale_s=0.4)
    lock.acquire()
    first = _lock(root)["heartbeat"]
    deadline = time.monotonic() + 5
    while _lock(root)["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lock(root)["heartbeat"] > first
    lock.check()
    _hold(root, host="some-other-pod", pid=1)  # a run that took it over
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(CorpusLocked, match="lost its lock to run other-run"):
        lock.check()
    lock.release()
    assert _lock(root)["run"] == "other-run"  # never removes someone else's lock


def test_build_refuses_a_corpus_another_run_writes(
    tmp_path: Path, live_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    _hold(str(root), host=socket.gethostname(), pid=live_pid)
    assert main(["build", str(video), "--out", str(root)]) == 1
    err = capsys.readouterr().err
    assert "is being written by another run" in err and "CorpusLocked" not in err
    assert not (root / "index").exists()


def test_storage_that_fails_before_the_build_starts_says_nothing_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An endpoint that does not answer while the sources are listed, or the corpus
    root is read: one line naming it, and no "run again to resume" (nothing started)."""
    import socket as sockets

    with sockets.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
        "REELPACK_S3_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    for args in (
        ["build", "s3://raw/videos/", "--out", str(tmp_path / "c")],
        ["build", str(video), "--out", "s3://corpora/v1"],
    ):
        assert main([*args, "--preset", "tiny"]) == 1
        err = capsys.readouterr().err
        assert "Could not connect to the endpoint URL" in err
        assert "nothing was built or written" in err and "resume" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_the_lock_on_s3(s3_bucket: str, live_pid: int) -> None:
    root = join(s3_bucket, "corpus")
    _hold(root, host=socket.gethostname(), pid=live_pid)
    with pytest.raises(CorpusLocked):
        CorpusWriter(root)
    _hold(root, host="some-other-pod", pid=1, age_s=500.0)
    with CorpusWriter(root) as writer:
        assert _lock(root)["run"] == writer._lock.run
    assert not S3Storage().exists(join(root, schemas.LOCK_NAME))
    assert read_index(root).num_rows == 0


def test_release_never_hides_the_error_being_raised(tmp_path: Path) -> None:
    class Broken:  # storage that has started failing
        def __init__(self) -> None:
            self.inner, self.down = storage_for(str(tmp_path)), False

        def read(self, uri: str) -> bytes:
            if self.down:
                raise OSError("storage down")
            return self.inner.read(uri)

        def write(self, uri: str, data: bytes) -> None:
            self.inner.write(uri, data)

        def delete(self, uri: str) -> None:
            self.inner.delete(uri)

    st = Broken()
    lock = CorpusLock(str(tmp_path / "corpus"), st, stale_s=30.0)  # type: ignore[arg-type]
    lock.acquire()
    st.down = True
    lock.release()  # no OSError: the lock stays for the next run to take over
    assert _lock(str(tmp_path / "corpus")) is not None


def test_a_writer_dropped_without_unlock_releases_its_lock(tmp_path: Path) -> None:
    import gc

    root = str(tmp_path / "c")
    writer = CorpusWriter(root)
    lock = Path(root) / schemas.LOCK_NAME
    beat = writer._lock._thread
    assert lock.exists() and beat is not None and beat.is_alive()
    del writer
    gc.collect()
    assert not lock.exists() and not beat.is_alive()  # no heartbeat left running
