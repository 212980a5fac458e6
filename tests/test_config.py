"""Typed configuration: validation names the field, dict round trips, LR schedules.

The full catalogue of bad values (YAML, --set, Python, CLI) is in test_config_validation.py."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import pytest
import torch

from lepton_ray.config import (
    DataConfig,
    OptimConfig,
    ScalingConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from lepton_ray.errors import ConfigError, LeptonError


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ScalingConfig(num_workers=0), "ScalingConfig.num_workers"),
        (lambda: ScalingConfig(num_workers=-2), "ScalingConfig.num_workers"),
        (lambda: ScalingConfig(num_workers=(3, 2)), "ScalingConfig.num_workers"),
        (lambda: ScalingConfig(num_workers=(0, 2)), "ScalingConfig.num_workers"),
        (lambda: ScalingConfig(num_workers=(1, 2, 3)), "ScalingConfig.num_workers"),
        (lambda: ScalingConfig(num_workers=("a", 2)), "ScalingConfig.num_workers"),
        (lambda: ScalingConfig(num_workers=True), "ScalingConfig.num_workers"),
        (lambda: ScalingConfig(num_workers="many"), "ScalingConfig.num_workers"),
        (lambda: ScalingConfig(placement_strategy="SCATTER"), "ScalingConfig.placement_strategy"),
        (lambda: TrainConfig(epochs=0), "TrainConfig.epochs"),
        (lambda: TrainConfig(batch_size=0), "TrainConfig.batch_size"),
        (lambda: TrainConfig(batch_size=10.5), "TrainConfig.batch_size"),
        (lambda: TrainConfig(max_micro_batch=0), "TrainConfig.max_micro_batch"),
        (lambda: TrainConfig(max_failures=-1), "TrainConfig.max_failures"),
        (lambda: OptimConfig(lr=0), "OptimConfig.lr"),
        (lambda: OptimConfig(lr=-0.1), "OptimConfig.lr"),
        (lambda: OptimConfig(lr="fast"), "OptimConfig.lr"),
        (lambda: OptimConfig(optimizer="adam"), "OptimConfig.optimizer"),
        (lambda: OptimConfig(schedule="step"), "OptimConfig.schedule"),
        (lambda: OptimConfig(warmup_fraction=1.0), "OptimConfig.warmup_fraction"),
        (lambda: DataConfig(augment=("random_crop", "sharpen")), "DataConfig.augment"),
        (lambda: DataConfig(preprocess_batch_size=0), "DataConfig.preprocess_batch_size"),
    ],
)
def test_invalid_fields_raise_config_error_naming_the_field(build, field):
    with pytest.raises(ConfigError) as info:
        build()
    assert field in str(info.value)
    assert isinstance(info.value, LeptonError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_unknown_augmentation_names_it():
    with pytest.raises(ConfigError, match="DataConfig.augment: unknown augmentation 'sharpen'"):
        DataConfig(augment=["sharpen"])


def test_valid_scaling_forms():
    assert ScalingConfig(num_workers=3).num_workers == 3
    assert ScalingConfig(num_workers=(1, 4)).num_workers == (1, 4)
    assert ScalingConfig(num_workers=[2, 2]).num_workers == (2, 2)  # lists (YAML) become tuples
    assert ScalingConfig(num_workers="auto").num_workers == "auto"
    assert DataConfig(augment=["hflip"]).augment == ("hflip",)


def test_from_dict_nested():
    cfg = from_dict(
        TrainConfig,
        {
            "batch_size": 64,
            "epochs": 3,
            "optim": {"lr": 0.05, "schedule": "cosine"},
            "data": {"augment": ["random_crop", "hflip"], "shuffle": False},
            "scaling": {"num_workers": [1, 4], "resources_per_worker": {"CPU": 2}},
        },
    )
    assert (
        isinstance(cfg.optim, OptimConfig)
        and cfg.optim.lr == 0.05
        and cfg.optim.schedule == "cosine"
    )
    assert cfg.optim.optimizer == "sgd"  # defaults fill the rest
    assert isinstance(cfg.data, DataConfig) and cfg.data.augment == ("random_crop", "hflip")
    assert cfg.data.shuffle == "none"  # False is "none"
    assert isinstance(cfg.scaling, ScalingConfig) and cfg.scaling.num_workers == (1, 4)
    assert cfg.scaling.resources_per_worker == {"CPU": 2}
    assert (cfg.batch_size, cfg.epochs) == (64, 3)


def test_from_dict_unknown_key_names_it():
    with pytest.raises(ConfigError, match="unknown key 'batchsize' for TrainConfig"):
        from_dict(TrainConfig, {"batchsize": 64})
    with pytest.raises(
        ConfigError, match=r"^TrainConfig.optim.learning_rate: unknown key \(known there: optimizer"
    ):
        from_dict(TrainConfig, {"optim": {"learning_rate": 0.1}})


def test_from_dict_validates_nested_values():
    with pytest.raises(ConfigError, match=r"^TrainConfig.optim.lr: must be > 0, got 0$"):
        from_dict(TrainConfig, {"optim": {"lr": 0}})
    with pytest.raises(
        ConfigError, match=r"^TrainConfig.scaling.num_workers: must be >= 1, got 0$"
    ):
        from_dict(TrainConfig, {"scaling": {"num_workers": 0}})


def test_to_dict_round_trip():
    cfg = TrainConfig(
        batch_size=32,
        epochs=2,
        max_micro_batch=8,
        run_name="r1",
        storage="s3://b/runs",
        endpoint_url="http://127.0.0.1:9000",
        optim=OptimConfig(optimizer="adamw", lr=1e-3, schedule="constant", grad_clip=1.0),
        data=DataConfig(augment=("hflip",), shuffle=False),
        scaling=ScalingConfig(
            num_workers=(2, 4), placement_strategy="SPREAD", resources_per_worker={"CPU": 2.0}
        ),
    )
    d = to_dict(cfg)
    assert d["optim"]["lr"] == 1e-3 and d["scaling"]["placement_strategy"] == "SPREAD"
    assert from_dict(TrainConfig, d) == cfg
    # Through JSON (what a checkpoint stores) it comes back the same as well.
    assert from_dict(TrainConfig, json.loads(json.dumps(d))) == cfg
    assert from_dict(TrainConfig, to_dict(TrainConfig())) == TrainConfig()


# --- learning-rate schedules (pure functions of the training loop) ---------------------------
def _lr_factor():
    from lepton_ray.train.step import lr_factor

    return lr_factor


def test_lr_onecycle():
    lr_factor = _lr_factor()
    cfg = OptimConfig(schedule="onecycle", warmup_fraction=0.25)
    total = 100
    f = [lr_factor(s, total, cfg) for s in range(total + 1)]
    # Warm-up from 4% of the peak, rising linearly to the peak at the last warm-up step.
    assert f[0] == pytest.approx(0.04 + 0.96 / 25)
    assert all(a < b for a, b in pairwise(f[:25]))
    assert f[24] == pytest.approx(1.0)
    assert f[25] == pytest.approx(1.0)  # the cosine decay starts at the peak
    assert all(a >= b for a, b in pairwise(f[25:]))
    assert f[total] == pytest.approx(1e-3)  # ... and ends near zero
    assert f[total - 1] < 0.01
    assert max(f) == pytest.approx(1.0)
    assert lr_factor(10 * total, total, cfg) == pytest.approx(1e-3)  # clamped past the end


def test_lr_cosine():
    lr_factor = _lr_factor()
    cfg = OptimConfig(schedule="cosine", warmup_fraction=0.1)
    total = 50
    assert lr_factor(0, total, cfg) == pytest.approx(1 / 5)  # warm-up from zero
    assert lr_factor(4, total, cfg) == pytest.approx(1.0)
    assert lr_factor(5, total, cfg) == pytest.approx(1.0)
    mid = 5 + (total - 5) // 2
    expected_mid = 0.5 * (1 + math.cos(math.pi * ((mid - 5) / 45))) * (1 - 1e-3) + 1e-3
    assert lr_factor(mid, total, cfg) == pytest.approx(expected_mid)
    assert lr_factor(total, total, cfg) == pytest.approx(1e-3)
    # Without warm-up the schedule starts at the peak.
    assert lr_factor(
        0, total, OptimConfig(schedule="cosine", warmup_fraction=0.0)
    ) == pytest.approx(1.0)


def test_lr_constant():
    lr_factor = _lr_factor()
    cfg = OptimConfig(schedule="constant")
    assert {lr_factor(s, 20, cfg) for s in range(25)} == {1.0}


def test_build_optimizer():
    from lepton_ray.train.step import build_optimizer

    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    )
    sgd = build_optimizer(model, OptimConfig(lr=0.2, momentum=0.9, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    decay, no_decay = sgd.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.ndim <= 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4
    assert sgd.defaults["nesterov"] is True and sgd.defaults["lr"] == 0.2
    plain = build_optimizer(model, OptimConfig(momentum=0.0))
    assert plain.defaults["nesterov"] is False
    adamw = build_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-3))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 1e-3


# --- early stopping and best-checkpoint decisions (rank 0's judgement, no process group here) ---
def test_judge_tracks_the_best_and_stops_after_patience():
    from lepton_ray.config import TrainConfig
    from lepton_ray.train.loop import judge

    cfg = TrainConfig(early_stopping_patience=2, monitor="val_loss")
    best = None
    decisions = []
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.85, 0.7], start=1):
        improved, stop, best = judge(
            cfg, {"epoch": epoch, "val_loss": loss, "train_loss": 0.0}, best
        )
        decisions.append((improved, stop))
    assert decisions[:4] == [(True, False), (True, False), (False, False), (False, True)]
    assert best == {"metric": "val_loss", "value": 0.7, "epoch": 5}


def test_judge_maximises_accuracy_and_falls_back_to_train_loss_without_validation():
    from lepton_ray.config import TrainConfig
    from lepton_ray.train.loop import judge

    improved, _, best = judge(
        TrainConfig(monitor="val_accuracy"), {"epoch": 1, "val_accuracy": 0.5}, None
    )
    improved2, _, best = judge(
        TrainConfig(monitor="val_accuracy"), {"epoch": 2, "val_accuracy": 0.6}, best
    )
    assert improved and improved2 and best["value"] == 0.6
    _, _, best = judge(TrainConfig(), {"epoch": 1, "train_loss": 0.3}, None)  # no val_loss reported
    assert best["metric"] == "train_loss"


def test_shuffle_modes():
    assert DataConfig().shuffle == "auto" and DataConfig(shuffle=True).shuffle == "auto"
    assert DataConfig(shuffle="files").shuffle == "files"
    with pytest.raises(
        ConfigError,
        match="DataConfig.shuffle: expected true or false or 'auto' or 'global' or 'files' or "
        "'none', got 'sometimes'",
    ):
        DataConfig(shuffle="sometimes")


def test_collective_backend_follows_the_device_and_gpu_sharing():
    assert ScalingConfig().process_group_backend() == "gloo"
    assert ScalingConfig(use_gpu=True).process_group_backend() == "nccl"
    assert (
        ScalingConfig(use_gpu=True, resources_per_worker={"GPU": 2}).process_group_backend()
        == "nccl"
    )
    # two workers on one GPU: NCCL refuses two ranks on one device, gloo does not
    assert (
        ScalingConfig(use_gpu=True, resources_per_worker={"GPU": 0.5}).process_group_backend()
        == "gloo"
    )
    assert ScalingConfig(use_gpu=True, backend="gloo").process_group_backend() == "gloo"
    with pytest.raises(
        ConfigError, match="ScalingConfig.backend: expected one of auto, nccl, gloo, got 'mpi'"
    ):
        ScalingConfig(backend="mpi")
