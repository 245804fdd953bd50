"""One writer per corpus: ``<root>/lock.json``, held while a build or refilter writes.

Opening a corpus for writing deletes what a killed run left behind (see
``pipeline.writer``), so a second writer on the same root would delete the first
one's shard in progress and then number its parts alike. The lock prevents that:

    {"run": "<uuid>", "host": "...", "pid": 123, "pidns": "...", "started": "...",
     "heartbeat": 1.7e9}

A writer takes it when it opens the corpus and refreshes ``heartbeat`` from a
background thread every ``stale_s / 4`` seconds; :meth:`CorpusLock.release` removes
it. Opening a corpus whose lock is held by a live process of this host fails at once
with :class:`CorpusLocked` naming the holder; a holder on another host (a retried Ray
job's driver may run in another pod) is waited for up to ``stale_s`` until it releases
the lock or its heartbeat goes stale. The lock of a dead run is taken over when its
process is gone (same host) or its heartbeat is older than ``stale_s``. A writer whose
lock was taken over stops committing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from pipeline.storage import Storage, join
from schemas import LOCK_NAME

__all__ = ["STALE_S", "CorpusLock", "CorpusLocked"]

STALE_S = 120.0  # a lock whose heartbeat is older than this belongs to a dead run

log = logging.getLogger(__name__)


class CorpusLocked(RuntimeError):
    """Another live writer holds the corpus (or took it over from this one)."""


def _pid_namespace() -> str:
    """Which process ids ``pid`` is one of: containers sharing a host name (host
    networking) have their own."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class CorpusLock:
    """The write lock of the corpus at ``root`` (see the module docstring)."""

    def __init__(self, root: str, st: Storage, stale_s: float = STALE_S) -> None:
        self.root, self._st, self.stale_s = root, st, stale_s
        self.uri = join(root, LOCK_NAME)
        self.run = uuid.uuid4().hex
        self.host, self.pid, self.pidns = socket.gethostname(), os.getpid(), _pid_namespace()
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.lost: str | None = None  # who took the lock over, once someone has
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock. A live writer of this host refuses at once (CorpusLocked); one
        of another host is waited for until it releases the lock or its heartbeat goes
        stale, as a dead one's does (a retried Ray job whose driver moved), and refuses
        if it is still beating after ``stale_s``."""
        deadline: float | None = None
        while (held := self._read()) is not None:
            why = self._takeover_reason(held)
            if why is not None:
                log.warning("taking over the lock of %s: %s (%s)", self.root, why, _holder(held))
                break
            age = time.time() - float(held.get("heartbeat", 0.0))
            if self._here(held) or (deadline is not None and time.monotonic() > deadline):
                raise CorpusLocked(
                    f"{self.root} is being written by another run ({_holder(held)}, last "
                    f"heartbeat {age:.0f} s ago). Wait for it to finish, or delete "
                    f"{self.uri} if you know it is dead"
                )
            if deadline is None:
                deadline = time.monotonic() + self.stale_s
                log.warning(
                    "%s is locked by %s (heartbeat %.0f s ago); waiting up to %.0f s for it "
                    "to finish or go stale",
                    self.root,
                    _holder(held),
                    age,
                    self.stale_s,
                )
            time.sleep(min(5.0, self.stale_s / 8))
        self._write()
        self._thread = threading.Thread(target=self._beat, name="reelpack-corpus-lock", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`CorpusLocked` if another run took the lock over (before a commit)."""
        if self.lost is not None:
            raise CorpusLocked(f"{self.root}: this run lost its lock to {self.lost}; stopped")

    def release(self, quick: bool = False) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's. ``quick``
        (a writer dropped without unlock, released by the garbage collector at whatever
        point it runs): one storage attempt per call, no retries, so a store that is
        gone costs no minutes of backoff there."""
        if quick and hasattr(self._st, "max_attempts"):
            self._st.max_attempts = 1  # the dropped writer's own storage object
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        # Release runs in `finally` blocks: storage trouble here must not hide the error
        # being raised; a lock left behind is taken over later.
        with contextlib.suppress(OSError):
            held = self._read()
            if held is not None and held.get("run") == self.run:
                self._st.delete(self.uri)

    def _takeover_reason(self, held: dict[str, Any]) -> str | None:
        """Why a lock found on the corpus belongs to no live writer (None: it does)."""
        if self._here(held):
            pid = int(held.get("pid", -1))
            if pid == self.pid:
                return "left by an earlier writer of this process"
            if not _alive(pid):
                return f"its process {pid} is gone"
        age = time.time() - float(held.get("heartbeat", 0.0))
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _here(self, held: dict[str, Any]) -> bool:
        """Whether the holder's pid is a process id of this host, as this one sees them."""
        return held.get("host") == self.host and held.get("pidns", "") == self.pidns

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            try:
                held = self._read()
                if held is None or held.get("run") != self.run:
                    self.lost = _holder(held) if held is not None else "a deleted lock file"
                    log.warning("%s: lock taken over by %s", self.root, self.lost)
                    return
                self._write()
            except OSError as e:  # storage trouble: the next beat tries again
                log.warning("%s: lock heartbeat failed: %s", self.root, e)

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self._st.read(self.uri))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign content: nobody can hold it
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self) -> None:
        body = {
            "run": self.run,
            "host": self.host,
            "pid": self.pid,
            "pidns": self.pidns,
            "started": self.started,
            "heartbeat": time.time(),
        }
        self._st.write(self.uri, json.dumps(body).encode())


def _holder(held: dict[str, Any]) -> str:
    return (
        f"run {held.get('run', '?')} on host {held.get('host', '?')}, pid {held.get('pid', '?')}, "
        f"started {held.get('started', '?')}"
    )
