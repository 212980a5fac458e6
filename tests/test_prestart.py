"""Warm processes for the next fit (lepton_ray.train.prestart): which processes a fit started, the
setting, the training workers' set-up hook. That a warm fit's worker was prestarted is measured by
``benchmarks.fixed_cost`` (``worker_group`` 0)."""

from __future__ import annotations

import pytest
from ray.core.generated.gcs_pb2 import ActorTableData

from lepton_ray.errors import ConfigError
from lepton_ray.train import prestart

NODE_A, NODE_B = b"a" * 28, b"b" * 28
TRAIN_ENV = '{"env_vars":{"RAY_TRAIN_X":"1","__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR":"h"}}'


def actor(start_ms, env="", node=NODE_A, name="", state=ActorTableData.DEAD):
    a = ActorTableData(start_time=start_ms, serialized_runtime_env=env, name=name, state=state)
    a.address.node_id = node
    return a


def test_the_processes_a_fit_started_are_counted_by_node_and_runtime_env():
    actors = [
        actor(900, TRAIN_ENV),  # an earlier fit's
        actor(1000, TRAIN_ENV),
        actor(1000, TRAIN_ENV, node=NODE_B),
        actor(1200, TRAIN_ENV, state=ActorTableData.ALIVE),  # ends when the driver lets go
        actor(1100, '{"env_vars":{"RAY_TRAIN_X":"1"}}'),
        actor(1100, name="datasets_stats_actor", state=ActorTableData.ALIVE),  # outlives fits
    ]
    assert prestart.processes_to_start(actors, since_ms=1000) == {
        (NODE_A, TRAIN_ENV): 2,
        (NODE_B, TRAIN_ENV): 1,
        (NODE_A, '{"env_vars":{"RAY_TRAIN_X":"1"}}'): 1,
    }
    assert prestart.processes_to_start(actors, since_ms=2000) == {}


def test_the_keep_alive_setting(monkeypatch):
    monkeypatch.delenv(prestart.ENV, raising=False)
    assert prestart.keep_alive_s() == prestart.DEFAULT_KEEP_S
    monkeypatch.setenv(prestart.ENV, "0")
    assert prestart.keep_alive_s() == 0
    assert prestart.after_fit(0, keep=0) == 0  # off: Ray is not asked (nor needed)
    monkeypatch.setenv(prestart.ENV, " 60 ")
    assert prestart.keep_alive_s() == 60
    monkeypatch.setenv(prestart.ENV, "5m")
    with pytest.raises(ConfigError, match=r"LEPTON_PRESTART_S must be a whole number.*'5m'"):
        prestart.keep_alive_s()


def test_the_training_workers_runtime_env_names_an_importable_hook():
    ((name, value),) = prestart.worker_runtime_env({})["env_vars"].items()
    import ray._private.ray_constants as ray_constants

    assert name == ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR  # Ray's own variable
    module, func = value.rsplit(".", 1)
    assert callable(getattr(__import__(module, fromlist=[func]), func))
    assert prestart.worker_runtime_env({"env_vars": {"A": "1"}}) == {"env_vars": {name: value}}


def test_a_jobs_own_set_up_hook_is_left_to_run():
    # As Ray records a job's hook: the field, and the variable among the job's env_vars.
    assert prestart.worker_runtime_env({"worker_process_setup_hook": "mine.setup"}) == {}
    assert prestart.worker_runtime_env({"env_vars": {prestart.SETUP_HOOK_ENV: "mine.setup"}}) == {}


def test_the_hook_imports_what_a_first_optimizer_step_would():
    """An idle training worker has imported torch._dynamo (a process's first optimizer step imports
    it): checked in a fresh interpreter, where nothing else has imported it."""
    import subprocess
    import sys

    code = (
        "import sys; from lepton_ray.train.prestart import import_for_training; "
        "assert 'torch._dynamo' not in sys.modules; import_for_training(); "
        "print(all(m in sys.modules for m in ('torch._dynamo', 'lepton_ray.train.loop')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
