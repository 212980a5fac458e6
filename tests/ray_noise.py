"""What Ray prints that lepton_ray's default output must not show (see lepton_ray.console)."""

from __future__ import annotations

import re

# Prefixes of streamed worker and actor output, Ray's log-record levels, and messages seen before
# lepton_ray.console kept Ray's output in its log folder.
_MARKERS = re.compile(
    r"\((?:RayTrainWorker|TrainController|ServeController|ServeReplica|ProxyActor|raylet|pid=)"
    r"|\b(?:DEBUG|INFO|WARNING)\b|TrainingReport\(|Execution plan|Starting execution"
    r"|Progress bars disabled|RayDeprecationWarning|Token authentication|Started a local Ray"
)


def ray_noise(text: str) -> list[str]:
    """The lines of ``text`` that are Ray's output, not lepton_ray's."""
    return [line for line in text.splitlines() if _MARKERS.search(line)]
