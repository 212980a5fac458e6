"""Fault tolerance and sample-exact resume, for real: worker processes die, runs continue.

Sample ids are recorded per step (``record_sample_ids``); a checkpoint carries the ids consumed
in its epoch. After a resume the rest of that epoch must be exactly the samples not yet consumed,
each once, whatever the new world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lepton_ray import DataConfig, Trainer, build_model
from lepton_ray.data import load_mnist5k, write_dataset
from lepton_ray.errors import ConfigError, TrainingError

pytestmark = pytest.mark.ray


def sample_logs(run: Path) -> dict[str, list[dict]]:
    """Per worker process (rank + attempt id): the steps it trained, in order."""
    out: dict[str, list[dict]] = {}
    for f in sorted((run / "sample_ids").glob("*.jsonl")):
        key = f.name.rsplit("-", 1)[0]
        out.setdefault(key, []).extend(json.loads(line) for line in f.read_text().splitlines())
    return out


def assert_sample_exact(
    run: Path,
    first: list[str],
    resumed: list[str],
    resume_step: int,
    steps_per_epoch: int,
    rows: int,
    global_batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch interrupted after global step ``resume_step`` (the checkpoint the run restored) was
    finished on exactly the samples not consumed by then, each once.

    ``first``/``resumed``: the sample-log keys of the worker processes before and after the resume.
    """
    epoch = resume_step // steps_per_epoch + 1
    logs = sample_logs(run)
    before = [
        np.asarray(s["ids"])
        for k in first
        for s in logs[k]
        if s["epoch"] == epoch and s["step"] <= resume_step
    ]
    consumed = np.concatenate(before)
    after = np.concatenate(
        [np.asarray(s["ids"]) for k in resumed for s in logs[k] if s["epoch"] == epoch]
    )
    assert (
        len(np.unique(consumed)) == len(consumed) == (resume_step % steps_per_epoch) * global_batch
    )
    assert len(np.unique(after)) == len(after), "a sample was trained twice after the resume"
    assert not np.intersect1d(after, consumed).size, "a consumed sample was trained again"
    assert (
        rows - len(consumed) - len(after) < global_batch
    )  # only a tail smaller than one batch is left
    return consumed, after


@pytest.fixture(scope="module")
def digits_1200(tmp_path_factory):
    x, y, ids = load_mnist5k()["train"]
    sel = np.sort(np.random.default_rng(0).choice(len(x), 1200, replace=False))
    return write_dataset(
        x[sel],
        y[sel],
        tmp_path_factory.mktemp("d1200"),
        classes=[str(i) for i in range(10)],
        ids=ids[sel],
    )


# Both ways a worker gets its data: streamed through Ray Data every epoch (augmented in the loop,
# augment_on="device", on the CPU here: the resumed epoch's own read included), and the device cache
# (the whole set on each worker's device; the default on GPUs). Which samples are trained does not
# depend on where they are augmented.
@pytest.mark.parametrize(
    "data",
    [DataConfig(augment=("random_crop", "hflip"), augment_on="device"), DataConfig(cache="device")],
    ids=["streamed", "device-cache"],
)
def test_resume_with_a_different_world_size_is_sample_exact(
    ray_session, digits_1200, tmp_path, data
):
    common = dict(
        batch_size=60,
        epochs=2,
        storage=str(tmp_path),
        run_name="resize",
        checkpoint_every_steps=5,
        record_sample_ids=True,
        lr=0.05,
        data=data,
    )
    model = build_model("cnn", in_channels=1, num_classes=10, width=8)
    # Attempt 1: 2 workers; rank 1 fails at epoch 1, step 13 (last checkpoint: step 10), no retries.
    with pytest.raises(TrainingError, match="injected fault at epoch 1 step 13 on rank 1"):
        Trainer(2).fit(model, digits_1200, max_failures=0, fault_injection="1:13:1", **common)
    run = tmp_path / "resize"
    first = set(sample_logs(run))
    # Same name without resume=True is refused: nothing gets mixed into an existing run by accident.
    with pytest.raises(ConfigError, match="already exists"):
        Trainer(3).fit(model, digits_1200, **common)
    # Attempt 2: resume the same run with 3 workers.
    res = Trainer(3).fit(model, digits_1200, resume=True, **common)
    assert res["epochs"] == 2 and [h["world_size"] for h in res["history"]] == [3, 3]
    new = sorted(set(sample_logs(run)) - first)
    assert len(new) == 3
    consumed, after = assert_sample_exact(
        run, sorted(first), new, resume_step=10, steps_per_epoch=20, rows=1200, global_batch=60
    )
    assert (
        len(consumed) == 600 and len(after) == 600
    )  # 10 steps x 60, then 600 rows / 3 workers / 20 each
    assert res["history"][-1]["step"] == 10 + 10 + 20
