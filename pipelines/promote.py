"""Promote a run's checkpoint to serving.

    python -m pipelines.promote --config pipelines/configs/mnist.yaml                      # best checkpoint
    python -m pipelines.promote --config pipelines/configs/mnist.yaml --set promote.deploy=true
    python -m pipelines.promote --config ... --set promote.checkpoint=s3://bucket/runs/r/checkpoint_...  # roll back

1. picks ``promote.checkpoint`` (``best`` or ``last`` of ``train.run_name``, or a URI; a sharded
   one is served from its copy in one file, exported once) and reads it once, verified
   (manifest, checksums, and a model spec that names a registered architecture or a class from
   ``promote.serve.trusted_modules``); the evaluation uses that copy, and the deployment checks
   only its manifest and metadata on the driver;
2. with a gate on the main metric of the checkpoint's kind (``promote.min_accuracy`` for a
   classifier, ``promote.min_auc`` for a click model, ``promote.max_perplexity`` for a language
   model), evaluates it first and refuses (exit 1) when it misses; a gate for another kind is a
   config error (exit 2);
3. with ``promote.deploy``, deploys it with Ray Serve on the cluster (a running application of
   the same name is rolled over to it);
4. then, and only then, moves the pointer ``<store>/serving/<name>/current.json`` (checkpoint,
   run, metrics, the previous checkpoint) and writes ``<store>/serving/<name>/config.yaml``, a
   Serve config for ``serve deploy`` (also to ``promote.write_config`` when set).

The pointer is the record of what serves; promoting an older checkpoint is the rollback. The app
name becomes a folder, so it must be one safe name (:func:`lepton_ray.runs.validate_name`), checked
before anything is read or written.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lepton_ray.config import PipelineConfig
from pipelines import common
from pipelines.common import PipelineFailure, find_checkpoint, loadable, log

# The gate on each main metric (lepton_ray.train.task): its promote.* field, and whether a
# checkpoint passes at ``value`` against the bar ``bar``.
GATES = {
    "accuracy": ("min_accuracy", lambda value, bar: value >= bar),
    "auc": ("min_auc", lambda value, bar: value >= bar),
    "perplexity": ("max_perplexity", lambda value, bar: value <= bar),
}


def serve_config_yaml(args: dict[str, Any], *, host: str, port: int) -> str:
    """A Serve config file (the shape of ``serving/config.yaml``) for ``serve deploy``/``serve run``."""
    import yaml

    doc = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": args["name"],
                "route_prefix": args["route_prefix"],
                "import_path": "serving.app:app",
                "args": args,
            }
        ],
    }
    return (
        "# Written by pipelines.promote. Deploy it from the repository root: serve deploy <this file>\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )


def run(cfg: PipelineConfig) -> dict[str, Any]:
    from lepton_ray import checkpoint
    from lepton_ray.config import to_dict
    from lepton_ray.runs import CURRENT, serving_home

    p = cfg.promote
    trained = find_checkpoint(cfg, p.checkpoint)
    serve = p.serve_config(trained, endpoint_url=cfg.endpoint_url)
    if serve.store is None:  # a canary's verdict is kept beside the app's pointer, in this store
        serve = replace(serve, store=cfg.root)
    home = serving_home(cfg.root, serve.name, cfg.endpoint_url)  # the app name, checked first
    pointer = home.join(CURRENT)
    previous = _previous(pointer)
    uri = loadable(cfg, trained)  # what serves: a sharded checkpoint's copy in one file
    serve = replace(serve, checkpoint=uri)
    loaded = checkpoint.load_checkpoint(
        uri, cfg.endpoint_url, trusted_modules=serve.trusted_modules
    )
    meta = loaded.meta
    summary: dict[str, Any] = {
        "checkpoint": uri,
        **({"exported_from": trained} if trained != uri else {}),
        "run": meta.get("run", {}).get("name"),
        "metrics": {k: v for k, v in meta.get("metrics", {}).items() if k in KEPT_METRICS},
    }
    gate = _gate(cfg, meta)
    if gate is not None:
        from pipelines.evaluate import evaluate

        metric, field, passes = gate
        result = evaluate(cfg, which=trained, loaded=loaded)
        summary["evaluation"] = {
            k: result[k]
            for k in ("split", "rows", "loss", "accuracy", metric, "main_metric", "written_to")
        }
        bar = getattr(p, field)
        if not passes(result[metric], bar):
            raise PipelineFailure(
                f"not promoted: {metric} {result[metric]:.4f} on '{result['split']}' misses "
                f"promote.{field} {bar}"
            )
    if p.deploy:
        from lepton_ray import deploy

        # to_dict leaves secrets out (they are never written); the token goes to deploy as is.
        fields = {k: v for k, v in to_dict(serve).items() if k != "checkpoint"}
        fields["auth_token"] = serve.auth_token
        summary["endpoint"] = deploy(uri, host=p.host, port=p.port, **fields)
        log(f"[promote] serving {uri} at {summary['endpoint']}")

    record = {
        **summary,
        "serve": {k: v for k, v in to_dict(serve).items() if k != "checkpoint"},
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "previous": previous["checkpoint"] if previous else None,
    }
    config_text = serve_config_yaml(to_dict(serve), host=p.host, port=p.port)
    home.join("config.yaml").write_bytes(config_text.encode())
    pointer.write_json(record)  # last: the pointer moves only once everything else is in place
    if p.write_config:
        Path(p.write_config).expanduser().write_text(config_text)
    log(
        f"[promote] {serve.name} -> {uri}"
        + (f" (was {record['previous']})" if record["previous"] else "")
    )
    return record | {
        "pointer": pointer.uri,
        "serve_config": [home.join("config.yaml").uri]
        + ([p.write_config] if p.write_config else []),
    }


# What the pointer keeps of the checkpoint's own (last training epoch's) metrics.
KEPT_METRICS = (
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_perplexity",
    "val_auc",
)


def _gate(cfg: PipelineConfig, meta: dict[str, Any]) -> tuple[str, str, Any] | None:
    """(main metric, its promote.* field, its test) when that gate is set; None when none is. A
    gate set on another kind's metric is a config error: it would never be checked."""
    import torch

    from lepton_ray.errors import ConfigError
    from lepton_ray.train.task import for_data
    from pipelines.evaluate import main_metric

    metric = main_metric(for_data(meta["data"], torch.device("cpu")))
    field, passes = GATES[metric]
    for other, (name, _) in GATES.items():
        if other != metric and getattr(cfg.promote, name) is not None:
            kind = meta["data"].get("kind", "image")
            raise ConfigError(
                f"promote.{name} gates on {other}, but this checkpoint ({kind} data) is judged by "
                f"{metric}: set promote.{field} instead"
            )
    return (metric, field, passes) if getattr(cfg.promote, field) is not None else None


def _previous(pointer: Any) -> dict[str, Any] | None:
    """The app's current pointer, or None: a JSON object whose ``checkpoint`` is a URI string.
    Only recorded (as ``previous``), never followed."""
    from lepton_ray.errors import NotFoundError, StorageError

    try:
        record = pointer.read_json()
    except NotFoundError:
        return None
    except ValueError:
        raise StorageError(f"{pointer.uri} is not JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoint"), str):
        raise StorageError(f"{pointer.uri} is not a pointer (a JSON object with a checkpoint URI)")
    return record


def main(argv: list[str] | None = None) -> int:
    return common.main("promote", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
