"""Joining a Ray cluster by address: a wrong address fails in seconds, naming it."""

from __future__ import annotations

import socket

__all__ = ["check_reachable"]


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """ConnectionError naming ``address`` (``host:port`` or ``ray://host:port``) when
    nothing there accepts a connection: ``ray.init`` would otherwise retry for minutes.
    ``auto`` and ``local`` are Ray's own to resolve."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():  # a bare host: the GCS's default port
        host, port = hostport, "6379"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(
            f"Ray address {address}: nothing answers at {host}:{port} ({exc}); is the "
            "cluster's head running there? `ray start --head` prints the address to join "
            "(host:port of its GCS, 6379 by default; ray://host:10001 for Ray Client)"
        ) from None
