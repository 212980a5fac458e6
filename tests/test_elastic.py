"""Elastic training on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``): the run grows
when a node joins and shrinks when one leaves, with the global batch and so the step count fixed.

This module needs a cluster of its own, so it shuts the shared local instance down first (the next
module that needs it starts it again). ``add_node``/``remove_node`` run in the main thread; ``fit``
runs in a thread, as in Ray's own elastic tests.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from lepton_ray import Trainer, build_model, prepare

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

# 40 steps an epoch, 20-26 a second on one worker here: the run grew at step 230-350 (the node
# takes ~10 s to join) and the node left ~40 steps later; 20 epochs leave 400 steps or more after
# that, room for a node that takes twice as long to join.
EPOCHS = 20


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _latest_step(run: Path) -> int:
    steps = [
        int(m.group(1))
        for p in run.glob("checkpoint_epoch*")
        if (m := re.search(r"_step(\d+)$", p.name))
    ]
    return max(steps, default=0)


def test_grows_when_a_node_joins_and_shrinks_when_it_leaves(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from lepton_ray.runtime import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    # When the node leaves, Ray still counts its resources for a while, and the controller's
    # first restart asks for 2 workers: their placement group waits this long before it gives up
    # and retries with 1 (Ray's default, 60 s, was most of this test's time). A group that can
    # be placed is ready in well under a second here. The cluster's processes inherit it.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"slot": 1}}
    )
    try:
        ensure_ray(address=cluster.address)
        data = prepare("mnist5k", str(tmp_path / "data"))
        run = tmp_path / "runs" / "elastic"
        out: dict = {}

        def train() -> None:
            try:
                out["res"] = Trainer(
                    (1, 2),
                    resources_per_worker={"CPU": 1, "slot": 1},
                    elastic_resize_monitor_interval_s=1,
                ).fit(
                    build_model("cnn", in_channels=1, num_classes=10, width=8),
                    data["train"],
                    batch_size=100,
                    epochs=EPOCHS,
                    storage=str(tmp_path / "runs"),
                    run_name="elastic",
                    checkpoint_every_steps=10,
                    record_sample_ids=True,
                    max_failures=4,
                    progress_bar=False,
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                out["error"] = exc

        t = threading.Thread(target=train)
        t.start()
        _wait_for(lambda: _latest_step(run) >= 20, 240, "training on one worker")
        node = cluster.add_node(num_cpus=1, resources={"slot": 1})  # main thread, as Ray requires
        _wait_for(
            lambda: len(list((run / "sample_ids").glob("rank1-*"))) > 0,
            240,
            "the run to grow to 2 workers",
        )
        grown_at = _latest_step(run)
        _wait_for(lambda: _latest_step(run) >= grown_at + 30, 240, "progress on 2 workers")
        assert t.is_alive(), "the run ended before the second node could leave: lengthen it"
        cluster.remove_node(node)  # the second worker's node leaves: the run must shrink and go on
        t.join(timeout=600)
        assert not t.is_alive(), "training did not finish"
        if "error" in out:
            raise out["error"]
        res = out["res"]
        changes = [(c["from"], c["to"]) for c in res["world_size_changes"]]
        assert changes == [(1, 2), (2, 1)], res["world_size_changes"]
        assert res["history"][-1]["world_size"] == 1
        # global batch fixed: the step count is that of one worker, whatever happened in between
        assert res["history"][-1]["step"] == EPOCHS * 40
        assert res["epochs"] == EPOCHS and res["train_accuracy"] > 0.8
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_cpu_only_nodes_take_the_jpeg_decoding(tmp_path):
    """In a cluster of a GPU node (its GPU declared: nothing here runs on it) and a CPU-only node,
    a JPEG dataset's CPU decoding (lepton_ray.train.feed.cpu_only_nodes) runs on the CPU-only node
    only, leaving the GPU node's CPUs to the trainer. Here, not in its own module: this module
    already runs without the shared Ray instance (issue 16 item 3)."""
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    from lepton_ray.data import jpeg
    from lepton_ray.runtime import ensure_ray
    from lepton_ray.train.feed import Plan, StreamedFeed

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    try:
        cpu_node = cluster.add_node(num_cpus=2)  # main thread, as Ray requires
        ensure_ray(address=cluster.address)
        jpeg.generate(tmp_path / "src", train=60, classes=3, sizes=(40, 64), seed=1)
        info = prepare(
            f"imagefolder:{tmp_path / 'src'}", str(tmp_path / "ds"), encoding="jpeg", crop=32
        )
        feed = StreamedFeed(
            info["train"],
            Plan(0, 20, 1, 0, "sequential-unshuffled"),
            augment=(),
            preprocess_batch=8,
            shuffle_buffer_rows=0,
            pin_memory=False,
        )
        ids = np.concatenate([b["id"].numpy() for b in feed.epoch(0)])
        assert sorted(ids.tolist()) == list(range(60))
        # Ray reports task events asynchronously: a task that ran may still show no node for a
        # moment (CI once saw one), so wait until every decoding task that ran names its node.
        # One that never ran (cancelled before scheduling when the epoch ended) has none at all.
        deadline = time.time() + 30
        while True:
            decoding = [
                t for t in list_tasks(detail=True, limit=10_000) if "Preprocessor" in t.name
            ]
            settled = all(
                t.node_id or t.state in ("PENDING_NODE_ASSIGNMENT", "FAILED") for t in decoding
            )
            if (decoding and settled) or time.time() > deadline:
                break
            time.sleep(0.5)
        ran = {t.node_id for t in decoding if t.node_id}
        assert ran == {cpu_node.node_id}, [(t.state, t.node_id) for t in decoding]
        assert all(t.state != "FINISHED" for t in decoding if not t.node_id), decoding
    finally:
        ray.shutdown()
        cluster.shutdown()
