"""Pure tier: every bad value a user can give is rejected in one line naming the key as they wrote
it, whichever way it came in (YAML, --set, Python, the CLI); configs survive a round trip through
to_dict; CLI defaults are the config classes' defaults; secrets are never serialised."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_ray.config import (
    DataConfig,
    ModelSpec,
    OptimConfig,
    PipelineConfig,
    ScalingConfig,
    ServeConfig,
    TrainConfig,
    build_train_config,
    from_dict,
    load_config,
    to_dict,
)
from lepton_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "pipelines" / "configs" / "mnist.yaml"
CONFIGS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))

# (YAML text, the error line it must give, exactly from its start)
YAML_CASES = [
    (
        "train: {scaling: {use_gpu: maybe}}",
        "train.scaling.use_gpu: expected true or false, got 'maybe'",
    ),
    ("train: {optim: {momentum: abc}}", "train.optim.momentum: expected a number, got 'abc'"),
    ("train: {seed: abc}", "train.seed: expected a whole number, got 'abc'"),
    (
        "train: {scaling: {resources_per_worker: {CPU: -3}}}",
        "train.scaling.resources_per_worker.CPU: must be >= 0, got -3",
    ),
    (
        "train: {scaling: {resources_per_worker: {CPU: lots}}}",
        "train.scaling.resources_per_worker.CPU: expected a number, got 'lots'",
    ),
    ("train: {optim: {grad_clip: -1}}", "train.optim.grad_clip: must be > 0, got -1"),
    ("evaluate: {batch_size: 0}", "evaluate.batch_size: must be >= 1, got 0"),
    ("promote: {port: abc}", "promote.port: expected a whole number, got 'abc'"),
    ("promote: {port: 70000}", "promote.port: must be in [1, 65535], got 70000"),
    ("promote: {port: 0}", "promote.port: must be in [1, 65535], got 0"),
    ("train: 3", "train: expected a section (a mapping of keys), got 3"),
    (
        "train: {data: [random_crop]}",
        "train.data: expected a section (a mapping of keys), got ['random_crop']",
    ),
    (
        "train:\n  data:\n    augment: random_crop,sharpen",
        "train.data.augment: unknown augmentation 'sharpen'",
    ),
    (
        "train: {data: {augment: [random_crop, 3]}}",
        "train.data.augment[1]: expected a string, got 3",
    ),
    (
        "model: {kwargs: {widht: 3}}",
        "model.kwargs.widht: 'cnn' takes no argument 'widht' (it takes: width, dropout)",
    ),
    ("model: {kwargs: {width: abc}}", "model.kwargs.width: expected a whole number, got 'abc'"),
    ("model: {kwargs: {num_classes: 3}}", "model.kwargs.num_classes: comes from the dataset"),
    ("model: {name: nope}", "model.name: unknown model 'nope' (registered: "),
    (
        "train: {optim: {optimizer: adam}}",
        "train.optim.optimizer: expected one of sgd, adamw, got 'adam'",
    ),
    ("train: {monitor: accuracy}", "train.monitor: expected one of val_loss, val_accuracy,"),
    (
        "train: {scaling: {num_workers: [3, 2]}}",
        "train.scaling.num_workers: a (min, max) range needs min <= max, got [3, 2]",
    ),
    (
        "train: {scaling: {num_workers: [0, 2]}}",
        "train.scaling.num_workers[0]: must be >= 1, got 0",
    ),
    (
        "train: {scaling: {num_workers: true}}",
        "train.scaling.num_workers: expected a whole number or a list of 2 whole numbers or 'auto', got True",
    ),
    ("train: {max_micro_batch: 0}", "train.max_micro_batch: must be >= 1, got 0"),
    ("train: {epochs: 2.5}", "train.epochs: expected a whole number, got 2.5"),
    ("train: {optim: {lr: .nan}}", "train.optim.lr: expected a finite number, got nan"),
    (
        "train: {optim: {warmup_fraction: 1}}",
        "train.optim.warmup_fraction: must be in [0, 1), got 1",
    ),
    (
        "train: {fault_injection: '2:1'}",
        "train.fault_injection: must look like EPOCH:STEP:RANK, got '2:1'",
    ),
    ("train: {fault_injection: 2:1:0}", "train.fault_injection: expected a string, got 7260"),
    ("train: {run_name: ../..}", "train.run_name: must be a plain name"),
    ("train: {resume: true}", "train.resume: needs run_name"),
    (
        "train: {data: {cache: device, augment_on: cpu}}",
        "train.data.cache: 'device' augments on the device",
    ),
    ("dataset: {limit_rows: -5}", "dataset.limit_rows: must be >= 1, got -5"),
    ("dataset: {encoding: jpeg}", "dataset.encoding: expected one of raw, png, got 'jpeg'"),
    ("dataset: {val_split: ../train}", "dataset.val_split: must be a plain name"),
    ("promote: {min_accuracy: 1.5}", "promote.min_accuracy: must be in [0, 1], got 1.5"),
    ("promote: {serve: {max_replicas: 0}}", "promote.serve.max_replicas: must be >= 1, got 0"),
    (
        "promote: {serve: {use_gpu: maybe}}",
        "promote.serve.use_gpu: expected true or false, got 'maybe'",
    ),
    ("promote: {serve: {auth_token: '  '}}", "promote.serve.auth_token: must not be blank"),
    ("promote: {serve: {name: a/b}}", "promote.serve.name: must be a plain name"),
    ("promote: {serve: 3}", "promote.serve: expected a mapping, got 3"),
    ("smoke_test: maybe", "smoke_test: expected true or false, got 'maybe'"),
    ("store: 3", "store: expected a string, got 3"),
]


def _one_line(err: pytest.ExceptionInfo, expected: str) -> None:
    text = str(err.value)
    assert text.startswith(expected), text
    assert "\n" not in text
    assert isinstance(err.value, ConfigError)


@pytest.mark.parametrize(("text", "expected"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_bad_yaml_values_name_the_dotted_key(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    _one_line(err, expected)


SET_CASES = [
    ("train.optim.momentum=abc", "train.optim.momentum: expected a number, got 'abc'"),
    ("train.scaling.use_gpu=maybe", "train.scaling.use_gpu: expected true or false, got 'maybe'"),
    (
        "train.scaling.resources_per_worker={CPU: -3}",
        "train.scaling.resources_per_worker.CPU: must be >= 0",
    ),
    ("train.optim.grad_clip=-1", "train.optim.grad_clip: must be > 0, got -1"),
    ("train.data.augment=random_crop,nope", "train.data.augment: unknown augmentation 'nope'"),
    ("evaluate.batch_size=0", "evaluate.batch_size: must be >= 1, got 0"),
    ("promote.port=abc", "promote.port: expected a whole number, got 'abc'"),
    ("model.name=nope", "model.name: unknown model 'nope'"),
    ("model.kwargs.widht=3", "model.kwargs.widht: 'cnn' takes no argument 'widht'"),
    ("train=3", "train: expected a section (a mapping of keys), got 3"),
    ("train.run_name=..", "train.run_name: must be a plain name"),
    ("promote.serve.canary_share=2", "promote.serve.canary_share: must be in [0, 1], got 2"),
]


@pytest.mark.parametrize(("override", "expected"), SET_CASES, ids=[c[0] for c in SET_CASES])
def test_bad_set_overrides_name_the_dotted_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(MNIST, [override])
    _one_line(err, expected)


PYTHON_CASES = [
    (lambda: OptimConfig(momentum="abc"), "OptimConfig.momentum: expected a number, got 'abc'"),
    (lambda: ScalingConfig(use_gpu="maybe"), "ScalingConfig.use_gpu: expected true or false"),
    (
        lambda: ScalingConfig(resources_per_worker={"GPU": -1}),
        "ScalingConfig.resources_per_worker.GPU: must be >= 0",
    ),
    (lambda: TrainConfig(seed="abc"), "TrainConfig.seed: expected a whole number, got 'abc'"),
    (lambda: TrainConfig(optim={"lr": -1}), "TrainConfig.optim.lr: must be > 0, got -1"),
    (
        lambda: TrainConfig(optim={"lrr": 1}),
        "TrainConfig.optim.lrr: unknown key (known there: optimizer,",
    ),
    (
        lambda: DataConfig(augment="hflip,sharpen"),
        "DataConfig.augment: unknown augmentation 'sharpen'",
    ),
    (lambda: ModelSpec(name="nope"), "ModelSpec.name: unknown model 'nope'"),
    (
        lambda: PipelineConfig(promote={"port": "abc"}),
        "PipelineConfig.promote.port: expected a whole number",
    ),
    (lambda: ServeConfig(checkpoint=""), "ServeConfig.checkpoint: must not be blank"),
    (lambda: from_dict(ServeConfig, {"name": "x"}), "ServeConfig.checkpoint: required"),
    (lambda: from_dict(TrainConfig, {"optim": 3}), "TrainConfig.optim: expected a section"),
    (
        lambda: build_train_config(scaling=ScalingConfig(), epochs=2, x=1),
        "unknown fit() argument 'x'",
    ),
    (
        lambda: build_train_config(scaling=ScalingConfig(), lr="fast"),
        "OptimConfig.lr: expected a number",
    ),
]


@pytest.mark.parametrize(("build", "expected"), PYTHON_CASES, ids=[c[1] for c in PYTHON_CASES])
def test_python_api_errors_name_the_class_path(build, expected):
    with pytest.raises(ConfigError) as err:
        build()
    _one_line(err, expected)


CLI_CASES = [
    (["--set", "train.optim.momentum=abc"], "train.optim.momentum: expected a number, got 'abc'"),
    (["--epochs", "0"], "train.epochs: must be >= 1, got 0"),
    (["--lr", "-1"], "train.optim.lr: must be > 0, got -1"),
    (
        ["--resources-per-worker", '{"CPU": -3}'],
        "train.scaling.resources_per_worker.CPU: must be >= 0",
    ),
    (["--model", "nope"], "model.name: unknown model 'nope'"),
    (["--augment", "random_crop,bad"], "train.data.augment: unknown augmentation 'bad'"),
    (["--workers", "3,2"], "train.scaling.num_workers: a (min, max) range needs min <= max"),
    (["--run-name", "../x"], "train.run_name: must be a plain name"),
    (["--set", "train=3"], "train: expected a section (a mapping of keys), got 3"),
    (["--set", "train.epoch=3"], "unknown key 'train.epoch' in the overrides (known there: "),
]


@pytest.mark.parametrize(("args", "expected"), CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_train_mistakes_exit_2_with_one_line(capsys, args, expected):
    from lepton_ray import cli

    assert cli.main(["train", "--data", "/nowhere", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lepton-ray: error: {expected}") and err.count("\n") == 1, err


# --- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_to_config_to_dict_and_back(path):
    cfg = load_config(path, ["promote.serve.max_replicas=3"])
    d = to_dict(cfg)
    assert from_dict(PipelineConfig, d, root="") == cfg
    assert from_dict(PipelineConfig, json.loads(json.dumps(d)), root="") == cfg
    assert load_config(None, [(k, v) for k, v in d.items()]) == cfg  # the overrides path too


def test_strings_and_lists_mean_the_same():
    a = load_config(
        None, ["train.data.augment=random_crop, hflip", "train.scaling.num_workers=[1, 2]"]
    )
    b = load_config(
        None,
        [("train.data.augment", ("random_crop", "hflip")), ("train.scaling.num_workers", (1, 2))],
    )
    assert a == b and a.train.data.augment == ("random_crop", "hflip")
    assert DataConfig(augment="random_crop").augment == ("random_crop",)  # not 'r', 'a', ...
    assert DataConfig(augment="").augment == ()
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)


def test_build_train_config_maps_flat_fit_arguments():
    cfg = build_train_config(
        scaling=ScalingConfig(num_workers=3), batch_size=64, epochs=None, lr=0.05, run_name="r"
    )
    assert (cfg.batch_size, cfg.epochs, cfg.optim.lr, cfg.run_name) == (64, 10, 0.05, "r")
    assert cfg.scaling.num_workers == 3 and cfg.data == DataConfig()


# --- the CLI takes its defaults from the config classes -------------------------------------
def test_cli_train_defaults_are_the_config_defaults():
    from lepton_ray import cli

    args = cli.build_parser().parse_args(["train", "--data", "x"])
    assert all(getattr(args, dest) is None for dest in cli._TRAIN_FLAGS)
    cfg = cli.train_config(args)
    assert cfg.train == TrainConfig() and cfg.model == ModelSpec()


def test_cli_train_config_file_then_set_then_flags():
    from lepton_ray import cli

    argv = ["train", "--config", str(MNIST), "--set", "train.epochs=3", "--set", "train.seed=4"]
    cfg = cli.train_config(cli.build_parser().parse_args([*argv, "--seed", "5", "--no-use-gpu"]))
    assert (cfg.train.epochs, cfg.train.seed, cfg.train.run_name) == (3, 5, "mnist-cnn")
    assert cfg.model.kwargs == {"width": 32} and cfg.train.scaling.use_gpu is False


def test_cli_serve_defaults_are_the_serve_config_defaults():
    from lepton_ray import cli

    args = cli.build_parser().parse_args(["serve", "/x"])
    defaults = ServeConfig(checkpoint="/x")
    for dest, name in cli._SERVE_FLAGS.items():
        assert getattr(args, dest) == getattr(defaults, name), dest


# --- secrets ---------------------------------------------------------------------------------
TOKEN = "tok-3c1f9e-never-written"


def test_the_serve_token_is_never_serialised_from_a_pipeline_config():
    cfg = load_config(MNIST, [f"promote.serve.auth_token={TOKEN}"])
    assert cfg.promote.serve["auth_token"] == TOKEN  # promote still has it to deploy with
    assert cfg.promote.serve_config("/ckpt").auth_token == TOKEN
    # pipeline.json is to_dict of the resolved config; promote writes to_dict of its ServeConfig
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_name="r"))
    for written in (to_dict(resolved), to_dict(cfg.promote.serve_config("/ckpt"))):
        assert TOKEN not in json.dumps(written)
    assert TOKEN not in repr(cfg)


def test_a_secret_in_the_file_stays_out_of_the_serve_config_yaml():
    from pipelines.promote import serve_config_yaml

    cfg = load_config(MNIST, [f"promote.serve.auth_token={TOKEN}"])
    text = serve_config_yaml(to_dict(cfg.promote.serve_config("/ckpt")), host="h", port=1)
    assert "checkpoint: /ckpt" in text and TOKEN not in text and "auth_token" not in text


# --- pipelines: user mistakes exit 2 in one line ----------------------------------------------
def test_an_unknown_model_in_a_pipeline_exits_2_with_one_line():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.train",
            "--config",
            str(MNIST),
            "--set",
            "model.name=nope",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("pipelines.train: error: model.name: unknown model 'nope'")


def test_importing_the_config_costs_neither_torch_nor_ray():
    code = (
        "import sys, lepton_ray.config as c; c.TrainConfig(); c.ServeConfig(checkpoint='/x'); "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
