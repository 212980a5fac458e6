"""benchmarks.ring_interference wired end to end on the CPU (the phases without Ray, in this
process and in a Ray Train worker), and its pieces: the CPU topology it reports and the ratios it
renders."""

from __future__ import annotations

import argparse
import sys

import pytest

from benchmarks import ring_interference as ri


def _args(**kw) -> argparse.Namespace:
    base = dict(
        phases="ring_prepacked,ring_thread,ring_trainer_step,plain_load_apart",
        model="cnn",
        rows=2048,
        ring_rows=512,
        batch_size=64,
        steps=3,
        warmup=1,
        load_procs=1,
        read_cpus=0,
        count_steps=2,
        where="process",
    )
    return argparse.Namespace(**{**base, **kw})


def test_every_phase_runs_twice_and_is_judged_against_the_plain_runs_of_the_same_run():
    r = ri.run(_args())
    phases = r["phases"]
    assert list(phases) == [
        "plain",
        "ring_prepacked",
        "ring_thread",
        "ring_trainer_step",
        "plain_load_apart",
    ]
    for name, p in phases.items():
        assert len(p["runs"]) == 2, name
        for run in p["runs"]:
            assert run["samples_per_s"] > 0 and run["wall_ms"] > 0
            assert 0 <= run["source_ms"] <= run["wall_ms"]
            assert run["ops"] > run["kernel_ops"] > 0  # a step has views and kernels
            if sys.platform == "linux":  # the thread's wait for a CPU, and its blocks, per step
                assert 0 <= run["runqueue_ms"] <= run["wall_ms"]
                assert run["sleeps_per_step"] >= 0 and run["preemptions_per_step"] >= 0
    base = sum(x["samples_per_s"] for x in phases["plain"]["runs"]) / 2
    assert phases["plain"]["ratio_to_plain"] == 1.0
    ring = sum(x["samples_per_s"] for x in phases["ring_thread"]["runs"]) / 2
    assert phases["ring_thread"]["ratio_to_plain"] == pytest.approx(ring / base, abs=1e-3)
    assert r["topology"]["cpus"] >= r["topology"]["physical_cores"] >= 1
    text = ri.render(r, "ring_interference")
    for name in phases:
        assert f"`{name}`" in text


@pytest.mark.ray
def test_the_phases_run_in_a_ray_train_workers_training_thread(ray_session):
    r = ri.run(_args(phases="ring_prepacked", where="train_worker"))
    assert r["where"] == "train_worker" and ray_session.is_initialized()  # the caller's Ray stays
    assert list(r["phases"]) == ["plain", "ring_prepacked"]
    assert all(len(p["runs"]) == 2 for p in r["phases"].values())
    assert all(x["samples_per_s"] > 0 for p in r["phases"].values() for x in p["runs"])
    assert "in the training thread of a Ray Train worker" in ri.render(r, "ring_interference")


def test_an_unknown_phase_is_named():
    with pytest.raises(SystemExit, match="ring_fast"):
        ri.run(_args(phases="plain,ring_fast"))


def test_a_steps_operations_are_counted_and_views_told_apart():
    import torch

    assert ri.count_ops(lambda: torch.ones(3).add_(1).view(3, 1).t()) == (4, 2)


def test_cpu_lists_read_as_sysfs_writes_them():
    assert ri._cpu_list("0-3,8\n") == [0, 1, 2, 3, 8]
    assert ri._cpu_list("5") == [5]
    assert 0 in ri.siblings(0)
