"""A run whose loss stops being a number stops there: no checkpoint of NaN weights, no restarts
that diverge again from the same checkpoint, and one line from ``fit`` naming the epoch and what
to change (before, a ResNet-50 at lr 0.1 trained on for epochs of NaN and reported them)."""

from __future__ import annotations

import math

import pytest

from lepton_ray import Trainer, build_model
from lepton_ray.data import prepare
from lepton_ray.errors import TrainingError
from lepton_ray.runs import RunLayout
from lepton_ray.storage import resolve
from lepton_ray.train.loop import diverged


def test_a_loss_that_is_not_a_number_has_diverged():
    assert diverged({"train_loss": math.nan}) and diverged({"train_loss": math.inf})
    assert not diverged({"train_loss": 1e30})


@pytest.mark.ray
@pytest.mark.parametrize("every", [None, 5], ids=["at-epoch-end", "mid-epoch"])
def test_a_diverging_run_stops_at_once_and_keeps_no_nan_checkpoint(ray_session, tmp_path, every):
    info = prepare("mnist5k", str(tmp_path / "d"))["test"]
    runs = tmp_path / "runs"
    with pytest.raises(TrainingError) as err:
        Trainer(1, storage=str(runs)).fit(
            build_model("cnn", num_classes=10, in_channels=1), info, batch_size=100, epochs=3,
            lr=1e12, schedule="constant", run_name="boom", max_failures=2, progress_bar=False,
            checkpoint_every_steps=every,
        )  # fmt: skip
    msg = str(err.value)
    assert "\n" not in msg and "training run 'boom' diverged: train_loss nan in epoch 1" in msg, msg
    # NaN from step 4 on (lr 1e12): seen at the epoch's end, or at the mid-epoch checkpoint of step 5
    assert f"(step {every or 10})" in msg, msg
    assert "no checkpoint kept" in msg and "optim.lr (it was 1e+12)" in msg, msg
    assert RunLayout(resolve(str(runs / "boom"))).latest() is None
