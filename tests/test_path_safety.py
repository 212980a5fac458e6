"""Names that become folders cannot escape them: ``--smoke-test --set train.run_name=..`` once
deleted a whole store, datasets included. Each case runs the pipeline as a user would and checks the
store is intact. No Ray: every one is refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_train(
    store: Path, *sets: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "pipelines.train",
        "--config",
        "pipelines/configs/mnist.yaml",
        "--smoke-test",
        "--set",
        f"store={store}",
        *(a for s in sets for a in ("--set", s)),
    ]
    return subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store holding a dataset file and a run, as a user's would."""
    (tmp_path / "store" / "datasets" / "mnist5k" / "train").mkdir(parents=True)
    (tmp_path / "store" / "datasets" / "mnist5k" / "train" / "manifest.json").write_text("{}")
    (tmp_path / "store" / "runs" / "keep").mkdir(parents=True)
    return tmp_path / "store"


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["..", "../..", "a/../..", "/tmp", ".hidden", "x" * 200])
def test_a_run_name_that_would_leave_the_runs_folder_is_refused(store, name):
    before = files(store.parent)
    out = run_train(store, f"train.run_name={name}")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "run_name" in out.stderr or "run name" in out.stderr, out.stderr
    assert files(store.parent) == before


def test_a_run_name_from_lepton_ray_submit_is_checked_too(store):
    before = files(store.parent)
    out = run_train(store, "train.run_name=null", env={"LEPTON_RUN_NAME": ".."})
    assert out.returncode == 2, out.stderr
    assert "invalid run name '..'" in out.stderr and out.stderr.strip().count("\n") == 0
    assert files(store.parent) == before
