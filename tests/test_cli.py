"""The CLI: instant help, exit codes and one-line errors on stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lepton_ray.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_imports_neither_torch_nor_ray():
    code = "import sys, lepton_ray.cli as c; c.build_parser(); print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"
    r = run_cli("--help")
    assert r.returncode == 0 and "data" in r.stdout and "train" in r.stdout and "serve" in r.stdout


@pytest.mark.parametrize("sub", ["data", "train", "serve", "predict"])
def test_each_command_has_help(sub):
    assert run_cli(sub, "--help").returncode == 0


def test_prepare_and_inspect(tmp_path):
    r = run_cli("data", "prepare", "mnist5k", str(tmp_path / "ds"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["train"]["rows"] == 4000
    r = run_cli("data", "inspect", str(tmp_path / "ds" / "test"))
    info = json.loads(r.stdout)
    assert info["rows"] == 1000 and set(info["class_counts"].values()) == {100}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("data", "prepare", "nosuchsource", "/tmp/x"), "unknown dataset source 'nosuchsource'"),
        (("data", "inspect", "/nonexistent/ds"), "no prepared dataset at /nonexistent/ds"),
        (("train", "--data", "/nonexistent/ds"), "no prepared dataset at /nonexistent/ds"),
        (("data", "inspect", "gs://bucket/x"), "unsupported storage URI scheme 'gs://'"),
    ],
)
def test_errors_are_one_line_on_stderr_with_exit_2(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_bad_worker_spec_is_a_usage_error():
    r = run_cli("train", "--data", "x", "--workers", "two")
    assert r.returncode == 2 and "--workers takes N, MIN,MAX or auto" in r.stderr


def test_bad_cache_choice_is_a_usage_error():
    r = run_cli("train", "--data", "x", "--cache", "gpu")
    assert r.returncode == 2 and "--cache: invalid choice: 'gpu'" in r.stderr


def test_train_help_shows_the_config_defaults():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert "(default: 10, TrainConfig.epochs)" in text
    assert "(default: 0.1, OptimConfig.lr)" in text
    assert "--config FILE" in text and "--set KEY=VALUE" in text


@pytest.mark.ray
def test_train_from_a_pipeline_config_with_overrides_and_flags(ray_session, tmp_path, capsys):
    """``lepton-ray train --config FILE --set k=v --flag``: the dataset, model and train sections of
    the pipeline YAML, overridden; one small epoch on the session's Ray instance."""
    from lepton_ray import cli

    store = tmp_path / "store"
    assert cli.main(["data", "prepare", "mnist5k", str(store / "datasets" / "mnist5k")]) == 0
    capsys.readouterr()
    argv = ["train", "--config", "pipelines/configs/mnist.yaml", "--set", f"store={store}"]
    argv += ["--set", "model.kwargs.width=4", "--set", "train.checkpoint_every_steps=null"]
    argv += ["--set", "train.progress_bar=false"]
    code = cli.main([*argv, "--epochs", "1", "--workers", "1", "--batch-size", "500"])
    out = capsys.readouterr().out
    assert code == 0, out
    res = json.loads(out)
    assert res["epochs"] == 1 and res["run"] == f"{store}/runs/mnist-cnn"
    assert "val_accuracy" in json.dumps(res)  # the config's val_split was used


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command_sets_lepton_verbose(where, monkeypatch, tmp_path):
    import os
    import warnings

    from lepton_ray import cli

    # setenv, not delenv: monkeypatch restores a variable it set, but forgets one it found unset
    # and deleted nothing of, so the "1" main sets would leak into every later test's processes.
    monkeypatch.setenv("LEPTON_VERBOSE", "")
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main sets its own
    argv = ["predict", "http://127.0.0.1:9", str(tmp_path / "missing.png")]
    assert cli.main(argv) == 2  # fails before any request: the file is missing
    assert os.environ["LEPTON_VERBOSE"] == ""  # quiet by default
    argv = ["--verbose", *argv] if where == "before" else [*argv[:1], "--verbose", *argv[1:]]
    assert cli.main(argv) == 2
    assert os.environ["LEPTON_VERBOSE"] == "1"  # inherited by a local Ray instance's workers


def test_prepare_names_the_rows_it_skipped_in_one_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from lepton_ray import cli

    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "src" / "train" / cls).mkdir(parents=True)
        for i in range(2):
            img = Image.fromarray(np.full((8, 8), value + i, np.uint8))
            img.save(tmp_path / "src" / "train" / cls / f"{i}.png")
    (tmp_path / "src" / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    src, out = f"imagefolder:{tmp_path / 'src'}", str(tmp_path / "out")
    assert cli.main(["data", "prepare", src, out, "--skip-bad"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lepton-ray: warning: train: 1 unreadable"), err
    assert "broken.png" in err[0]
