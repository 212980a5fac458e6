"""benchmarks.loadgen against a small threaded HTTP server of the test's own (no Ray): what the
client counts is what the server answered, bodies arrive whole, chunked answers, errors and
server-closed connections are handled, and the connection arithmetic."""

from __future__ import annotations

import socketserver
import threading

import pytest

from benchmarks import loadgen

BODY = b'{"instances": [[1, 2, 3]]}' * 40


class _Server(socketserver.ThreadingTCPServer):
    """Answers each POST: 200 (every ``fail_every``-th: 500), chunked every other answer, and
    ``Connection: close`` every ``close_every``-th answer on a connection. Counts what it did."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, fail_every: int = 0, close_every: int = 0, drop_every: int = 0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail_every, self.close_every, self.drop_every = fail_every, close_every, drop_every
        self.lock = threading.Lock()
        self.answered = self.bad_bodies = self.dropped = 0

    def count(self) -> int:
        with self.lock:
            self.answered += 1
            return self.answered


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        srv: _Server = self.server  # type: ignore[assignment]
        on_this = 0
        while True:
            line = self.rfile.readline()
            if not line:
                return
            length = 0
            while (h := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = h.decode().partition(":")
                length = int(value) if name.lower() == "content-length" else length
            if self.rfile.read(length) != BODY:
                srv.bad_bodies += 1
            if srv.drop_every and (srv.answered + srv.dropped + 1) % srv.drop_every == 0:
                srv.dropped += 1  # hang up without an answer
                return
            n, on_this = srv.count(), on_this + 1
            status = (
                b"500 Internal Server Error"
                if srv.fail_every and n % srv.fail_every == 0
                else b"200 OK"
            )
            close = srv.close_every and on_this % srv.close_every == 0
            payload = b'{"predictions": [[{"class": "7"}]]}'
            head = b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
            head += b"Connection: close\r\n" if close else b""
            if n % 2:
                self.wfile.write(head + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            else:
                chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
                self.wfile.write(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
            self.wfile.flush()
            if close:
                return


@pytest.fixture
def server():
    servers = []

    def start(**kw) -> tuple[_Server, str]:
        srv = _Server(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1/predict"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_what_the_client_counts_is_what_the_server_answered(server):
    srv, url = server()
    r = loadgen.load(
        url, BODY, {"Content-Type": "application/json"}, concurrency=6, seconds=0.5, processes=2
    )
    assert r["client_processes"] == 2 and r["errors"] == 0 and srv.bad_bodies == 0
    assert r["requests"] > 20 and r["requests_per_s"] == round(r["requests"] / 0.5, 1)
    # Answers that came after the window are not counted: at most one per connection.
    assert 0 <= srv.answered - r["requests"] <= 6
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert len(r["client_cpu_s"]) == 2 and all(c > 0 for c in r["client_cpu_s"])


def test_error_answers_and_server_closed_connections_are_counted_and_survived(server):
    srv, url = server(fail_every=5, close_every=3)
    r = loadgen.load(url, BODY, concurrency=4, seconds=0.5, processes=1)
    assert r["requests"] > 10 and r["reconnects"] > 2 and srv.bad_bodies == 0
    # Every fifth answer of the server is a 500: the client's share of errors is one in five.
    counted = r["requests"] + r["errors"]
    assert 0 <= srv.answered - counted <= 4
    assert abs(r["errors"] - srv.answered // 5) <= 4


def test_a_request_the_server_hangs_up_on_is_an_error(server):
    srv, url = server(drop_every=4)
    r = loadgen.load(url, BODY, concurrency=2, seconds=0.5, processes=1)
    assert r["requests"] > 10 and srv.dropped > 2 and srv.bad_bodies == 0
    # Each hang-up is one error; the client reconnects after each but a last one past the window.
    assert r["errors"] == srv.dropped and srv.dropped - 2 <= r["reconnects"] <= srv.dropped
    assert 0 <= srv.answered - r["requests"] <= 2


def test_nothing_listening_is_one_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"^cannot connect to 127.0.0.1:{port}$"):
        loadgen.load(f"http://127.0.0.1:{port}/", b"x", concurrency=3, seconds=0.2, processes=2)


@pytest.mark.skipif(
    not loadgen.wrk_available(), reason="wrk is not installed (apt-get install wrk)"
)
def test_wrk_sends_the_same_request_and_reports_the_same_fields(server):
    srv, url = server()
    r = loadgen.load(
        url,
        BODY,
        {"Content-Type": "application/json"},
        concurrency=4,
        seconds=1,
        processes=2,
        client="wrk",
    )
    assert r["client"] == "wrk" and r["errors"] == 0 and srv.bad_bodies == 0
    assert r["requests"] > 50 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert set(r) >= {"requests_per_s", "p90_ms", "client_processes"}


@pytest.mark.parametrize(
    ("concurrency", "processes", "expected"),
    [(64, 4, [16] * 4), (64, 3, [22, 21, 21]), (2, 4, [1, 1]), (1, 1, [1]), (5, 0, [5])],
)
def test_connections_are_spread_evenly_and_no_process_is_idle(concurrency, processes, expected):
    assert loadgen.split(concurrency, processes) == expected


@pytest.mark.parametrize(
    ("concurrency", "cpus", "expected"), [(64, 2, 1), (64, 16, 4), (1, 16, 1), (64, 128, 32)]
)
def test_the_client_takes_a_quarter_of_the_cpus(concurrency, cpus, expected):
    assert loadgen.default_processes(concurrency, cpus) == expected


def test_the_request_is_one_keep_alive_post_with_the_exact_body():
    host, port, req = loadgen.request_bytes(
        "http://10.0.0.2:8123/a/v1/predict?x=1", b"abc", {"X-Shape": "1,2"}
    )
    head, _, body = req.partition(b"\r\n\r\n")
    assert (host, port, body) == ("10.0.0.2", 8123, b"abc")
    assert head.split(b"\r\n") == [
        b"POST /a/v1/predict?x=1 HTTP/1.1",
        b"Host: 10.0.0.2:8123",
        b"Content-Length: 3",
        b"X-Shape: 1,2",
    ]
