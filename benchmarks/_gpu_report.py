"""The doc section of a GPU result, whichever of its parts the run measured.

One renderer for ``gpu_train``, ``gpu_pipeline`` and ``time_to_accuracy`` results and for the older
``benchmarks/gpu.py`` results kept in ``benchmarks/results/gpu*.json`` (that script ran all parts at
once, and one merged file, ``gpu.json``, lists three of its runs). Every ratio is recomputed here
from the samples/s of the same run; the goals are :data:`GOALS`.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import harness
from benchmarks.harness import Goal, fmt, table
from lepton_ray.train.timeline import columns

# The Trainer cases the goals are about: (a) synthetic data, (b) the augmented Parquet set.
GOALS = {
    "trainer_synthetic": Goal(
        "(a) Trainer ÷ plain loop on random images >= 0.97", "ratio", ">=", 0.97
    ),
    "trainer_augmented": Goal(
        "(b) Trainer ÷ plain loop, Parquet + crop + flip >= 0.90", "ratio", ">=", 0.90
    ),
}


def ring_goal(rows: int) -> Goal:
    """Issue 16's streaming goals: >= 0.90 of the plain loop on epochs of 1M rows or more,
    >= 0.85 on smaller ones (200k rows)."""
    big = rows >= 1_000_000
    return Goal(
        f"streamed ring ÷ plain loop >= {0.90 if big else 0.85:.2f} "
        f"({'epochs of 1M rows or more' if big else 'epochs under 1M rows'})",
        "ratio",
        ">=",
        0.90 if big else 0.85,
    )


def _startup(rows: list[dict[str, Any]]) -> list[str]:
    """Where each fit's fixed cost went (``train_results["startup_s"]``), where the run has it:
    the phases in order, their sum to the first step, then the teardown."""
    timed = [t for t in rows if isinstance(t.get("startup_s"), dict)]
    if not timed:
        return []
    cols = columns([t["startup_s"] for t in timed])
    body = [[t.get("input", t["key"])] + [t["startup_s"].get(p, "–") for p in cols] for t in timed]
    return [
        "",
        "Fixed cost of each `fit()`, seconds (`train_results['startup_s']`; `to_first_step` is "
        "the sum of the phases before it):\n",
        table(["input", *cols], body),
    ]


PIPELINES = {
    "synthetic_float32": "in-memory dataset, normalised to float32 NCHW on the CPUs",
    "synthetic_float32_bs256": "in-memory dataset, normalised to float32 NCHW on the CPUs",
    "synthetic_float32_bs2048": "the same, `preprocess_batch_size=2048`",
    "synthetic_float32_bs2048_prefetch8": "the same, and `prefetch_batches=8`",
    "augmented_float32": "Parquet, global shuffle, crop + flip + normalise to float32 on the CPUs",
    "augmented_float32_pinned": "the same, `pin_memory=True`",
    "augmented_float32_bs2048": "the same, `preprocess_batch_size=2048`",
    "augmented_uint8_pinned_gpu_normalise": "Parquet, shuffle, crop + flip; uint8 rows, pinned, "
    "normalised on the GPU",
}


def _plain(r: dict[str, Any]) -> float | None:
    return (r.get("plain") or {}).get("samples_per_s")


def on_gpu(r: dict[str, Any]) -> bool:
    """Whether the run had a GPU (every result from before the harness did: it records none)."""
    hw = r.get("hardware")
    return not isinstance(hw, dict) or "summary" in hw or bool(hw.get("gpu"))


def training_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per Trainer measurement, each with the plain loop of its own run."""
    if r.get("training"):  # gpu.json: rows of several runs, merged
        return [dict(t, plain=t.get("plain_same_run")) for t in r["training"]]
    return [
        {**v, "key": k, "plain": baseline_rate(r, v.get("baseline", "plain"))}
        for k, v in r.items()
        if k.startswith("trainer_") and isinstance(v, dict)
    ]


def baseline_rate(r: dict[str, Any], name: str) -> float | None:
    """The samples/s a Trainer row is judged against: plain loop ``name``, or where the run also
    ran it after the Trainer cases (``--plain-after``), the mean of the two runs, so that a drift
    in the machine's speed lands on both sides."""
    before = (r.get(name) or {}).get("samples_per_s")
    after = (r.get(f"{name}_after") or {}).get("samples_per_s")
    return (before + after) / 2 if before and after else before


def _training(r: dict[str, Any]) -> list[str]:
    s, plain = r.get("setup", {}), _plain(r)
    out = [
        f"### Training: {s.get('model')} at {s.get('input')}, global batch "
        f"{fmt(s.get('global_batch'))}, {s.get('precision')}, {s.get('memory_format')}; "
        f"{fmt(s.get('rows_per_epoch'))} rows per epoch\n",
        "samples/s: mean over the epochs after the first; ÷ plain: against the plain loop (data "
        + (
            "on the GPU) of the same run doing the same work: a uint8 one below (with crop + flip "
            "for the augmented inputs); the float loop sliced in order, where shown, is a reference"
            if any(k in r for k in ("plain_uint8", "plain_uint8_augmented"))
            else "already on the GPU) of the same run"
        )
        + (
            ", the mean of its runs before and after the Trainer's"
            if any(k.endswith("_after") for k in r)
            else ""
        )
        + "; data wait: share of the loop's training time spent waiting for a batch; fixed "
        "cost: `fit()` wall time minus its epochs.\n",
    ]
    rows: list[list[Any]] = (
        [["plain PyTorch loop", "tensors already on the GPU", "", plain, "1.00"]] if plain else []
    )
    for key, what in (
        ("plain_uint8", "uint8 rows on the GPU, shuffled, converted there"),
        ("plain_uint8_augmented", "uint8 rows on the GPU, shuffled, crop + flip, converted there"),
    ):
        for when, suffix in (("", ""), ("_after", ", run again after the Trainer")):
            if key + when in r:
                sps = r[key + when]["samples_per_s"]
                rows.append(
                    [
                        f"plain loop, {what}{suffix}",
                        "same",
                        "",
                        sps,
                        f"{sps / plain:.2f}" if plain else "–",
                    ]
                )
    if "plain_cudnn_benchmark" in r:
        sps = r["plain_cudnn_benchmark"]["samples_per_s"]
        rows.append(["plain loop, `cudnn.benchmark=True`", "same", "", sps, f"{sps / plain:.2f}"])
    bk = r.get("bookkeeping") or {}
    for mode, what in (
        ("library", "plain loop + the loop's per-step bookkeeping of that day (2 syncs a step)"),
        ("no_sync", "plain loop + the same bookkeeping without syncs"),
    ):
        if mode in bk:
            sps = bk[mode]["samples_per_s"]
            base = bk.get("plain_same_run") or plain
            rows.append([what, "same", bk.get("run", ""), sps, f"{sps / base:.2f}"])
    rows = [row + ["–", "–"] for row in rows]
    goal_lines = []
    for t in training_rows(r):
        label, run = t.get("input", t["key"]), t.get("run", "")
        where = f" [{label}" + (f"; run `{run}`" if run else "") + "]"
        if "error" in t:
            rows.append(
                [
                    "`Trainer.fit`",
                    label,
                    run,
                    t["error"]
                    if t["error"].startswith("skipped")
                    else f"failed: {t['error'][:90]}",
                    "",
                    "",
                    "",
                ]
            )
            if t["key"] in GOALS:
                goal_lines.append(GOALS[t["key"]].line({}) + where)
            continue
        ratio = t["samples_per_s"] / t["plain"]
        rows.append(
            [
                "`Trainer.fit`" + (" (2 workers)" if "two_workers" in t["key"] else ""),
                label,
                run,
                t["samples_per_s"],
                f"**{ratio:.2f}**",
                f"{t['data_wait_share']:.0%}",
                f"{fmt(t['fit_wall_s'])} ({fmt(t['fixed_cost_s'])})",
            ]
        )
        goal = GOALS.get(t["key"])
        if t["key"] == "trainer_ring":
            goal = ring_goal(int(s.get("rows_per_epoch") or 0))
        if goal is not None:
            goal_lines.append(goal.line({"ratio": ratio}) + where)
    headers = ["side", "input", "run", "samples/s", "÷ plain", "data wait", "fit() s (fixed s)"]
    if not any(row[2] for row in rows):  # one run: no run column
        headers.pop(2)
        rows = [row[:2] + row[3:] for row in rows]
    out.append(table(headers, rows))
    out += _startup(training_rows(r))
    out += usage_table(r)
    out += gc_table(r)
    out += thread_table(r)
    out += states_table(r)
    if not on_gpu(r):
        goal_lines = ["No GPU in this run: a wiring check, not a measurement; no goal is judged."]
    return out + ([""] + goal_lines if goal_lines else [])


def usage_table(r: dict[str, Any]) -> list[str]:
    """Each side's sampled CPU and GPU use over its epochs after the first (benchmarks/_usage.py)."""
    sides = [
        (k, v["usage"])
        for k, v in r.items()
        if isinstance(v, dict) and (v.get("usage") or {}).get("samples")
    ]
    if not sides:
        return []
    machine = any("host_busy_cores" in u or "gpu_sm_mhz" in u for _, u in sides)
    rows = []
    for key, u in sides:
        others = [
            f"{kind} {cores:.2f}"
            for kind, cores in u["cores_by_kind"].items()
            if kind != ("driver" if key.startswith("plain") else "ray::RayTrainWorker")
        ]
        gpu = u.get("gpu_util_pct")
        row = [
            key,
            u["samples"],
            f"{u['step_thread_cores']:.2f}",
            f"{u['other_thread_cores']:.2f}",
            "–" if gpu is None else f"{gpu:.0f}%",
            ", ".join(others[:3]) or "–",
        ]
        if machine:
            row += [_clock(u), _host(u)]
        rows.append(row)
    headers = ["side", "samples", "step thread", "its other threads", "GPU busy", "other processes"]
    if machine:
        headers += ["GPU SM clock", "host CPUs busy / stolen"]
    return [
        "\nCPU and GPU use over each side's epochs after the first, sampled once a second "
        "(`benchmarks/_usage.py`): the step's thread (its busiest thread plus torch's autograd "
        "threads, which take turns with it) and the rest of its process in cores; the GPU busy: "
        "the share of time a kernel ran (`nvidia-smi`). A step thread near one core with the GPU "
        "busy well under 100% is a loop bound by the CPU that launches its kernels."
        + (
            " The machine's state: the GPU's mean SM clock (and the share of samples a power or "
            "thermal limit held it down), and all of the host's CPUs in cores, busy and stolen "
            "by the hypervisor."
            if machine
            else ""
        )
        + "\n",
        table(headers, rows),
    ]


def _clock(u: dict[str, Any]) -> str:
    if "gpu_sm_mhz" not in u:
        return "–"
    slowed = u.get("gpu_slowdown_share")
    return f"{u['gpu_sm_mhz']:,} MHz" + (f" (held down {slowed:.0%})" if slowed else "")


def _host(u: dict[str, Any]) -> str:
    if "host_busy_cores" not in u:
        return "–"
    return f"{u['host_busy_cores']:.2f} / {u['steal_cores']:.2f}"


def gc_table(r: dict[str, Any]) -> list[str]:
    """Each side's garbage-collector pauses per epoch (``per_epoch_gc``), where the run has them."""
    sides = [
        (k, v["per_epoch_gc"])
        for k, v in r.items()
        if isinstance(v, dict) and v.get("per_epoch_gc")
    ]
    if not sides:
        return []
    rows = [[key, ", ".join(f"{g['s']:.3f} ({g['full']})" for g in laps)] for key, laps in sides]
    return [
        "\nPython's garbage collector in each side's process, epoch by epoch: seconds collecting "
        "(full collections); every collection holds the GIL (`lepton_ray/train/gc_clock.py`).\n",
        table(["side", "seconds (full) by epoch"], rows),
    ]


def thread_table(r: dict[str, Any]) -> list[str]:
    """Each side's step-launching thread per epoch (``per_epoch_loop_cpu_s`` and, where the
    kernel kept them, its runqueue wait and sleeps), where the run has them."""
    sides = [(k, v) for k, v in r.items() if isinstance(v, dict) and v.get("per_epoch_loop_cpu_s")]
    if not sides:
        return []

    def epoch(v: dict[str, Any], i: int) -> str:
        cpu = f"{v['per_epoch_loop_cpu_s'][i]:.2f}"
        if "per_epoch_loop_runqueue_s" not in v:
            return cpu
        runq, sleeps = v["per_epoch_loop_runqueue_s"][i], v["per_epoch_loop_sleeps"][i]
        return f"{cpu} ({runq:.2f}, {sleeps})"

    rows = [
        [key, ", ".join(epoch(v, i) for i in range(len(v["per_epoch_loop_cpu_s"])))]
        for key, v in sides
    ]
    return [
        "\nThe thread that launches each side's steps, epoch by epoch: its CPU seconds (seconds "
        "it waited for a CPU, times it blocked: on the GIL, a lock, its batch or the GPU) "
        "(`lepton_ray/train/thread_clock.py`).\n",
        table(["side", "CPU s (runqueue s, sleeps) by epoch"], rows),
    ]


def states_table(r: dict[str, Any]) -> list[str]:
    """Where each side's step thread and autograd threads were over its epochs after the first
    (``usage.step_thread_states``), where the run's sampler polled them."""
    sides = [
        (k, v["usage"]["step_thread_states"])
        for k, v in r.items()
        if isinstance(v, dict) and (v.get("usage") or {}).get("step_thread_states")
    ]
    if not sides:
        return []

    def where(shares: dict[str, float] | None) -> str:
        return ", ".join(f"{k} {v:.0%}" for k, v in (shares or {}).items()) or "–"

    roles = ["step", "autograd"]
    head = ["side", "step thread", "autograd thread"]
    text = (
        "\nWhere each side's step thread and torch's autograd thread were, polled every 5 ms over "
        "its epochs after the first (`benchmarks/_usage.py`): running (on a CPU or waiting for "
        "one), or the kernel wait channel it slept in (`futex_do_wait`: the GIL, a lock or a "
        "condition, such as the step thread's wait for its backward; `D:` an uninterruptible "
        "wait), as shares of the polls."
    )
    if any("others_running" in st for _, st in sides):  # polled since 2026-12-07
        roles += ["step_futex", "others_running"]
        head += ["neither ran: the step's futex", "neither ran: the process's threads running"]
        text += (
            " In the polls where neither ran: the futex the step thread slept on (its address; "
            "`+t` a wait with a timeout, as CPython's GIL is waited for) and which of the "
            "process's other threads ran (`name:tid`; a Python thread bears its process's name), "
            "as shares of those polls."
        )
    rows = [[key, *(where(st.get(role)) for role in roles)] for key, st in sides]
    polls = [(r[key]["usage"].get("step_thread_polls") or {}) for key, _ in sides]
    if "others_running" in roles and any(p.get("step") for p in polls):  # counted since 12-07
        head.insert(3, "neither ran")
        text += " `neither ran`: the share of the step thread's polls in which neither ran."
        for row, p in zip(rows, polls, strict=True):
            share = p.get("others_running", 0) / p["step"] if p.get("step") else None
            row.insert(3, "–" if share is None else f"{share:.1%}")
    return [text + "\n", table(head, rows)]


def _pipelines(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for part in ("pipeline_only", "pipeline_blocks"):
        cases = {k: v for k, v in (r.get(part) or {}).items() if isinstance(v, dict)}
        if not cases:
            continue
        plain = (r.get(part) or {}).get("plain_same_run") or _plain(r)
        run = (r.get(part) or {}).get("run")
        rows: list[list[Any]] = [["plain loop (the GPU's pace, for scale)", plain, "1.00"]]
        for k, v in cases.items():
            sps = v.get("samples_per_s")
            ratio = f"{sps / plain:.2f}" if sps and plain else "–"
            rows.append(
                [PIPELINES.get(k, k), sps if sps else f"failed: {str(v.get('error'))[:90]}", ratio]
            )
        out += [
            "",
            "### Input pipeline alone: Ray Data -> `iter_torch_batches` -> GPU, no model"
            + (f" (run `{run}`)" if run else "")
            + "\n",
            table(["pipeline", "samples/s (last epoch)", "÷ plain loop, same run"], rows),
        ]
    return out


def _mnist(r: dict[str, Any]) -> list[str]:
    m = r.get("mnist")
    if not m:
        return []
    rows = []
    for run in m["runs"]:
        et = run.get("epoch_time_s") or []
        rows.append(
            [
                run["epochs"],
                run["train_wall_s"],
                run.get("fit_wall_s"),
                fmt(run.get("val_accuracy"), 4),
                run.get("first_epoch_at_98"),
                fmt(statistics.median(et), 2) if et else "–",
            ]
        )
    reached = [x for x in m["runs"] if (x.get("val_accuracy") or 0) >= 0.98]
    out = [
        "",
        "### Time to >= 98% test accuracy: built-in MNIST subset from the command line"
        + (f" (run `{m['run']}`)" if m.get("run") else "")
        + "\n",
        f"`lepton-ray data prepare mnist5k DIR` ({fmt(m.get('prepare_wall_s'))} s), then "
        "`lepton-ray train --data DIR/train --val DIR/test"
        + (" --use-gpu" if r.get("use_gpu", True) else "")
        + " --workers 1 "
        "--batch-size 100 --epochs N` (the `cnn`); "
        "wall clock of each command, Ray start-up included.\n",
        table(
            [
                "epochs",
                "train command s",
                "of which fit() s",
                "test accuracy",
                "first epoch >= 98%",
                "median epoch s",
            ],
            rows,
        ),
    ]
    if reached:
        best = min(reached, key=lambda x: x["train_wall_s"])
        total = (m.get("prepare_wall_s") or 0) + best["train_wall_s"]
        out.append(
            f"\nFastest run ending at >= 98%: {fmt(total)} s, prepare + train "
            f"({best['epochs']} epochs)."
        )
    else:
        out.append("\nNo run ended at >= 98% test accuracy.")
    ck = r.get("checkpoint_on_cpu")
    if ck:
        ok = "yes" if ck.get("ok") else f"no ({ck.get('error')})"
        out.append(
            f"\nThe checkpoint loads in a process that sees no GPU (`CUDA_VISIBLE_DEVICES=`): {ok}."
        )
    return out


def _serve(r: dict[str, Any]) -> list[str]:
    """Part (d) of the old ``benchmarks/gpu.py`` (now ``benchmarks/serve.py --use-gpu``)."""
    sv = r.get("serve")
    if not sv or "levels" not in sv:
        return []
    rows = [
        [
            x["concurrency"],
            x["requests"],
            x["requests_per_s"],
            x["p50_ms"],
            x["p99_ms"],
            x["errors"],
            fmt(x["accuracy"], 3),
        ]
        for x in sv["levels"]
    ]
    out = [
        "",
        "### Serving the trained checkpoint: `deploy(checkpoint, use_gpu=True)`, one replica\n",
        f"{sv['request']}; `@serve.batch(max_batch_size=64)`; client threads with `urllib` in the "
        f"benchmark process. Deploy took {sv['deploy_s']} s. No baseline was run beside it (see "
        "the serve sections).\n",
        table(
            [
                "concurrency",
                "requests",
                "requests/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "accuracy over HTTP",
            ],
            rows,
        ),
    ]
    b = sv.get("batched")
    if b:
        out.append(
            f"\n64 digits per request at concurrency {b['concurrency']}: "
            f"{fmt(b['requests_per_s'])} requests/s, {fmt(b['images_per_s'])} images/s "
            f"(p50 {fmt(b['p50_ms'])} ms, p99 {fmt(b['p99_ms'])} ms)."
        )
    return out


def _runs(r: dict[str, Any]) -> list[str]:
    runs = r.get("runs") or {}
    if not runs:
        return []
    rows = [
        [
            n,
            f"`{m.get('file')}`",
            m.get("measured_at"),
            m.get("loop"),
            m.get("plain_samples_per_s"),
            m.get("what"),
        ]
        for n, m in runs.items()
    ]
    return [
        f"Merged from {len(runs)} runs of `benchmarks/gpu.py` (the loop changed between them):\n",
        table(
            [
                "run",
                "its own JSON",
                "measured",
                "loop.py",
                "plain loop samples/s",
                "what it measured",
            ],
            rows,
        ),
        "",
    ]


def render(r: dict[str, Any], key: str) -> str:
    parts = [
        name
        for name, present in (
            ("training throughput", bool(training_rows(r))),
            ("input pipeline", bool(r.get("pipeline_only") or r.get("pipeline_blocks"))),
            ("time to accuracy", bool(r.get("mnist"))),
            ("serving", bool(r.get("serve"))),
        )
        if present
    ]
    head = [
        f"## {'GPU' if on_gpu(r) else 'No GPU'}, {r.get('measured_at')}: {', '.join(parts) or 'plain loop only'} (`{key}`)\n",
        harness.provenance(r, key) + "\n",
    ]
    body = _runs(r) + (_training(r) if training_rows(r) else [])
    return "\n".join(head + body + _pipelines(r) + _mnist(r) + _serve(r)) + "\n"
