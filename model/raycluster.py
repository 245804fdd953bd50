"""Joining a Ray cluster by address (a wrong address fails in seconds, naming it), and
starting a local one that leaves Ctrl-C to its driver."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["RayUnreachable", "check_reachable", "join_cluster", "sigint_ignored"]

_HINT = (
    "`ray start --head` prints the address to join (host:port of its GCS, 6379 by "
    "default; ray://host:10001 for Ray Client); leave the address out to start a local Ray"
)


class RayUnreachable(ConnectionError):
    """No Ray cluster answers at the address given; the message names it and how to
    find the right one."""


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """:class:`RayUnreachable` naming ``address`` (``host:port`` or ``ray://host:port``)
    when nothing there accepts a connection: ``ray.init`` would otherwise retry for
    minutes. ``auto`` and ``local`` are Ray's own to resolve."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():  # a bare host: the GCS's default port
        host, port = hostport, "6379"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayUnreachable(
            f"Ray address {address}: nothing answers at {host}:{port} ({exc}); is the "
            f"cluster's head running there? {_HINT}"
        ) from None


def join_cluster(address: str, **kwargs: Any) -> None:
    """``ray.init(address=address, **kwargs)`` after :func:`check_reachable`; Ray's own
    refusal (``auto`` with no cluster running here) is a :class:`RayUnreachable` too."""
    import ray

    check_reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayUnreachable(
            f"Ray address {address}: {first.split('. Please')[0]}; {_HINT}"
        ) from None


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a local Ray starts: its processes inherit that, so Ctrl-C in
    a terminal (sent to the whole process group) reaches only the driver, which then
    stops its work cleanly instead of losing its cluster under it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)
