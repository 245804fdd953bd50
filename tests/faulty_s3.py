"""A fault-injecting HTTP proxy in front of an S3 endpoint, on loopback, for tests.

Requests are forwarded byte for byte (headers, ``Host`` included, so SigV4 signatures
still verify; bodies raw, so chunked and ``aws-chunked`` uploads pass unchanged), except
when the proxy's ``plan`` names a fault for that request:

=============  ============================================================================
``slowdown``   503 ``SlowDown`` (S3's throttling answer); nothing is forwarded
``internal``   500 ``InternalError``; nothing is forwarded
``timeout``    400 ``RequestTimeout``; nothing is forwarded
``throttled``  429 ``TooManyRequests``; nothing is forwarded
``denied``     403 ``AccessDenied``; nothing is forwarded (not transient)
``invalid``    400 ``InvalidArgument``; nothing is forwarded (not transient)
``gone``       404 ``NoSuchUpload``; nothing is forwarded (not transient)
``nocond``     501 ``NotImplemented`` to a request with If-Match; nothing is forwarded
``reset``      the connection is closed with no answer; nothing is forwarded
``drop``       forwarded (the store applies it), then closed with no answer: a lost reply
``cut``        a GET with a body: forwarded, then the head and half the body are sent
               and the connection closed; any other request: like ``reset``
=============  ============================================================================

A plan is a callable ``plan(request) -> fault name | None`` (see :func:`first_attempts`
and :func:`always`). Every request is recorded in ``proxy.requests`` with the fault it
got and the status it was answered, so tests can assert faults really happened.

    with FaultyS3(upstream="http://127.0.0.1:8333", plan=first_attempts(2)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        ...
        assert proxy.injected()
"""

from __future__ import annotations

import collections
import http.client
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from xml.sax.saxutils import escape

__all__ = [
    "ERRORS",
    "FaultyS3",
    "Request",
    "always",
    "first_attempts",
]

# fault -> (HTTP status, S3 error code, message)
ERRORS: dict[str, tuple[int, str, str]] = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "timeout": (
        400,
        "RequestTimeout",
        "Your socket connection to the server was not read from or written to within "
        "the timeout period.",
    ),
    "throttled": (429, "TooManyRequests", "Too many requests, please slow down."),
    "denied": (403, "AccessDenied", "Access Denied (injected)."),
    "invalid": (400, "InvalidArgument", "Invalid argument (injected)."),
    # what S3 may answer a repeated CompleteMultipartUpload once the first one succeeded
    "gone": (404, "NoSuchUpload", "The specified upload does not exist."),
    # what a store without conditional requests may answer a GET with If-Match
    "nocond": (
        501,
        "NotImplemented",
        "A header you provided implies functionality that is not implemented.",
    ),
}
CONNECTION_FAULTS = ("reset", "drop", "cut")
TRANSIENT = ("slowdown", "internal", "timeout", "throttled", "reset", "drop", "cut")

# Hop-by-hop headers: they describe one connection, never forwarded as they are.
_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"}
_UPSTREAM_TIMEOUT_S = 60.0
_IDLE_TIMEOUT_S = 30.0  # a client connection idle this long is closed
_CHUNK = 64 << 10


@dataclass
class Request:
    """One request the proxy saw."""

    index: int  # 0-based, in arrival order
    method: str
    path: str  # without the query
    query: str  # without signature parameters (presigned URLs), sorted
    range: str  # the Range header, "" without one
    attempt: int  # 1-based: how many times this (method, path, query, range) was seen
    fault: str | None = None
    status: int | None = None  # the answer's status (the store's when forwarded); None: none
    if_match: str = ""  # the If-Match header, "" without one

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.method, self.path, self.query, self.range)


Plan = Callable[[Request], "str | None"]
Match = Callable[[Request], bool]


def _pick(faults: Sequence[str], n: int, req: Request) -> str:
    """The ``n``-th of ``faults`` (cyclic) among those that fit ``req``: a HEAD answer has
    no body to carry an error code, so a HEAD never gets ``timeout`` (400
    ``RequestTimeout``), which would read as a plain 400."""
    fitting = [f for f in faults if not (req.method == "HEAD" and f == "timeout")] or faults
    return fitting[n % len(fitting)]


def first_attempts(n: int, faults: Sequence[str] = TRANSIENT, match: Match | None = None) -> Plan:
    """The first ``n`` attempts of every distinct request fail (those ``match`` accepts,
    by default all), cycling through ``faults`` across the injected faults."""
    counter = iter(range(1 << 62))
    lock = threading.Lock()

    def plan(req: Request) -> str | None:
        if req.attempt > n or (match is not None and not match(req)):
            return None
        with lock:
            return _pick(faults, next(counter), req)

    return plan


def always(fault: str, match: Match | None = None) -> Plan:
    """Every request (that ``match`` accepts) gets ``fault``."""

    def plan(req: Request) -> str | None:
        return fault if match is None or match(req) else None

    return plan


class FaultyS3:
    """The proxy: ``start()``/``stop()`` or a ``with`` block; ``endpoint`` is its URL.

    ``plan`` may be replaced at any time; None forwards everything untouched.
    """

    def __init__(self, upstream: str, plan: Plan | None = None) -> None:
        url = urllib.parse.urlsplit(upstream)
        if url.scheme != "http" or url.hostname not in {"127.0.0.1", "localhost", "::1"}:
            raise ValueError(f"upstream must be a loopback http:// endpoint, got {upstream!r}")
        self.upstream = (url.hostname, url.port or 80)
        self.plan = plan
        self.requests: list[Request] = []
        self._attempts: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FaultyS3:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        done = threading.Thread(target=server.shutdown, daemon=True)
        done.start()
        done.join(timeout)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> FaultyS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what happened ---------------------------------------------------------------------

    def injected(self) -> collections.Counter[str]:
        """How many times each fault was injected."""
        with self._lock:
            return collections.Counter(r.fault for r in self.requests if r.fault)

    def seen(self, method: str | None = None, path_contains: str = "") -> list[Request]:
        """The requests so far, optionally only one method's or paths containing a string."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and path_contains in r.path
            ]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self._attempts.clear()

    # -- used by the handler ---------------------------------------------------------------

    def _admit(self, method: str, target: str, range_header: str, if_match: str = "") -> Request:
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = sorted((k, v) for k, v in query if not k.lower().startswith("x-amz-"))
        path = urllib.parse.unquote(parts.path)
        key = (method, path, urllib.parse.urlencode(query), range_header)
        with self._lock:
            self._attempts[key] += 1
            req = Request(len(self.requests), *key, attempt=self._attempts[key], if_match=if_match)
            self.requests.append(req)
        plan = self.plan
        fault = plan(req) if plan is not None else None
        if fault is not None and fault not in ERRORS and fault not in CONNECTION_FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        req.fault = fault
        return req


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open never blocks stop()
    proxy: FaultyS3


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint
    timeout = _IDLE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _proxy(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()  # always drained, so the connection stays in step
        req = proxy._admit(
            self.command, self.path, self.headers.get("Range", ""), self.headers.get("If-Match", "")
        )
        if req.fault in ERRORS:
            req.status = ERRORS[req.fault][0]
            self._send_error(*ERRORS[req.fault], resource=req.path)
            return
        if req.fault == "reset" or (req.fault == "cut" and self.command != "GET"):
            self.close_connection = True
            return
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=_UPSTREAM_TIMEOUT_S)
        try:
            resp = self._forward(upstream, body)
            req.status = resp.status
            if req.fault == "drop":
                resp.read()
                self.close_connection = True
                return
            self._relay(resp, cut=req.fault == "cut")
        finally:
            upstream.close()

    def _read_body(self) -> bytes:
        """The request body exactly as sent: chunked framing (and trailers) kept."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline(65537)
                raw += line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    break
                raw += self.rfile.read(size + 2)  # data and its CRLF
            while True:  # trailers, up to the empty line
                line = self.rfile.readline(65537)
                raw += line
                if line in (b"\r\n", b"\n", b""):
                    return bytes(raw)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, upstream: http.client.HTTPConnection, body: bytes) -> Any:
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP:
                upstream.putheader(name, value)
        upstream.putheader("Connection", "close")
        upstream.endheaders()
        if body:
            upstream.send(body)
        return upstream.getresponse()

    def _relay(self, resp: http.client.HTTPResponse, cut: bool) -> None:
        length = resp.getheader("Content-Length")
        chunked = length is None and self.command != "HEAD" and resp.status not in (204, 304)
        data = resp.read() if chunked else b""
        if chunked:
            length = str(len(data))
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP | {"transfer-encoding", "content-length"}:
                self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if self.command == "HEAD":
            return
        remaining = int(length or 0)
        if cut and remaining > 0:
            remaining //= 2  # announce the whole body, send half, hang up
            self.close_connection = True
        if chunked:
            self.wfile.write(data[:remaining])
        else:
            while remaining > 0:
                chunk = resp.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
        self.wfile.flush()

    def _send_error(self, status: int, code: str, message: str, resource: str) -> None:
        body = b""
        if self.command != "HEAD":
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<Resource>{escape(resource)}</Resource><RequestId>faulty-s3</RequestId></Error>"
            ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
