"""Pipelines: YAML configs onto the typed configs, overrides, one-line errors, and the four
pipelines run in smoke mode on the S3 test server against the session's Ray cluster."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from lepton_ray.config import load_config, parse_override
from lepton_ray.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "pipelines" / "configs").glob("*.yaml"))
MNIST = str(Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "mnist.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_onto_the_typed_configs(path):
    cfg = load_config(path)
    assert cfg.train.run_name and cfg.dataset.source


def test_yaml_sections_map_one_to_one_and_overrides_win(tmp_path):
    cfg = load_config(
        MNIST,
        [
            "train.epochs=3",
            "train.optim.lr=0.05",
            "train.scaling.num_workers=[1, 2]",
            "model.kwargs.width=8",
            "store=s3://b/p",
            "promote.serve.max_replicas=4",
        ],
    )
    assert (cfg.train.epochs, cfg.train.optim.lr, cfg.train.scaling.num_workers) == (
        3,
        0.05,
        (1, 2),
    )
    assert cfg.model.kwargs == {"width": 8}
    assert cfg.train.data.augment == ("random_crop",)
    assert (cfg.dataset_uri, cfg.runs_uri) == ("s3://b/p/datasets/mnist5k", "s3://b/p/runs")
    assert cfg.promote.serve["max_replicas"] == 4


def test_smoke_test_shrinks_everything_but_what_was_overridden():
    cfg = load_config(MNIST, ["train.epochs=2"], smoke_test=True)
    assert cfg.smoke_test and cfg.train.epochs == 2 and cfg.train.scaling.num_workers == 1
    assert cfg.dataset.limit_rows == 500 and cfg.dataset_uri.endswith("/datasets/mnist5k-smoke")
    assert cfg.train.run_name == "mnist-cnn-smoke" and cfg.promote.min_accuracy == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.epoch=3"],
            "unknown key 'train.epoch' in the overrides (known there: batch_size, epochs,",
        ),
        (["train.optim.lrr=1"], "unknown key 'train.optim.lrr'"),
        (["promote.serve.replicas=2"], "unknown key 'promote.serve.replicas'"),
        (["datasets.source=x"], "unknown key 'datasets'"),
        (["train.epochs"], "override 'train.epochs' must look like key.path=value"),
        (["train.epochs=0"], "train.epochs: must be >= 1, got 0"),
        (
            ["train.scaling.placement_strategy=BOTH"],
            "train.scaling.placement_strategy: expected one of PACK, SPREAD,",
        ),
        (
            ["promote.serve.checkpoint=/x"],
            "promote.serve.checkpoint: is chosen by promote.checkpoint",
        ),
    ],
)
def test_bad_keys_and_values_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(MNIST, overrides)
    assert message in str(err.value)


def test_unknown_key_in_the_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  optim:\n    learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=f"unknown key 'train.optim.learning_rate' in {bad}"):
        load_config(bad)


def test_override_values_are_yaml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=s3://bucket/x") == ("a", "s3://bucket/x")
    assert parse_override("a=true") == ("a", True)
    assert parse_override("train.fault_injection=2:1:0") == ("train.fault_injection", "2:1:0")


def test_unknown_key_exits_2_with_one_line_on_stderr_before_ray_starts():
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--config", MNIST, "--set", "train.epoch=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("pipelines.train: error: unknown key 'train.epoch' in the overrides")


def run_pipeline(name: str, capsys, *args: str) -> tuple[int, dict]:
    import importlib

    code = importlib.import_module(f"pipelines.{name}").main(["--config", MNIST, *args])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 else {})


@pytest.mark.ray
def test_prepare_train_evaluate_promote_in_smoke_mode_on_s3(
    ray_session, s3_server, s3_bucket, serve_port, capsys
):
    import boto3
    from ray import serve

    store = ["--smoke-test", f"store=s3://{s3_bucket}/lepton", f"endpoint_url={s3_server}"]
    code, data = run_pipeline("prepare_data", capsys, *store)
    assert (
        code == 0
        and data["splits"]["train"]["rows"] == 500
        and data["splits"]["test"]["rows"] == 500
    )

    # A serving token in the config must never land in a file (checked at the end).
    secret = "promote.serve.auth_token=tok-5d2e-planted-never-written"
    code, res = run_pipeline("train", capsys, *store, "model.kwargs.width=8", secret)
    assert code == 0 and res["epochs"] == 1 and res["run_name"] == "mnist-cnn-smoke"
    run = f"s3://{s3_bucket}/lepton/runs/mnist-cnn-smoke"
    assert res["run"] == run and res["checkpoint"].startswith(run + "/checkpoint_epoch0001_")

    code, ev = run_pipeline("evaluate", capsys, *store, "evaluate.checkpoint=last")
    assert code == 0 and ev["checkpoint"] == res["checkpoint"] and ev["rows"] == 500
    assert 0 <= ev["accuracy"] <= 1 and sorted(ev["per_class_accuracy"]) == [
        str(i) for i in range(10)
    ]

    # A gate a one-epoch smoke checkpoint cannot meet (perfect accuracy; above 1 is a config
    # error, exit 2): exit 1, and the pointer does not move.
    code, _ = run_pipeline("promote", capsys, *store, "promote.min_accuracy=1.0")
    assert code == 1
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="lepton/")["Contents"]}
    assert "lepton/serving/mnist/current.json" not in keys
    assert any(k.startswith("lepton/runs/mnist-cnn-smoke/eval/") for k in keys)

    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    try:
        code, promoted = run_pipeline(
            "promote", capsys, *store, "promote.deploy=true", "promote.serve.route_prefix=/promoted"
        )
        assert (
            code == 0
            and promoted["checkpoint"] == res["best_checkpoint"]
            and promoted["previous"] is None
        )
        with urllib.request.urlopen(promoted["endpoint"] + "/v1/model", timeout=30) as r:
            assert json.loads(r.read())["checkpoint"] == res["best_checkpoint"]
    finally:
        serve.delete("mnist")
    pointer = json.loads(
        s3.get_object(Bucket=s3_bucket, Key="lepton/serving/mnist/current.json")["Body"].read()
    )
    assert pointer["checkpoint"] == res["best_checkpoint"] and pointer["evaluation"]["rows"] == 500

    # Promoting another checkpoint (a rollback, say) records what it replaced.
    code, again = run_pipeline(
        "promote", capsys, *store, f"promote.checkpoint={res['checkpoint']}", secret
    )
    assert code == 0 and again["previous"] == res["best_checkpoint"]
    config = (
        s3.get_object(Bucket=s3_bucket, Key="lepton/serving/mnist/config.yaml")["Body"]
        .read()
        .decode()
    )
    assert f"checkpoint: {res['checkpoint']}" in config and "import_path: serving.app:app" in config

    # pipeline.json, the pointer, the Serve config file, every object the pipelines wrote: no token.
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="lepton/")
    written = [o for page in pages for o in page["Contents"]]
    assert "lepton/runs/mnist-cnn-smoke/pipeline.json" in {o["Key"] for o in written}
    for o in written:
        body = s3.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read()
        assert b"tok-5d2e-planted" not in body, o["Key"]
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):  # the store's credentials
            assert os.environ[name].encode() not in body, (name, o["Key"])


# --- the GPT and the DLRM: evaluate and promote by the kind of the checkpoint's data --------------
CONFIGS_DIR = Path(MNIST).parent


def run_config(config: str, name: str, capsys, *args: str) -> tuple[int, dict, str]:
    """(exit code, summary, stderr) of a pipeline run in-process in smoke mode."""
    import importlib

    main = importlib.import_module(f"pipelines.{name}").main
    code = main(["--config", str(CONFIGS_DIR / config), "--smoke-test", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def test_smoke_gates_pass_any_checkpoint_and_a_click_source_names_its_folder():
    ctr = load_config(CONFIGS_DIR / "ctr_dlrm.yaml", smoke_test=True)
    assert ctr.dataset_uri.endswith("/datasets/synthetic-ctr-smoke")
    assert (ctr.promote.min_auc, ctr.promote.min_accuracy, ctr.promote.max_perplexity) == (
        0.0,
        None,
        None,
    )
    assert ctr.train.strategy == "fsdp" and ctr.train.scaling.num_workers == 1
    gpt = load_config(CONFIGS_DIR / "pydoc_gpt.yaml", ["promote.max_perplexity=3"], smoke_test=True)
    assert gpt.promote.max_perplexity == 3  # overridden: kept
    assert (
        load_config(CONFIGS_DIR / "pydoc_gpt.yaml", smoke_test=True).promote.max_perplexity > 1e300
    )


@pytest.mark.ray
def test_dlrm_config_prepares_trains_fsdp_evaluates_auc_and_promotes(ray_session, tmp_path, capsys):
    """ctr_dlrm.yaml in smoke mode: a sharded (fsdp) checkpoint, evaluated by AUC beside the
    planted AUC through its consolidated copy, gated on AUC, promoted as that copy."""
    store = [f"store={tmp_path}", "dataset.source=synthetic-ctr:rows=2000,tables=3,cardinality=7"]
    code, data, err = run_config("ctr_dlrm.yaml", "prepare_data", capsys, *store)
    assert code == 0 and data["splits"]["train"]["rows"] == 500
    assert data["splits"]["test"]["rows"] == 200  # a tenth of 2,000: under the smoke limit
    code, res, err = run_config("ctr_dlrm.yaml", "train", capsys, *store, "train.batch_size=100")
    assert code == 0 and res["run_name"] == "ctr-dlrm-smoke"

    code, ev, err = run_config("ctr_dlrm.yaml", "evaluate", capsys, *store)
    assert code == 0 and ev["kind"] == "ctr" and ev["main_metric"] == "auc" and ev["rows"] == 200
    assert ev["checkpoint"] == res["best_checkpoint"]
    assert (
        ev["evaluated"]
        == f"{tmp_path}/runs/ctr-dlrm-smoke/exported/" + Path(res["best_checkpoint"]).name
    )  # sharded: scored through its copy in one file
    assert 0 <= ev["auc"] <= 1 and 0.5 < ev["planted_auc"] <= 1 and 0 <= ev["accuracy"] <= 1
    assert ev["auc"] == pytest.approx(res["val_auc"], abs=1e-4)  # the loop's own validation

    # A gate for another kind is a config error; an AUC gate no checkpoint meets is a refusal.
    code, _, err = run_config(
        "ctr_dlrm.yaml", "promote", capsys, *store, "promote.min_accuracy=0.5"
    )
    assert code == 2 and "set promote.min_auc instead" in err
    code, _, err = run_config("ctr_dlrm.yaml", "promote", capsys, *store, "promote.min_auc=1.0")
    assert code == 1 and "not promoted: auc" in err

    # Deployed, it serves the consolidated copy (examples/dlrm_ctr.py deploys one and POSTs).
    code, promoted, err = run_config("ctr_dlrm.yaml", "promote", capsys, *store)
    assert code == 0 and promoted["checkpoint"] == ev["evaluated"], err
    assert promoted["exported_from"] == res["best_checkpoint"]
    assert promoted["evaluation"]["auc"] == ev["auc"] and "val_auc" in promoted["metrics"]
    config = (tmp_path / "serving" / "ctr-dlrm" / "config.yaml").read_text()
    assert f"checkpoint: {ev['evaluated']}" in config


@pytest.mark.ray
def test_gpt_config_evaluates_perplexity_and_promotes(ray_session, tmp_path, capsys):
    """pydoc_gpt.yaml in smoke mode with a tiny GPT: evaluated by perplexity over the held-out
    tokens, gated on it (lower is better), promoted (the pointer moves)."""
    store = [f"store={tmp_path}", "dataset.block_size=16", "dataset.limit_rows=64"]
    tiny = ["model.kwargs={n_layer: 1, n_head: 1, n_embd: 16}", "train.batch_size=32"]
    code, data, err = run_config("pydoc_gpt.yaml", "prepare_data", capsys, *store)
    assert code == 0 and data["splits"]["test"]["rows"] == 64
    code, res, err = run_config("pydoc_gpt.yaml", "train", capsys, *store, *tiny)
    assert code == 0 and res["run_name"] == "pydoc-gpt-smoke"

    code, ev, err = run_config("pydoc_gpt.yaml", "evaluate", capsys, *store)
    assert code == 0 and ev["kind"] == "text" and ev["main_metric"] == "perplexity"
    assert ev["tokens"] == 64 * 16 and "evaluated" not in ev  # ddp: no copy needed
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    assert ev["loss"] == pytest.approx(res["val_loss"], rel=1e-4)  # the loop's own validation

    code, _, err = run_config(
        "pydoc_gpt.yaml", "promote", capsys, *store, "promote.max_perplexity=1"
    )
    assert code == 1 and "misses promote.max_perplexity 1" in err
    code, promoted, err = run_config("pydoc_gpt.yaml", "promote", capsys, *store)
    assert code == 0 and promoted["checkpoint"] == res["best_checkpoint"]
    assert promoted["evaluation"]["perplexity"] == ev["perplexity"]
    pointer = json.loads((tmp_path / "serving" / "pydoc-gpt" / "current.json").read_text())
    assert pointer["checkpoint"] == res["best_checkpoint"]


# --- evaluate without Ray: a checkpoint of each kind, scored as its task says ---------------------
def published(root: Path, model, info) -> str:
    """``model`` as checkpoint 1/1 of run ``r`` under ``root``, with ``info``'s data section (what
    fit records): a checkpoint without a training run."""
    from lepton_ray import checkpoint, storage
    from lepton_ray.models import spec_of
    from lepton_ray.runs import RunLayout

    data = {
        "shape": list(info.shape),
        "mean": list(info.mean),
        "std": list(info.std),
        "classes": list(info.classes),
        "kind": info.kind,
        **info.kind_fields(),
    }
    local = checkpoint.write_local(root / "local", model, {"model": spec_of(model), "data": data})
    dest = RunLayout.under(storage.resolve(root / "runs"), "r").checkpoint(1, 1)
    checkpoint.publish(local, dest)
    return dest.uri


def evaluate_pure(config: str, uri: str, dataset: Path, capsys) -> tuple[int, dict, str]:
    from pipelines import evaluate

    args = ["--config", str(CONFIGS_DIR / config), "--set", f"dataset.uri={dataset}"]
    code = evaluate.main([*args, "--set", f"evaluate.checkpoint={uri}"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def test_evaluate_scores_a_click_model_by_its_exact_auc(tmp_path, capsys):
    import numpy as np
    import torch

    from lepton_ray import build_model, prepare
    from lepton_ray.data import ctr, read_arrays
    from lepton_ray.dlrm import Features

    source = "synthetic-ctr:rows=600,tables=2,cardinality=9,dense=3,seed=2"
    infos = prepare(source, str(tmp_path / "ctr"))
    torch.manual_seed(0)
    model = build_model("dlrm", **infos["train"].model_kwargs(), embed_dim=4).eval()
    uri = published(tmp_path, model, infos["train"])
    code, ev, err = evaluate_pure("ctr_dlrm.yaml", uri, tmp_path / "ctr", capsys)
    assert code == 0, err
    rows, labels, _ = read_arrays(infos["test"])
    dense, ids = ctr.unpack(rows, 3)
    with torch.no_grad():
        logits = model(Features(torch.from_numpy(dense), torch.from_numpy(ids))).numpy()
    assert ev["auc"] == pytest.approx(ctr.auc(logits, labels), abs=1e-9)
    assert ev["accuracy"] == pytest.approx(np.mean((logits > 0) == labels))
    assert ev["planted_auc"] == infos["test"].manifest["planted_auc"] and ev["rows"] == 60

    # the same model on click data of other tables: named before anything is scored
    prepare("synthetic-ctr:rows=600,tables=2,cardinality=9/5,dense=3", str(tmp_path / "other"))
    code, _, err = evaluate_pure("ctr_dlrm.yaml", uri, tmp_path / "other", capsys)
    assert code == 2 and "cardinalities [9, 5] here, [9, 9] there" in err


def test_evaluate_treats_a_text_classifier_as_any_classifier(tmp_path, capsys):
    import numpy as np
    import torch

    from lepton_ray import build_model, prepare
    from lepton_ray.data import read_arrays

    infos = prepare("python-snippets", str(tmp_path / "snippets"), block_size=32)
    info = infos["test"]
    torch.manual_seed(0)
    kwargs = {"n_layer": 1, "n_head": 2, "n_embd": 16}
    model = build_model("bert", **info.model_kwargs(), **kwargs).eval()
    uri = published(tmp_path, model, infos["train"])
    code, ev, err = evaluate_pure("mnist.yaml", uri, tmp_path / "snippets", capsys)
    assert code == 0, err
    assert ev["kind"] == "text-label" and ev["main_metric"] == "accuracy"
    rows, labels, _ = read_arrays(info)
    with torch.no_grad():
        predicted = model(torch.from_numpy(rows.reshape(len(rows), -1)).long()).argmax(1).numpy()
    assert ev["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert sorted(ev["per_class_accuracy"]) == sorted(info.classes)
    assert ev["rows"] == info.num_rows
