"""``POST /v1/generate`` on a GPT checkpoint: the request, the replica's token streams, the answer.

The request path (the ingress's auth, body limit and metrics are ``/v1/predict``'s)::

    JSON body -> parse() -> Request (4xx here, before any model work)
      -> the model replica's TokenStreams.stream(request): joins the Scheduler's running batch
         (continuous batching, lepton_ray.generation); one token per scheduler step
      -> stream=false: answer() collects them into one JSON object
         stream=true:  sse() sends one Server-Sent Event per token, then one ``done`` event

A streamed answer is ``text/event-stream``::

    event: token
    data: {"token": 72, "text": "H"}
    ...
    event: done
    data: {"text": "", "finish_reason": "length", "usage": {...}, "seed": 7, "model_version": "..."}

Tokens are UTF-8 bytes, so one character may take several events: each event's ``text`` is what
the bytes so far complete (an incremental decoder), and ``done``'s ``text`` flushes an unfinished
character (U+FFFD), so the texts of all events concatenate to the non-streamed ``text``. A client
that disconnects cancels its generation: the stream's generator is cancelled, which cancels its
sequence, whose slot is free at the next step.

Pure apart from :class:`TokenStreams` (an asyncio task around the scheduler); no Serve imports.
"""

from __future__ import annotations

import asyncio
import codecs
import math
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from lepton_ray.serve.codec import RequestError

FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "seed", "stream")
DEFAULT_MAX_NEW_TOKENS = 64
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Tell proxies (nginx, HAProxy setups that honour it) to pass each event on at once."""


@dataclass(frozen=True)
class TextSpec:
    """What a language model's checkpoint takes: its context and vocabulary."""

    block_size: int
    vocab_size: int

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TextSpec | None:
        """The spec of a text checkpoint's ``lepton.json``; None for an image model's."""
        data = meta.get("data", {})
        if data.get("kind") != "text":
            return None
        return cls(int(data["block_size"]), int(data["vocab_size"]))


def parse(body: bytes, spec: TextSpec) -> tuple[Any, bool]:
    """A request body -> (:class:`lepton_ray.generation.Request`, stream); each problem a
    :class:`RequestError` (400 malformed, 422 a value out of range) naming the field."""
    from lepton_ray.generation import Request

    if not body:
        raise RequestError(400, 'empty request body: send JSON {"prompt": "..."}')
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError(400, "body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise RequestError(400, 'body must be a JSON object: {"prompt": "..."}')
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(422, '"prompt" must be a string')
    tokens = tuple(prompt.encode("utf-8"))
    if not tokens:
        raise RequestError(422, '"prompt" is empty')
    if len(tokens) > spec.block_size:
        raise RequestError(
            422,
            f'"prompt" is {len(tokens)} tokens (UTF-8 bytes), longer than the model\'s context '
            f"of {spec.block_size}",
        )
    budget = _int(obj, "max_new_tokens", min(DEFAULT_MAX_NEW_TOKENS, spec.block_size))
    if not 1 <= budget <= spec.block_size:
        raise RequestError(422, f'"max_new_tokens" must be 1..{spec.block_size}, got {budget}')
    temperature = obj.get("temperature", 1.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise RequestError(422, f'"temperature" must be a number >= 0, got {temperature!r}')
    top_k = _int(obj, "top_k", None)
    if top_k is not None and top_k < 1:
        raise RequestError(422, f'"top_k" must be >= 1 or null, got {top_k}')
    seed = _int(obj, "seed", None)
    if seed is None:
        seed = secrets.randbits(63)  # reported in the answer, so the run can be repeated
    elif not 0 <= seed < 2**63:
        raise RequestError(422, f'"seed" must be in 0..2**63-1, got {seed}')
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, '"stream" must be true or false')
    request = Request(
        prompt=tokens,
        max_new_tokens=budget,
        temperature=float(temperature),
        top_k=top_k,
        seed=seed,
    )
    return request, stream


def _int(obj: dict[str, Any], key: str, default: int | None) -> int | None:
    value = obj.get(key, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise RequestError(422, f'"{key}" must be a whole number, got {value!r}')


class TokenStreams:
    """The scheduler of one model replica, driven by one asyncio task: each step runs in a
    thread (the event loop keeps serving HTTP meanwhile) while any sequence runs or waits."""

    def __init__(self, model: Any, slots: int, on_step: Callable[[int], None] | None = None):
        from lepton_ray.generation import Scheduler

        self.scheduler = Scheduler(model, slots)
        self.on_step = on_step
        self.queues: dict[int, asyncio.Queue] = {}
        self.driver: asyncio.Task | None = None
        self.finished: dict[str, int] = {}  # sequences ended, by finish reason

    @classmethod
    def of(
        cls, runner: Any, slots: int, on_step: Callable[[int], None] | None = None
    ) -> TokenStreams | None:
        """The streams of a replica's :class:`~lepton_ray.serve.runner.ModelRunner` if its model
        is a language model, else None."""
        if TextSpec.from_meta(runner.meta) is None:
            return None
        return cls(runner.model, slots, on_step)

    async def stream(self, request: Any) -> AsyncIterator[int | dict[str, Any]]:
        """``request``'s tokens as they are sampled, then ``{"finish_reason", "usage"}``. Closing
        or cancelling the iterator early cancels the sequence."""
        seq = self.scheduler.submit(request)
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[seq.id] = queue
        if self.driver is None or self.driver.done():
            self.driver = asyncio.ensure_future(self._drive())
        try:
            done = False
            while not done:
                token, done = await queue.get()
                if isinstance(token, BaseException):
                    raise token
                if token is not None:
                    yield token
            yield {
                "finish_reason": seq.finish_reason,
                "usage": {
                    "prompt_tokens": len(request.prompt),
                    "completion_tokens": len(seq.tokens),
                },
            }
        finally:
            self.queues.pop(seq.id, None)
            if not seq.done:
                self.scheduler.cancel(seq)

    def info(self) -> dict[str, Any]:
        """Slots, sequences running and waiting, steps taken, sequences ended by reason."""
        s = self.scheduler
        return {
            "slots": s.slots,
            "running": len(s.running),
            "waiting": len(s.waiting),
            "steps": s.steps,
            "finished": dict(self.finished),
        }

    async def _drive(self) -> None:
        while self.scheduler.busy:
            try:
                events = await asyncio.to_thread(self.scheduler.step)
            except Exception as exc:  # noqa: BLE001 - every waiting client hears of it
                for seq in self.scheduler.abort():
                    if (queue := self.queues.get(seq.id)) is not None:
                        queue.put_nowait((exc, True))
                return
            if self.on_step is not None:
                self.on_step(len(events))
            for seq, token in events:
                if seq.done:
                    self.finished[seq.finish_reason] = self.finished.get(seq.finish_reason, 0) + 1
                if (queue := self.queues.get(seq.id)) is not None:
                    queue.put_nowait((token, seq.done))


def token_bytes(token: int) -> bytes:
    """A byte token's byte; a token past the 256 bytes (a padded vocabulary) is U+FFFD."""
    return bytes((token,)) if token < 256 else "\ufffd".encode()


async def respond(
    events: AsyncIterator[Any],
    seed: int,
    stream: bool,
    version: str,
    record: Callable[[bool], None],
) -> Any:
    """The HTTP answer to a generation's ``events``: Server-Sent Events, or one JSON object once
    every token is in. ``record(ok)`` counts the model call (the ingress's metric)."""
    from fastapi.responses import Response, StreamingResponse

    if stream:
        return StreamingResponse(
            sse(events, seed, version, record), media_type="text/event-stream", headers=SSE_HEADERS
        )
    try:
        body = await answer(events, seed, version)
    except Exception as exc:  # noqa: BLE001 - a dead replica or a failing model
        record(False)
        raise RequestError(503, f"model unavailable, retry shortly: {type(exc).__name__}") from None
    record(True)
    return Response(orjson.dumps(body), media_type="application/json")


async def answer(events: AsyncIterator[Any], seed: int, version: str) -> dict[str, Any]:
    """The non-streamed answer: every token, the text, why it ended, usage."""
    tokens, last = [], {}
    async for item in events:
        if isinstance(item, dict):
            last = item
        else:
            tokens.append(item)
    text = b"".join(token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
    return {"text": text, "tokens": tokens, **last, "seed": seed, "model_version": version}


async def sse(
    events: AsyncIterator[Any], seed: int, version: str, record: Callable[[bool], None]
) -> AsyncIterator[bytes]:
    """The streamed answer as Server-Sent Events (see the module docstring); a failure after
    the stream has begun is an ``error`` event (the status line was already sent)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        try:
            async for item in events:
                if isinstance(item, dict):
                    tail = decoder.decode(b"", final=True)
                    done = {"text": tail, **item, "seed": seed, "model_version": version}
                    record(True)
                    yield event("done", done)
                else:
                    text = decoder.decode(token_bytes(item))
                    yield event("token", {"token": item, "text": text})
        except Exception as exc:  # noqa: BLE001 - the client hears of it in the stream's one shape
            record(False)
            yield event("error", {"error": f"generation failed ({type(exc).__name__})"})
    finally:  # ended, or the client went away: stop generating for it
        await close(events)


async def close(events: Any) -> None:
    """Stop a generation's events early: an async generator (one hop) is closed, a Serve
    streaming response (two hops) cancelled; either cancels the sequence in its replica."""
    if hasattr(events, "aclose"):
        await events.aclose()
    elif hasattr(events, "cancel"):
        events.cancel()


def event(name: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event: ``event: <name>``, one ``data:`` line of JSON, a blank line."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
