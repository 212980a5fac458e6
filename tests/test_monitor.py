"""``TrainConfig.monitor``: the metric that picks a run's best checkpoint and stops it early, for
every kind of data — a language model's ``val_perplexity`` (lower is better), a click model's
``val_auc`` (higher is better) — and a metric the data's task never reports refused before Ray
starts (it would otherwise never decide anything)."""

from __future__ import annotations

import pytest

from lepton_ray import Trainer, build_model
from lepton_ray.config import TrainConfig
from lepton_ray.data import prepare
from lepton_ray.errors import ConfigError
from lepton_ray.train.loop import judge
from lepton_ray.train.task import monitorable


def _decide(monitor: str, values: list[float]) -> list[bool]:
    best, improved = None, []
    for epoch, v in enumerate(values, start=1):
        better, _, best = judge(TrainConfig(monitor=monitor), {"epoch": epoch, monitor: v}, best)
        improved.append(better)
    return improved


def test_perplexity_is_minimised_and_auc_maximised():
    assert _decide("val_perplexity", [12.0, 10.5, 11.0, 9.9]) == [True, True, False, True]
    assert _decide("val_auc", [0.70, 0.78, 0.74, 0.80]) == [True, True, False, True]


def test_each_kind_offers_its_own_metric():
    assert "val_auc" in monitorable("ctr") and "val_auc" not in monitorable("image")
    assert "val_perplexity" in monitorable("text") and "val_perplexity" not in monitorable("ctr")
    for kind in ("image", "text-label", "text", "ctr"):
        assert {"val_loss", "val_accuracy", "train_loss"} <= set(monitorable(kind))


def test_a_metric_the_data_never_reports_is_refused_before_ray(tmp_path, monkeypatch):
    def tripwire(*_a, **_k):
        raise AssertionError("fit started Ray before checking monitor")

    monkeypatch.setattr("lepton_ray.train.trainer.ensure_ray", tripwire)
    info = prepare("mnist5k", str(tmp_path / "d"))["test"]
    with pytest.raises(ConfigError, match="monitor 'val_auc' is not reported for image data"):
        Trainer(1, storage=str(tmp_path / "runs")).fit(
            build_model("cnn", in_channels=1), info, monitor="val_auc", epochs=1
        )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_unknown_monitor_names_the_choices():
    with pytest.raises(ConfigError, match="val_perplexity.*val_auc"):
        TrainConfig(monitor="auc")
