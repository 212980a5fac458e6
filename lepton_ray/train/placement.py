"""Can the cluster ever place the workers? A pure check, run before Ray Train is started, so that
an impossible request fails in a second with what is missing instead of waiting forever."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def worker_bundle(
    use_gpu: bool, resources_per_worker: Mapping[str, float] | None
) -> dict[str, float]:
    """The resources one worker asks for (Ray Train's defaults: 1 CPU, plus 1 GPU with use_gpu)."""
    bundle = {"CPU": 1.0}
    if use_gpu:
        bundle["GPU"] = 1.0
    bundle.update({k: float(v) for k, v in (resources_per_worker or {}).items()})
    return {k: v for k, v in bundle.items() if v > 0}


def _fits(node: Mapping[str, float], bundle: Mapping[str, float], count: int = 1) -> bool:
    return all(node.get(k, 0.0) >= v * count for k, v in bundle.items())


def _fmt(x: float) -> str:
    return f"{x:g}"


def unschedulable_reason(
    nodes: Sequence[Mapping[str, float]],
    bundle: Mapping[str, float],
    workers: int,
    strategy: str,
    data_cpus: float = 0.0,
) -> str | None:
    """Why ``workers`` bundles can never be placed on ``nodes`` (total resources per node), or None.

    Checks what no amount of waiting fixes on a fixed cluster: a resource the cluster lacks in
    total, a bundle bigger than any node, the STRICT_ strategies' node constraints, and
    ``data_cpus`` CPUs left over for Ray Data's read and preprocessing tasks, without which the
    workers would be placed and then wait for their first batch forever (on a 2-CPU head, two
    1-CPU workers take every CPU).
    """
    want = ", ".join(f"{_fmt(v)} {k}" for k, v in bundle.items())
    head = f"cannot place {workers} training worker{'s' if workers != 1 else ''} of {{{want}}}"
    for key, per in bundle.items():
        total = sum(n.get(key, 0.0) for n in nodes)
        if total < per * workers:
            return (
                f"{head}: the cluster has {_fmt(total)} {key} in all, {_fmt(per * workers)} needed"
            )
    if not any(_fits(n, bundle) for n in nodes):
        return f"{head}: no single node has {{{want}}}"
    if strategy == "STRICT_PACK" and not any(_fits(n, bundle, workers) for n in nodes):
        return f"{head} with STRICT_PACK: no single node holds all of them"
    if strategy == "STRICT_SPREAD":
        fitting = sum(_fits(n, bundle) for n in nodes)
        if fitting < workers:
            return f"{head} with STRICT_SPREAD: only {fitting} node{'s' if fitting != 1 else ''} can take one"
    if strategy in ("PACK", "SPREAD"):
        capacity = sum(min(int(n.get(k, 0.0) // v) for k, v in bundle.items()) for n in nodes)
        if capacity < workers:
            return f"{head}: the nodes can hold only {capacity} such workers"
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    left = cpus - bundle.get("CPU", 0.0) * workers
    if data_cpus and left < data_cpus:
        return (
            f"{head}: they take {_fmt(cpus - left)} of the cluster's {_fmt(cpus)} CPUs and Ray Data "
            f"needs {_fmt(data_cpus)} more to read and preprocess their data (use fewer workers, "
            f"resources_per_worker={{'CPU': 0.5}}, or a cluster with more CPUs)"
        )
    return None
