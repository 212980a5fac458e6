"""A fault-injecting HTTP proxy in front of an S3 server (moto), on 127.0.0.1.

Clients (pyarrow's S3 filesystem through :mod:`lepton_ray.storage`) are pointed at the proxy's
``url`` instead of the server's; every request is forwarded unchanged (the SigV4 signature covers
the ``Host`` header, so it is kept) unless the proxy decides otherwise:

* **Errors and throttling.** ``faults`` decides, per request, to answer it itself with S3's own
  ``500 InternalError`` or ``503 SlowDown`` (XML body, as S3 sends them) without forwarding it.
  :class:`SeededFaults` decides from a hash of (seed, method, target, how many times that same
  request was seen), so a run is reproducible whatever order threads send in.
* **Outages.** :meth:`S3FaultProxy.cut` stops listening and resets every open connection (a
  request in flight gets no answer), as a server that goes away does; :meth:`restore` listens
  again on the same port. The server behind keeps its state. ``cut_on`` cuts automatically when
  a matching request arrives (e.g. the PUT of a checkpoint's weights), dropping that request,
  and ``outage_s`` later the proxy listens again.

Counts (:attr:`S3FaultProxy.counts`) say what happened: requests seen, forwarded, injected 500s
and 503s, requests dropped by a cut, requests that reached the proxy during an outage (accepted
just before it stopped listening; not answered either), outages.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

# S3's error bodies (https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html).
_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
# Hop-by-hop headers and those the proxy recomputes.
_DROP_REQUEST = {"connection", "keep-alive", "proxy-connection", "expect", "transfer-encoding"}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "date"}


def error_body(status: int, target: str) -> bytes:
    code, message = _ERRORS[status]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{target.split('?', 1)[0]}</Resource>"
        f"<RequestId>{hashlib.sha1(target.encode()).hexdigest()[:16].upper()}</RequestId></Error>"
    ).encode()


@dataclass(frozen=True)
class SeededFaults:
    """Answer a seeded share of requests with 500 (``p500``) or 503 (``p503``).

    The draw for a request depends on (seed, method, target, ``nth``: how many times this same
    method and target were seen before), never on arrival order across threads.
    ``max_per_request``: never fault the same method and target more than this many times in all
    (so an operation retried that many times by the client always gets through, however many
    clients send the same request at once); None for independent faults.
    """

    seed: int = 0
    p500: float = 0.0
    p503: float = 0.0
    max_per_request: int | None = None
    only: str | None = None  # a regex the target must match to be faulted (None: every request)

    def __call__(self, method: str, target: str, nth: int, faulted: int) -> int | None:
        if self.only is not None and not re.search(self.only, target):
            return None
        if self.max_per_request is not None and faulted >= self.max_per_request:
            return None
        h = hashlib.sha256(f"{self.seed}|{method}|{target}|{nth}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        if u < self.p500:
            return 500
        if u < self.p500 + self.p503:
            return 503
        return None


FaultPolicy = Callable[[str, str, int, int], "int | None"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # An answer goes out as two writes (the headers, then the body): with Nagle's algorithm on,
    # the body waited for the client's delayed ACK of the headers, ~40 ms a request (30 ms a
    # request through the proxy against 4 ms straight to moto).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy._opened(self.connection)
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._closed(self.connection)
            if self._upstream is not None:
                self._upstream.close()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _proxy(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        decision = proxy._decide(self.command, self.path)
        if decision == "cut":
            self.close_connection = True
            return  # the connection is reset by the cut; nothing is answered
        if decision is not None:
            self._send(
                decision, [("Content-Type", "application/xml")], error_body(decision, self.path)
            )
            return
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _DROP_REQUEST]
        if body or self.command in ("PUT", "POST"):
            headers.append(("Content-Length", str(len(body))))
        status, reply, data = self._forward(headers, body)
        proxy._count("forwarded")
        self._send(status, reply, data)

    def _forward(self, headers: list, body: bytes) -> tuple[int, list, bytes]:
        for attempt in (0, 1):  # once more on a fresh connection if the kept-alive one was closed
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(
                    *self.server.proxy.upstream, timeout=120
                )
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                conn.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send(self, status: int, headers: list, data: bytes) -> None:
        self.send_response_only(status)
        head = self.command == "HEAD"
        for k, v in headers:
            if k.lower() in _DROP_RESPONSE and not (head and k.lower() == "content-length"):
                continue
            self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        elif not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", "0")
        self.end_headers()
        if not head and data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: S3FaultProxy


class S3FaultProxy:
    """``with S3FaultProxy(upstream_url, faults=SeededFaults(...)) as proxy: ... proxy.url``.

    ``cut_on``: a predicate on (method, target): the first matching request (while no outage is
    in progress, at most ``max_outages`` times) cuts the proxy for ``outage_s`` seconds.
    """

    def __init__(
        self,
        upstream: str,
        *,
        faults: FaultPolicy | None = None,
        cut_on: Callable[[str, str], bool] | None = None,
        outage_s: float = 3.0,
        max_outages: int = 1,
        port: int = 0,
    ):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.faults, self.cut_on = faults, cut_on
        self.outage_s, self.max_outages = outage_s, max_outages
        self.counts: Counter[str] = Counter()
        self.cut_targets: list[str] = []  # the requests that set off an outage
        self.put_paths: set[str] = set()  # every object a PUT was sent for (query left out)
        self.outage_ended = threading.Event()
        self._seen: Counter[tuple[str, str]] = Counter()
        self._faulted: Counter[tuple[str, str]] = Counter()
        self._lock = threading.RLock()
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.down = False

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3FaultProxy:
        with self._lock:
            server = _Server(("127.0.0.1", self.port), _Handler)
            server.proxy = self
            self.port = server.server_address[1]
            self._server, self.down = server, False
            self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            self._thread.start()
        return self

    def cut(self) -> None:
        """Stop listening and reset every open connection: the server is gone."""
        with self._lock:
            server, self._server, self.down = self._server, None, True
            conns, self._conns = list(self._conns), set()
        if server is not None:
            server.shutdown()
            server.server_close()
        for c in conns:
            try:
                c.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self) -> None:
        """Listen again on the same port (the server behind kept its state)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.start()
                return
            except OSError:  # the port is briefly held after the close
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.cut()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the handler's side ------------------------------------------------------------------
    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _decide(self, method: str, target: str) -> int | str | None:
        with self._lock:
            self.counts["requests"] += 1
            if method == "PUT":
                self.put_paths.add(target.split("?", 1)[0])
            key = (method, target)
            nth, faulted = self._seen[key], self._faulted[key]
            self._seen[key] += 1
            if self.down:
                # Accepted before the listening socket closed (the cut's shutdown takes up to a
                # poll interval, and a client's retry comes 25 ms after the dropped request):
                # the server is gone, so this request is not answered either.
                self.counts["refused_in_outage"] += 1
                return "cut"
            if (
                self.cut_on is not None
                and self.counts["outages"] < self.max_outages
                and self.cut_on(method, target)
            ):
                self.counts["outages"] += 1
                self.counts["dropped"] += 1
                self.cut_targets.append(f"{method} {target}")
                self.outage_ended.clear()
                self.down = True  # from this request on, not when the cut thread gets to it
                threading.Thread(target=self._outage, daemon=True).start()
                return "cut"
            status = self.faults(method, target, nth, faulted) if self.faults else None
            if status is None:
                return None
            self._faulted[key] += 1
            self.counts[f"injected_{status}"] += 1
            return status

    def _outage(self) -> None:
        self.cut()
        time.sleep(self.outage_s)  # the outage's length is the fault being injected
        self.restore()
        self.outage_ended.set()
