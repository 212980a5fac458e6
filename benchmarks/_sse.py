"""A streaming client for ``POST /v1/generate`` with ``stream: true`` that is not the bottleneck.

Each process runs its streams on one asyncio loop over raw sockets (``asyncio.open_connection``,
one connection per request, ``Connection: close``); a response is read chunk by chunk (chunked
transfer coding, or to the end without it) into :class:`SSEParser`, and only the ``done`` event's
JSON is parsed: a ``token`` event is counted by its name. Streams are spread over spawned
processes as ``benchmarks.loadgen`` spreads connections; every process starts at one barrier and
stamps times with ``time.monotonic()`` (one clock system-wide), so the caller can take the wall
time from the earliest send to the latest end across processes.

    records = streams("http://127.0.0.1:8000/gen/v1/generate", bodies, concurrency=16)

Each record: ``sent``, ``first`` (first token event, None if none), ``end``, ``tokens`` (token
events), ``finish_reason``, ``error`` (None, or why the stream failed). Standard library only
(plus ``benchmarks.loadgen`` for the split): no torch, no Ray in the client processes.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from benchmarks.loadgen import default_processes, split


class SSEParser:
    """Server-Sent Events from bytes that arrive in any pieces: :meth:`feed` returns the events
    completed so far as ``(event name, data text)``; an event ends at a blank line. E.g.
    ``feed(b"event: token\\ndata: {}\\n\\nevent: do")`` -> ``[("token", "{}")]``, then
    ``feed(b"ne\\ndata: 1\\n\\n")`` -> ``[("done", "1")]``. A block without ``event:`` is
    ``"message"`` (the SSE default); several ``data:`` lines join with newlines."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        # On the whole buffer: a CRLF may arrive split across two pieces.
        self._buf = (self._buf + data).replace(b"\r\n", b"\n")
        *blocks, self._buf = self._buf.split(b"\n\n")
        out = []
        for block in blocks:
            name, lines = "message", []
            for line in block.split(b"\n"):
                if line.startswith(b"event:"):
                    name = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    lines.append(line[5:].removeprefix(b" ").decode())
            if lines or name != "message":
                out.append((name, "\n".join(lines)))
        return out


def request_bytes(url: str, body: bytes) -> tuple[str, int, bytes]:
    """(host, port, the HTTP/1.1 request) for POSTing JSON ``body`` to ``url``, one connection."""
    u = urlsplit(url)
    head = (
        f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port or 80}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return u.hostname or "127.0.0.1", u.port or 80, head.encode() + body


async def _body_pieces(reader: asyncio.StreamReader, chunked: bool) -> Any:
    """The response body as it arrives: chunk by chunk, or read by read to the end."""
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def one_stream(url: str, body: bytes) -> dict[str, Any]:
    """Send one streamed request; what the client saw (see the module docstring)."""
    host, port, request = request_bytes(url, body)
    rec: dict[str, Any] = {"sent": time.monotonic(), "first": None, "tokens": 0}
    rec.update(finish_reason=None, error=None)
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        status = (await reader.readline()).split()
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            chunked |= k.strip().lower() == "transfer-encoding" and "chunked" in v.lower()
        if len(status) < 2 or status[1] != b"200":
            rec["error"] = f"HTTP {b' '.join(status[1:]).decode(errors='replace')}"
        parser = SSEParser()
        async for piece in _body_pieces(reader, chunked):
            for name, data in parser.feed(piece):
                if name == "token":
                    rec["tokens"] += 1
                    if rec["first"] is None:
                        rec["first"] = time.monotonic()
                elif name == "done":
                    rec["finish_reason"] = json.loads(data).get("finish_reason")
                elif name == "error":
                    rec["error"] = data[:200]
        if rec["finish_reason"] is None and rec["error"] is None:
            rec["error"] = "stream ended without a done event"
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    rec["end"] = time.monotonic()
    return rec


async def _closed_loop(url: str, bodies: list[bytes], concurrency: int) -> list[dict[str, Any]]:
    """``concurrency`` streams in flight until every body has been sent (a new one as one ends)."""
    todo = list(reversed(bodies))
    out: list[dict[str, Any]] = []

    async def worker() -> None:
        while todo:
            out.append(await one_stream(url, todo.pop()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def _process(url: str, bodies: list[bytes], concurrency: int, ready: Any, send: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass  # the standard loop: slower, same records
    try:
        ready.wait(timeout=120)
        send.send(asyncio.run(_closed_loop(url, bodies, concurrency)))
    except Exception as exc:  # noqa: BLE001 - the caller reports it
        send.send([{"error": f"client process: {type(exc).__name__}: {exc}"}])
    send.close()


def streams(
    url: str, bodies: list[bytes], *, concurrency: int, processes: int | None = None
) -> list[dict[str, Any]]:
    """Every body of ``bodies`` streamed from ``url``, ``concurrency`` at a time over
    ``processes`` client processes (default: as ``benchmarks.loadgen`` picks); the records."""
    conns = split(concurrency, processes or default_processes(concurrency))
    shares = split(len(bodies), len(conns)) if len(bodies) >= len(conns) else [1] * len(bodies)
    ctx = multiprocessing.get_context("spawn")  # no inherited threads, event loops or CUDA
    ready = ctx.Barrier(len(shares) + 1)
    pipes, procs, start = [], [], 0
    for n, share in zip(conns, shares, strict=False):
        recv, send = ctx.Pipe(duplex=False)
        part = bodies[start : start + share]
        start += share
        p = ctx.Process(target=_process, args=(url, part, min(n, len(part)), ready, send))
        p.start()
        send.close()
        pipes.append(recv)
        procs.append(p)
    try:
        ready.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass  # a process failed before the start: its record says why
    records: list[dict[str, Any]] = []
    for recv, p in zip(pipes, procs, strict=True):
        try:
            records += recv.recv()
        except EOFError:
            records.append({"error": f"client process exited {p.exitcode} without records"})
        p.join(timeout=30)
    return records
