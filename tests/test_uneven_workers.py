"""Worker counts that do not divide the global batch, for real: 3 and 7 Ray Train workers.

With B = 40 the workers take 14/13/13 (3 workers) or 6,6,6,6,6,5,5 (7 workers) rows per step. Every
sample must still be trained exactly once per epoch, every worker must take the same number of
optimizer steps, the number the schedule was planned on (400 rows / 40 = 10 per epoch), and the LR
schedule must reach its end. The workers record the ids of every batch they train. The 7 workers
read with the streaming shuffle (shard order + a local buffer), the one tests/test_sharding.py
leaves to this module; both shuffles must give each epoch a new order.
"""

from __future__ import annotations

import numpy as np
import pytest

from lepton_ray import DataConfig, Trainer, build_model
from lepton_ray.config import OptimConfig
from lepton_ray.data import load_mnist5k, read_ids, write_dataset
from lepton_ray.train.batching import worker_batch
from lepton_ray.train.step import lr_factor
from lepton_ray.train.timeline import BEFORE_FIRST_STEP
from tests.test_resume import sample_logs

pytestmark = pytest.mark.ray

ROWS, BATCH, EPOCHS, LR = 400, 40, 2, 0.05


@pytest.fixture(scope="module")
def digits_400(tmp_path_factory):
    x, y, ids = load_mnist5k()["train"]
    sel = np.sort(np.random.default_rng(7).choice(len(x), ROWS, replace=False))
    return write_dataset(
        x[sel],
        y[sel],
        tmp_path_factory.mktemp("d400"),
        classes=[str(i) for i in range(10)],
        ids=ids[sel],
        rows_per_shard=45,
    )


@pytest.mark.parametrize(("workers", "shuffle"), [(3, "global"), (7, "files")])
def test_every_sample_once_and_the_planned_steps(
    ray_session, digits_400, tmp_path, workers, shuffle
):
    res = Trainer(workers, resources_per_worker={"CPU": 0.25}).fit(
        build_model("cnn", in_channels=1, num_classes=10, width=4),
        digits_400,
        batch_size=BATCH,
        epochs=EPOCHS,
        lr=LR,
        storage=str(tmp_path),
        run_name="uneven",
        record_sample_ids=True,
        progress_bar=False,
        data=DataConfig(shuffle=shuffle, shuffle_buffer_rows=32),
    )
    steps = ROWS // BATCH * EPOCHS
    assert [h["step"] for h in res["history"]] == [10, 20]
    # Where the fixed cost went: every phase measured, in order, adding up to the first step.
    startup = res["startup_s"]
    before = BEFORE_FIRST_STEP
    assert set(startup) == {*before, "teardown", "to_first_step"}, startup
    assert all(startup[k] >= 0 for k in startup), startup
    assert startup["to_first_step"] == pytest.approx(sum(startup[k] for k in before), abs=0.01)
    # The schedule ran to its end: the last step's LR is the schedule's last value.
    assert res["history"][-1]["lr"] == pytest.approx(LR * lr_factor(steps, steps, OptimConfig()))
    logs = sample_logs(tmp_path / "uneven")
    assert len(logs) == workers
    all_ids = set(read_ids(digits_400).tolist())
    orders = []
    for epoch in (1, 2):
        seen = []
        for key, log in logs.items():
            rank = int(key.split("-")[0].removeprefix("rank"))
            mine = [s for s in log if s["epoch"] == epoch]
            assert len(mine) == ROWS // BATCH, (
                f"rank {rank} took {len(mine)} steps in epoch {epoch}"
            )
            assert {len(s["ids"]) for s in mine} == {worker_batch(BATCH, workers, rank)}
            seen += [i for s in mine for i in s["ids"]]
        assert len(seen) == ROWS and set(seen) == all_ids, f"epoch {epoch}: not every sample once"
        orders.append(seen)
    assert orders[0] != orders[1], "the training set was not reshuffled between epochs"


def test_a_users_ray_dataset_is_cached_whole_on_every_worker(ray_session, tmp_path):
    """``cache="device"`` with an in-memory Ray Dataset (no ids): each worker reads all of it once
    (not a split), numbers the rows the same way, and trains every row once per epoch."""
    import ray

    x, y, _ = load_mnist5k()["test"]
    pick = np.random.default_rng(0).choice(len(x), 200, replace=False)  # every class
    # A few blocks, not Ray's default of one per row here: the numbering still spans blocks, and
    # the fit is not spent on 200 one-row blocks.
    rows = [{"image": x[i], "label": int(y[i])} for i in pick]
    ds = ray.data.from_items(rows, override_num_blocks=8)
    res = Trainer(3, resources_per_worker={"CPU": 0.5}).fit(
        build_model("cnn", in_channels=1, num_classes=10, width=4),
        ds,
        batch_size=BATCH,
        epochs=EPOCHS,
        storage=str(tmp_path),
        run_name="cached",
        record_sample_ids=True,
        progress_bar=False,
        data=DataConfig(cache="device"),
    )
    assert [h["step"] for h in res["history"]] == [5, 10]
    logs = sample_logs(tmp_path / "cached")
    for epoch in (1, 2):
        seen = [i for log in logs.values() for s in log if s["epoch"] == epoch for i in s["ids"]]
        assert sorted(seen) == list(range(200)), f"epoch {epoch}: not every row once"
