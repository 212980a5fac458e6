"""A load generator that is not the bottleneck: N processes x M keep-alive connections, each
sending one fixed request back to back (closed loop), latencies taken in the client.

Every connection is an asyncio protocol (uvloop where installed) whose responses an ``httptools``
parser reads (Content-Length or chunked), so a client process spends its time in C, not in
``http.client``: the benchmark's earlier client (Python threads with urllib in one process) could
not tell a slow server from a slow client. Connections are spread over processes as evenly as they
go (c=64 on 4 processes: 16 each); every process connects first, then all start at one instant
(the system-wide monotonic clock) and stop at one deadline. A request counts when its answer
completes inside the window; ``requests_per_s`` is those over the window's length. What the
client itself used is reported (``client_cpu_s`` per process, of user+system time), so a run says
whether its client had CPU to spare.

    from benchmarks.loadgen import load
    load("http://127.0.0.1:8000/v1/predict", body, {"Content-Type": "application/json"},
         concurrency=64, seconds=10, processes=2)

``wrk`` (Debian package ``wrk``) measures the same thing where it is installed:
``load(..., client="wrk")`` drives it with the same body and headers and returns the same fields,
for a cross-check of this client. Only standard library, numpy and httptools here (the benchmark's subprocesses start
fast); no Ray, no torch.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np


def default_processes(concurrency: int, cpus: int | None = None) -> int:
    """Client processes for ``concurrency`` connections: a quarter of the CPUs, at least one, at
    most one per connection (2 CPUs -> 1; 16 CPUs -> 4; c=1 -> 1). The rest is the server's."""
    return max(1, min(concurrency, (cpus or os.cpu_count() or 1) // 4))


def split(concurrency: int, processes: int) -> list[int]:
    """Connections per process, as even as they go: (64, 3) -> [22, 21, 21]; never a process
    with none ((2, 4) -> [1, 1])."""
    processes = max(1, min(processes, concurrency))
    base, extra = divmod(concurrency, processes)
    return [base + (i < extra) for i in range(processes)]


def request_bytes(url: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    """(host, port, the whole HTTP/1.1 request) for POSTing ``body`` to ``url``, keep-alive."""
    u = urlsplit(url)
    head = [f"POST {u.path or '/'}{'?' + u.query if u.query else ''} HTTP/1.1"]
    head += [f"Host: {u.hostname}:{u.port or 80}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return u.hostname or "127.0.0.1", u.port or 80, ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Window:
    """When the measurement ends (set once every process is connected)."""

    deadline = float("inf")


class _Connection(asyncio.Protocol):
    """One keep-alive connection: send, wait for the whole answer, record, send again."""

    def __init__(self, request: bytes, window: _Window, lat: list[float], stats: dict[str, int]):
        import httptools

        self.request, self.window, self.lat, self.stats = request, window, lat, stats
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sent_at: float | None = None  # None: no request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self) -> None:
        if time.monotonic() >= self.window.deadline:
            self.transport.close()
            return
        self.sent_at = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # noqa: BLE001 - a garbled answer: an error, and this connection's end
            self.transport.close()

    def on_message_complete(self) -> None:  # httptools' callback
        now = time.monotonic()
        if now <= self.window.deadline:
            ok = self.parser.get_status_code() == 200
            self.stats["ok" if ok else "errors"] += 1
            if ok:
                self.lat.append(now - self.sent_at)
        self.sent_at = None
        if self.parser.should_keep_alive():
            self.send()
        else:  # the server closes it: the caller opens another for the rest of the window
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent_at is not None and self.sent_at < self.window.deadline:
            self.stats["errors"] += 1  # closed with a request unanswered
        if not self.done.done():
            self.done.set_result(None)


async def _run_connections(
    host: str, port: int, request: bytes, connections: int, ready: Any, seconds: float
) -> dict[str, Any]:
    """Connect all, wait at ``ready`` (a barrier across processes), then send for ``seconds``."""
    lat: list[float] = []
    stats = {"ok": 0, "errors": 0, "reconnects": 0}
    loop = asyncio.get_running_loop()
    window = _Window()

    async def connect() -> _Connection:
        for _ in range(20):  # 1 s: the caller waited for the server to be up
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(request, window, lat, stats), host, port
                )
                return conn
            except OSError:
                stats["errors"] += 1
                await asyncio.sleep(0.05)
        raise ConnectionError(f"cannot connect to {host}:{port}")

    first = await asyncio.gather(*(connect() for _ in range(connections)))
    ready.wait()  # every process connected: start together (blocking: nothing else runs yet)
    window.deadline = time.monotonic() + seconds

    async def one(conn: _Connection) -> None:
        while True:
            conn.send()
            try:  # an answer that never comes ends the connection 30 s after the window
                await asyncio.wait_for(conn.done, window.deadline + 30 - time.monotonic())
            except TimeoutError:
                conn.transport.abort()  # connection_lost counts the unanswered request
            if time.monotonic() >= window.deadline:
                return
            stats["reconnects"] += 1  # closed early: go on with a new connection
            conn = await connect()

    await asyncio.gather(*(one(c) for c in first))
    return {"latencies_s": lat, **stats}


def _process(
    host: str, port: int, request: bytes, connections: int, ready: Any, seconds: float, out: Any
) -> None:
    """One client process: its connections on one event loop; what it saw goes to ``out``."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass  # the standard asyncio loop then: slower, same counts
    cpu0 = _cpu_s()
    try:
        res = asyncio.run(_run_connections(host, port, request, connections, ready, seconds))
    except ConnectionError as exc:
        ready.abort()  # the other processes and the caller stop waiting
        res = {"error": str(exc)}
    res["client_cpu_s"] = _cpu_s() - cpu0
    out.send(res)
    out.close()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    concurrency: int,
    seconds: float,
    processes: int | None = None,
    client: str = "loadgen",
) -> dict[str, Any]:
    """POST ``body`` to ``url`` from ``concurrency`` connections for ``seconds``; see the module
    docstring. Returns requests, errors, requests/s and client-side latency percentiles (ms).
    ``client="wrk"``: the same measurement by ``wrk``, its threads standing for the processes."""
    per = split(concurrency, processes or default_processes(concurrency))
    if client == "wrk":
        return _wrk(url, body, headers or {}, concurrency, seconds, len(per))
    host, port, request = request_bytes(url, body, headers or {})
    ctx = multiprocessing.get_context("spawn")  # no inherited threads, event loops or CUDA
    ready = ctx.Barrier(len(per) + 1)
    pipes, procs = [], []
    for n in per:
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_process, args=(host, port, request, n, ready, seconds, send))
        p.start()
        send.close()
        pipes.append(recv)
        procs.append(p)
    try:
        ready.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass  # a process could not connect: it said why
    t0 = time.monotonic()
    results = [r.recv() for r in pipes]
    for p in procs:
        p.join()
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise ConnectionError(failed[0])
    late = time.monotonic() - t0 - seconds
    lat = np.array([x for r in results for x in r["latencies_s"]]) * 1e3
    ok = sum(r["ok"] for r in results)
    return {
        "concurrency": concurrency,
        "client": "loadgen",
        "client_processes": len(per),
        "seconds": seconds,
        "requests": ok,
        "errors": sum(r["errors"] for r in results),
        "reconnects": sum(r["reconnects"] for r in results),
        "requests_per_s": round(ok / seconds, 1),
        **percentiles(lat),
        "client_cpu_s": [round(r["client_cpu_s"], 2) for r in results],
        "drain_s": round(late, 2),
    }


def percentiles(lat_ms: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99 (ms) of the answers' latencies; None with no answer."""
    if not len(lat_ms):
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    p50, p90, p99 = np.percentile(lat_ms, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
    }


# --- wrk, where installed ----------------------------------------------------------------------
_WRK_SCRIPT = """
wrk.method = "POST"
local f = assert(io.open(os.getenv("LOADGEN_BODY"), "rb"))
wrk.body = f:read("*all")
f:close()
%s
function done(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format('LOADGEN {"requests": %%d, "errors": %%d, "duration_us": %%d, '
    .. '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d}\\n',
    summary.requests, errors, summary.duration, latency:percentile(50),
    latency:percentile(90), latency:percentile(99)))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _wrk(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float, threads: int
) -> dict[str, Any]:
    """``load`` by wrk, which counts every answer as a request and a non-2xx one also as an error."""
    heads = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items())
    with tempfile.TemporaryDirectory() as tmp:
        script, data = os.path.join(tmp, "post.lua"), os.path.join(tmp, "body")
        with open(script, "w") as f:
            f.write(_WRK_SCRIPT % heads)
        with open(data, "wb") as f:
            f.write(body)
        cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds}s"]
        cmd += ["--timeout", "60s", "-s", script, url]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env=os.environ | {"LOADGEN_BODY": data}
        ).stdout
    r = json.loads(next(line for line in out.splitlines() if line.startswith("LOADGEN "))[8:])
    ok = r["requests"] - r["errors"]
    return {
        "concurrency": concurrency,
        "client": "wrk",
        "client_processes": threads,
        "seconds": seconds,
        "requests": ok,
        "errors": r["errors"],
        "requests_per_s": round(ok / (r["duration_us"] / 1e6), 1),
        "p50_ms": round(r["p50_us"] / 1e3, 2),
        "p90_ms": round(r["p90_us"] / 1e3, 2),
        "p99_ms": round(r["p99_us"] / 1e3, 2),
    }
