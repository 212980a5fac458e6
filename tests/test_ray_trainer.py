"""lepton_ray.train.ray_trainer: a fit given no Ray Dataset starts no dataset manager, and its
worker still runs with the driver's Ray Data settings. (A fit given one keeps Ray Train's way: the
tests that pass a Ray Dataset, e.g. tests/test_train_serve.py, read their shards through it.)"""

from __future__ import annotations

import sys
from typing import Any

import pytest

pytestmark = pytest.mark.ray

KEY = "lepton_ray_test_setting"


def _managers() -> set[str]:
    from ray.util.state import list_actors

    found = list_actors(filters=[("class_name", "=", "DatasetManager")], limit=10_000)
    return {a.actor_id for a in found}


def _check_context(config: dict) -> None:
    """Every worker checks what it was given; a mismatch fails the fit (Ray Train V2 keeps
    metrics only with checkpoints, so nothing is reported back)."""
    import ray.train
    from ray.data import DataContext

    rank = ray.train.get_context().get_world_rank()
    ctx = DataContext.get_current()
    seen = (ctx.get_config(KEY, None), ctx.target_max_block_size)
    if seen != (config["setting"], config["block_size"]):
        raise AssertionError(f"worker {rank} saw the data context {seen}")
    # handed over by reference to Ray Data's own setter: the worker imports nothing for it
    if "lepton_ray.train.ray_trainer" in sys.modules:
        raise AssertionError(f"worker {rank} imported lepton_ray.train.ray_trainer")


def _fit(tmp_path) -> Any:
    import ray.train
    from ray.data import DataContext

    from lepton_ray.train.backend import TorchBackendConfig
    from lepton_ray.train.ray_trainer import FitTrainer

    ctx = DataContext.get_current()
    setting, block = "from-the-driver", 3 * 1024 * 1024
    before = (ctx.get_config(KEY, None), ctx.target_max_block_size)
    ctx.set_config(KEY, setting)
    ctx.target_max_block_size = block
    try:  # Ray Train's callbacks take the context when fit() starts
        return FitTrainer(
            _check_context,
            train_loop_config={"setting": setting, "block_size": block},
            backend_config=TorchBackendConfig(),
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(name="ctx", storage_path=str(tmp_path)),
        ).fit()
    finally:  # the session's context as it was
        ctx.set_config(KEY, before[0])
        ctx.target_max_block_size = before[1]


def test_a_fit_without_a_ray_dataset_starts_no_dataset_manager_and_keeps_the_drivers_context(
    ray_session, tmp_path
):
    before = _managers()
    result = _fit(tmp_path)
    assert result.error is None
    assert _managers() == before
