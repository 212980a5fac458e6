"""lepton_ray.train.ray_trainer: a fit given no Ray Dataset starts no dataset manager, and its
workers still run with the driver's Ray Data settings; a fit given one keeps Ray Train's way."""

from __future__ import annotations

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
    if config["with_data"]:  # Ray Train's split: 5 of the 10 rows on each of the 2 workers
        rows = sum(len(b["id"]) for b in ray.train.get_dataset_shard("train").iter_batches())
        if rows != 5:
            raise AssertionError(f"worker {rank} read {rows} rows of its shard")


def _fit(tmp_path, datasets: dict) -> Any:
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
            train_loop_config={
                "setting": setting,
                "block_size": block,
                "with_data": bool(datasets),
            },
            backend_config=TorchBackendConfig(),
            scaling_config=ray.train.ScalingConfig(num_workers=2),
            run_config=ray.train.RunConfig(name="ctx", storage_path=str(tmp_path)),
            datasets=datasets,
        ).fit()
    finally:  # the session's context as it was
        ctx.set_config(KEY, before[0])
        ctx.target_max_block_size = before[1]


def test_a_fit_without_a_ray_dataset_starts_no_dataset_manager_and_keeps_the_drivers_context(
    ray_session, tmp_path
):
    before = _managers()
    result = _fit(tmp_path, {})
    assert result.error is None
    assert _managers() == before


def test_a_fit_with_a_ray_dataset_keeps_ray_trains_dataset_manager(ray_session, tmp_path):
    before = _managers()
    import ray.data

    result = _fit(tmp_path, {"train": ray.data.range(10)})
    assert result.error is None
    assert len(_managers() - before) == 1
