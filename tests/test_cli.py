"""The CLI: instant help, exit codes and one-line errors on stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_serve_client import endpoint  # noqa: F401 - a fixture


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


# --- click data and the DLRM from the command line -----------------------------------------------
def test_inspect_describes_click_rows_as_features_not_pixels(tmp_path, capsys):
    from lepton_ray import cli
    from lepton_ray.data import open_dataset

    dest = str(tmp_path / "ctr")
    source = "synthetic-ctr:rows=300,tables=2,cardinality=5/7,dense=3,seed=1"
    assert cli.main(["data", "prepare", source, dest]) == 0
    prepared = json.loads(capsys.readouterr().out)
    assert prepared["train"]["rows"] == 300 and prepared["test"]["rows"] == 30
    assert prepared["test"]["kind"] == "ctr" and 0.5 < prepared["test"]["planted_auc"] <= 1
    assert cli.main(["data", "inspect", f"{dest}/train"]) == 0
    info = json.loads(capsys.readouterr().out)
    manifest = open_dataset(f"{dest}/train").manifest
    assert info["kind"] == "ctr" and (info["dense"], info["sparse"]) == (3, 2)
    assert info["cardinalities"] == [5, 7] and info["planted_auc"] == manifest["planted_auc"]
    assert info["click_rate"] == round(manifest["class_counts"][1] / 300, 4)
    assert info["schema"]["image"].endswith(
        ": 3 float32 dense features, then 2 int32 ids (one a table), little-endian"
    )
    assert info["schema"]["label"] == "int64 (1: clicked, 0: not)"
    assert cli.main(["data", "inspect", f"{dest}/train", "--grid", str(tmp_path / "g.png")]) == 2
    assert "this dataset holds click rows" in capsys.readouterr().err


def test_train_takes_a_strategy_flag():
    from lepton_ray import cli

    args = cli.build_parser().parse_args(["train", "--data", "x", "--strategy", "fsdp"])
    assert cli.train_config(args).train.strategy == "fsdp"
    r = run_cli("train", "--data", "x", "--strategy", "zero3")
    assert r.returncode == 2 and "--strategy: invalid choice: 'zero3'" in r.stderr


def test_predict_sends_features_inline_or_from_a_file(endpoint, tmp_path, capsys):  # noqa: F811
    from lepton_ray import cli

    url, script, seen = endpoint  # a scripted HTTP server on loopback (tests/test_serve_client.py)
    answer = json.dumps({"predictions": [{"click_probability": 0.25}]}).encode()
    script += [(200, {"Content-Type": "application/json"}, answer)] * 2
    rows = {"dense": [[0.5, -1.0, 0.0]], "sparse": [[3, 6]]}
    assert cli.main(["predict", url, "--features", json.dumps(rows)]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["click_probability"] == 0.25
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert cli.main(["predict", url, "--features", f"@{tmp_path / 'rows.json'}"]) == 0
    assert [json.loads(body) for body in seen] == [{"features": rows}] * 2


def test_predict_sends_texts(endpoint, capsys):  # noqa: F811
    from lepton_ray import cli

    url, script, seen = endpoint
    answer = {"predictions": [{"class": "code"}, {"class": "reference"}]}
    script.append((200, {"Content-Type": "application/json"}, json.dumps(answer).encode()))
    assert cli.main(["predict", url, "--text", "def f(): pass", "--text", "for_stmt ::= ..."]) == 0
    assert json.loads(capsys.readouterr().out) == answer
    assert json.loads(seen[-1]) == {"texts": ["def f(): pass", "for_stmt ::= ..."]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "nothing to predict: give image files, --features JSON or --text TEXT"),
        (
            ("a.png", "--features", "{}"),
            "give one of image files, --features or --text, not image files and --features",
        ),
        (("--text", "a", "--features", "{}"), "not --features and --text"),
        (("--features", "{'dense': 1}"), "--features is not valid JSON: Expecting property name"),
        (("--features", "[[1, 2]]"), "--features must be a JSON object, got list"),
        (("--features", "@/nonexistent/rows.json"), "--features: cannot read /nonexistent/rows"),
    ],
)
def test_predict_refuses_bad_features_in_one_line_before_any_request(args, message, capsys):
    from lepton_ray import cli

    assert cli.main(["predict", "http://127.0.0.1:9", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
