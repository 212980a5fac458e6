"""Self-healing Ray jobs: submit, wait, and resubmit a failed job so that it resumes its run.

Ray runs a submitted job once. :func:`submit` (``lepton-ray submit``) submits through Ray's
``JobSubmissionClient``, follows the job's logs, and when the job FAILED submits it again, up to
``max_retries`` times. Every attempt gets the same run name and, from the second on, the order to
resume, through ``runtime_env`` environment variables that ``pipelines.train`` reads:

    LEPTON_RUN_NAME   the run every attempt trains (used when the config names none)
    LEPTON_RESUME     "1" on retries: continue the run from its last checkpoint
    LEPTON_ATTEMPT    1, 2, ...

A job whose entrypoint exits with 2 (a usage or config error: a retry would fail the same way)
or that was stopped by a person is not retried. The retry loop lives in the submitting process:
if that process goes away, the running attempt carries on but no further one is made.
"""

from __future__ import annotations

import asyncio
import copy
import os
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
    """A FAILED attempt is retried unless its entrypoint said the input is wrong (exit code 2)."""
    return attempt.status == "FAILED" and attempt.exit_code != USAGE_EXIT_CODE


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
    log: Callable[[str], None] | None = None,
    output: Any = None,
) -> Outcome:
    """Run ``entrypoint`` as a Ray job until it succeeds, retrying a failed one ``max_retries`` times.

    ``address`` is the dashboard's HTTP address (default ``$RAY_API_SERVER_ADDRESS``, else
    ``$RAY_ADDRESS`` when it is an http(s) URL, else ``http://127.0.0.1:8265``). ``working_dir`` is
    uploaded once and every attempt runs that same copy. With token authentication
    (``RAY_AUTH_MODE=token``) Ray's client sends ``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``.
    """
    if max_retries < 0:
        raise JobError(f"max_retries must be >= 0, got {max_retries}")
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
    for n in range(1, max_retries + 2):
        env["env_vars"] = {
            **(runtime_env or {}).get("env_vars", {}),
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
        log(f"attempt {n}/{max_retries + 1}: {attempt.submission_id} (run '{run_name}')")
        try:
            _wait(client, attempt, follow_logs, poll_s, output)
        except KeyboardInterrupt:
            log(
                f"no longer following; the job keeps running (ray job stop {attempt.submission_id})"
            )
            raise
        attempt.seconds = round(time.monotonic() - started, 1)
        outcome.status = attempt.status
        log(
            f"attempt {n}: {attempt.status}"
            + (f" (exit code {attempt.exit_code})" if attempt.exit_code else "")
            + (f": {attempt.message}" if attempt.status != "SUCCEEDED" and attempt.message else "")
        )
        if not should_retry(attempt):
            break
        if n <= max_retries:
            log(f"resubmitting: attempt {n + 1} resumes run '{run_name}' from its last checkpoint")
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
    """Follow the job's logs until it ends (or poll its status), then record the outcome."""
    if follow_logs:
        try:
            asyncio.run(_tail(client, attempt.submission_id, output))
        except Exception:  # noqa: BLE001 - the log stream is a convenience; the status decides
            pass
    while True:
        info = client.get_job_info(attempt.submission_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            attempt.status, attempt.message = status, info.message
            attempt.exit_code = getattr(info, "driver_exit_code", None)
            return
        time.sleep(poll_s)


async def _tail(client: Any, submission_id: str, output: Any) -> None:
    async for lines in client.tail_job_logs(submission_id):
        output.write(lines)
        output.flush()
