"""Benchmark: recovery from a killed training worker.

Trains the built-in MNIST digits with 2 Ray Train workers, checkpointing every 10 steps, kills one
worker process (SIGKILL) right after a mid-epoch checkpoint is written, and measures

- seconds from the kill to the first optimizer step of the restarted worker group,
- the work redone: steps between the checkpoint the group restored and the step at the kill,
- the whole run's wall time against an uninterrupted run in the same script (the ratio).

    python -m benchmarks.recovery [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.report import replace_section, save_result
from lepton_ray import Trainer, build_model, prepare


def _committed_step(run: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered: what a restart restores."""
    try:
        snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _train(data: dict, root: str, name: str, epochs: int):
    t0 = time.perf_counter()
    res = Trainer(2).fit(
        build_model("cnn", in_channels=1, num_classes=10),
        data["train"],
        data["test"],
        batch_size=100,
        epochs=epochs,
        storage=root,
        run_name=name,
        checkpoint_every_steps=10,
        record_sample_ids=True,
        max_failures=2,
        progress_bar=False,
    )
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kill-after-step", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="lepton-recovery-")
    data = prepare("mnist5k", f"{root}/data")
    baseline, base_wall = _train(data, f"{root}/runs", "baseline", args.epochs)

    run = Path(root) / "runs" / "killed"
    kill: dict = {}

    def killer() -> None:
        deadline = time.time() + 600
        while not kill and time.time() < deadline:
            step = _committed_step(run)
            if step >= args.kill_after_step:
                pids = sorted(
                    p.pid
                    for p in psutil.process_iter(["cmdline"])
                    if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")
                )
                kill.update(t=time.time(), step=step, pid=pids[-1])
                os.kill(pids[-1], signal.SIGKILL)
                return
            time.sleep(0.02)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    res, wall = _train(data, f"{root}/runs", "killed", args.epochs)
    th.join(timeout=5)

    lines = []
    for f in (run / "sample_ids").glob("*.jsonl"):
        key = f.name.rsplit("-", 1)[0]
        lines += [dict(json.loads(x), key=key) for x in f.read_text().splitlines()]
    first_of = {}
    for line in sorted(lines, key=lambda x: x["t"]):
        first_of.setdefault(line["key"], line)
    restarted = [v for v in first_of.values() if v["t"] > kill["t"]]
    resumed_at = min(v["t"] for v in restarted)
    resume_step = min(v["step"] for v in restarted) - 1
    result = {
        "benchmark": "recovery",
        "what": "SIGKILL of one of 2 CPU training workers right after Ray Train committed a mid-epoch checkpoint; checkpoint every 10 steps",
        "hardware": f"{os.cpu_count()} CPU cores, CPU only",
        "seconds_kill_to_training_resumed": round(resumed_at - kill["t"], 2),
        "committed_step_at_kill": kill["step"],
        "restored_step": resume_step,
        "steps_redone_at_most": 10
        + kill["step"]
        - resume_step,  # < one checkpoint interval past it
        "wall_s_uninterrupted": round(base_wall, 1),
        "wall_s_with_kill": round(wall, 1),
        "wall_ratio": round(wall / base_wall, 3),
        "val_accuracy_uninterrupted": round(baseline["val_accuracy"], 4),
        "val_accuracy_with_kill": round(res["val_accuracy"], 4),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    save_result(args.out, "recovery.json", result)
    _write_table(result)
    print(json.dumps(result, indent=2))


def _write_table(r: dict) -> None:
    section = (
        "\n## Recovery from a killed training worker\n\n"
        "`python -m benchmarks.recovery`: 2 CPU workers, MNIST subset, checkpoint every 10 steps, one worker "
        "SIGKILLed right after Ray Train committed a mid-epoch checkpoint.\n\n"
        "| measured | hardware | kill -> training resumed | restored step / committed step at kill | steps redone (at most) "
        "| wall with kill / without | val acc with / without |\n| --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {r['measured_at']} | {r['hardware']} | {r['seconds_kill_to_training_resumed']} s "
        f"| {r['restored_step']} / {r['committed_step_at_kill']} | {r['steps_redone_at_most']} "
        f"| **{r['wall_ratio']}** ({r['wall_s_with_kill']} s / {r['wall_s_uninterrupted']} s) "
        f"| {r['val_accuracy_with_kill']} / {r['val_accuracy_uninterrupted']} |\n"
    )
    replace_section("Recovery from a killed", section)


if __name__ == "__main__":
    main()
