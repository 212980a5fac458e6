"""The schedulability check behind fail-fast scheduling: pure tests."""

from __future__ import annotations

from lepton_ray.train.placement import unschedulable_reason, worker_bundle

CPU4 = {"CPU": 4.0, "memory": 8e9}


def test_bundle_defaults_and_overrides():
    assert worker_bundle(False, None) == {"CPU": 1.0}
    assert worker_bundle(True, None) == {"CPU": 1.0, "GPU": 1.0}
    assert worker_bundle(True, {"CPU": 2, "GPU": 0.5, "accel": 1}) == {
        "CPU": 2.0,
        "GPU": 0.5,
        "accel": 1.0,
    }


def test_fits():
    assert unschedulable_reason([CPU4], {"CPU": 1.0}, 4, "PACK") is None
    assert unschedulable_reason([CPU4, CPU4], {"CPU": 2.0}, 4, "SPREAD") is None
    assert unschedulable_reason([CPU4, CPU4], {"CPU": 1.0}, 2, "STRICT_SPREAD") is None
    assert unschedulable_reason([CPU4], {"CPU": 2.0}, 2, "STRICT_PACK") is None


def test_missing_gpu_is_named():
    msg = unschedulable_reason([CPU4], worker_bundle(True, None), 2, "PACK")
    assert (
        msg
        == "cannot place 2 training workers of {1 CPU, 1 GPU}: the cluster has 0 GPU in all, 2 needed"
    )


def test_missing_custom_resource_and_oversized_bundle():
    assert "0 special in all" in unschedulable_reason(
        [CPU4], {"CPU": 1.0, "special": 1.0}, 1, "PACK"
    )
    assert "no single node has {3 CPU}" in unschedulable_reason(
        [{"CPU": 2.0}, {"CPU": 2.0}], {"CPU": 3.0}, 1, "PACK"
    )
    assert "hold only 2" in unschedulable_reason(
        [{"CPU": 3.0}, {"CPU": 3.0}], {"CPU": 2.0}, 3, "PACK"
    )


def test_strict_strategies():
    two = [CPU4, CPU4]
    assert "STRICT_PACK: no single node holds all" in unschedulable_reason(
        two, {"CPU": 2.0}, 3, "STRICT_PACK"
    )
    assert "STRICT_SPREAD: only 2 nodes" in unschedulable_reason(
        two, {"CPU": 1.0}, 3, "STRICT_SPREAD"
    )


def test_workers_that_take_every_cpu_leave_ray_data_none():
    """On a 2-CPU head, two 1-CPU workers are placed and then wait for data forever."""
    head = [{"CPU": 2.0}]
    msg = unschedulable_reason(head, {"CPU": 1.0}, 2, "PACK", data_cpus=1.0)
    assert msg.startswith(
        "cannot place 2 training workers of {1 CPU}: they take 2 of the cluster's"
    )
    assert "Ray Data needs 1 more" in msg
    assert unschedulable_reason(head, {"CPU": 0.5}, 2, "PACK", data_cpus=1.0) is None
    assert unschedulable_reason(head, {"CPU": 1.0}, 2, "PACK") is None  # not asked: placeable
