"""Warm processes for the next fit (lepton_ray.train.prestart): which processes a fit started, the
setting, the training workers' set-up hook, and a fit landing on the training worker prestarted
after the one before (``worker_group`` 0; ``benchmarks.fixed_cost`` measures what that saves)."""

from __future__ import annotations

import os
import time

import pytest
import ray
from ray.core.generated.gcs_pb2 import ActorTableData

from lepton_ray.errors import ConfigError
from lepton_ray.train import prestart

NODE_A, NODE_B = b"a" * 28, b"b" * 28
TRAIN_ENV = '{"env_vars":{"RAY_TRAIN_X":"1","__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR":"h"}}'


def actor(start_ms, env="", node=NODE_A, name="", state=ActorTableData.DEAD, cls=""):
    a = ActorTableData(
        start_time=start_ms, serialized_runtime_env=env, name=name, state=state, class_name=cls
    )
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


def test_the_hook_env_names_an_importable_hook():
    ((name, value),) = prestart.hook_env({})["env_vars"].items()
    import ray._private.ray_constants as ray_constants

    assert name == ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR  # Ray's own variable
    module, func = value.rsplit(".", 1)
    assert callable(getattr(__import__(module, fromlist=[func]), func))
    assert prestart.hook_env({"env_vars": {"A": "1"}}) == {"env_vars": {name: value}}


def test_the_training_workers_get_the_hook_only_while_a_prestarted_process_may_be_idle(
    monkeypatch,
):
    empty = {"env_vars": {prestart.SETUP_HOOK_ENV: ""}}
    # Nothing warm (a process's first fit): the hook would gain its workers nothing and make the
    # tasks of their reads import torch for nothing. Its variable is empty (no hook): the
    # environment the next fit's reads ask for, to land on this fit's idle read processes.
    monkeypatch.setattr(prestart, "_warm_until", 0.0)
    assert prestart.worker_runtime_env({}) == empty
    assert prestart.worker_runtime_env({}, keep_s=0) == {}  # nothing started after it: as Ray has
    # Processes prestarted after a fit may be idle (prestarting since turned off or not): the
    # fit's workers ask for the environment those were started with, to land on them.
    monkeypatch.setattr(prestart, "_warm_until", time.time() + 60)
    assert prestart.worker_runtime_env({}) == prestart.hook_env({}) != {}
    assert prestart.worker_runtime_env({}, keep_s=0) == prestart.hook_env({})
    for warm in (0.0, time.time() + 60):  # a job's own hook is left alone, warm or not
        monkeypatch.setattr(prestart, "_warm_until", warm)
        assert prestart.worker_runtime_env({"worker_process_setup_hook": "mine.setup"}) == {}


def test_a_jobs_own_set_up_hook_is_left_to_run():
    # As Ray records a job's hook: the field, and the variable among the job's env_vars.
    assert prestart.hook_env({"worker_process_setup_hook": "mine.setup"}) == {}
    assert prestart.hook_env({"env_vars": {prestart.SETUP_HOOK_ENV: "mine.setup"}}) == {}


def test_the_training_workers_processes_are_prestarted_with_the_hook():
    """A fit without the hook (nothing was warm) has the processes for its training workers
    started with it, in the form Ray records an actor's environment (sorted keys, no spaces): the
    next fit's workers ask for that environment. Its other actors' are started as they were."""
    hook = prestart.hook_env({})
    cold = '{"env_vars":{"RAY_TRAIN_X":"1","Z":"2","__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR":""}}'
    plain = '{"env_vars":{"RAY_TRAIN_X":"1","Z":"2"}}'
    hooked = cold.replace(':""}}', f':"{prestart.HOOK}"}}}}')
    workers = [actor(1000, cold, cls="RayTrainWorker"), actor(1000, cold, cls="RayTrainWorker")]
    actors = [*workers, actor(1000, plain, cls="TrainController")]
    assert prestart.processes_to_start(actors, since_ms=1000, hook=hook) == {
        (NODE_A, hooked): 2,
        (NODE_A, plain): 1,
    }
    assert prestart.processes_to_start(actors, since_ms=1000) == {
        (NODE_A, cold): 2,
        (NODE_A, plain): 1,
    }
    # A warm fit's workers had it already; one Ray wrote in another form is left as it is.
    assert prestart.with_env_vars(hooked, hook["env_vars"]) == hooked
    assert prestart.with_env_vars("", {"A": "1"}) == '{"env_vars":{"A":"1"}}'
    assert (
        prestart.with_env_vars('{"env_vars": {"B": "2"}}', {"A": "1"}) == '{"env_vars": {"B": "2"}}'
    )


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


def test_the_hook_leaves_torch_one_thread_as_ray_would_a_one_cpu_task(ray_session):
    """torch sizes its thread pool as it loads, and Ray sets ``$OMP_NUM_THREADS`` for a task only
    as it runs, after the hook: a task started from a training worker (Ray Data's decoding ones)
    would otherwise run as many threads as the node has cores, in each of its processes (on the
    2-core CI machine, 2: the assertion tells the two apart on any machine of more than one)."""

    @ray.remote(num_cpus=1)
    def threads():
        import torch

        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    env = {"env_vars": {prestart.SETUP_HOOK_ENV: prestart.HOOK}}
    assert ray.get(threads.options(runtime_env=env).remote(), timeout=120) == (1, "1")
    assert ray.get(threads.remote(), timeout=120) == (1, "1")  # what Ray does without a hook


def test_the_hook_imports_torch_with_one_thread_unless_the_environment_says():
    """In a fresh interpreter: unset, torch gets one thread and the variable is unset again after
    the hook (Ray sets it per task); set, it is kept."""
    import subprocess
    import sys

    code = (
        "import os; from lepton_ray.train.prestart import import_for_training; "
        "import_for_training(); import torch; "
        "print(torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS', '-'))"
    )

    def run(env):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert run(base) == ["1", "-"]
    assert run(base | {"OMP_NUM_THREADS": "2"}) == ["2", "2"]


class _TrainingWorker:
    """Stands for a training worker: an actor started with the training workers' runtime
    environment (so with lepton_ray's set-up hook), which reads an epoch for a ring."""

    def run(self, info):
        import os
        import sys

        import psutil

        from lepton_ray.train.ring_reader import ReadSpec, RemoteBlocks, start_reader

        def ray_processes():
            return {p.pid for p in psutil.process_iter() if _is_ray_worker(p)}

        before = ray_processes()
        reader = start_reader()
        reader_env = ray.get(
            reader.__ray_call__.remote(
                lambda _: (os.environ.get(prestart.SETUP_HOOK_ENV), "torch" in sys.modules)
            )
        )
        spec = ReadSpec((3, 8, 8), info, None, 0, 100, True, 1)
        rows = sum(len(block) for block in RemoteBlocks(reader, 1, spec, pin=False))
        # The reads a worker runs itself (the streamed feed's, the cache's fill) take it off too.
        from lepton_ray.data import read_ray
        from lepton_ray.train.prestart import child_options

        ds = read_ray(info, normalize=False, keep_ids=range(400), task_args=child_options())
        rows += sum(len(b["id"]) for b in ds.iter_batches(batch_format="numpy"))
        # The processes started for the reader and its read, told by the variable they run with
        # (another fit's prestarted workers may start meanwhile, with the hook, on a shared Ray).
        started = ray_processes() - before
        ours = [pid for pid in started if _hook_of(pid) == ""]
        hooked = [pid for pid in started if _hook_of(pid) == prestart.HOOK]
        ray.kill(reader)
        hook = os.environ.get(prestart.SETUP_HOOK_ENV)
        return hook, reader_env, rows, len(ours), _with_torch(ours), hooked


def _is_ray_worker(p) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - a process that ended meanwhile
        return False
    return cmd.startswith("ray::") or "default_worker.py" in cmd


def _hook_of(pid) -> str | None:
    import psutil

    try:
        return psutil.Process(pid).environ().get(prestart.SETUP_HOOK_ENV)
    except psutil.Error:
        return None


def _with_torch(pids) -> list[int]:
    """Of ``pids``, the processes that have loaded torch's library (imported torch)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if any("libtorch" in m.path for m in psutil.Process(pid).memory_maps()):
                out.append(pid)
        except psutil.Error:
            continue
    return sorted(out)


def test_what_a_training_worker_starts_does_not_run_its_hook(ray_session, tmp_path):
    """A task or actor inherits its parent's runtime environment: a training worker's ring reader
    and the tasks of its reads (Ray Data's sampling of the Parquet files among them) would each
    import torch before running anything."""
    import ray.data

    from lepton_ray.data import prepare

    info = prepare("synthetic:400:8x8x3", str(tmp_path / "s"), rows_per_shard=100)["train"]
    ray.data.range(1).take(1)  # Ray Data's own named actors, started by the driver, not the worker
    env = prestart.hook_env({})  # a warm fit's training worker
    worker = ray.remote(_TrainingWorker).options(num_cpus=0, runtime_env=env).remote()
    hook, reader_env, rows, started, with_torch, hooked = ray.get(
        worker.run.remote(info), timeout=300
    )
    ray.kill(worker)
    assert hook == prestart.HOOK  # the worker ran the hook ...
    assert reader_env == ("", False)  # ... its reader did not
    assert rows == 800  # the ring's epoch, and the worker's own read
    assert started >= 2  # the reader's process and the reads' (Ray Data's tasks) ...
    assert with_torch == []  # ... none of which imported torch
    assert hooked == []  # and none ran with the worker's hook


def test_only_our_hook_is_taken_off_what_a_process_starts(monkeypatch):
    monkeypatch.delenv(prestart.SETUP_HOOK_ENV, raising=False)
    assert prestart.child_options() == {}  # a driver: nothing to take off
    monkeypatch.setenv(prestart.SETUP_HOOK_ENV, "mine.setup")
    assert prestart.child_options() == {}  # a job's own hook is the job's to pass on
    monkeypatch.setenv(prestart.SETUP_HOOK_ENV, prestart.HOOK)
    assert prestart.child_options() == {"runtime_env": {"env_vars": {prestart.SETUP_HOOK_ENV: ""}}}


def test_no_hook_when_the_package_is_found_only_through_the_drivers_directory(
    tmp_path, monkeypatch
):
    """Ray puts the driver's directory on a worker's path only after the hook ran: a hook there
    would kill every training worker at start (a source checkout run without installing it)."""
    (tmp_path / "pkg_only_here").mkdir()
    (tmp_path / "pkg_only_here" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert not prestart.importable_in_workers("pkg_only_here")
    # The same directory named by $PYTHONPATH: a new worker's interpreter has it from its start.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/nonexistent", str(tmp_path)]))
    assert prestart.importable_in_workers("pkg_only_here")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    assert not prestart.importable_in_workers("pkg_only_here")
    monkeypatch.chdir(tmp_path.parent)  # now found through sys.path itself, as $PYTHONPATH is
    assert prestart.importable_in_workers("pkg_only_here")
    assert prestart.importable_in_workers("lepton_ray")  # installed (editable) here
    monkeypatch.setattr(prestart, "importable_in_workers", lambda package: False)
    assert prestart.hook_env({}) == {}
    # A job's working_dir is on a new worker's path from its start (Ray ships and adds it).
    assert prestart.hook_env({"working_dir": "gcs://_ray_pkg_x.zip"}) != {}


def _idle_training_workers(since: float) -> list[int]:
    """Ray's idle worker processes started at ``since`` or later (``time.time()``) with the
    training workers' hook that have run it (they have imported torch): what a fit's training
    worker can land on."""
    import psutil

    idle = []
    for p in psutil.process_iter():
        try:
            if (
                p.cmdline()[:1] == ["ray::IDLE"]
                and p.create_time() >= since
                and _hook_of(p.pid) == prestart.HOOK
            ):
                idle.append(p.pid)
        except psutil.Error:
            continue
    return _with_torch(idle)


@pytest.mark.ray
def test_a_fit_lands_on_the_training_worker_prestarted_after_the_one_before(
    ray_session, tmp_path, monkeypatch
):
    """The suite runs with prestarting off (tests/conftest.py: its fits rarely match the one
    before); here it is on, as by default: once a fit has trained, a process for its training
    worker is started idle and imports torch, and the same fit run again lands on it (its process
    started before the fit did: ``worker_group`` 0)."""
    import time

    from lepton_ray import Trainer, build_model
    from lepton_ray.data import prepare

    info = prepare("synthetic:200:8x8x3", str(tmp_path / "d"), rows_per_shard=100)["train"]

    def fit():
        return Trainer(1, storage=str(tmp_path / "runs")).fit(
            build_model("cnn", in_channels=3, num_classes=10, width=8), info, batch_size=50,
            epochs=1, progress_bar=False,
        )  # fmt: skip

    monkeypatch.setenv(prestart.ENV, "120")
    first = fit()
    # Started after its last report: not a process the fit's own reads started (same hook).
    trained = time.time() - first["startup_s"]["teardown"]
    deadline = time.monotonic() + 120
    while not _idle_training_workers(trained) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _idle_training_workers(trained), "no training worker was prestarted after the fit"
    monkeypatch.setenv(prestart.ENV, "0")  # the next fit starts none after it
    second = fit()
    assert second["startup_s"]["worker_group"] == 0, second["startup_s"]
