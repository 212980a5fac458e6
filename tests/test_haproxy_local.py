"""Pure tier: the HAProxy configuration Ray 2.60 writes, as lepton_ray runs it
(:mod:`lepton_ray.serve.haproxy_local`): side listeners on the serving host, a private admin
socket, JSON 503s. Ray's own template is rendered here (no Ray started, no HAProxy run)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from lepton_ray.serve import haproxy_local
from lepton_ray.serve.haproxy_local import UNAVAILABLE, UnsafeConfig, localize


def ray_config(tmp_path, host: str, port: int = 8000, backends=None, **options) -> str:
    """The configuration Ray's HAProxy manager writes for Serve on ``host:port``, with
    ``backends`` (Ray's ``BackendConfig`` by name) and other ``HAProxyConfig`` ``options``."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        http_options=HTTPOptions(host=host, port=port),
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "state"),
        metrics_socket_path=str(tmp_path / "metrics.sock"),
        **options,
    )
    api = HAProxyApi(
        cfg=cfg, backend_configs=backends, config_file_path=str(tmp_path / "haproxy.cfg")
    )
    api._generate_config_file_internal()
    return (tmp_path / "haproxy.cfg").read_text()


def binds(config: str) -> list[str]:
    return re.findall(r"^\s+bind (\S+)", config, re.MULTILINE)


def test_rays_template_still_opens_the_side_listeners_to_every_interface(tmp_path):
    # What this module exists for; if Ray fixes it, the module can go.
    config = ray_config(tmp_path, "127.0.0.1")
    assert sorted(binds(config)) == sorted(["127.0.0.1:8000", ":9101", "*:8404"])
    assert "mode 666 level admin" in config


def test_every_listener_moves_to_the_serving_host_and_the_socket_is_private(tmp_path):
    config = localize(ray_config(tmp_path, "127.0.0.1"), "/x/503.http")
    assert sorted(binds(config)) == ["127.0.0.1:8000", "127.0.0.1:8404", "127.0.0.1:9101"]
    assert "mode 600 level admin" in config and "mode 666" not in config
    assert re.findall(r"tune.bufsize (\d+)", config) == ["32768"]  # Ray wrote 16384
    assert re.findall(r"errorfile (\d+) (\S+)", config) == [
        ("502", "/x/503.http"),
        ("503", "/x/503.http"),
        ("504", "/x/503.http"),
    ]


def test_serve_on_every_interface_keeps_its_side_listeners_there(tmp_path):
    config = localize(ray_config(tmp_path, "0.0.0.0"))
    assert sorted(binds(config)) == sorted(["*:8000", ":9101", "*:8404"])
    assert "mode 600 level admin" in config


@pytest.mark.parametrize("extra", ["listen other\n  bind *:7000\n", "frontend x\n    bind :7001\n"])
def test_an_unknown_wildcard_listener_is_refused(tmp_path, extra):
    with pytest.raises(UnsafeConfig, match="every interface"):
        localize(ray_config(tmp_path, "127.0.0.1") + extra)


def test_the_error_answer_is_the_endpoints_json_503():
    import json

    head, _, body = UNAVAILABLE.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
    assert b"Content-Type: application/json" in head
    assert f"Content-Length: {len(body)}".encode() in head and list(json.loads(body)) == ["error"]


def test_the_wrapper_runs_the_real_binary_on_the_localized_copy(tmp_path):
    # A stand-in for HAProxy that prints the arguments it got and the file it was given.
    fake = tmp_path / "fake-haproxy"
    fake.write_text('#!/bin/sh\necho "$@"\ncat "$3"\n')
    fake.chmod(0o700)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(ray_config(tmp_path, "127.0.0.1"))
    r = subprocess.run(
        [
            sys.executable,
            "-I",
            haproxy_local.__file__,
            str(fake),
            "-db",
            "-f",
            str(cfg),
            "-sf",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    args, config = r.stdout.split("\n", 1)
    assert args == f"-db -f {cfg}.local -sf 1"
    assert "127.0.0.1:9101" in config and (tmp_path / "haproxy.cfg.503.http").read_bytes() == (
        UNAVAILABLE
    )
    cfg.write_text(cfg.read_text() + "listen other\n  bind *:7000\n")
    r = subprocess.run(
        [sys.executable, "-I", haproxy_local.__file__, str(fake), "-db", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and r.stdout == "" and "refusing to start HAProxy" in r.stderr


class Replica:
    """A stand-in for a Serve replica's HTTP server: answers its health check and ``answers``
    POSTs, then dies on the next one, as a SIGKILLed replica does: it stops listening and closes
    the connection that carried the request without answering."""

    def __init__(self, name: str, answers: int | None = None):
        import http.server
        import threading

        replica = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self._answer(b"ok")

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                if replica.answers is not None and replica.answers <= 0:
                    threading.Thread(target=replica.server.shutdown).start()
                    replica.server.socket.close()
                    self.close_connection = True
                    return
                if replica.answers is not None:
                    replica.answers -= 1
                self._answer(json.dumps({"from": name}).encode())

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass  # no access-log line per request on the test's stderr

        self.answers = answers
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda *a: None  # HAProxy's connections reset at its stop
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop serving, then close the socket (idempotent). Closing it alone leaves
        ``serve_forever`` polling a closed socket, a thread that spins a core for the rest of the
        test session."""
        self.server.shutdown()
        self.server.server_close()


def _start_haproxy(tmp_path, backend, **options) -> tuple[subprocess.Popen, int]:
    """Real HAProxy through haproxy_local on Ray's configuration for ``backend`` with
    lepton_ray's retry defaults, once it listens: (its process, its port)."""
    from lepton_ray.serve.ingress import HAPROXY_DEFAULTS, haproxy_binary
    from tests.conftest import free_port

    binary = haproxy_binary()
    if binary is None:
        pytest.skip("no HAProxy binary")
    port = free_port()
    ray_config(
        tmp_path,
        "127.0.0.1",
        port,
        backends={backend.name: backend},
        retry_on=HAPROXY_DEFAULTS["RAY_SERVE_HAPROXY_RETRY_ON"],
        retries=int(HAPROXY_DEFAULTS["RAY_SERVE_HAPROXY_RETRIES"]),
        **options,
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            haproxy_local.__file__,
            binary,
            "-db",
            "-f",
            str(tmp_path / "haproxy.cfg"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    for _ in range(100):  # HAProxy listening
        try:
            socket.create_connection(("127.0.0.1", port), timeout=30).close()
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    return proc, port


@pytest.mark.parametrize(
    "body_bytes, answer",
    [
        pytest.param(2_000, (200, {"from": "fallback"}), id="replayed-on-the-fallback"),
        pytest.param(100_000, (503, "Retry-After"), id="body-past-the-buffer-gets-json-503"),
    ],
)
def test_a_replica_killed_mid_request_on_a_reused_connection_still_answers(
    tmp_path, body_bytes, answer
):
    # The request before went to the same replica over the same connections (client to HAProxy,
    # HAProxy to replica); HAProxy's rule for a reused connection that fails is to close the
    # client's connection without an answer, which Ray's own configuration does here.
    import http.client

    from ray.serve._private.haproxy import BackendConfig, ServerConfig

    replica, fallback = Replica("replica", answers=1), Replica("fallback")
    backend = BackendConfig(
        name="http-app",
        path_prefix="/app",
        servers=[ServerConfig(name="replica", host="127.0.0.1", port=replica.port)],
        fallback_server=ServerConfig(name="fallback", host="127.0.0.1", port=fallback.port),
    )
    proc, port = _start_haproxy(tmp_path, backend, log_target="stdout")
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        body = json.dumps({"pad": "x" * body_bytes}).encode()
        head = (
            "POST /app/v1/predict HTTP/1.1\r\nHost: app\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        answers = []
        for _ in range(2):  # on one keep-alive connection
            client.sendall(head)  # the headers first, then the body, as httpx sends them
            time.sleep(0.05)
            client.sendall(body)
            r = http.client.HTTPResponse(client)
            r.begin()  # RemoteDisconnected: the connection closed unanswered
            data = r.read()
            answers.append((r.status, json.loads(data), r.getheader("Retry-After")))
        client.close()
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0].decode(errors="replace")
        replica.stop()
        fallback.stop()
    assert answers[0] == (200, {"from": "replica"}, None), log
    status, detail = answer
    if status == 200:
        assert answers[1] == (200, detail, None), log
    else:
        assert answers[1][0] == 503 and answers[1][2] == "1", log
        assert list(answers[1][1]) == ["error"], log


def test_app_backends_keep_each_client_connection_on_one_replica(tmp_path):
    """Ray's template balances every request over pooled connections; each application backend
    is made to keep a client connection's replica instead. Its copy for partial requests and
    HAProxy's other backends are left as they were."""
    from ray.serve._private.haproxy import BackendConfig, ServerConfig

    servers = [ServerConfig(name=f"r{i}", host="127.0.0.1", port=9000 + i) for i in range(3)]
    backend = BackendConfig(name="http-app", path_prefix="/app", servers=servers)
    config = ray_config(tmp_path, "127.0.0.1", backends={"http-app": backend})
    out = localize(config)
    sections = {s.split("\n", 1)[0]: s for s in re.split(r"(?m)^(?=\S)", out) if s.strip()}
    app = sections["backend http-app"]
    assert "balance hash src_port" in app and "hash-type consistent" in app
    assert "http-reuse always" in app  # connections to the replicas stay pooled
    fresh = sections["backend http-app-fresh"]
    assert "option http-server-close" in fresh and "balance hash" not in fresh
    assert "balance hash" not in sections["backend default_backend"]
    assert out.count("balance hash") == 1


def test_a_keep_alive_client_stays_on_its_replica_until_the_replica_dies(tmp_path):
    """Real HAProxy, three stand-in replicas: one connection's requests all reach one replica;
    thirty connections spread over them, each staying on its own; when a connection's replica
    dies, its next request is answered by another."""
    import http.client

    from ray.serve._private.haproxy import BackendConfig, ServerConfig

    replicas = [Replica(f"r{i}") for i in range(3)]
    backend = BackendConfig(
        name="http-app",
        path_prefix="/app",
        servers=[
            ServerConfig(name=f"r{i}", host="127.0.0.1", port=r.port)
            for i, r in enumerate(replicas)
        ],
    )
    proc, port = _start_haproxy(tmp_path, backend)

    def ask(conn: http.client.HTTPConnection) -> str:
        conn.request("POST", "/app/v1/predict", body=b"{}", headers={"Host": "app"})
        r = conn.getresponse()
        assert r.status == 200
        return json.loads(r.read())["from"]

    try:
        one = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        assert len({ask(one) for _ in range(20)}) == 1
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(30)]
        first = [ask(c) for c in conns]
        assert len(set(first)) > 1  # connections spread (30 on one replica: 3 / 3**30)
        assert [ask(c) for c in conns] == first  # and each stays where it went
        dead = int(first[0][1])
        replicas[dead].answers = 0  # dies on its next request, unanswered
        assert ask(conns[0]) != first[0]  # replayed on another replica
        for c in (one, *conns):
            c.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        for r in replicas:
            r.stop()
