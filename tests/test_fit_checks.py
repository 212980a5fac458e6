"""What ``fit`` checks before Ray starts: bad arguments, a missing dataset, the model's shape.

Every test here replaces ``ensure_ray`` with a tripwire, so a check that runs only after Ray has
started fails the test. No Ray, no cluster: the pure tier.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_ray import Trainer, build_model
from lepton_ray.data import load_mnist5k, prepare, read_arrays
from lepton_ray.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def tripwire(*_a, **_k):
        raise AssertionError("fit started Ray before checking its arguments")

    monkeypatch.setattr("lepton_ray.train.trainer.ensure_ray", tripwire)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ConfigError, "TrainConfig.epochs: must be >= 1, got 0"),
        ({"batch_size": 0}, ConfigError, "TrainConfig.batch_size: must be >= 1, got 0"),
        ({"bogus": 1}, ConfigError, "unknown fit\\(\\) argument 'bogus'"),
    ],
)
def test_bad_fit_arguments_fail_fast(tmp_path, kwargs, error, match):
    info = prepare("mnist5k", str(tmp_path / "d"))["test"]
    args = {"batch_size": 100, "epochs": 1, **kwargs}
    with pytest.raises(error, match=match):
        Trainer(2, storage=str(tmp_path)).fit(
            build_model("cnn", num_classes=10, in_channels=1), info, **args
        )


def test_missing_dataset_uri_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no prepared dataset at .*nowhere"):
        Trainer(2, storage=str(tmp_path)).fit(
            build_model("cnn", in_channels=1), str(tmp_path / "nowhere")
        )


@pytest.mark.parametrize(
    ("run_name", "match"), [("..", "run_name: must be a plain name"), ("a/b", "got 'a/b'")]
)
def test_a_run_name_that_is_not_one_folder_is_refused(tmp_path, run_name, match):
    info = prepare("mnist5k", str(tmp_path / "d"))["test"]
    with pytest.raises(ConfigError, match=match):
        Trainer(2, storage=str(tmp_path / "runs")).fit(
            build_model("cnn", in_channels=1), info, run_name=run_name
        )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_read_arrays_matches_the_source(tmp_path):
    info = prepare("mnist5k", str(tmp_path))["test"]
    images, labels, ids = read_arrays(info)
    x, y, i = load_mnist5k()["test"]
    order = np.argsort(ids)
    assert (
        np.array_equal(images[order], x)
        and np.array_equal(labels[order], y)
        and np.array_equal(ids[order], i)
    )


def test_worker_count_spellings():
    assert Trainer(4).scaling.num_workers == 4
    assert Trainer(num_nodes=3).scaling.num_workers == 3  # the name older docs use
    assert Trainer((1, 4)).scaling.num_workers == (1, 4)
    assert Trainer("auto", use_gpu=True).scaling.use_gpu is True
    with pytest.raises(ConfigError, match="num_workers"):
        Trainer(0)


def test_serve_run_key_value_pairs_are_read_by_the_field_types():
    """``serve run serving.app:app max_replicas=4`` hands the builder strings."""
    import serving.app

    built = serving.app.app({"checkpoint": "/x/ckpt", "max_replicas": "4", "name": "007"})
    assert type(built).__name__ == "Application"
    with pytest.raises(ConfigError, match="ServeConfig.max_replicas: expected a whole number"):
        serving.app.app({"checkpoint": "/x/ckpt", "max_replicas": "many"})


class NeedsWidth(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(width, 10)


class Defaults(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = torch.nn.Linear(width, 10)


def test_a_model_its_checkpoints_cannot_rebuild_is_named_in_a_warning():
    from lepton_ray.train.trainer import checkpoint_spec

    with pytest.warns(UserWarning, match="NeedsWidth trains, but its checkpoints cannot be"):
        assert checkpoint_spec(NeedsWidth(3)) == {"class": f"{__name__}:NeedsWidth", "kwargs": {}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint_spec(Defaults())  # rebuildable: no warning
        checkpoint_spec(build_model("cnn", in_channels=1))
