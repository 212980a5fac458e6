"""What every pipeline shares: the entry point (arguments, exit codes), logging, run names.

    python -m pipelines.NAME --config pipelines/configs/mnist.yaml [--set train.epochs=3] [key=value ...]
                             [--smoke-test]

One YAML file describes an experiment; each pipeline reads the sections it needs. The file, the
overrides and the typed config it becomes are the library's (:mod:`lepton_ray.config`:
:func:`~lepton_ray.config.load_config`, :class:`~lepton_ray.config.PipelineConfig`); an unknown
key or a bad value anywhere, in the file or in an override, is a one-line error naming its dotted
path.

Output: a line per stage and the summary as JSON; Ray's own output stays in its session's log folder
(printed once) unless ``--verbose`` or ``LEPTON_VERBOSE=1`` (:mod:`lepton_ray.console`).

Exit codes: 0 success, 2 a user error (config, data, storage; one line on stderr), 1 a failure
(training failed, a promotion gate not met, anything unexpected). ``lepton-ray submit`` retries a
job that exits 1, never one that exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from lepton_ray.config import SMOKE_ROWS, PipelineConfig, load_config
from lepton_ray.console import VERBOSE_HELP, entry_point
from lepton_ray.errors import ConfigError, LeptonError, TrainingError, one_line

# Set by ``lepton-ray submit`` (lepton_ray.jobs) in every attempt's runtime_env.
RUN_NAME_ENV, RESUME_ENV, ATTEMPT_ENV = "LEPTON_RUN_NAME", "LEPTON_RESUME", "LEPTON_ATTEMPT"


# --- runs and checkpoints --------------------------------------------------------------------
def run_name_and_resume(cfg: PipelineConfig) -> tuple[str, bool]:
    """The run to train: ``train.run_name``, else the one ``lepton-ray submit`` chose for every
    attempt (``$LEPTON_RUN_NAME``), else a fresh one; resumed when asked to or on a retry."""
    name = (
        cfg.train.run_name
        or os.environ.get(RUN_NAME_ENV)
        or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    return name, cfg.train.resume or os.environ.get(RESUME_ENV) == "1"


def find_checkpoint(cfg: PipelineConfig, which: str) -> str:
    """A checkpoint URI: ``best`` or ``last`` of ``train.run_name`` (or ``$LEPTON_RUN_NAME``), or
    ``which`` itself. ``best`` follows ``best.json`` only inside the run's ``best/`` folder, and
    falls back to the latest complete checkpoint when the run has no best yet."""
    from lepton_ray.runs import RunLayout

    if which not in ("best", "last"):
        return which
    name = cfg.train.run_name or os.environ.get(RUN_NAME_ENV)
    if not name:
        raise ConfigError(
            f"which run? set train.run_name (or pass a checkpoint URI instead of '{which}')"
        )
    run = RunLayout.under(cfg.runs_uri, name, cfg.endpoint_url)
    if which == "best" and (best := run.read_best()):
        return best["uri"]
    latest = run.latest()
    if latest is None:
        raise ConfigError(f"run '{name}' has no complete checkpoint at {run.uri}")
    return latest.uri


def loadable(cfg: PipelineConfig, uri: str) -> str:
    """``uri``, or for a sharded (``strategy: fsdp``) checkpoint its copy in one file, which
    ``load_model`` and Serve read: ``<run>/exported/<checkpoint>``, exported once and reused (a
    checkpoint folder is never rewritten once its manifest is there)."""
    from lepton_ray import checkpoint, storage
    from lepton_ray.runs import RunLayout
    from lepton_ray.train.sharded import export

    loc = storage.resolve(uri, cfg.endpoint_url)
    # One file of weights: nothing to do, and nothing read here (the loader reads each file once).
    if loc.join(checkpoint.WEIGHTS).exists() or not checkpoint.is_sharded(
        checkpoint.read_manifest(loc)
    ):
        return uri
    run, name = RunLayout.of_checkpoint(loc)
    dest = run.exported(name)
    if not dest.join(checkpoint.MANIFEST).exists():
        log(f"[export] {uri} is sharded: consolidating it into {dest.uri}")
        export(loc, dest)
    return dest.uri


# --- the entry point -------------------------------------------------------------------------
def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m pipelines.{name}", description=description)
    p.add_argument(
        "--config", default=None, help="pipeline YAML (e.g. pipelines/configs/mnist.yaml)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, as with --set"
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"cheap run: a {SMOKE_ROWS}-row dataset copy, 1 epoch, 1 worker",
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def main(
    name: str,
    doc: str,
    run: Callable[[PipelineConfig], dict[str, Any]],
    argv: list[str] | None = None,
) -> int:
    """Parse arguments, load the config, run the pipeline, print its summary as JSON; the exit code."""
    args = parser(name, doc.strip().split("\n\n")[0]).parse_args(argv)
    entry_point(args.verbose)
    prog = f"pipelines.{name}"
    try:
        cfg = load_config(args.config, [*args.sets, *args.overrides], smoke_test=args.smoke_test)
        summary = run(cfg)
    except TrainingError as exc:
        print(f"{prog}: failed: {one_line(exc)}", file=sys.stderr)
        return 1
    except PipelineFailure as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return 1
    except LeptonError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary, indent=2, default=str), flush=True)
    return 0


class PipelineFailure(Exception):
    """The pipeline ran but its outcome is a failure (e.g. a promotion gate not met): exit 1."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
