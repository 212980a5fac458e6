"""Warm processes for the next fit (lepton_ray.train.prestart): which processes a fit started, the
setting, and, with Ray, that the next fit's training worker is one started before it."""

from __future__ import annotations

import os
import time

import pytest
from ray.core.generated.gcs_pb2 import ActorTableData

from lepton_ray import Trainer, build_model
from lepton_ray.data import load_mnist5k, write_dataset
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


@pytest.fixture(scope="module")
def digits_200(tmp_path_factory):
    x, y, ids = load_mnist5k()["train"]
    return write_dataset(
        x[:200],
        y[:200],
        tmp_path_factory.mktemp("d200"),
        classes=[str(i) for i in range(10)],
        ids=ids[:200],
    )


def cpu_ticks(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def settled_training_workers() -> list[str]:
    """Idle Ray worker processes (``ray::IDLE``) started for a training worker (Ray's set-up hook
    in their environment) with torch loaded that used no CPU for a second: prestarted, hook done."""
    hook = f"{prestart.SETUP_HOOK_ENV}={prestart.HOOK}".encode()
    loaded = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(b"ray::IDLE"):
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if hook not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/maps") as f:
                if "libtorch" in f.read():
                    loaded.append((pid, cpu_ticks(pid)))
        except OSError:
            continue
    time.sleep(1.0)
    settled = []
    for pid, ticks in loaded:
        try:
            if cpu_ticks(pid) == ticks:
                settled.append(pid)
        except OSError:
            continue
    return settled


@pytest.mark.ray
def test_the_next_fit_trains_on_a_worker_started_before_it(ray_session, digits_200, tmp_path):
    def fit():
        return Trainer(1).fit(
            build_model("cnn", in_channels=1, num_classes=10, width=4),
            digits_200,
            batch_size=50,
            epochs=1,
            storage=str(tmp_path),
            progress_bar=False,
        )

    fit()
    # The first fit's processes are asked for again: wait until a training worker is up and idle.
    deadline = time.monotonic() + 120
    while not settled_training_workers():
        assert time.monotonic() < deadline, "no prestarted training worker settled in 120 s"
    # The next fit's worker process started before the fit did (the phase clamps to 0).
    startup = fit()["startup_s"]
    assert startup["worker_group"] == 0.0, startup
