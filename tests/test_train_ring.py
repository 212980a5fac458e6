"""The ring feed in a real ``fit`` (CPU workers): the batches are the ones the plan and the seeded
ring make, and a run interrupted mid-epoch resumes on another worker count sample-exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_ray import DataConfig, Trainer, build_model
from lepton_ray.data import read_shard_ids
from lepton_ray.errors import TrainingError
from lepton_ray.train.ring import Ring, ring_generator, serve
from lepton_ray.train.sampling import sequential_plan
from tests.test_resume import assert_sample_exact, digits_1200, sample_logs  # noqa: F401

pytestmark = pytest.mark.ray


def planned_steps(info, world: int, rank: int, capacity: int) -> list[list[int]]:
    """The ids of each step of epoch 0 on ``rank``, from the plan and a ring on this machine: what
    the worker must train if Ray Data hands it its rows in plan order (``preserve_order``)."""
    p = sequential_plan(
        read_shard_ids(info), seed=0, epoch=0, global_batch=60, world=world, rank=rank
    )
    block = {"image": np.zeros((len(p.ids), 1, 1, 1), np.uint8), "label": p.ids, "id": p.ids}
    gen = ring_generator(0, 0, rank, torch.device("cpu"))
    ring = Ring(capacity, (1, 1, 1), torch.device("cpu"))
    return [
        b["id"].tolist() for b in serve(ring, [ring.layout.pack(block)], p.steps, p.per_step, gen)
    ]


def test_ring_fit_trains_the_planned_batches_and_resumes_on_another_worker_count(
    ray_session,
    digits_1200,  # noqa: F811 (test_resume's fixture, imported above)
    tmp_path,
):
    common = dict(
        batch_size=60,
        epochs=2,
        storage=str(tmp_path),
        run_name="ring",
        checkpoint_every_steps=5,
        record_sample_ids=True,
        lr=0.05,
        data=DataConfig(feed="ring", ring_rows=200, augment=("random_crop", "hflip")),
    )
    model = build_model("cnn", in_channels=1, num_classes=10, width=8)
    # Attempt 1: 2 workers, a ring of 200 of each worker's 600 rows; rank 1 fails at step 13.
    with pytest.raises(TrainingError, match="injected fault at epoch 1 step 13 on rank 1"):
        Trainer(2).fit(model, digits_1200, max_failures=0, fault_injection="1:13:1", **common)
    run = tmp_path / "ring"
    first = sorted(sample_logs(run))
    for rank in (0, 1):
        (key,) = [k for k in first if k.startswith(f"rank{rank}-")]
        trained = [s["ids"] for s in sample_logs(run)[key] if s["step"] <= 10]
        assert trained == planned_steps(digits_1200, 2, rank, 200)[:10]
    # Attempt 2: resume with 3 workers; the rest of epoch 1 exactly once, then epoch 2.
    res = Trainer(3).fit(model, digits_1200, resume=True, **common)
    assert res["epochs"] == 2 and [h["world_size"] for h in res["history"]] == [3, 3]
    # Each epoch reports its read: epoch 2's was asked for before epoch 2 began (read ahead once
    # epoch 1's rows were all in the ring), epoch 1's (resumed) by the epoch itself.
    reads = [{k: v for k, v in h.items() if k.startswith("read_")} for h in res["history"]]
    assert reads[1]["read_ahead_s"] > 0 and reads[0]["read_ahead_s"] < reads[1]["read_ahead_s"]
    assert all(0 <= r["read_first_block_s"] <= r["read_s"] for r in reads), reads
    resumed = sorted(set(sample_logs(run)) - set(first))
    consumed, after = assert_sample_exact(
        run, first, resumed, resume_step=10, steps_per_epoch=20, rows=1200, global_batch=60
    )
    assert len(consumed) == 600 and len(after) == 600
    epoch2 = np.concatenate(
        [s["ids"] for k in resumed for s in sample_logs(run)[k] if s["epoch"] == 2]
    )
    assert len(epoch2) == len(np.unique(epoch2)) == 1200
