"""Ray Train's dataset sharding as lepton_ray uses it: every sample once per epoch, on any number
of workers; a fresh order every epoch; the same run again given the seed and worker count.

The workers record the ids of every batch they train (``record_sample_ids``).
"""

from __future__ import annotations

import numpy as np
import pytest

from lepton_ray import DataConfig, Trainer, build_model
from lepton_ray.data import load_mnist5k, write_dataset
from tests.test_resume import sample_logs

pytestmark = pytest.mark.ray

ROWS, BATCH, EPOCHS = (
    360,
    36,
    2,
)  # 360 = 10 global batches: nothing is left over with 1, 2 or 3 workers


@pytest.fixture(scope="module")
def digits_360(tmp_path_factory):
    x, y, ids = load_mnist5k()["train"]
    sel = np.sort(np.random.default_rng(1).choice(len(x), ROWS, replace=False))
    return write_dataset(
        x[sel],
        y[sel],
        tmp_path_factory.mktemp("d360"),
        classes=[str(i) for i in range(10)],
        ids=ids[sel],
        rows_per_shard=45,
    )


def _run(
    digits, tmp_path, workers: int, name: str, shuffle: str
) -> dict[tuple[int, int, int], list[int]]:
    """Train briefly; returns the ids each rank trained at each (epoch, step)."""
    model = build_model("cnn", in_channels=1, num_classes=10, width=4)
    val = (
        digits if shuffle == "cache" else None
    )  # cached with the training set (any prepared set will do here)
    res = Trainer(workers).fit(
        model,
        digits,
        val,
        batch_size=BATCH,
        epochs=EPOCHS,
        storage=str(tmp_path),
        run_name=name,
        record_sample_ids=True,
        seed=0,
        progress_bar=False,
        data=_data(shuffle),
    )
    assert res["epochs"] == EPOCHS
    assert (val is None) == ("val_accuracy" not in res)
    steps: dict[tuple[int, int, int], list[int]] = {}
    for key, log in sample_logs(tmp_path / name).items():
        rank = int(key.split("-")[0].removeprefix("rank"))
        for s in log:
            steps[(s["epoch"], s["step"], rank)] = s["ids"]
    return steps


def _data(shuffle: str) -> DataConfig:
    if (
        shuffle == "cache"
    ):  # each worker holds the whole set on its device and draws every epoch there
        return DataConfig(cache="device", augment=("random_crop", "hflip"))
    return DataConfig(shuffle=shuffle, shuffle_buffer_rows=64)


# A global shuffle (what ``auto`` picks for a dataset this small) and the device cache (the default
# on GPUs for datasets that fit; forced here on the CPU). The streaming one (shard order + a local
# buffer, for datasets bigger than the object store) on several workers, exactly once and reshuffled
# per epoch: tests/test_uneven_workers.py (7 workers).
@pytest.mark.parametrize(("workers", "shuffle"), [(1, "global"), (2, "global"), (2, "cache")])
def test_every_sample_once_per_epoch(ray_session, digits_360, tmp_path, workers, shuffle):
    steps = _run(digits_360, tmp_path, workers, f"shard{workers}", shuffle)
    all_ids = set(_ids(digits_360))
    orders = []
    for epoch in range(1, EPOCHS + 1):
        mine = {
            r: [
                i
                for (e, _, rank), ids in sorted(steps.items())
                if e == epoch and rank == r
                for i in ids
            ]
            for r in range(workers)
        }
        seen = [i for r in range(workers) for i in mine[r]]
        assert len(seen) == ROWS and set(seen) == all_ids, (
            f"epoch {epoch}: not every sample exactly once"
        )
        assert all(len(ids) == BATCH // workers for (e, _, _), ids in steps.items() if e == epoch)
        orders.append(seen)
    assert orders[0] != orders[1], "the training set was not reshuffled between epochs"
    if (
        shuffle == "cache"
    ):  # a global batch is one slice of the epoch's permutation, split over the ranks
        from lepton_ray.train.sampling import shuffled_plan

        for epoch in range(1, EPOCHS + 1):
            plan = shuffled_plan(
                [np.asarray(_ids(digits_360))],
                seed=0,
                epoch=epoch - 1,
                global_batch=BATCH,
                world=1,
                rank=0,
            )
            expected = plan.ids.reshape(-1, BATCH)
            for step, batch in enumerate(expected):
                got = (
                    steps[(epoch, (epoch - 1) * len(expected) + step + 1, 0)]
                    + steps[(epoch, (epoch - 1) * len(expected) + step + 1, 1)]
                )
                assert got == batch.tolist()
    if (
        workers == 2 and shuffle == "global"
    ):  # the same seed and worker count: the same batches on the same ranks
        assert _run(digits_360, tmp_path, workers, "shard2-again", shuffle) == steps


def _ids(info) -> list[int]:
    from lepton_ray.data import read_ids

    return read_ids(info).tolist()
