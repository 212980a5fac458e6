"""Generation (pure, no Ray): the KV cache against the plain loop, seeded sampling, continuous
batching (joining, leaving, cancelling, neighbours of other lengths), bounds."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch

from lepton_ray.generation import (
    Request,
    Scheduler,
    generate,
    generate_uncached,
    sample,
    sample_rows,
)
from lepton_ray.models import build_model
from lepton_ray.serve.codec import RequestError
from lepton_ray.serve.generate import TextSpec, TokenStreams, answer, parse, sse

TINY = dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)


def _model(seed: int = 0):
    """A tiny GPT whose samples depend on it: at nanoGPT's init (std 0.02) the logits are near
    zero and sampling is nearly uniform (5.5 nats); matrices of std 0.3 give ~4.2 nats."""
    torch.manual_seed(seed)
    m = build_model("gpt", **TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return m


def _req(prompt: bytes, **kw) -> Request:
    return Request(prompt=tuple(prompt), **{"stop_token": None, **kw})


def test_greedy_cached_equals_uncached_token_for_token():
    m = _model()
    for prompt in (b"a", b"The quick brown fox", b"x" * 31):
        r = _req(prompt, max_new_tokens=40, temperature=0)
        seq = generate(m, r)
        expected = generate_uncached(m, r)
        assert seq.tokens == expected
        assert len(expected) == min(40, 33 - len(prompt))  # stops at the context
        assert seq.finish_reason == "context"


def test_cached_logits_match_the_full_forward():
    m = _model()
    sched = Scheduler(m, slots=2)
    prompt = b"hello world"
    seq = sched.submit(_req(prompt, max_new_tokens=10, temperature=0))
    while not seq.done:
        sched.step()
    full = m(torch.tensor([list(prompt) + seq.tokens]))[0]
    # Replay through the cache and compare every decoded position's logits with the full pass.
    sched2 = Scheduler(m, slots=1)
    s2 = sched2.submit(_req(prompt, max_new_tokens=10, temperature=0))
    sched2.step()
    s2.slot, s2.tokens = 0, [seq.tokens[0]]
    for i in range(1, 10):
        logits = sched2._decode([s2])[0]
        torch.testing.assert_close(logits, full[len(prompt) + i - 1], atol=1e-5, rtol=1e-5)
        s2.tokens.append(seq.tokens[i])


def test_seeded_sampling_is_reproducible_and_matches_the_plain_loop():
    m = _model()
    r = _req(b"seed me", max_new_tokens=20, temperature=1.0, top_k=50, seed=7)
    a, b = generate(m, r).tokens, generate(m, r).tokens
    assert a == b == generate_uncached(m, r)
    assert generate(m, _req(b"seed me", max_new_tokens=20, seed=8)).tokens != a


def test_sample_temperature_and_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample(logits, 0, None, g) == 1
    draws = {sample(logits, 1.0, 2, g) for _ in range(200)}
    assert draws == {1, 2}  # top_k=2: never 0 or 3
    assert {sample(logits, 1.0, 1, g) for _ in range(20)} == {1}


def test_sample_rows_draws_each_row_as_it_would_alone_and_from_its_distribution():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1)) * 3
    settings = [(1.0, None), (0.0, None), (0.7, 3), (1.3, 40), (1.0, 1)]
    temps, ks = [t for t, _ in settings], [k for _, k in settings]
    together = [
        sample_rows(logits, temps, ks, [torch.Generator().manual_seed(s) for s in range(5)])
    ]
    alone = [
        sample(logits[i], t, k, torch.Generator().manual_seed(i))
        for i, (t, k) in enumerate(settings)
    ]
    assert together[0] == alone
    assert alone[1] == int(logits[1].argmax()) and alone[4] == int(logits[4].argmax())
    assert alone[2] in set(torch.topk(logits[2], 3).indices.tolist())
    # The draws follow softmax(logits / T): frequencies over 4,000 draws within 0.03 of it.
    row = torch.tensor([1.0, 0.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor(sample_rows(row.expand(4000, 4), [0.8] * 4000, [None] * 4000, [g] * 4000))
    freq = torch.bincount(draws, minlength=4) / 4000
    torch.testing.assert_close(freq, torch.softmax(row / 0.8, 0), atol=0.03, rtol=0)


def test_concurrent_requests_with_different_seeds_equal_their_solo_runs():
    m = _model()
    reqs = [
        _req(b"first prompt, longer", max_new_tokens=5, seed=1),  # leaves slot 0 first
        _req(b"ab", max_new_tokens=9, seed=2, top_k=20),
        _req(b"greedy one", max_new_tokens=7, temperature=0),
    ]
    solo = [generate(m, r).tokens for r in reqs]
    sched = Scheduler(m, slots=3)
    seqs = [sched.submit(reqs[0])]
    sched.step()
    sched.step()
    seqs.append(sched.submit(reqs[1]))  # joins a batch already two steps in
    sched.step()
    seqs.append(sched.submit(reqs[2]))
    while sched.busy:
        batch = len(sched.running)
        sched.step()
        assert batch <= 3
    # Slots 1 and 2 ran on after slot 0 was freed: their keys gathered, not a view of 0..A-1.
    assert [s.tokens for s in seqs] == solo
    assert [s.finish_reason for s in seqs] == ["length"] * 3


def test_prompts_of_different_lengths_joining_at_one_step_equal_their_solo_runs():
    m = _model()
    reqs = [
        _req(b"a longer prompt than the others", max_new_tokens=6, seed=4),
        _req(b"x", max_new_tokens=1, seed=5),  # ends at its first token: its slot is freed
        _req(b"mid length", max_new_tokens=8, temperature=0),
        _req(b"waits for a slot", max_new_tokens=4, seed=6, top_k=5),
    ]
    solo = [generate(m, r).tokens for r in reqs]
    sched = Scheduler(m, slots=3)
    seqs = [sched.submit(r) for r in reqs]
    events = sched.step()  # three prefilled together; the fourth takes the slot "x" left
    assert [s for s, _ in events] == seqs and seqs[1].done and seqs[3].slot == 1
    while sched.busy:
        sched.step()
    assert [s.tokens for s in seqs] == solo


def test_waiting_requests_take_freed_slots_and_cancel_frees_at_the_next_step():
    m = _model()
    sched = Scheduler(m, slots=2)
    long = sched.submit(_req(b"long", max_new_tokens=25))
    short = sched.submit(_req(b"short", max_new_tokens=2))
    queued = sched.submit(_req(b"queued", max_new_tokens=3, seed=5))
    sched.step()
    assert {s.slot for s in (long, short)} == {0, 1} and queued.slot is None
    events = sched.step()  # short ends here; queued takes its slot in the same step
    assert short.finish_reason == "length" and queued.slot is not None
    assert [s for s, _ in events] == [long, short, queued]
    sched.cancel(long)
    assert long.slot is not None  # freed at the next step, not during one
    events = sched.step()
    assert (long, None) in events and long.finish_reason == "cancelled" and long.slot is None
    assert sorted(sched.free) == [0] and len(sched.running) == 1
    while sched.busy:
        sched.step()
    assert queued.tokens == generate(m, _req(b"queued", max_new_tokens=3, seed=5)).tokens
    assert sorted(sched.free) == [0, 1]
    waiting = sched.submit(_req(b"never runs", max_new_tokens=3))
    sched.cancel(waiting)
    assert sched.step() == [(waiting, None)] and not sched.busy


def test_stop_token_ends_without_being_emitted():
    m = _model()
    first = generate(m, _req(b"abc", max_new_tokens=8, seed=3)).tokens
    i = next(i for i in range(1, 8) if first[i] not in first[:i])  # its first appearance
    seq = generate(m, _req(b"abc", max_new_tokens=8, seed=3, stop_token=first[i]))
    assert seq.tokens == first[:i] and seq.finish_reason == "stop"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(prompt=()), "prompt is empty"),
        (dict(prompt=(1,) * 33), "longer than the model's context"),
        (dict(prompt=(256,)), "prompt tokens"),
        (dict(prompt=(1,), max_new_tokens=0), "max_new_tokens"),
        (dict(prompt=(1,), temperature=-1.0), "temperature"),
        (dict(prompt=(1,), temperature=float("nan")), "temperature"),
        (dict(prompt=(1,), top_k=0), "top_k"),
        (dict(prompt=(1,), seed=-1), "seed"),
    ],
)
def test_requests_out_of_bounds_are_refused(kw, message):
    sched = Scheduler(_model(), slots=1)
    with pytest.raises(ValueError, match=message):
        sched.submit(Request(**kw))
    assert not sched.busy


# --- the endpoint's pure side (lepton_ray.serve.generate) -----------------------------------
SPEC = TextSpec(block_size=32, vocab_size=256)


def test_parse_defaults_and_fields():
    req, stream = parse(b'{"prompt": "h\\u00e9"}', SPEC)
    assert req.prompt == tuple("hé".encode()) and req.max_new_tokens == 32 and not stream
    assert req.temperature == 1.0 and req.top_k is None and 0 <= req.seed < 2**63
    body = b'{"prompt":"x","max_new_tokens":5,"temperature":0,"top_k":3,"seed":9,"stream":true}'
    req, stream = parse(body, SPEC)
    assert (req.max_new_tokens, req.temperature, req.top_k, req.seed, stream) == (
        5,
        0.0,
        3,
        9,
        True,
    )


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"", 400, "empty request body"),
        (b"{", 400, "not valid JSON"),
        (b"[1]", 400, "JSON object"),
        (b'{"prompt": ""}', 422, '"prompt" is empty'),
        (b'{"prompt": 5}', 422, '"prompt" must be a string'),
        (b'{"prompt": "' + b"a" * 33 + b'"}', 422, "longer than the model's context of 32"),
        (b'{"prompt": "a", "max_new_tokens": 0}', 422, '"max_new_tokens" must be 1..32'),
        (b'{"prompt": "a", "max_new_tokens": 33}', 422, '"max_new_tokens" must be 1..32'),
        (b'{"prompt": "a", "max_new_tokens": 2.5}', 422, "whole number"),
        (b'{"prompt": "a", "max_new_tokens": true}', 422, "whole number"),
        (b'{"prompt": "a", "temperature": -1}', 422, '"temperature"'),
        (b'{"prompt": "a", "top_k": 0}', 422, '"top_k"'),
        (b'{"prompt": "a", "seed": -3}', 422, '"seed"'),
        (b'{"prompt": "a", "stream": "yes"}', 422, '"stream"'),
        (b'{"prompt": "a", "max_tokens": 5}', 422, "unknown field 'max_tokens'"),
    ],
)
def test_parse_refuses_bad_requests_in_one_line(body, status, message):
    with pytest.raises(RequestError, match=re.escape(message)) as info:
        parse(body, SPEC)
    assert info.value.status == status and "\n" not in str(info.value)


def _collect_sse(chunks: list[bytes]) -> list[tuple[str, dict]]:
    out = []
    for raw in b"".join(chunks).decode().split("\n\n")[:-1]:
        name, data = raw.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_streams_batch_concurrent_requests_and_sse_concatenates_to_the_answer():
    m = _model()
    reqs = [_req(b"caf\xc3\xa9 ", max_new_tokens=20, seed=s) for s in (1, 2)]
    solo = [generate(m, r).tokens for r in reqs]

    async def run():
        streams = TokenStreams(m, slots=4, on_step=steps.append)
        ok = []
        answers = await asyncio.gather(
            *(answer(streams.stream(r), r.seed, "v1") for r in reqs),
            _gather(sse(streams.stream(reqs[0]), 1, "v1", ok.append)),
        )
        return answers, ok, streams

    steps: list[int] = []
    (first, second, chunks), ok, streams = asyncio.run(run())
    assert [first["tokens"], second["tokens"]] == solo
    assert first["usage"] == {"prompt_tokens": 6, "completion_tokens": 20}
    assert first["finish_reason"] == "length" and first["seed"] == 1
    assert max(steps) == 3  # all three sequences decoded in the same steps
    events = _collect_sse(chunks)
    assert [n for n, _ in events] == ["token"] * 20 + ["done"] and ok == [True]
    assert [d["token"] for _, d in events[:-1]] == solo[0]
    assert "".join(d["text"] for _, d in events) == first["text"]
    assert first["text"] == bytes(solo[0]).decode("utf-8", errors="replace")
    info = streams.info()
    assert info["running"] == info["waiting"] == 0 and info["finished"] == {"length": 3}


async def _gather(chunks) -> list[bytes]:
    return [c async for c in chunks]


def test_closing_a_stream_cancels_its_sequence_and_frees_its_slot():
    m = _model()

    async def run():
        streams = TokenStreams(m, slots=1)
        it = streams.stream(_req(b"go on", max_new_tokens=30))
        assert isinstance(await anext(it), int)
        await it.aclose()  # what a client disconnect does to the response's generator
        waiting = answer(streams.stream(_req(b"next", max_new_tokens=3, seed=4)), 4, "v")
        return await asyncio.wait_for(waiting, 10), streams

    later, streams = asyncio.run(run())
    assert later["tokens"] == generate(m, _req(b"next", max_new_tokens=3, seed=4)).tokens
    assert streams.info()["running"] == 0 and sorted(streams.scheduler.free) == [0]
    assert streams.info()["finished"] == {"cancelled": 1, "length": 1}
