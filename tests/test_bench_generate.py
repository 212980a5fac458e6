"""The generation benchmark's arithmetic and its streaming client, without Ray or a GPU: SSE events
from bytes cut anywhere, a chunked response read from a real socket, the figures of a level, the
goal judged from them only on a GPU."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks import _sse, gpu_generate
from benchmarks.harness import HARDWARE_KEYS

STREAM = (
    b'event: token\ndata: {"token": 72, "text": "H"}\n\n'
    b"event: token\r\ndata: {}\r\n\r\n"
    b"data: line one\ndata: line two\n\n"
    b'event: done\ndata: {"finish_reason": "length"}\n\n'
)
EVENTS = [
    ("token", '{"token": 72, "text": "H"}'),
    ("token", "{}"),
    ("message", "line one\nline two"),
    ("done", '{"finish_reason": "length"}'),
]


@pytest.mark.parametrize("piece", [1, 2, 7, len(STREAM)])
def test_sse_events_are_the_same_however_the_bytes_arrive(piece):
    parser = _sse.SSEParser()
    got = []
    for i in range(0, len(STREAM), piece):
        got += parser.feed(STREAM[i : i + piece])
    assert got == EVENTS
    assert parser.feed(b"event: tok") == [] and parser.feed(b"en\ndata: 1\n\n") == [("token", "1")]


def _serve_once(response: bytes) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i in range(0, len(response), 13):  # the answer in small writes, as a stream comes
            writer.write(response[i : i + 13])
            await writer.drain()
        writer.close()

    async def start() -> tuple[asyncio.AbstractServer, int]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    return start()


def _chunked(body: bytes, size: int = 20) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "body", "tokens", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", _chunked(STREAM), 2, None),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n", STREAM, 2, None),
        (b"HTTP/1.1 200 OK\r\n", STREAM[:-52], 2, "stream ended without a done event"),
        (b"HTTP/1.1 422 Unprocessable\r\n", b'{"error": "x"}', 0, "HTTP 422 Unprocessable"),
    ],
)
def test_one_stream_reads_a_real_socket_chunked_or_not(head, body, tokens, error):
    async def go() -> dict:
        server, port = await _serve_once(head + b"\r\n" + body)
        async with server:
            return await _sse.one_stream(f"http://127.0.0.1:{port}/v1/generate", b"{}")

    rec = asyncio.run(go())
    assert rec["tokens"] == tokens and rec["error"] == error
    assert rec["sent"] <= (rec["first"] or rec["sent"]) <= rec["end"]
    assert rec["finish_reason"] == ("length" if error is None else None)


def test_a_level_s_figures_from_its_records():
    recs = [
        {"sent": 0.0, "first": 0.1, "end": 1.1, "tokens": 11},
        {"sent": 0.0, "first": 0.3, "end": 1.3, "tokens": 11},
        {"sent": 0.0, "first": None, "end": 0.2, "tokens": 0},  # its first draw was the stop token
        {"sent": 0.0, "first": None, "end": 0.1, "tokens": 0, "error": "HTTP 503"},
    ]
    s = gpu_generate.summarize(recs)
    assert (s["requests"], s["errors"], s["without_tokens"], s["tokens"]) == (4, 1, 1, 22)
    assert s["tokens_per_s"] == round(22 / 1.3, 1) and s["ttft_p50_ms"] == 200.0
    assert s["ttft_p99_ms"] == pytest.approx(298.0) and s["per_stream_tokens_per_s"] == 10.0
    assert s["per_token_ms"] == 100.0
    assert gpu_generate.percentile([10, 20, 30, 40], 99) == pytest.approx(39.7)
    assert gpu_generate.summarize([recs[3]]) == {"requests": 1, "errors": 1, "without_tokens": 0}


def _result(gpu: str | None, one: float, wide: float) -> dict:
    level = {"tokens_per_s": one, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "per_token_ms": 4.0}
    return {
        "benchmark": "gpu_generate",
        "measured_at": "2026-12-02 00:00 UTC",
        "hardware": dict.fromkeys(HARDWARE_KEYS) | {"gpu": gpu},
        "setup": {"dtype_in_process": "bfloat16", "dtype_endpoint": "bfloat16"},
        "plain": {"tokens_per_s": 300.0, "per_token_ms": 3.5},
        "sched": {"1": level, "64": level | {"tokens_per_s": wide}},
        "http": {"levels": {"1": level, "64": level | {"tokens_per_s": wide / 2}}},
    }


def test_the_goal_is_the_64_stream_speedup_judged_only_on_a_gpu():
    r = _result("1x NVIDIA H200", 250.0, 2600.0)
    m = gpu_generate.metrics(r)
    assert m["speedup_64"] == 10.4 and m["http_vs_in_process"] == {"1": 1.0, "64": 0.5}
    # (d) against the plain loop in the same dtype: 4.0 ms a token against 3.5
    assert m["http_per_token_overhead_ms"] == 0.5 and m["http_per_token_ratio"] == 1.14
    other = _result("1x NVIDIA H200", 250.0, 2600.0)
    other["setup"]["dtype_endpoint"] = "float32"  # a replica in another dtype: no overheads
    assert set(gpu_generate.metrics(other)) == {"speedup_64"}
    text = gpu_generate.render(r, "gpu_generate")
    assert "**met** (speedup_64 = 10.400)" in text and "+0.50 ms (1.14x)" in text
    assert "**not met**" in gpu_generate.render(_result("1x NVIDIA H200", 250.0, 2400.0), "k")
    cpu = gpu_generate.render(_result(None, 250.0, 2600.0), "gpu_generate")
    assert cpu.startswith("## No GPU") and "no goal is judged" in cpu and "**met**" not in cpu
