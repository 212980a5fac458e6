"""Warm processes for the next ``fit()``: each fit's Ray processes, started again before it asks.

Every ``fit()`` starts new Ray worker processes: Ray Train's controller and its helpers (the
placement-group cleaner, the synchronisation actor, and the dataset manager where the fit is
given a Ray Dataset: :mod:`lepton_ray.train.ray_trainer`) and one per training worker, each then
importing what it runs; the training workers import torch (1.4-2.5 s). Ray's pool of idle
workers does not serve them: those actors carry a runtime environment of their own (Ray Train's
environment variables), and a worker process fits only the runtime environment it was started
for. (lepton_ray's progress board is started by a driver's first fit only, and serves the
next ones: :func:`lepton_ray.train.progress.driver_board`.)

After a fit, :func:`after_fit` asks each node's raylet to start the same processes again, idle,
for the same runtime environments (Ray's ``PrestartWorkers``, the request Ray's own task
submitter sends for a backlog), read from the unnamed actors the fit started (Ray's actor
table). The next fit's actors land on them instead of waiting for new processes. The
processes started for its training workers name :func:`import_for_training` as Ray's
worker-process set-up hook, so an idle training worker has imported torch, ``torch._dynamo``
(which its first optimizer step imports) and the training loop before a fit needs it; a fit
that may find them names the hook in its training workers' runtime environment to land on them
(:func:`worker_runtime_env`), and a fit with none to find (a process's first) names none. What a
training worker starts in turn (the ring's reader, the tasks of the reads it runs itself) would
inherit the hook with the environment: each takes it off (:func:`child_options`), and so runs in
the environment of a fit without the hook, whose idle read processes it lands on.
A job whose runtime environment has a set-up hook of its own keeps it: the training workers then
get none of ours (one would replace the other), and import on demand; so do they where a new
worker process could not import lepton_ray before running a hook (:func:`importable_in_workers`).

What a warm fit still waits for is Ray Train's own: registering the workers' placement group
with its placement-group cleaner, a detached actor the controller starts first, took 1.1 s of a
warm fit on 2 cores (Ray Train's debug log), most likely the cleaner's own start (its process
importing Ray Train's modules), which in a cold fit hid behind the workers' start.

The processes stay idle for ``$LEPTON_PRESTART_S`` seconds (default 300; ``0`` turns this off,
and with it the training workers' hook once none is idle) and are then Ray's to stop
like any idle worker (Ray keeps up to one per CPU of the node). An idle training worker holds
what its imports take and no GPU memory: those imports alone took 0.78 GB of host memory in a
plain process on the 2-core machine (0.43 GB of it the process's own, the rest
torch's libraries; without ``torch._dynamo`` 0.64 and 0.36 GB). A fit after a different one
(another worker count, another ``RAY_TRAIN_*`` setting) uses what fits and starts the rest as
before. Nothing here fails a fit: a raylet that does not answer, or an older Ray, is logged at
debug level and skipped.
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR as SETUP_HOOK_ENV

from lepton_ray.train.warmup import warm_imports

log = logging.getLogger(__name__)

ENV = "LEPTON_PRESTART_S"
DEFAULT_KEEP_S = 300
# SETUP_HOOK_ENV: the variable through which Ray's worker_process_setup_hook reaches a worker
# process. Ray fills it from a job's runtime environment only; set in the training workers' own,
# it names the hook for them alone.
HOOK = "lepton_ray.train.prestart.import_for_training"
# torch._dynamo: a process's first optimizer step imports it (lepton_ray.train.warmup). Imported
# here, a warm fit's ``model`` phase on 2 CPUs went from 1.6-2.3 s to 0.06-0.10 s and its time to
# the first step from 8.2 to 6.6 s (means of 6 fits each, 2 workers, 15 s apart; benchmarks
# fixed_cost_dynamo_old_1/_new_1/_old_2/_new_2); a worker started on demand imports it before its
# actor is ready instead of in its first step.
TRAINING_IMPORTS = (
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "ray.train.torch.config",
    "lepton_ray.train.loop",
)
# Ray Train's training-worker actor class (``ActorTableData.class_name``): its processes get the hook.
TRAINING_WORKER = "RayTrainWorker"
RPC_TIMEOUT_S = 2.0
_warm_until = 0.0  # time.time() until which processes this one prestarted may be idle


def keep_alive_s() -> int:
    """``$LEPTON_PRESTART_S`` as whole seconds (0: off); a value that is not a number is an error
    in one line."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_KEEP_S
    try:
        value = int(raw)
    except ValueError:
        from lepton_ray.errors import ConfigError

        raise ConfigError(
            f"${ENV} must be a whole number of seconds (0: off), got {raw!r}"
        ) from None
    return max(value, 0)


def worker_runtime_env(job_env: dict[str, Any], keep_s: int = DEFAULT_KEEP_S) -> dict[str, Any]:
    """The training workers' runtime environment (Ray Train's ``worker_runtime_env``): the hook
    (:func:`hook_env`) while processes this one prestarted may still be idle (:func:`after_fit`),
    for the fit to land on them. Else the hook's variable empty (Ray runs no hook), the
    environment the tasks of the next fit's reads ask for (:func:`child_options`), so that they
    land on this fit's idle read processes; nothing at all when prestarting is off
    (``keep_s`` 0) or the job has a hook of its own.

    A fit with nothing warm to land on gains nothing from the hook (its training workers would
    import the same on demand), and the tasks of the reads a worker runs in its own process (the
    streamed feed's, the device cache's fill) would each start a process that imports torch,
    ``torch._dynamo`` and the training loop for nothing. A process's first fit is such a fit: on
    2 CPUs, a first 2-worker fit (Ray's start included) took 20.4-20.9 s with the hook against
    16.0-16.7 s without, its first step 6.3-6.7 s after the workers were ready against 2.3-2.5 s,
    and the fits after it as long either way (benchmarks ``fixed_cost_coldhook_old_1``/``_2`` and
    ``_new_1``/``_2``, alternated). The processes :func:`after_fit` starts for the next fit's
    training workers get the hook all the same."""
    hook = hook_env(job_env)
    if not hook or time.time() < _warm_until:
        return hook
    if keep_s <= 0:
        return {}
    return {"env_vars": {SETUP_HOOK_ENV: ""}}


def hook_env(job_env: dict[str, Any]) -> dict[str, Any]:
    """The runtime environment that names :func:`import_for_training` as a process's set-up hook,
    or nothing where the job's runtime environment ``job_env`` has a set-up hook of its own (ours
    would override the user's in the training workers) or lepton_ray is found through the
    driver's directory only (a job's ``working_dir`` is on a worker's path from its start, the
    driver's directory is not)."""
    if job_env.get("worker_process_setup_hook") or SETUP_HOOK_ENV in job_env.get("env_vars", {}):
        return {}
    if not job_env.get("working_dir") and not importable_in_workers(__name__.split(".")[0]):
        log.debug("lepton_ray is found through the driver's directory only: no set-up hook")
        return {}
    return {"env_vars": {SETUP_HOOK_ENV: HOOK}}


def child_options() -> dict[str, Any]:
    """Ray remote args for what a training worker starts that should not run lepton_ray's set-up
    hook (the ring's reader, :func:`lepton_ray.train.ring_reader.start_reader`; the tasks of the
    reads it runs itself, :func:`lepton_ray.data.read_ray`'s ``task_args``): the worker's own
    runtime environment with the hook's variable empty (Ray runs no hook then, and merges the
    other variables in); nothing in a process without our hook (a driver, a fit's worker with the
    variable empty already, a job with a hook of its own, which is the job's to pass on).

    A task or actor inherits its parent's runtime environment, so the reader's process and those
    of its reads' tasks would each import torch, ``torch._dynamo`` and the training loop before
    running anything: on 2 cores a task started from an actor with the hook took 6.1 s to answer,
    0.9-1.2 s with it off; a ring-fed fit's first step waited 12.2-12.5 s for its first read
    with the hook, 3.8-5.2 s without (``benchmarks.gpu_train --model cnn --cases ring --rows 4096
    --batch-size 256 --epochs 3``, two runs each, alternated).

    The reads a worker runs in its own process (the device cache's fill, the streamed feed) then
    run in the environment of a fit's workers without the hook (:func:`worker_runtime_env`), and
    land on the processes of the reads of the fit before, idle, which never imported torch.
    (While a fit's reads kept the hook, its first fit's read processes imported torch and the
    next fit's reads landed on those; taking the hook off the reads alone made each fit start
    fresh processes for them, 10.7-12.9 s to the first step instead of 1.3-1.7 s, 2 workers on 2
    cores back to back.)"""
    if os.environ.get(SETUP_HOOK_ENV) != HOOK:
        return {}
    return {"runtime_env": {"env_vars": {SETUP_HOOK_ENV: ""}}}


def importable_in_workers(package: str) -> bool:
    """Whether a new worker process can import ``package`` before the driver's own directories
    are on its path. Ray adds the driver's working directory (and script's) to a worker's path
    only after the worker ran its set-up hook: a hook in a package found only through them (a
    source checkout run without installing it) fails, the worker exits, and the fit waits for
    training workers that never start (on 2 cores: ``ActorDiedError``, "No module named
    'lepton_ray'"). Installed packages, editable ones and ``$PYTHONPATH`` are found, the driver's
    directory too where ``$PYTHONPATH`` names it (a worker's interpreter reads the variable,
    inherited through the raylet, before any hook)."""
    import __main__

    env_path = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    drop = {os.getcwd()}  # what "" on sys.path stands for
    script = getattr(__main__, "__file__", None)  # none in a notebook: Ray adds none either
    if script:
        drop.add(os.path.dirname(os.path.realpath(script)))
    drop -= env_path
    path = [p for p in sys.path if os.path.abspath(p or ".") not in drop]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        try:
            if find is not None and find(package, path) is not None:
                return True
        except Exception:  # noqa: BLE001 - a finder that cannot answer this question
            continue
    return False


def import_for_training() -> None:
    """Ray's set-up hook in a training worker's process: what every training worker imports,
    before any fit asks for the process; sympy on a thread (:mod:`lepton_ray.train.warmup`).

    torch sizes its CPU thread pool (OpenMP's) as it loads, from ``$OMP_NUM_THREADS``, and Ray
    sets that variable from a task's CPUs only as the task runs, after this hook: imported here
    with the variable unset, torch would take every core of the node in each process, and so in
    each of the Ray Data tasks a training worker starts (they inherit the hook). On a 16-core
    GPU machine, 15 such tasks decoding JPEGs ran 16 threads each: a fit decoding on the CPU
    trained at about 50 images/s (``benchmarks.gpu_jpeg``, 2026-12-06), 2,403 on 2026-12-04,
    before this hook. The import runs with the variable at 1, what Ray gives a one-CPU task or an
    actor with no CPUs, unless the environment already sets it; the training loop then sets a CPU
    worker's own threads from its CPUs (:mod:`lepton_ray.train.loop`). A task of more CPUs that
    such a process runs keeps torch at one thread unless it calls ``torch.set_num_threads``
    (without the hook, its torch would have had the first task's CPUs)."""
    unset = "OMP_NUM_THREADS" not in os.environ
    if unset:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for name in TRAINING_IMPORTS:
            importlib.import_module(name)
    finally:
        if unset:  # Ray sets it for each task as before
            del os.environ["OMP_NUM_THREADS"]
    warm_imports()


def processes_to_start(
    actors: Iterable[Any], since_ms: int, hook: dict[str, Any] | None = None
) -> dict[tuple[bytes, str], int]:
    """``(node id, serialized runtime environment) -> count`` of the actors (Ray's
    ``ActorTableData``) that started at or after ``since_ms`` without a name: the processes a fit
    started for itself. Named actors are the ones meant to outlive it, found by name by the next
    (Ray Data's statistics actor and autoscaling coordinator); some of a fit's own are still
    alive when it returns, until the driver lets go of their handles.

    ``hook`` (:func:`hook_env`) goes into a training worker's environment that lacks it: the next
    fit's training workers ask for it (:func:`worker_runtime_env`), so its process must have it to
    be theirs."""
    out: collections.Counter[tuple[bytes, str]] = collections.Counter()
    for a in actors:
        if a.start_time >= since_ms and not a.name:
            env = a.serialized_runtime_env
            if hook and a.class_name == TRAINING_WORKER:
                env = with_env_vars(env, hook["env_vars"])
            out[(a.address.node_id, env)] += 1
    return dict(out)


def with_env_vars(serialized: str, env_vars: dict[str, str]) -> str:
    """A serialized runtime environment as Ray records an actor's (sorted keys, no spaces) with
    ``env_vars`` added; one not in that form is returned as it is (no process started for it
    could be matched to what the next fit asks for)."""
    try:
        env = json.loads(serialized or "{}")
        if serialized and _compact(env) != serialized:
            return serialized
    except ValueError:
        return serialized
    env["env_vars"] = {**env.get("env_vars", {}), **env_vars}
    return _compact(env)


def _compact(env: Any) -> str:
    return json.dumps(env, sort_keys=True, separators=(",", ":"))


def after_fit(since_ms: int, keep: int) -> int:
    """Start idle processes, kept ``keep`` seconds (:func:`keep_alive_s`, read before the fit), for
    what the fit that began at ``since_ms`` (``time.time()`` in ms) started, the training workers'
    with the hook (:func:`hook_env`); the number asked for (0 when off or when Ray could not be
    asked)."""
    global _warm_until
    if keep == 0:
        return 0
    try:
        import ray

        context = ray.get_runtime_context()
        job = ray.JobID.from_hex(context.get_job_id())
        wanted = processes_to_start(_job_actors(job), since_ms, hook_env(context.runtime_env))
        asked = _prestart(wanted, job, keep)
        if asked:
            _warm_until = max(_warm_until, time.time() + keep)
        return asked
    except Exception as exc:  # noqa: BLE001 - an optimisation: never the fit's failure
        log.debug("prestarting the next fit's processes failed: %s", exc)
        return 0


def _job_actors(job: Any) -> list[Any]:
    import ray
    from ray.core.generated.gcs_pb2 import ActorTableData

    accessor = ray._private.state.state._connect_and_get_accessor()
    return [ActorTableData.FromString(b) for b in accessor.get_actor_table(job, None)]


def _prestart(wanted: dict[tuple[bytes, str], int], job: Any, keep: int) -> int:
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    from ray.core.generated.runtime_environment_pb2 import RuntimeEnvInfo

    raylets = {
        bytes.fromhex(n["NodeID"]): f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}"
        for n in ray.nodes()
        if n.get("Alive")
    }
    channels: dict[bytes, Any] = {}
    asked = 0
    try:
        for (node, env), count in wanted.items():
            if node not in raylets:  # the node has left the cluster since
                continue
            if node not in channels:
                channels[node] = init_grpc_channel(raylets[node])
            node_manager_pb2_grpc.NodeManagerServiceStub(channels[node]).PrestartWorkers(
                node_manager_pb2.PrestartWorkersRequest(
                    language=common_pb2.PYTHON,
                    job_id=job.binary(),
                    runtime_env_info=RuntimeEnvInfo(serialized_runtime_env=env),
                    keep_alive_duration_secs=keep,
                    num_workers=count,
                ),
                timeout=RPC_TIMEOUT_S,
            )
            asked += count
    finally:
        for channel in channels.values():
            channel.close()
    return asked
