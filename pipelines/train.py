"""Train the experiment's model on its prepared dataset with Ray Train (``Trainer.fit``).

    python -m pipelines.train --config pipelines/configs/mnist.yaml [--set train.epochs=3]
    python -m pipelines.train --config pipelines/configs/mnist.yaml --smoke-test
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.train --config pipelines/configs/mnist.yaml

Inside a Ray job it attaches to that cluster; otherwise it starts a local Ray instance. Checkpoints,
``metrics.jsonl``, ``best.json`` and the resolved ``pipeline.json`` go to ``<train.storage>/<run>``.
Under ``lepton-ray submit`` every attempt trains the same run and a retry resumes it from its last
checkpoint. A smoke run replaces the previous smoke run of the same name.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from lepton_ray.config import PipelineConfig
from pipelines import common
from pipelines.common import ATTEMPT_ENV, log, run_name_and_resume

# What each epoch's log line shows of validation: what every task counts, then a language
# model's perplexity or a click model's AUC.
VAL_METRICS = ("val_accuracy", "val_perplexity", "val_auc")


def run(cfg: PipelineConfig) -> dict[str, Any]:
    from lepton_ray import build_model, fit, open_dataset
    from lepton_ray.config import to_dict
    from lepton_ray.runs import RunLayout
    from lepton_ray.runtime import ensure_ray

    name, resume = run_name_and_resume(cfg)
    run = RunLayout.under(cfg.runs_uri, name, cfg.endpoint_url)  # the name is checked: one folder
    train_info = open_dataset(f"{cfg.dataset_uri}/{cfg.dataset.train_split}", cfg.endpoint_url)
    val = f"{cfg.dataset_uri}/{cfg.dataset.val_split}" if cfg.dataset.val_split else None
    if cfg.smoke_test and not resume and run.root.exists():
        run.root.delete()
    tcfg = dataclasses.replace(
        cfg.train,
        run_name=name,
        resume=resume,
        storage=cfg.runs_uri,
        endpoint_url=cfg.train.endpoint_url or cfg.endpoint_url,
    )
    model = build_model(cfg.model.name, **train_info.model_kwargs(), **cfg.model.kwargs)
    attempt = os.environ.get(ATTEMPT_ENV)
    log(f"LEPTON_RUN_NAME={name}")  # machine-readable: lepton-ray submit reports the run trained
    log(
        f"[train] run '{name}' at {run.uri}"
        + (" (resuming)" if resume else "")
        + (f", attempt {attempt}" if attempt else "")
    )
    ensure_ray()
    results = fit(model, train_info, val, tcfg)
    run.pipeline.write_json(to_dict(dataclasses.replace(cfg, train=tcfg)))
    for h in results["history"]:
        log(
            f"[train] epoch {h['epoch']:>2}  loss {h['train_loss']:.4f}  acc {h['train_accuracy']:.4f}"
            + "".join(f"  {k} {h[k]:.4f}" for k in VAL_METRICS if k in h)
        )
    return {k: v for k, v in results.items() if k != "history"} | {"run_name": name}


def main(argv: list[str] | None = None) -> int:
    return common.main("train", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
