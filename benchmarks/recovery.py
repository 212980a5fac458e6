"""Benchmark: recovery from a killed training worker.

Claim measured: when one of 2 training workers is SIGKILLed right after Ray Train commits a
mid-epoch checkpoint (every 10 steps), the run restarts from that checkpoint and finishes; the
benchmark reports the seconds from the kill to the first optimizer step of the restarted worker
group, the steps redone, and the whole run's wall time and accuracy against an uninterrupted run
of the same script. Meant for a CPU machine (measured on 2 shared cores).

    python -m benchmarks.recovery [--epochs 3] [--kill-after-step 60] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.harness import table
from lepton_ray.runs import RunLayout
from lepton_ray.storage import resolve

KEY = "recovery"
EVERY = 10  # checkpoint every this many steps


def committed_step(run: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered: what a restart restores."""
    return RunLayout(resolve(str(run))).committed_step()


def train(data: dict, root: str, name: str, epochs: int) -> tuple[dict, float]:
    from lepton_ray import Trainer, build_model

    res, wall = harness.timed(
        Trainer(2).fit,
        build_model("cnn", in_channels=1, num_classes=10),
        data["train"],
        data["test"],
        batch_size=100,
        epochs=epochs,
        storage=root,
        run_name=name,
        checkpoint_every_steps=EVERY,
        record_sample_ids=True,
        max_failures=2,
        progress_bar=False,
    )
    return res, wall


def kill_when_committed(run: Path, step: int, kill: dict) -> None:
    """SIGKILL the newest Train worker once a checkpoint at ``step`` or later is committed."""
    import psutil

    deadline = time.time() + 600
    while time.time() < deadline:
        at = committed_step(run)
        if at >= step:
            pids = sorted(
                p.pid
                for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")
            )
            kill.update(t=time.time(), step=at, pid=pids[-1])
            os.kill(pids[-1], signal.SIGKILL)
            return
        time.sleep(0.02)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lepton_ray import prepare

    r = harness.record(KEY, epochs=args.epochs, checkpoint_every_steps=EVERY, workers=2)
    root = harness.scratch("lepton-recovery-")
    data = prepare("mnist5k", f"{root}/data")
    baseline, base_wall = train(data, f"{root}/runs", "baseline", args.epochs)
    run_dir = Path(root) / "runs" / "killed"
    kill: dict = {}
    th = threading.Thread(
        target=kill_when_committed, args=(run_dir, args.kill_after_step, kill), daemon=True
    )
    th.start()
    res, wall = train(data, f"{root}/runs", "killed", args.epochs)
    th.join(timeout=5)
    if not kill:
        raise SystemExit(
            f"no checkpoint at step {args.kill_after_step} was committed: nothing killed"
        )
    # The sample log's first line of each worker process: the restarted ones begin after the kill.
    lines = []
    for f in (run_dir / "sample_ids").glob("*.jsonl"):
        key = f.name.rsplit("-", 1)[0]
        lines += [dict(json.loads(x), key=key) for x in f.read_text().splitlines()]
    first_of: dict[str, dict] = {}
    for line in sorted(lines, key=lambda x: x["t"]):
        first_of.setdefault(line["key"], line)
    restarted = [v for v in first_of.values() if v["t"] > kill["t"]]
    resume_step = min(v["step"] for v in restarted) - 1
    r.update(
        seconds_kill_to_training_resumed=round(min(v["t"] for v in restarted) - kill["t"], 2),
        committed_step_at_kill=kill["step"],
        restored_step=resume_step,
        # Worker steps past the committed checkpoint (< one interval) are trained again.
        steps_redone_at_most=EVERY + kill["step"] - resume_step,
        wall_s_uninterrupted=round(base_wall, 1),
        wall_s_with_kill=round(wall, 1),
        val_accuracy_uninterrupted=round(baseline["val_accuracy"], 4),
        val_accuracy_with_kill=round(res["val_accuracy"], 4),
    )
    return r


def render(r: dict[str, Any], key: str) -> str:
    ratio = r["wall_s_with_kill"] / r["wall_s_uninterrupted"]
    rows = [
        ["kill -> training resumed", f"{r['seconds_kill_to_training_resumed']} s"],
        [
            "restored step / committed step at kill",
            f"{r['restored_step']} / {r['committed_step_at_kill']}",
        ],
        ["steps redone (at most)", r["steps_redone_at_most"]],
        [
            "wall time with kill ÷ without",
            f"**{ratio:.3f}** ({r['wall_s_with_kill']} s / {r['wall_s_uninterrupted']} s)",
        ],
        [
            "test accuracy with kill / without",
            f"{r['val_accuracy_with_kill']} / {r['val_accuracy_uninterrupted']}",
        ],
    ]
    return (
        "## Recovery from a killed training worker\n\n"
        f"{harness.provenance(r, key)} 2 CPU workers, the MNIST subset, a checkpoint every 10 "
        "steps; one "
        "worker SIGKILLed right after Ray Train committed a mid-epoch checkpoint.\n\n"
        + table(["measure", "value"], rows)
        + "\n"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kill-after-step", type=int, default=60)


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
