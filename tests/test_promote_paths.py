"""promote and evaluate treat names and pointers as data: an app name or a best.json cannot send
them outside their folders, and a checkpoint is read once (issue 19, item 2; issue 15, item 3).

No Ray here: nothing is deployed and no evaluation gate is set, unless a test says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lepton_ray import checkpoint, storage
from lepton_ray.models import build_model, spec_of
from lepton_ray.runs import RunLayout, checkpoint_name

MNIST = str(Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "mnist.yaml")
NAME = checkpoint_name(1, 10)


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its content (to show nothing changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path) -> Path:
    """A store with a dataset folder (the victim) and a run with one checkpoint and its best copy."""
    root = tmp_path / "store"
    victim = root / "datasets" / "mnist5k" / "train"
    victim.mkdir(parents=True)
    (victim / "manifest.json").write_text('{"precious": true}')
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, width=4)
    meta = {
        "model": spec_of(model),
        "data": {"shape": [28, 28, 1], "mean": [0.1], "std": [0.3], "classes": list("0123456789")},
        "metrics": {"epoch": 1, "val_accuracy": 0.5},
        "run": {"name": "r1"},
    }
    local = checkpoint.write_local(tmp_path / "local", model, meta)
    run = RunLayout.under(storage.resolve(root / "runs"), "r1")
    checkpoint.publish(local, run.checkpoint(1, 10))
    checkpoint.publish(local, run.best_copy(NAME))
    run.point_best(NAME, {"metric": "val_accuracy", "value": 0.5, "epoch": 1})
    return root


def promote(store: Path, capsys, *sets: str) -> tuple[int, dict, str]:
    from pipelines import promote as pipeline

    args = ["--config", MNIST, "--set", f"store={store}", "--set", "train.run_name=r1"]
    args += ["--set", "promote.min_accuracy=null", "--set", "promote.deploy=false"]
    for s in sets:
        args += ["--set", s]
    code = pipeline.main(args)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def test_promote_follows_best_json_and_records_the_previous_pointer(store, capsys):
    code, summary, _ = promote(store, capsys)
    assert code == 0, summary
    best = RunLayout.under(storage.resolve(store / "runs"), "r1").best_copy(NAME)
    assert summary["checkpoint"] == best.uri and summary["previous"] is None
    assert summary["pointer"] == f"{store.resolve()}/serving/mnist/current.json"
    code, summary, _ = promote(store, capsys, "promote.checkpoint=last")
    assert code == 0 and summary["previous"] == best.uri
    assert summary["checkpoint"].endswith(f"/runs/r1/{NAME}")


@pytest.mark.parametrize(
    "pointer",
    [
        {"path": "../../datasets", "uri": "ignored"},
        {"path": "best/../../datasets/mnist5k/train"},
        {"path": f"best/{NAME}", "uri": "/elsewhere"},  # a fine path: the uri is recomputed
    ],
)
def test_a_best_json_pointing_outside_is_refused(pointer, store, capsys, monkeypatch):
    (store / "runs" / "r1" / "best.json").write_text(json.dumps(pointer))
    before = _tree(store / "datasets")
    read = []
    real = storage.Location.read_bytes
    monkeypatch.setattr(
        storage.Location, "read_bytes", lambda self: read.append(self.uri) or real(self)
    )
    code, summary, err = promote(store, capsys)
    assert _tree(store / "datasets") == before
    assert not any("/datasets" in uri for uri in read)
    if pointer.get("uri") == "/elsewhere":
        assert code == 0 and summary["checkpoint"].endswith(f"/runs/r1/best/{NAME}")
        return
    assert code == 2 and not (store / "serving").exists()
    assert err.count("\n") == 1 and "best.json must point at a checkpoint folder" in err


@pytest.mark.parametrize("app", ["../x", "..", "a/b", ".hidden"])
def test_an_unsafe_app_name_is_refused_before_anything_is_read_or_written(app, store, capsys):
    before = _tree(store.parent)
    code, _, err = promote(store, capsys, f"promote.serve.name={app}")
    assert code == 2 and err.count("\n") == 1 and repr(app) in err
    assert _tree(store.parent) == before


def test_a_current_pointer_that_is_not_a_pointer_is_refused(store, capsys):
    home = store / "serving" / "mnist"
    home.mkdir(parents=True)
    (home / "current.json").write_text('["../../datasets"]')
    code, _, err = promote(store, capsys)
    assert code == 2 and "current.json is not a pointer" in err
    assert (home / "current.json").read_text() == '["../../datasets"]'


def test_an_untrusted_checkpoint_is_not_promoted(store, tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = store / "runs" / "r1" / checkpoint_name(2, 20)
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(
        (store / "runs" / "r1" / NAME / "model.safetensors").read_bytes()
    )
    spec = {"class": "os:system", "kwargs": {"command": f"touch {marker}"}}
    (bad / "lepton.json").write_text(json.dumps({"model": spec}))
    checkpoint.publish(bad, storage.resolve(bad))
    code, _, err = promote(store, capsys, "promote.checkpoint=last")
    assert code == 2 and "refusing model class 'os:system'" in err
    assert not marker.exists() and not (store / "serving").exists()


def test_promote_reads_each_checkpoint_file_once(store, capsys, monkeypatch):
    """Verified, evaluated against the gate and recorded from one read of each file."""
    from lepton_ray.data import prepare

    prepare("synthetic:40:28x28x1", str(store / "datasets" / "synthetic"))
    read = []
    real = storage.Location.read_bytes
    monkeypatch.setattr(
        storage.Location, "read_bytes", lambda self: read.append(self.uri) or real(self)
    )
    dataset = f"dataset.uri={store / 'datasets' / 'synthetic'}"
    code, summary, err = promote(store, capsys, dataset, "promote.min_accuracy=0.0")
    assert code == 0, err
    assert summary["evaluation"]["rows"] == 4
    ckpt = summary["checkpoint"]
    for name in (checkpoint.MANIFEST, checkpoint.META, checkpoint.WEIGHTS):
        assert read.count(f"{ckpt}/{name}") == 1, (name, read)


@pytest.mark.parametrize("which", ["best", "last"])
def test_evaluate_writes_where_the_run_layout_says(which, store, capsys):
    """The result lands in <run>/eval/<checkpoint>-<split>.json, for the best copy as for a
    checkpoint of the run; the dataset folder is only read."""
    from lepton_ray.data import prepare
    from pipelines import evaluate as pipeline

    prepare("synthetic:40:28x28x1", str(store / "datasets" / "synthetic"))
    args = ["--config", MNIST, "--set", f"store={store}", "--set", "train.run_name=r1"]
    args += ["--set", f"dataset.uri={store / 'datasets' / 'synthetic'}"]
    args += ["--set", f"evaluate.checkpoint={which}"]
    assert pipeline.main(args) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["written_to"] == f"{store.resolve()}/runs/r1/eval/{NAME}-test.json"
    assert out["rows"] == 4 and os.path.exists(out["written_to"])
    assert ("/best/" in out["checkpoint"]) == (which == "best")


def test_evaluate_refuses_an_unsafe_split(store, capsys):
    from pipelines import evaluate as pipeline

    args = ["--config", MNIST, "--set", f"store={store}", "--set", "train.run_name=r1"]
    args += ["--set", "evaluate.split=../../x"]
    before = _tree(store.parent)
    assert pipeline.main(args) == 2
    err = capsys.readouterr().err  # refused by the config or by the run layout: one line
    assert err.count("\n") == 1 and "'../../x'" in err
    assert _tree(store.parent) == before
