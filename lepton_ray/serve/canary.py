"""Canary rollout: which version answers a request, the verdict on the canary, and its record.

Ray's open-source Serve routes by path only, so the ingress splits traffic itself. While the canary
is on trial, each predict request is **mirrored** to it with probability ``share``: the stable
version answers the client as always, and the canary gets the same images at the same moment.
Once the canary has answered ``min_requests`` mirrored requests, the judge decides once and for
all, on the same requests for both versions:

- **errors**: the canary's error rate at most the stable version's plus ``tolerance``;
- **latency**: the canary's median model-call time at most ``max_latency_ratio`` times the stable
  version's;
- **answers**: the canary's top-1 class agrees with the stable version's on at least
  ``min_agreement`` of the mirrored images.

All three hold: **promoted**, all traffic goes to the canary. Any fails: **rolled back**, none does,
and the report says which (``reason``). A canary with random weights agrees with a trained stable
model on about one image in ten, so it is rolled back without a user ever seeing its answers.

The verdict is kept in the object store (:class:`VerdictRecord`, one JSON per stable/canary pair),
not in a replica's memory: a restarted or added ingress replica reads it and routes accordingly,
and replicas that judged apart converge on the stored one. :class:`CanaryTrial` is what an
ingress replica holds: the judge, the record, and the mirrored calls judged in the background.
No Serve here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["trial", "promoted", "rolled_back"]
Route = Literal["stable", "canary", "mirror"]


@dataclass
class Tally:
    """Model calls to one version on mirrored requests: how many, how many failed, how long."""

    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p50_ms(self) -> float | None:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    def add(self, ok: bool, ms: float) -> None:
        self.requests += 1
        self.errors += not ok
        if ok:
            self.latencies_ms.append(ms)

    def report(self) -> dict[str, Any]:
        p50 = self.p50_ms
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p50_ms": None if p50 is None else round(p50, 2),
        }


def top1_agreement(stable: dict[str, Any], canary: dict[str, Any]) -> tuple[int, int]:
    """(images whose predicted class is the same, images compared) of two answers to one request
    (``{"predictions": [{"index": ...}, ...]}``)."""
    a, b = stable["predictions"], canary["predictions"]
    return sum(x["index"] == y["index"] for x, y in zip(a, b, strict=True)), len(a)


def token_agreement(stable: dict[str, Any], canary: dict[str, Any]) -> tuple[int, int]:
    """(tokens the two generations share before they first differ, tokens of the longer one) for
    one mirrored ``/v1/generate`` request (``{"tokens": [...]}``). Both ran the same prompt with
    the same seed and sampling, so the same weights give the same tokens (1.0); once two models
    pick different tokens their continuations are no longer comparable, hence the common prefix.

    >>> token_agreement({"tokens": [5, 6, 7, 8]}, {"tokens": [5, 6, 9]})
    (2, 4)
    """
    a, b = stable["tokens"], canary["tokens"]
    same = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    return same, max(len(a), len(b))


@dataclass
class CanaryJudge:
    """Routes requests between ``stable`` and ``canary`` and decides the canary's fate."""

    share: float
    min_requests: int
    tolerance: float = 0.0
    max_latency_ratio: float = 2.0
    min_agreement: float = 0.9
    state: Verdict = "trial"
    reason: str = ""
    stable: Tally = field(default_factory=Tally)
    canary: Tally = field(default_factory=Tally)
    agreed: int = 0
    compared: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def pick(self) -> Route:
        """Where the next request goes: ``mirror`` (stable answers, the canary is compared) with
        probability ``share`` during the trial; then all to the canary or all to stable."""
        if self.state == "promoted":
            return "canary"
        if self.state == "trial" and self.rng.random() < self.share:
            return "mirror"
        return "stable"

    def record(
        self,
        stable: tuple[bool, float],
        canary: tuple[bool, float],
        agreement: tuple[int, int] = (0, 0),
    ) -> Verdict:
        """Count one mirrored request: each version's (ok, milliseconds) and the top-1 agreement
        of their answers; returns the (possibly new) state."""
        if self.state != "trial":
            return self.state
        self.stable.add(*stable)
        self.canary.add(*canary)
        self.agreed += agreement[0]
        self.compared += agreement[1]
        if self.canary.requests >= self.min_requests:
            failed = self.failed_criteria()
            self.state = "rolled_back" if failed else "promoted"
            self.reason = "; ".join(failed) or "errors, latency and answers within bounds"
        return self.state

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def failed_criteria(self) -> list[str]:
        """What makes the canary worse than stable, one phrase each (empty: nothing)."""
        out = []
        if self.canary.error_rate > self.stable.error_rate + self.tolerance:
            out.append(
                f"error rate {self.canary.error_rate:.2f} > stable's "
                f"{self.stable.error_rate:.2f} + {self.tolerance}"
            )
        canary_ms, stable_ms = self.canary.p50_ms, self.stable.p50_ms
        if canary_ms is not None and stable_ms and canary_ms > self.max_latency_ratio * stable_ms:
            out.append(
                f"p50 {canary_ms:.1f} ms > {self.max_latency_ratio} x stable's {stable_ms:.1f} ms"
            )
        agreement = self.agreement
        if agreement is None or agreement < self.min_agreement:
            shown = "none compared" if agreement is None else f"{agreement:.2f}"
            out.append(f"agreement with stable {shown} < {self.min_agreement}")
        return out

    def adopt(self, record: dict[str, Any]) -> None:
        """Take a verdict reached before (by this replica's predecessor or another replica)."""
        if record.get("state") in ("promoted", "rolled_back"):
            self.state = record["state"]
            self.reason = str(record.get("reason", ""))

    def report(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "share": self.share,
            "min_requests": self.min_requests,
            "stable": self.stable.report(),
            "canary": self.canary.report(),
            "agreement": self.agreement,
        }


@dataclass(frozen=True)
class VerdictRecord:
    """Where the verdict on one canary against one stable version is kept:
    ``<store>/serving/<app>/canary/<stable version>--<canary version>.json``.

    Written once, when a replica reaches the verdict (a single PUT); read by every ingress
    replica when it starts and, during the trial, about once a second. Deploying the same pair
    again finds the verdict; a new canary (or a new stable version) is a new trial. To judge a
    pair afresh, delete its file.
    """

    store: str | None  # None: $LEPTON_STORE or ~/.lepton_ray/store
    app: str
    stable_version: str
    canary_version: str
    endpoint_url: str | None = None

    def location(self) -> Any:
        from lepton_ray import runs
        from lepton_ray.storage import default_store

        home = runs.serving_home(self.store or default_store(), self.app, self.endpoint_url)
        return home.join("canary", f"{self.stable_version}--{self.canary_version}.json")

    def read(self) -> dict[str, Any] | None:
        """The stored verdict, or None while there is none."""
        from lepton_ray.errors import NotFoundError

        try:
            record = self.location().read_json()
        except (NotFoundError, ValueError):  # none yet, or not JSON: no verdict stands
            return None
        return record if isinstance(record, dict) else None

    def write(self, judge: CanaryJudge) -> dict[str, Any]:
        """Store ``judge``'s verdict unless one is stored already; returns the one that stands."""
        stored = self.read()
        if stored is not None:
            return stored
        record = {
            "state": judge.state,
            "reason": judge.reason,
            "stable_version": self.stable_version,
            "canary_version": self.canary_version,
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "judged": judge.report(),
        }
        self.location().write_json(record)
        return record


class CanaryTrial:
    """The canary in one ingress replica: routes requests (:meth:`pick`), judges mirrored calls
    once the canary's answer is in (:meth:`judge_later`; the client does not wait for it), and
    keeps the verdict and its record the same (:meth:`sync`)."""

    def __init__(self, judge: CanaryJudge, record: VerdictRecord):
        self.judge, self.record = judge, record
        self.stored, self._checked, self._pending = False, 0.0, set()
        self._adopt(self._exchange())  # a verdict reached before this replica started stands

    def pick(self) -> Route:
        return self.judge.pick()

    def judge_later(
        self,
        canary: Awaitable[tuple[dict[str, Any] | None, float]],
        stable: dict[str, Any] | None,
        stable_s: float,
        agree: Callable[[dict[str, Any], dict[str, Any]], tuple[int, int]] = top1_agreement,
    ) -> asyncio.Future:
        """Count a mirrored request once ``canary`` (its answer or None, and seconds) is done,
        against ``stable``'s answer (None: stable failed) that took ``stable_s`` seconds;
        ``agree`` compares the two answers."""

        async def judge() -> None:
            answer, canary_s = await canary
            agreement = (0, 0)
            if answer is not None and stable is not None:
                agreement = agree(stable, answer)
            before = self.judge.state
            self.judge.record(
                (stable is not None, stable_s * 1e3),
                (answer is not None, canary_s * 1e3),
                agreement,
            )
            if self.judge.state != before:
                await self.sync(force=True)

        task = asyncio.ensure_future(judge())
        self._pending.add(task)  # held until done: the event loop keeps only weak references
        task.add_done_callback(self._pending.discard)
        return task

    async def mirrored(
        self, events: AsyncIterator[Any], canary: asyncio.Future
    ) -> AsyncIterator[Any]:
        """A mirrored generation: the stable version's ``events`` (tokens, then a final dict)
        passed on to the client as they come, its tokens kept; once they are all out, judged
        against ``canary`` (its ``({"tokens": [...]}`` or None``, seconds per token)``) by
        :func:`token_agreement`, latency per token. A client that leaves first cancels the
        canary's generation too and nothing is judged (a disconnect is no one's failure)."""
        tokens: list[int] = []
        start, ok = time.perf_counter(), False
        try:
            async for item in events:
                if not isinstance(item, dict):
                    tokens.append(item)
                yield item
            ok = True
        except (GeneratorExit, asyncio.CancelledError):
            canary.cancel()
            raise
        except Exception:  # noqa: BLE001 - the stable version failed: counted, then re-raised
            self.judge_later(canary, None, 0.0, token_agreement)
            raise
        finally:
            if ok:
                per_token = (time.perf_counter() - start) / max(1, len(tokens))
                self.judge_later(canary, {"tokens": tokens}, per_token, token_agreement)

    async def sync(self, force: bool = False) -> None:
        """Store a verdict reached here, or adopt one another replica stored: at most once a
        second unless ``force``, and no more once one is stored."""
        now = time.monotonic()
        if self.stored or (not force and now - self._checked < 1.0):
            return
        self._checked = now
        self._adopt(await asyncio.to_thread(self._exchange))

    def _exchange(self) -> dict[str, Any] | None:
        """The stored verdict after storing this replica's, if it has one (blocking I/O); None
        while there is none, or when the store cannot be reached (the trial goes on)."""
        try:
            if self.judge.state == "trial":
                return self.record.read()
            return self.record.write(self.judge)
        except Exception as exc:  # noqa: BLE001 - the store is down: judge on, store it later
            logging.getLogger(__name__).warning(
                "canary verdict not synced with %s yet: %s: %s",
                self.record.location().uri,
                type(exc).__name__,
                exc,
            )
            return None

    def _adopt(self, stored: dict[str, Any] | None) -> None:
        if stored is not None:
            self.judge.adopt(stored)
            self.stored = True

    def report(self) -> dict[str, Any]:
        return self.judge.report() | {
            "record": self.record.location().uri,
            "stored": self.stored,
        }
