"""Canary rollout: which version answers a request, and the verdict on the canary.

Ray's open-source Serve routes by path only, so the ingress splits traffic itself. Each predict
request goes to the canary with probability ``share`` while the canary is on trial; every model
call's outcome is recorded per version. Once the canary has answered ``min_requests`` requests the
judge decides once and for all:

- **rollback** when the canary's error rate is higher than the stable version's (plus
  ``tolerance``): no more traffic goes to the canary;
- **promote** otherwise: all traffic goes to the canary.

A request that fails on the canary is retried on the stable version, so users never see the
canary's errors; the failure still counts against the canary. Pure logic, no Serve: the ingress
owns one judge (one per ingress replica; each judges the traffic it routes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["trial", "promoted", "rolled_back"]


@dataclass
class Tally:
    """Model calls to one version: how many, and how many failed."""

    requests: int = 0
    errors: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass
class CanaryJudge:
    """Routes requests between ``stable`` and ``canary`` and decides the canary's fate."""

    share: float
    min_requests: int
    tolerance: float = 0.0
    state: Verdict = "trial"
    stable: Tally = field(default_factory=Tally)
    canary: Tally = field(default_factory=Tally)
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def pick(self) -> Literal["stable", "canary"]:
        """Which version serves the next request."""
        if self.state == "promoted":
            return "canary"
        if self.state == "trial" and self.rng.random() < self.share:
            return "canary"
        return "stable"

    def record(self, version: Literal["stable", "canary"], ok: bool) -> Verdict:
        """Count one model call's outcome; returns the (possibly new) state."""
        tally = self.canary if version == "canary" else self.stable
        tally.requests += 1
        tally.errors += not ok
        if self.state == "trial" and self.canary.requests >= self.min_requests:
            worse = self.canary.error_rate > self.stable.error_rate + self.tolerance
            self.state = "rolled_back" if worse else "promoted"
        return self.state

    def report(self) -> dict:
        return {
            "state": self.state,
            "share": self.share,
            "min_requests": self.min_requests,
            "stable": vars(self.stable).copy() | {"error_rate": self.stable.error_rate},
            "canary": vars(self.canary).copy() | {"error_rate": self.canary.error_rate},
        }
