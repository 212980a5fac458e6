"""The run layout: names, complete checkpoints, the best pointer, and names that cannot escape."""

from __future__ import annotations

import json

import pytest

from lepton_ray import storage
from lepton_ray.errors import ConfigError, StorageError
from lepton_ray.runs import (
    RunLayout,
    checkpoint_name,
    parse_checkpoint_name,
    serving_home,
    validate_name,
)


def _complete(run: RunLayout, epoch: int, step: int) -> storage.Location:
    loc = run.checkpoint(epoch, step)
    loc.join("model.safetensors").write_bytes(b"w")
    loc.join("manifest.json").write_json({"files": {}})
    return loc


def test_checkpoint_names_round_trip():
    assert checkpoint_name(15, 600) == "checkpoint_epoch0015_step0000600"
    assert parse_checkpoint_name("checkpoint_epoch0015_step0000600") == (15, 600)
    assert parse_checkpoint_name(checkpoint_name(12345, 98765432)) == (12345, 98765432)
    for other in ("best", "checkpoint_epoch15_step600", "checkpoint_epoch0015_step0000600x"):
        assert parse_checkpoint_name(other) is None
    with pytest.raises(ValueError, match="must be >= 0"):
        checkpoint_name(-1, 0)


def test_latest_complete_checkpoint_sorts_by_epoch_then_step(tmp_path):
    run = RunLayout.under(tmp_path / "runs", "r1")
    assert run.latest() is None and run.checkpoints() == []
    _complete(run, 1, 40)
    _complete(run, 2, 80)
    # past epoch 9999 the padded names no longer sort as text; (epoch, step) still does
    _complete(run, 10000, 400000)
    run.checkpoint(10001, 400040).join("model.safetensors").write_bytes(b"no manifest yet")
    run.root.join("best.json").write_json({})
    run.root.join("metrics.jsonl").write_bytes(b"")
    assert [c.name for c in run.checkpoints()] == [
        "checkpoint_epoch0001_step0000040",
        "checkpoint_epoch0002_step0000080",
        "checkpoint_epoch10000_step0400000",
    ]
    assert run.latest().name == "checkpoint_epoch10000_step0400000"
    assert run.latest().uri == f"{tmp_path.resolve()}/runs/r1/checkpoint_epoch10000_step0400000"


def test_paths_of_a_run(tmp_path):
    run = RunLayout.under(str(tmp_path / "runs"), "r1")
    base = f"{tmp_path.resolve()}/runs/r1"
    assert run.uri == base and run.name == "r1"
    assert run.metrics.uri == f"{base}/metrics.jsonl"
    assert run.sample_ids.uri == f"{base}/sample_ids"
    assert run.tensorboard.uri == f"{base}/tensorboard"
    assert run.curves.uri == f"{base}/curves.svg"
    assert run.pipeline.uri == f"{base}/pipeline.json"
    assert run.data("train").uri == f"{base}/data/train"
    assert run.best_pointer.uri == f"{base}/best.json"
    name = checkpoint_name(3, 120)
    assert run.best_copy(name).uri == f"{base}/best/{name}"
    assert run.eval_result(name, "test").uri == f"{base}/eval/{name}-test.json"
    with pytest.raises(ConfigError, match="invalid split name '../x'"):
        run.data("../x")
    with pytest.raises(ConfigError, match="invalid split name"):
        run.eval_result(name, "a/b")


def test_s3_run_paths(s3_server):
    run = RunLayout.under("s3://bucket/runs", "r1", endpoint_url=s3_server)
    assert run.checkpoint(1, 2).uri == "s3://bucket/runs/r1/checkpoint_epoch0001_step0000002"
    assert run.checkpoint(1, 2).is_s3 and run.root.endpoint_url == s3_server


def test_run_of_a_checkpoint(tmp_path):
    run = RunLayout.under(tmp_path, "r1")
    name = checkpoint_name(2, 80)
    for ckpt in (run.checkpoint(2, 80), run.best_copy(name)):
        owner, got = RunLayout.of_checkpoint(ckpt)
        assert owner.uri == run.uri and got == name
    elsewhere = storage.resolve(tmp_path / "exported" / "model-v3")
    owner, got = RunLayout.of_checkpoint(elsewhere)
    assert owner.uri == f"{tmp_path.resolve()}/exported" and got == "model-v3"


def test_best_pointer_written_last_and_the_previous_copy_removed(tmp_path, monkeypatch):
    run = RunLayout.under(tmp_path, "r1")
    assert run.read_best() is None
    first, second = checkpoint_name(1, 40), checkpoint_name(2, 80)
    run.best_copy(first).join("manifest.json").write_json({"files": {}})
    pointer = run.point_best(first, {"metric": "val_accuracy", "value": 0.9, "epoch": 1})
    assert pointer["path"] == f"best/{first}" and pointer["uri"] == run.best_copy(first).uri
    assert run.read_best() == pointer

    run.best_copy(second).join("manifest.json").write_json({"files": {}})
    written = []
    real = storage.Location.write_bytes
    monkeypatch.setattr(
        storage.Location, "write_bytes", lambda self, d: written.append(self.name) or real(self, d)
    )
    run.point_best(second, {"metric": "val_accuracy", "value": 0.95, "epoch": 2})
    assert written == ["best.json"]
    assert run.best_dir.listdir() == [second]
    assert run.read_best()["value"] == 0.95


@pytest.mark.parametrize(
    "record",
    [
        {"path": "../../datasets", "uri": "ignored"},
        {"path": "best/../../datasets"},
        {"path": "best/../checkpoint_epoch0001_step0000040"},
        {"path": "best/checkpoint_epoch0001_step0000040/../../../datasets"},
        {"path": "/etc"},
        {"path": "best/not-a-checkpoint"},
        {"path": 7},
        {"uri": "s3://other-bucket/anything"},
        ["best/x"],
    ],
)
def test_a_best_pointer_cannot_escape_its_folder(record, tmp_path):
    """Nothing outside <run>/best/ is read, returned as the best, or deleted."""
    datasets = tmp_path / "datasets"
    (datasets / "train").mkdir(parents=True)
    (datasets / "train" / "manifest.json").write_text("{}")
    run = RunLayout.under(tmp_path / "runs", "r1")
    run.best_pointer.write_json(record)
    with pytest.raises(StorageError, match="best.json (must point at a checkpoint folder|is not)"):
        run.read_best()
    # A new best overwrites the bad pointer and deletes nothing for it.
    new = checkpoint_name(3, 120)
    run.best_copy(new).join("manifest.json").write_json({"files": {}})
    with pytest.warns(UserWarning, match="ignoring the previous best"):
        run.point_best(new, {"value": 1.0})
    assert (datasets / "train" / "manifest.json").exists()
    assert run.read_best()["uri"] == run.best_copy(new).uri


def test_the_uri_in_a_pointer_is_recomputed_not_trusted(tmp_path):
    run = RunLayout.under(tmp_path, "r1")
    name = checkpoint_name(1, 40)
    run.best_pointer.write_json({"path": f"best/{name}", "uri": "s3://attacker/bucket"})
    assert run.read_best()["uri"] == run.best_copy(name).uri


def test_unparsable_pointer(tmp_path):
    run = RunLayout.under(tmp_path, "r1")
    run.best_pointer.write_bytes(b"{oops")
    with pytest.raises(StorageError, match="best.json is not JSON"):
        run.read_best()


@pytest.mark.parametrize(
    "name",
    ["..", ".", "../x", "a/b", "", ".hidden", "a\\b", "-rf", "x" * 129, "a..b", None, 3, "a b"],
)
def test_unsafe_names_are_refused_in_one_line(name):
    with pytest.raises(ConfigError) as info:
        validate_name("run", name)
    assert str(info.value).startswith(f"invalid run name {name!r}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["mnist", "run-20260101-120000-ab12cd", "a.b_c-1", "X" * 128])
def test_safe_names_pass(name):
    assert validate_name("dataset", name) == name


def test_run_and_app_names_are_validated_before_any_path_is_made(tmp_path):
    with pytest.raises(ConfigError, match="invalid run name '..'"):
        RunLayout.under(tmp_path / "runs", "..")
    with pytest.raises(ConfigError, match="invalid app name '../x'"):
        serving_home(tmp_path, "../x")
    assert serving_home(tmp_path, "mnist").uri == f"{tmp_path.resolve()}/serving/mnist"
    assert not any(tmp_path.iterdir())


def test_pointer_file_is_plain_json(tmp_path):
    run = RunLayout.under(tmp_path, "r1")
    name = checkpoint_name(1, 40)
    run.point_best(name, {"metric": "val_loss", "value": 0.1, "epoch": 1})
    on_disk = json.loads((tmp_path / "r1" / "best.json").read_text())
    assert on_disk == {
        "metric": "val_loss",
        "value": 0.1,
        "epoch": 1,
        "path": f"best/{name}",
        "uri": f"{tmp_path.resolve()}/r1/best/{name}",
    }


def test_committed_step_reads_ray_trains_snapshot(tmp_path):
    import json

    from lepton_ray.runs import RunLayout
    from lepton_ray.storage import resolve

    run = RunLayout(resolve(str(tmp_path)))
    assert run.committed_step() == 0  # no checkpoint registered yet
    snapshot = {"latest_checkpoint_result": {"metrics": {"step": 60}}}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert run.committed_step() == 60
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{not json")
    assert run.committed_step(settle_s=0.05) == 0  # never settles: no step to report


def test_committed_step_is_never_0_while_ray_rewrites_the_snapshot(tmp_path):
    """Ray Train rewrites its snapshot in place (truncate, then write): a read in between must
    wait for the write, not report that no checkpoint is committed (a chaos run's killer once read
    step 0 there and misplaced its kill)."""
    import json
    import threading
    import time

    from lepton_ray.runs import RunLayout
    from lepton_ray.storage import resolve

    path = tmp_path / "checkpoint_manager_snapshot.json"
    body = json.dumps({"latest_checkpoint_result": {"metrics": {"step": 60}}}).encode()
    path.write_bytes(body)
    stop = threading.Event()

    def rewrite() -> None:  # about half the time whole, as between two of Ray's reports
        while not stop.wait(0.005):
            with open(path, "wb") as f:  # truncated here, as Ray's open_output_stream does
                f.flush()
                time.sleep(0.003)
                f.write(body[:10])  # and for a moment cut short
                f.flush()
                time.sleep(0.002)
                f.write(body[10:])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        run = RunLayout(resolve(str(tmp_path)))
        steps, until = [], time.monotonic() + 0.5
        while time.monotonic() < until:  # reads spread over ~50 rewrites
            steps.append(run.committed_step())
            time.sleep(0.001)
    finally:
        stop.set()
        writer.join()
    assert set(steps) == {60}, sorted(set(steps))
