"""The doc section of a ``benchmarks/serve.py`` result, and the goals it is judged on.

Issue 18's goals, per ingress (the default path is HAProxy where its binary is present):

- every run: p50 added at concurrency 1, (a) − (c), <= 1 ms; (a) ÷ (b) requests/s at
  concurrency 64 >= 3;
- CPU runs whose (c) had as many processes as the endpoint had replicas (runs of the load
  generator): (a) ÷ (c) requests/s at concurrency 64 >= 0.8 (the 2-CPU goal);
- GPU runs only: (a) >= 2,000 requests/s at concurrency 64 with p99 <= 50 ms, and (a) >= 20,000
  images/s with batches of images in the request (its best level).

Every value is computed here from the run's own figures, so a result measured before a goal
changed renders with today's goals and its own numbers. Older results keep older layouts: no
ingress suffix (two hops through Serve's proxy), hardware as a string, a file of re-runs.
"""

from __future__ import annotations

from typing import Any

from benchmarks import harness
from benchmarks.harness import Goal, fmt, table

GOAL_RPS, GOAL_P99_MS, GOAL_IMAGES_PER_S = 2000, 50, 20000
"""Issue 18's absolute goals for (a) on one H200 (GPU runs only): requests/s and p99 at
concurrency 64 with one image per request; images/s with batches in the request."""

NAMES = {
    "a_batched": "(a) batched, Serve proxy, two hops",
    "b_unbatched": "(b) unbatched, Serve proxy, two hops",
    "a_batched_proxy": "(a) batched, Serve proxy",
    "b_unbatched_proxy": "(b) unbatched, Serve proxy",
    "a_batched_haproxy": "(a) batched, HAProxy",
    "b_unbatched_haproxy": "(b) unbatched, HAProxy",
    "c_plain_fastapi": "(c) plain FastAPI/uvicorn",
}
# Results before issue 5 (no ingress suffix) went through Serve's proxy and a second replica.
INGRESS_NAMES = {
    "": "Serve's proxy, two hops (the code of that run)",
    "proxy": "Serve's proxy (opt-out)",
    "haproxy": "HAProxy ingress (default)",
}
# metric -> (its column in a table of re-runs, how a value reads, the unit after a target)
COLUMNS = {
    "endpoint_over_plain_rps_at_64": ("(a) ÷ (c) at c=64", "{:.2f}x", ""),
    "batched_over_unbatched_rps_at_64": ("(a) ÷ (b) at c=64", "{:.2f}x", ""),
    "p50_added_ms_at_1": ("p50 added at c=1", "{:+.2f} ms", " ms"),
    "batched_rps_at_64": ("(a) req/s at c=64", "{:,.0f}", ""),
    "batched_p99_ms_at_64": ("(a) p99 at c=64", "{:.1f} ms", " ms"),
    "images_per_s": ("(a) images/s", "{:,.0f}", ""),
}


def _at(levels: list[dict], c: int) -> dict | None:
    return next((x for x in levels if x["concurrency"] == c), None)


def _ratio(x: float | None, y: float | None) -> float | None:
    """x ÷ y; None when either is missing or y is 0 (a variant that answered nothing)."""
    return None if x is None or not y else x / y


def metrics(
    results: dict[str, list], images: dict[str, list] | None = None
) -> dict[str, dict[str, float | None]]:
    """Per ingress: (a) ÷ (b) and (a) ÷ (c) requests/s at concurrency 64, (a) − (c) p50 at
    concurrency 1, (a)'s requests/s and p99 at concurrency 64, and, from the
    batches-in-the-request phase (``images``), (a)'s best images/s. A value the run could not
    give (a level not measured, no answers) is None: its goal reads "not measured"."""
    plain = results.get("c_plain_fastapi", [])
    out = {}
    for ingress in INGRESS_NAMES:
        sfx = f"_{ingress}" if ingress else ""
        a, b = f"a_batched{sfx}", f"b_unbatched{sfx}"
        if a not in results or b not in results:
            continue
        a1, a64, b64 = _at(results[a], 1), _at(results[a], 64), _at(results[b], 64)
        c1, c64 = _at(plain, 1), _at(plain, 64)
        p50 = (a1 or {}).get("p50_ms"), (c1 or {}).get("p50_ms")
        m = {
            "batched_over_unbatched_rps_at_64": _ratio(
                (a64 or {}).get("requests_per_s"), (b64 or {}).get("requests_per_s")
            ),
            "p50_added_ms_at_1": None if None in p50 else p50[0] - p50[1],
            "endpoint_over_plain_rps_at_64": _ratio(
                (a64 or {}).get("requests_per_s"), (c64 or {}).get("requests_per_s")
            ),
            "batched_rps_at_64": (a64 or {}).get("requests_per_s"),
            "batched_p99_ms_at_64": (a64 or {}).get("p99_ms"),
        }
        if images and images.get(a):
            m["images_per_s"] = max(x["images_per_s"] for x in images[a])
        out[ingress or "two_hops"] = m
    return out


def goals(
    ingress: str, fair_baseline: bool = False, gpu: bool = False, images_per_request: int = 0
) -> list[Goal]:
    """The goals judged for ``ingress`` (a key of :func:`metrics`). ``fair_baseline``: a CPU run
    whose (c) had as many worker processes as the endpoint had replicas (the 2-CPU goal);
    ``gpu``: a GPU run (the absolute goals); ``images_per_request`` names the batches in the
    request of that run's phase (0: none measured)."""
    name = INGRESS_NAMES["" if ingress == "two_hops" else ingress]
    judged = [
        Goal(
            f"{name}: (a) ÷ (c) requests/s at concurrency 64, as many processes, >= 0.8 "
            "(the 2-CPU goal)",
            f"{ingress}.endpoint_over_plain_rps_at_64",
            ">=",
            0.8,
        )
    ] * fair_baseline
    judged += [
        Goal(
            f"{name}: (a) ÷ (b) requests/s at concurrency 64 >= 3",
            f"{ingress}.batched_over_unbatched_rps_at_64",
            ">=",
            3,
        ),
        Goal(
            f"{name}: p50 added at concurrency 1, (a) − (c), <= 1 ms",
            f"{ingress}.p50_added_ms_at_1",
            "<=",
            1,
        ),
    ]
    if not gpu:
        return judged
    batches = (
        f"{images_per_request} images per request"
        if images_per_request
        else "batches of images in the request"
    )
    return judged + [
        Goal(
            f"{name}: (a) requests/s at concurrency 64 >= {GOAL_RPS:,} (GPU runs)",
            f"{ingress}.batched_rps_at_64",
            ">=",
            GOAL_RPS,
        ),
        Goal(
            f"{name}: (a) p99 at concurrency 64 <= {GOAL_P99_MS} ms (GPU runs)",
            f"{ingress}.batched_p99_ms_at_64",
            "<=",
            GOAL_P99_MS,
        ),
        Goal(
            f"{name}: (a) images/s with {batches}, its best level, "
            f">= {GOAL_IMAGES_PER_S:,} (GPU runs)",
            f"{ingress}.images_per_s",
            ">=",
            GOAL_IMAGES_PER_S,
        ),
    ]


def batching_ceiling(r: dict[str, Any]) -> str | None:
    """What batching can win in this run, from its numbers: the model's side of a request alone
    (``model_alone``: one image, and per image in a batch of 64), and plain FastAPI's time per
    request outside the model at concurrency 64. If (a) spent no more than that around the model,
    it could answer at most n / (outside + per image in a batch) requests/s: over (b), the most
    (a) ÷ (b) can be with an HTTP stack as costly as plain FastAPI's."""
    alone, n = r.get("model_alone"), r.get("replicas", 1)
    c64 = _at(r["results"].get("c_plain_fastapi", []), 64)
    if not alone or not c64 or not c64.get("requests_per_s"):
        return None
    one, batched = alone["batch_1_ms"], alone["batch_64_ms"] / 64
    per_request = n * 1000 / c64["requests_per_s"]  # ms of one process per request
    outside = per_request - one
    if outside <= 0:
        return None
    ceiling = n * 1000 / (outside + batched)
    text = (
        f"What batching can win here: the model's side of a request alone took {one:.3f} ms for "
        f"one image and {batched:.3f} ms per image in a batch of 64 ({one / batched:.2f}x less); "
        f"plain FastAPI's requests at concurrency 64 took {per_request:.3f} ms of a process each, "
        f"{outside:.3f} ms of it outside the model. Spending no more than that around the model, "
        f"(a) could answer at most {ceiling:,.0f} requests/s"
    )
    ratios = []
    for name, key in (("HAProxy", "b_unbatched_haproxy"), ("Serve's proxy", "b_unbatched_proxy")):
        b64 = _at(r["results"].get(key, []), 64)
        if b64 and b64.get("requests_per_s"):
            ratios.append(f"{ceiling / b64['requests_per_s']:.2f}x (b) behind {name}")
    return text + (": " + ", ".join(ratios) if ratios else "") + "."


def gpu_run(r: dict[str, Any]) -> bool:
    """Whether ``r`` (one run) put the model on a GPU; older results say so in their hardware."""
    hw = r.get("hardware")
    return bool(r.get("use_gpu") or (isinstance(hw, str) and "model on one" in hw))


def _run_goals(r: dict[str, Any], ingress: str) -> list[Goal]:
    gpu = gpu_run(r)
    # Runs of the load generator (they record their client) gave (c) as many processes.
    fair = "client" in r and not gpu
    return goals(ingress, fair, gpu, r.get("images_per_request") or 0)


def render(r: dict[str, Any], key: str) -> str:
    first = r["runs"][0] if "runs" in r else r  # a file of re-runs describes its first run
    where = "a GPU" if gpu_run(first) else "the CPU"
    head = (
        f"## Serving {first.get('model', 'cnn')} on {where}: the endpoint, batched and not, "
        f"vs plain FastAPI (`{key}`)\n\n"
    )
    if "runs" in r:
        return head + _reruns(r, key)
    rows = [
        [NAMES.get(k, k)]
        + [f"{x['requests_per_s']} / {x['p50_ms']} / {x['p99_ms']}" for x in levels]
        + [sum(x["errors"] for x in levels)]
        for k, levels in r["results"].items()
    ]
    m = metrics(r["results"], r.get("images"))
    lines = [harness.goal_lines(_run_goals(r, ingress), m) for ingress in m]
    lines += [_client_load(r)] if "client" in r else []
    lines += [f"- {c}" for c in [batching_ceiling(r)] if c]
    return (
        head
        + f"{harness.provenance(r, key)} {r['what']}.\n\n"
        + table(["variant", "c=1 req/s / p50 ms / p99 ms", "c=16", "c=64", "errors"], rows)
        + "\n\n"
        + (_images_table(r) + "\n\n" if r.get("images") else "")
        + "\n".join(lines + [f"- {n}" for n in r.get("notes", [])])
        + "\n"
    )


def _images_table(r: dict[str, Any]) -> str:
    """The batches-in-the-request phase: images/s, requests/s and latency per level."""
    levels = r["image_levels"]
    head = [
        f"{r['images_per_request']} images per request",
        f"c={levels[0]} images/s / req/s / p50 ms / p99 ms",
        *(f"c={c}" for c in levels[1:]),
        "errors",
    ]
    rows = [
        [NAMES.get(k, k)]
        + [
            f"{fmt(x['images_per_s'], 0)} / {x['requests_per_s']} / {x['p50_ms']} / {x['p99_ms']}"
            for x in lv
        ]
        + [sum(x["errors"] for x in lv)]
        for k, lv in r["images"].items()
    ]
    return table(head, rows)


def _client_load(r: dict[str, Any]) -> str:
    """How busy the client was: its busiest process's CPU seconds over a level's seconds."""
    phases = [("", r["results"]), (" with images in the request", r.get("images") or {})]
    busy = [
        (max(x["client_cpu_s"]) / x["seconds"], f"{NAMES.get(name, name)}{phase}", x["concurrency"])
        for phase, results in phases
        for name, levels in results.items()
        for x in levels
        if x.get("client_cpu_s")
    ]
    share, name, c = max(busy)
    hw = r.get("hardware")
    small = not isinstance(hw, dict) or (hw.get("cpu_cores") or 0) <= 4
    why = (
        "; on a machine this small its CPU is taken from what the servers could use, alike for "
        "every variant"
        if small
        else ""
    )
    return f"- The client's busiest process used {share:.0%} of a CPU (at its busiest, {name}, c={c}){why}."


def _reruns(r: dict[str, Any], key: str) -> str:
    """Several runs of one configuration: each run's goal values, and how many met each goal."""
    rows, met, columns = [], {}, {}
    for run in r["runs"]:
        for ingress, v in metrics(run["results"], run.get("images")).items():
            judged = _run_goals(run, ingress)
            for g in judged:
                met.setdefault(g.text, []).append(g.met({ingress: v}))
                metric = g.metric.split(".", 1)[1]
                label, _, unit = COLUMNS[metric]
                columns.setdefault(metric, f"{label} (goal {g.op} {fmt(g.target)}{unit})")
            rows.append((run.get("measured_at"), ingress, v, judged))
    # A goal that no run measured gets its line below, not a column of dashes.
    measured = [m for m in columns if any(v.get(m) is not None for *_, v, _ in rows)]
    cells = []
    for when, ingress, v, judged in rows:
        verdicts = {g.metric.split(".", 1)[1]: g.met({ingress: v}) for g in judged}
        cells.append(
            [when, INGRESS_NAMES.get(ingress, ingress)]
            + [
                "–"
                if v.get(m) is None
                else f"{COLUMNS[m][1].format(v[m])} ({'met' if verdicts[m] else 'not met'})"
                for m in measured
            ]
        )
    first = r["runs"][0]

    def tally(oks: list[bool | None]) -> str:
        done = [ok for ok in oks if ok is not None]
        if not done:
            return "not measured in these runs."
        return f"met in {sum(done)} of {len(done)} runs."

    return (
        f"{r['what']}; results: `benchmarks/results/{key}.json`, on "
        f"{harness.hardware_summary(first.get('hardware'))}. "
        f"{first.get('what')}.\n\n"
        + table(["measured", "ingress", *(columns[m] for m in measured)], cells)
        + "\n\n"
        + "\n".join(f"- Goal {text}: {tally(oks)}" for text, oks in met.items())
        + "\n"
    )
