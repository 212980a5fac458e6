"""Text generation from a :class:`lepton_ray.gpt.GPT`: a KV cache and continuous batching.

A :class:`Scheduler` holds ``slots`` sequences at once, each with its own rows of one key/value
cache per layer, ``(slots, nh, block_size, hs)``. Requests wait in a queue and join the running
batch between steps; each :meth:`Scheduler.step` gives every running sequence one token:

- a sequence that has just joined is *prefilled*: its prompt (1, P) runs through the model once,
  causally, writing its keys and values at positions ``0..P-1`` of its slot, and the last
  position's logits give its first token (sequences joining at one step are prefilled together,
  right-padded to the longest prompt);
- every other running sequence is *decoded* together: the last token of each (A, 1) is fed at
  its own position (``pos`` = tokens already cached), its key and value written there, and its
  query attends to positions ``0..pos`` of its own slot. Slots hold sequences of different
  lengths, so the cached keys are read up to the longest and masked per row (``key <= pos``):
  a masked key gets zero weight, so a short sequence's answer does not depend on its neighbours.

E.g. prompts of 5 and 3 tokens: step 1 prefills both (a token each); step 2 feeds them at
positions 5 and 3, reads keys ``0..5`` for both, and masks keys 4 and 5 of the second.

A sequence takes the lowest free slot, so a busy scheduler's sequences hold slots ``0..A-1`` and
their keys are read as a view of the cache; only with holes (a sequence in the middle has left and
none waits) are they gathered, a copy of the cache per layer per step. One run each on 2 shared
CPU cores (a GPT of 4 layers, width 128, 128 tokens per stream, 1 thread): 64 streams made 10.4k
tokens/s read as views, 4.2k gathered, and 1.1k one stream at a time.

Sampling is batched over the rows of a step (:func:`sample_rows`, one read-back of all tokens) and
the prompts joining at one step are prefilled together. Before, each row sampled alone (its own
``topk`` and ``multinomial``, and on a GPU a synchronisation per row) and each prompt ran its own
forward. Two interleaved A/B runs on 2 shared CPU cores (1 thread; a GPT of 2 layers, width 64,
vocabulary 4,096; 16-token prompts, 48 new tokens, top-k 50; ``benchmarks.gpu_generate``'s
closed loop): 64 streams 2.4k and 2.2k tokens/s before, 9.1k and 6.7k after; time to first token
at 64 streams (p50) 93 and 144 ms before, 13 and 35 ms after.

Each sequence samples from its own seeded ``torch.Generator`` (temperature, then top-k), so a
request's tokens depend on its seed and prompt only, not on who else is in the batch. A sequence
leaves when it has ``max_new_tokens``, samples ``stop_token`` (EOT, byte 0, by default; not
emitted), or fills the context: the token sampled from position ``block_size - 1`` is the last
(a prompt of ``P`` tokens gets at most ``block_size + 1 - P``). A cancelled request leaves at the
next step and its slot takes the next waiting one.

:func:`generate` runs one request alone through the same code; :func:`generate_uncached` is the
plain loop (the whole sequence through ``model(idx)`` per token) the tests compare against.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lepton_ray.data.text import EOT
from lepton_ray.gpt import GPT

FINISH_REASONS = ("length", "context", "stop", "cancelled", "error")
"""Why a sequence ended: its ``max_new_tokens``, the model's context, its stop token, a cancel, a
step that failed (:meth:`Scheduler.abort`)."""


@dataclass(frozen=True, kw_only=True)
class Request:
    """What to generate."""

    prompt: tuple[int, ...]
    """Token ids of the prompt (at least one, at most the model's ``block_size``)."""
    max_new_tokens: int = 64
    """The most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 picks the most likely token (greedy)."""
    top_k: int | None = None
    """Sample among the ``top_k`` most likely tokens only (None: all)."""
    seed: int = 0
    """Seeds this request's own generator: the same seed and prompt give the same tokens."""
    stop_token: int | None = EOT
    """A token that ends the sequence (not emitted); None: none does."""

    def check(self, block_size: int, vocab_size: int) -> None:
        """Raise ``ValueError`` naming the first field out of range for a model of this shape."""
        if not self.prompt:
            raise ValueError("prompt is empty")
        if len(self.prompt) > block_size:
            raise ValueError(
                f"prompt of {len(self.prompt)} tokens is longer than the model's context "
                f"({block_size})"
            )
        if any(not 0 <= t < vocab_size for t in self.prompt):
            raise ValueError(f"prompt tokens must be in 0..{vocab_size - 1}")
        if not 1 <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")


@dataclass(eq=False)
class Sequence:
    """One request's state in a :class:`Scheduler`."""

    id: int
    request: Request
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    """The tokens generated so far."""
    finish_reason: str | None = None
    """One of :data:`FINISH_REASONS` once it has ended."""
    slot: int | None = None
    cached: int = 0
    """Tokens whose keys and values are in the cache (prompt, then all but the last generated)."""
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator
) -> int:
    """One token from ``logits`` (V,): :func:`sample_rows` of one row."""
    return sample_rows(logits[None], [temperature], [top_k], [generator])[0]


def sample_rows(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ks: list[int | None],
    generators: list[torch.Generator],
) -> list[int]:
    """One token per row of ``logits`` (A, V), each row with its own settings and generator: the
    argmax at temperature 0, else a draw from ``softmax(logits / temperature)`` over the row's
    ``top_k`` largest (exactly ``top_k``; None: all V).

    Every row's work is batched (one ``topk``, softmax and cumulative sum for all rows, one
    read-back), because sampling row by row cost more than the model: at 64 streams on 2 CPUs,
    75% of a step was the per-row ``multinomial``/``topk``, and on a GPU each row also synchronised
    it. A row's draw stays its own: its generator (a CPU ``torch.Generator``) gives one uniform
    ``u`` per sampled token, and the token is where ``u`` falls in the row's cumulative
    distribution (inverse CDF), so a sequence's tokens do not depend on its neighbours. E.g. top-2
    probabilities [0.7, 0.3] (sorted): u = 0.5 -> the first, u = 0.8 -> the second.
    """
    A, V = logits.shape
    dev = logits.device
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)  # (A,): the greedy rows' answer
    hot = [i for i, t in enumerate(temperatures) if t > 0]
    if hot:
        ks = [min(top_ks[i] or V, V) for i in hot]
        kmax = max(ks)
        u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64) for i in hot])
        temp = torch.tensor([temperatures[i] for i in hot], dtype=torch.float32)
        k = torch.tensor(ks)
        rows = torch.tensor(hot) if len(hot) < A else None
        u, temp, k = u.to(dev), temp.to(dev), k.to(dev)
        vals, idx = torch.topk(
            (logits if rows is None else logits[rows.to(dev)]) / temp[:, None], kmax
        )
        if min(ks) < kmax:  # (H, kmax): a row with a smaller top_k ignores its tail
            vals = vals.masked_fill(
                torch.arange(kmax, device=dev)[None, :] >= k[:, None], -math.inf
            )
        cdf = F.softmax(vals, dim=-1).double().cumsum(-1)  # (H, kmax), descending probabilities
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        # u * total < total, so pick < k but for rounding in the last place: keep it a candidate
        pick = torch.minimum(pick, k - 1)
        drawn = idx.gather(1, pick[:, None])[:, 0]
        if rows is None:
            tokens = drawn
        else:
            tokens[rows.to(dev)] = drawn
    return tokens.tolist()


class Scheduler:
    """Continuous batching over a GPT (see the module docstring). :meth:`submit` and
    :meth:`cancel` may be called from another thread than the one calling :meth:`step`."""

    def __init__(self, model: GPT, slots: int = 8):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size, self.vocab_size = model.block_size, model.vocab_size
        n_layer, nh = len(model.blocks), model.blocks[0].attn.n_head
        hs = model.tok_emb.weight.shape[1] // nh
        shape = (slots, nh, self.block_size, hs)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(n_layer)]
        self.free = list(range(slots))  # a heap: a sequence takes the lowest free slot
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.steps = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def busy(self) -> bool:
        """Whether a sequence runs or waits."""
        return bool(self.running or self.waiting)

    def submit(self, request: Request) -> Sequence:
        """Queue ``request`` (checked against the model); it joins the batch at the next step."""
        request.check(self.block_size, self.vocab_size)
        gen = torch.Generator().manual_seed(request.seed)  # CPU: draws need no device sync
        seq = Sequence(next(self._ids), request, gen)
        with self._lock:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End ``seq`` at the next step (its slot is freed then)."""
        seq.cancelled = True

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int | None]]:
        """One token for every running sequence; returns ``(sequence, token)`` for each, the
        token None for a sequence that ended without one (stop token, cancel). A sequence whose
        ``done`` is set after its event has left the batch."""
        events: list[tuple[Sequence, int | None]] = []
        with self._lock:
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                events.append((seq, self._finish(seq, "cancelled")))
        for seq in [s for s in self.running if s.cancelled]:
            events.append((seq, self._finish(seq, "cancelled")))
        if self.running:
            by_slot = sorted(self.running, key=lambda s: s.slot)
            events += self._emit_all(by_slot, self._decode(by_slot))
        while self.free:  # again while a sequence that ended at its first token freed a slot
            with self._lock:
                joined = [
                    self.waiting.popleft() for _ in range(min(len(self.free), len(self.waiting)))
                ]
            if not joined:
                break
            for seq in joined:
                seq.slot = heapq.heappop(self.free)
                self.running.append(seq)
            events += self._emit_all(joined, self._prefill(joined))
        self.steps += 1
        return events

    def abort(self) -> list[Sequence]:
        """End every running and waiting sequence (a step failed); returns them."""
        with self._lock:
            ended = [*self.running, *self.waiting]
            self.waiting.clear()
        for seq in ended:
            self._finish(seq, "error")
        return ended

    def _emit_all(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> list[tuple[Sequence, int | None]]:
        """Sample a token for each of ``seqs`` from its row of ``logits`` (A, V), all at once."""
        reqs = [s.request for s in seqs]
        tokens = sample_rows(
            logits,
            [r.temperature for r in reqs],
            [r.top_k for r in reqs],
            [s.generator for s in seqs],
        )
        return [(seq, self._emit(seq, t)) for seq, t in zip(seqs, tokens, strict=True)]

    def _emit(self, seq: Sequence, token: int) -> int | None:
        r = seq.request
        if token == r.stop_token:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        if len(seq.tokens) >= r.max_new_tokens:
            self._finish(seq, "length")
        elif seq.cached >= self.block_size:  # no position left to feed this token at
            self._finish(seq, "context")
        return token

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.slot is not None:
            self.running.remove(seq)
            heapq.heappush(self.free, seq.slot)
            seq.slot = None

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Run the prompts of sequences joining together through the model at once, caching
        their keys and values in their slots; each last prompt position's logits (J, V).

        Prompts of different lengths are right-padded to the longest (J, P): attention is
        causal, so a prompt's positions never see the padding after them, and a padded
        position's cached key is overwritten by the decode step that reaches it before any query
        reads it (decode reads keys ``0..pos``). One forward for J prompts instead of J forwards
        (at 64 joining streams the first token waited on 64 prefills, one after another)."""
        m = self.model
        lens = [len(s.request.prompt) for s in seqs]
        P = max(lens)
        rows = [list(s.request.prompt) + [0] * (P - n) for s, n in zip(seqs, lens, strict=True)]
        meta = torch.tensor([[s.slot, n - 1] for s, n in zip(seqs, lens, strict=True)])
        idx = torch.tensor(rows, dtype=torch.long).to(self.device)  # (J, P)
        slots, last = meta.to(self.device).unbind(1)  # (J,) each
        x = m.embed(idx)  # (J, P, C)
        for i, block in enumerate(m.blocks):
            attn = block.attn
            q, k, v = _heads(attn, block.ln_1(x))  # (J, nh, P, hs) each
            self.k[i][slots, :, :P], self.v[i][slots, :, :P] = k, v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + attn.proj(_merge(y))
            x = x + block.mlp(block.ln_2(x))
        for seq, n in zip(seqs, lens, strict=True):
            seq.cached = n
        return m.logits(x[torch.arange(len(seqs), device=self.device), last][:, None])[:, 0]

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token at its own position; logits (A, V). ``seqs`` in slot
        order: when they hold slots ``0..A-1`` (lowest free slots are taken first, so a busy
        scheduler's are), their cached keys are read as a view, not gathered (a copy of the
        cache per layer per step)."""
        m = self.model
        dev = self.device
        # One host-to-device copy for the three (A,) index vectors; L from the host's numbers (a
        # read of pos.max() would wait for the device).
        meta = torch.tensor([[s.tokens[-1], s.cached, s.slot] for s in seqs], dtype=torch.long)
        tok, pos, slots = meta.to(dev).unbind(1)  # (A,) each
        tok = tok[:, None]  # (A, 1)
        L = max(s.cached for s in seqs) + 1
        packed = all(s.slot == a for a, s in enumerate(seqs))
        # (A, 1, 1, L): row a sees keys 0..pos[a] of its own slot, never a neighbour's padding.
        mask = (torch.arange(L, device=dev)[None, :] <= pos[:, None])[:, None, None, :]
        x = m.tok_emb(tok) + m.pos_emb(pos)[:, None, :]  # (A, 1, C)
        for i, block in enumerate(m.blocks):
            attn = block.attn
            q, k, v = _heads(attn, block.ln_1(x))  # (A, nh, 1, hs) each
            self.k[i][slots, :, pos] = k[:, :, 0]  # advanced indices first: (A, nh, hs)
            self.v[i][slots, :, pos] = v[:, :, 0]
            if packed:  # (A, nh, L, hs) views of slots 0..A-1
                keys, values = self.k[i][: len(seqs), :, :L], self.v[i][: len(seqs), :, :L]
            else:
                keys, values = self.k[i][slots, :, :L], self.v[i][slots, :, :L]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + attn.proj(_merge(y))
            x = x + block.mlp(block.ln_2(x))
        for s in seqs:
            s.cached += 1
        return m.logits(x)[:, 0]


def _heads(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, T, C) -> q, k, v of (B, nh, T, hs), as :class:`lepton_ray.gpt.CausalSelfAttention`."""
    B, T, C = x.shape
    return tuple(
        t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
        for t in attn.qkv(x).split(C, dim=2)
    )


def _merge(y: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, C)."""
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, nh * hs)


def generate(model: GPT, request: Request) -> Sequence:
    """``request`` alone through a one-slot :class:`Scheduler`; the finished sequence."""
    sched = Scheduler(model, slots=1)
    seq = sched.submit(request)
    while not seq.done:
        sched.step()
    return seq


@torch.inference_mode()
def generate_uncached(model: GPT, request: Request) -> list[int]:
    """The plain loop: the whole sequence through ``model`` for every token (no cache)."""
    request.check(model.block_size, model.vocab_size)
    gen = torch.Generator().manual_seed(request.seed)
    dev = next(model.parameters()).device
    idx = list(request.prompt)
    out: list[int] = []
    while len(out) < request.max_new_tokens and len(idx) <= model.block_size:
        x = torch.tensor([idx], dtype=torch.long, device=dev)
        token = sample(model(x)[0, -1], request.temperature, request.top_k, gen)
        if token == request.stop_token:
            break
        out.append(token)
        idx.append(token)
    return out
