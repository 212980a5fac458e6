"""Pure tier: the endpoint's Python client against a scripted HTTP server on loopback (no Ray):
a 503 with ``Retry-After`` is sent again after the wait it names; other errors raise one line."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lepton_ray.serve.client import predict


@pytest.fixture
def endpoint():
    """(url, script): the server answers each POST with the next (status, headers, body)."""
    script: list[tuple[int, dict, bytes]] = []
    seen: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            seen.append(self.rfile.read(int(self.headers["Content-Length"])))
            status, headers, body = script.pop(0)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", script, seen
    server.shutdown()


OK = (200, {"Content-Type": "application/json"}, b'{"predictions": [], "model_version": "v"}')
BUSY = (503, {"Retry-After": "1"}, b'{"error": "model unavailable, retry shortly"}')


def test_a_503_is_retried_after_the_wait_it_names(endpoint):
    url, script, seen = endpoint
    script += [BUSY, (503, {"Retry-After": "2"}, b'{"error": "x"}'), OK]
    waits: list[float] = []
    answer = predict(url, np.zeros((1, 2, 2, 1), np.uint8), sleep=waits.append)
    assert answer["model_version"] == "v" and waits == [1.0, 2.0]
    assert len(seen) == 3 and len(set(seen)) == 1  # the same body each time


@pytest.mark.parametrize(
    ("answers", "message", "expected_waits"),
    [
        ([BUSY] * 3, "HTTP 503 from .*: model unavailable, retry shortly", [1.0, 1.0]),  # spent
        ([(503, {"Retry-After": "3600"}, b"down")], "HTTP 503 from .*: down", []),  # too long
        ([(422, {}, json.dumps({"error": "bad pixels"}).encode())], "HTTP 422 .*: bad pixels", []),
        ([(500, {}, b"Internal Server Error")], "HTTP 500 from .*: Internal Server Error", []),
    ],
)
def test_other_errors_raise_one_line_with_the_endpoints_message(
    endpoint, answers, message, expected_waits
):
    url, script, _ = endpoint
    script += answers
    waits: list[float] = []
    with pytest.raises(RuntimeError, match=message):
        predict(url, np.zeros((1, 2, 2, 1), np.uint8), sleep=waits.append)
    assert waits == expected_waits
