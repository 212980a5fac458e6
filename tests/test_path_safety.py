"""Names that become folders cannot escape them: ``--smoke-test --set train.run_name=..`` once
deleted a whole store, datasets included. Each case runs the pipeline's entry point with a user's
arguments and checks the store is intact; one runs it as a user does (``python -m``), the rest call
the same ``main`` in this process, which saves an interpreter start (~5 s of imports) each. No Ray:
every one is refused before anything starts (a start here fails the test instead)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def train_args(store: Path, *sets: str) -> list[str]:
    return [
        "--config",
        "pipelines/configs/mnist.yaml",
        "--smoke-test",
        "--set",
        f"store={store}",
        *(a for s in sets for a in ("--set", s)),
    ]


@pytest.fixture
def run_train(monkeypatch, capsys):
    """``pipelines.train.main`` in this process: (exit code, stderr). Ray is never started."""
    import lepton_ray.runtime
    from pipelines import train

    def no_ray(*args, **kwargs):
        raise AssertionError("the pipeline went on to start Ray")

    monkeypatch.setattr(lepton_ray.runtime, "ensure_ray", no_ray)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main sets it
    monkeypatch.chdir(ROOT)

    def run(store: Path, *sets: str) -> tuple[int, str]:
        code = train.main(train_args(store, *sets))
        return code, capsys.readouterr().err

    return run


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store holding a dataset file and a run, as a user's would."""
    (tmp_path / "store" / "datasets" / "mnist5k" / "train").mkdir(parents=True)
    (tmp_path / "store" / "datasets" / "mnist5k" / "train" / "manifest.json").write_text("{}")
    (tmp_path / "store" / "runs" / "keep").mkdir(parents=True)
    return tmp_path / "store"


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_the_command_a_user_types_exits_2_and_keeps_the_store(store):
    before = files(store.parent)
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.train", *train_args(store, "train.run_name=..")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "run_name" in out.stderr or "run name" in out.stderr, out.stderr
    assert files(store.parent) == before


@pytest.mark.parametrize("name", ["..", "../..", "a/../..", "/tmp", ".hidden", "x" * 200])
def test_a_run_name_that_would_leave_the_runs_folder_is_refused(store, run_train, name):
    before = files(store.parent)
    code, err = run_train(store, f"train.run_name={name}")
    assert code == 2, err
    assert err.strip().count("\n") == 0, err
    assert "run_name" in err or "run name" in err, err
    assert files(store.parent) == before


def test_a_run_name_from_lepton_ray_submit_is_checked_too(store, run_train, monkeypatch):
    before = files(store.parent)
    monkeypatch.setenv("LEPTON_RUN_NAME", "..")
    code, err = run_train(store, "train.run_name=null")
    assert code == 2, err
    assert "invalid run name '..'" in err and err.strip().count("\n") == 0
    assert files(store.parent) == before
