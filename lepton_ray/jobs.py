"""Self-healing Ray jobs: submit, wait, and resubmit a failed job so that it resumes its run.

Ray runs a submitted job once. :func:`submit` (``lepton-ray submit``) submits through Ray's
``JobSubmissionClient``, follows the job's logs, and when the job FAILED submits it again, up to
``max_retries`` times. Every attempt gets the same run name and, from the second on, the order to
resume, through ``runtime_env`` environment variables that ``pipelines.train`` reads:

    LEPTON_RUN_NAME   the run every attempt trains (used when the config names none)
    LEPTON_RESUME     "1" on retries: continue the run from its last checkpoint
    LEPTON_ATTEMPT    1, 2, ...

A job whose entrypoint exits with 2 (a usage or config error: a retry would fail the same way),
whose ``python`` cannot import lepton_ray or torch, or that was stopped by a person is not
retried. Retries wait :func:`retry_delay` (exponential with jitter, capped) so that a cluster
that is short of something (a node, object storage) gets time to recover. The retry loop lives in
the submitting process: if that process goes away, the running attempt carries on but no further
one is made.

The run name printed is the one really trained: ``pipelines.train`` writes
``LEPTON_RUN_NAME=<name>`` on a line of its own (a config that fixes ``train.run_name`` wins over ``$LEPTON_RUN_NAME``), and
:func:`submit` reads it from the job's logs.

Every attempt runs with the submitting interpreter's ``bin`` folder first on its ``PATH`` (unless
the runtime env sets ``PATH``): on a local cluster started by ``.venv/bin/ray start`` without an
activated venv, the job's ``python`` is then the venv's, the one that has lepton_ray and torch.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lepton_ray.errors import LeptonError, one_line

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
USAGE_EXIT_CODE = 2  # the entrypoint's "your input is wrong" exit code: never retried
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RUN_NAME_LINE = re.compile(r"^LEPTON_RUN_NAME=(\S+)\s*$", re.MULTILINE)
"""What ``pipelines.train`` prints (stderr, a line of its own) once it knows the run it trains."""
MISSING_MODULE = re.compile(
    r"^ModuleNotFoundError: No module named '(lepton_ray|torch|ray)[.']", re.M
)
"""The last line of Python's traceback when the job's ``python`` is not the environment that has
lepton_ray: a job's output is all :func:`submit` sees of it, so this is matched as text."""
LOG_TAIL_BYTES = 1 << 20  # how much of an attempt's log is kept to look for the lines above


class JobError(LeptonError):
    """The cluster could not be reached or refused the submission."""


@dataclass
class Attempt:
    """One submission of the job."""

    submission_id: str
    status: str = "PENDING"
    exit_code: int | None = None
    message: str | None = None
    seconds: float = 0.0
    run_name: str | None = None  # as the job reported it (``LEPTON_RUN_NAME=`` in its logs)
    missing_module: str | None = None  # lepton_ray, torch or ray, when the job's python lacked it


@dataclass
class Outcome:
    """What :func:`submit` returns: the final status and every attempt."""

    status: str
    run_name: str
    address: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def entrypoint_string(args: Sequence[str] | str) -> str:
    """One argument is a shell command line as it is; several are quoted and joined (as ``ray job submit``)."""
    if isinstance(args, str):
        return args
    args = list(args)
    return args[0] if len(args) == 1 else shlex.join(args)


def should_retry(attempt: Attempt) -> bool:
    """A FAILED attempt is retried unless its entrypoint said the input is wrong (exit code 2) or
    its ``python`` lacks lepton_ray's environment: both would fail the same way again."""
    return (
        attempt.status == "FAILED"
        and attempt.exit_code != USAGE_EXIT_CODE
        and attempt.missing_module is None
    )


def retry_delay(
    failures: int, base_s: float = 5.0, cap_s: float = 60.0, jitter: float | None = None
) -> float:
    """Seconds to wait before resubmitting after the ``failures``-th failed attempt (1, 2, ...).

    The nominal wait doubles from ``base_s`` up to ``cap_s``; the wait is drawn uniformly from
    its upper half ("equal jitter"), so that jobs that failed together (a node lost under several
    of them) do not all come back in the same second. ``jitter`` in [0, 1] fixes the draw
    (tests); ``base_s = 0`` means no wait.

    With the defaults: nominal 5, 10, 20, 40, 60, 60 ... s; e.g. failure 3 waits 10-20 s.
    The package's one backoff: ``Trainer.fit`` waits it too before resuming a run whose storage
    failed (:mod:`lepton_ray.train.storage_retry`, from 2 s).
    """
    if failures < 1 or base_s < 0 or cap_s < 0:
        raise ValueError(f"need failures >= 1 and delays >= 0, got {failures}, {base_s}, {cap_s}")
    nominal = min(cap_s, base_s * 2.0 ** min(failures - 1, 60))  # min(): no float overflow
    u = random.random() if jitter is None else jitter
    return nominal * (0.5 + 0.5 * u)


def job_path(runtime_env: dict[str, Any], python: str = sys.executable) -> str | None:
    """The ``PATH`` a job gets: the submitting interpreter's ``bin`` folder before the node's own
    (``${PATH}``, which Ray expands on the node), or None when the runtime env already sets one.

    A remote node without that folder skips it; a local one then runs the venv's ``python``.
    """
    if "PATH" in runtime_env.get("env_vars", {}):
        return None
    return f"{os.path.dirname(os.path.abspath(python))}:${{PATH}}"


def submit(
    entrypoint: Sequence[str] | str,
    *,
    address: str | None = None,
    max_retries: int = 0,
    working_dir: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    run_name: str | None = None,
    follow_logs: bool = True,
    poll_s: float = 1.0,
    retry_delay_s: float = 5.0,
    log: Callable[[str], None] | None = None,
    output: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Run ``entrypoint`` as a Ray job until it succeeds, retrying a failed one ``max_retries`` times.

    ``address`` is the dashboard's HTTP address (default ``$RAY_API_SERVER_ADDRESS``, else
    ``$RAY_ADDRESS`` when it is an http(s) URL, else ``http://127.0.0.1:8265``). ``working_dir`` is
    uploaded once and every attempt runs that same copy. With token authentication
    (``RAY_AUTH_MODE=token``) Ray's client sends ``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``.
    Retry ``n`` waits :func:`retry_delay` ``(n, retry_delay_s)`` seconds first (0: no wait).
    The outcome's ``run_name`` is the one the job reported training, else the one chosen here.
    """
    if max_retries < 0:
        raise JobError(f"max_retries must be >= 0, got {max_retries}")
    if retry_delay_s < 0:
        raise JobError(f"retry_delay must be >= 0 seconds, got {retry_delay_s}")
    cmd = entrypoint_string(entrypoint)
    if not cmd.strip():
        raise JobError(
            "no entrypoint: put the command after --, e.g. -- python -m pipelines.train --config ..."
        )
    address = resolve_address(address)
    log = log or (lambda m: print(f"[lepton-ray submit] {m}", file=sys.stderr, flush=True))
    output = output or sys.stderr
    client = _client(address)
    base = f"lepton-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_name = run_name or base
    env = copy.deepcopy(runtime_env or {})
    if working_dir is not None:
        env["working_dir"] = working_dir
    outcome = Outcome(status="PENDING", run_name=run_name, address=address)
    path = job_path(env)
    for n in range(1, max_retries + 2):
        env["env_vars"] = {
            **(runtime_env or {}).get("env_vars", {}),
            **({"PATH": path} if path else {}),
            "LEPTON_RUN_NAME": run_name,
            "LEPTON_ATTEMPT": str(n),
            **({"LEPTON_RESUME": "1"} if n > 1 else {}),
        }
        attempt = Attempt(submission_id=f"{base}-{n}")
        outcome.attempts.append(attempt)
        started = time.monotonic()
        try:
            # The client rewrites a local working_dir into the package it uploaded: later
            # attempts reuse that package (same code, no second upload).
            client.submit_job(
                entrypoint=cmd,
                submission_id=attempt.submission_id,
                runtime_env=env,
                metadata={"lepton_run": run_name, "lepton_attempt": str(n)},
            )
        except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError for HTTP errors
            raise JobError(f"the cluster at {address} refused the job: {one_line(exc)}") from None
        log(f"attempt {n}/{max_retries + 1}: {attempt.submission_id} (run '{outcome.run_name}')")
        try:
            _wait(client, attempt, follow_logs, poll_s, output)
        except KeyboardInterrupt:
            log(
                f"no longer following; the job keeps running (ray job stop {attempt.submission_id})"
            )
            raise
        attempt.seconds = round(time.monotonic() - started, 1)
        outcome.status = attempt.status
        if attempt.run_name and attempt.run_name != outcome.run_name:
            log(f"the job trains run '{attempt.run_name}' (its config names it)")
            outcome.run_name = attempt.run_name
        if attempt.missing_module and attempt.status == "FAILED":
            attempt.message = (
                f"the job's python cannot import {attempt.missing_module}: start the cluster "
                "from the environment that has lepton_ray (.venv/bin/ray start, with .venv/bin "
                "first on PATH), or set PATH in the job's runtime_env env_vars"
            )
        log(
            f"attempt {n}: {attempt.status}"
            + (f" (exit code {attempt.exit_code})" if attempt.exit_code else "")
            + (f": {attempt.message}" if attempt.status != "SUCCEEDED" and attempt.message else "")
        )
        if not should_retry(attempt) or n > max_retries:
            break
        wait = retry_delay(n, retry_delay_s)
        log(
            f"resubmitting in {wait:.0f} s: attempt {n + 1} resumes run '{outcome.run_name}' "
            "from its last checkpoint"
        )
        sleep(wait)
    return outcome


def resolve_address(address: str | None) -> str:
    """The dashboard address to submit to (see :func:`submit`)."""
    if address:
        return address
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, AuthenticationError
        raise JobError(f"cannot reach the Ray dashboard at {address}: {one_line(exc)}") from None


def _wait(client: Any, attempt: Attempt, follow_logs: bool, poll_s: float, output: Any) -> None:
    """Follow the job's logs until it ends (or poll its status), then record the outcome and
    what its logs say (:func:`read_job_report`)."""
    seen: list[str] = []
    if follow_logs:
        try:
            asyncio.run(_tail(client, attempt.submission_id, output, seen))
        except Exception:  # noqa: BLE001 - the log stream is a convenience; the status decides
            pass
    while True:
        info = client.get_job_info(attempt.submission_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            attempt.status, attempt.message = status, info.message
            attempt.exit_code = getattr(info, "driver_exit_code", None)
            break
        time.sleep(poll_s)
    text = "".join(seen)
    if not follow_logs:
        try:
            text = client.get_job_logs(attempt.submission_id)[-LOG_TAIL_BYTES:]
        except Exception:  # noqa: BLE001 - without logs the run name is the one chosen
            text = ""
    attempt.run_name, missing = read_job_report(text)
    attempt.missing_module = missing if attempt.status == "FAILED" else None


def read_job_report(logs: str) -> tuple[str | None, str | None]:
    """(the run the job trained, the module its python lacked) from its logs; None if not said.

    The last ``LEPTON_RUN_NAME=`` line wins (a job may run several pipelines)."""
    names = RUN_NAME_LINE.findall(logs)
    missing = MISSING_MODULE.search(logs)
    return (names[-1] if names else None), (missing.group(1) if missing else None)


async def _tail(client: Any, submission_id: str, output: Any, seen: list[str]) -> None:
    kept = 0
    async for lines in client.tail_job_logs(submission_id):
        output.write(lines)
        output.flush()
        seen.append(lines)
        kept += len(lines)
        while kept > LOG_TAIL_BYTES and len(seen) > 1:  # keep the tail, whole chunks
            kept -= len(seen.pop(0))
