"""A run's progress (its board, arithmetic and lines) and its records."""

from __future__ import annotations

import time

import pytest

from lepton_ray.train.progress import eta_seconds, group_note, slowest_worker, status_line


def test_slowest_worker_is_named_only_when_it_lags():
    even = [{"rank": r, "fwd_s": 1.0, "data_wait_s": 0.1} for r in range(4)]
    assert slowest_worker(even) is None
    lagging = even[:2] + [{"rank": 2, "fwd_s": 1.0, "data_wait_s": 1.5}] + even[3:]
    assert slowest_worker(lagging) == 2
    assert slowest_worker(even[:1]) is None  # nobody to compare with


def test_eta():
    assert eta_seconds(10, 110, 5.0) == pytest.approx(50.0)
    assert eta_seconds(0, 100, 5.0) is None
    assert eta_seconds(100, 100, 5.0) == 0


@pytest.mark.ray
def test_the_drivers_progress_board_summarises_each_fits_workers(ray_session):
    import ray

    from lepton_ray.train.progress import driver_board

    board = driver_board("fit-a", 100)
    assert ray.get(board.summary.remote("fit-a")) == {}
    for rank, wait in ((0, 0.1), (1, 0.1), (2, 3.0)):
        board.update.remote(
            "fit-a",
            rank,
            {
                "epoch": 1,
                "step": 10,
                "world_size": 3,
                "samples_per_second": 50.0,
                "rank": rank,
                "fwd_s": 1.0,
                "data_wait_s": wait,
                "steps_since_start": 10,
                "group": "a",
            },
        )
    s = ray.get(board.summary.remote("fit-a"))
    assert (
        s["step"] == 10
        and s["total_steps"] == 100
        and s["slowest_worker"] == 2
        and s["eta_s"] is not None
        and s["notes"] == []
    )
    # a new worker group of 2 (each WorkerProgress has its own token) resumes from step 8
    restart = {"epoch": 1, "step": 12, "world_size": 2, "steps_since_start": 4, "group": "b"}
    board.update.remote("fit-a", 0, restart)
    board.update.remote("fit-a", 0, restart | {"step": 14, "steps_since_start": 6})  # no note
    assert ray.get(board.summary.remote("fit-a"))["notes"] == [
        "worker group resized: 3 -> 2 workers, resumed from the checkpoint at step 8"
    ]
    # The driver's next fit is served by the same board (no process of its own), apart from the
    # first; a worker of an ended fit still sending is dropped.
    again = driver_board("fit-b", 50)
    assert again._actor_id == board._actor_id
    assert ray.get(again.summary.remote("fit-b")) == {}
    board.end.remote("fit-a")
    board.update.remote("fit-a", 0, restart | {"step": 16})
    assert ray.get(board.summary.remote("fit-a")) == {}
    again.update.remote("fit-b", 0, restart | {"step": 3, "steps_since_start": 3})
    assert ray.get(again.summary.remote("fit-b"))["total_steps"] == 50
    # A board whose process is gone is replaced at the next fit.
    ray.kill(board)  # asynchronous: a call made just after may still be answered
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(300):
            ray.get(board.summary.remote("fit-b"), timeout=30)
            time.sleep(0.1)
    fresh = driver_board("fit-c", 10)
    assert fresh._actor_id != board._actor_id
    assert ray.get(fresh.summary.remote("fit-c"), timeout=30) == {}


@pytest.mark.ray
def test_the_drivers_board_outlives_the_handles_its_fits_let_go(ray_session):
    """A Ray actor lives while its first handle does: the driver keeps that one between fits."""
    import gc

    import ray

    from lepton_ray.train.progress import driver_board

    ids = []
    for fit in ("x", "y", "z"):
        board = driver_board(fit, 5)
        ids.append(board._actor_id)
        assert ray.get(board.summary.remote(fit), timeout=30) == {}
        board.end.remote(fit)
        del board
        gc.collect()
        time.sleep(1)  # an actor whose handles are all gone is stopped by then
    assert len(set(ids)) == 1


def test_group_note_names_a_resume_a_restart_and_a_resize():
    first = {"step": 10, "steps_since_start": 10, "world_size": 2}
    assert group_note(None, first) is None  # a fresh run says nothing
    resumed = {"step": 130, "steps_since_start": 10, "world_size": 2}
    assert group_note(None, resumed) == "resumed from the checkpoint at step 120"
    assert group_note(2, resumed) == (
        "worker group restarted after a failure (2 workers), resumed from the checkpoint at step 120"
    )
    resized = resumed | {"world_size": 3}
    assert group_note(2, resized) == (
        "worker group resized: 2 -> 3 workers, resumed from the checkpoint at step 120"
    )
    assert group_note(2, first).endswith("resumed from the start (no checkpoint yet)")
    assert group_note(2, resumed | {"world_size": 1}).startswith(
        "worker group resized: 2 -> 1 worker,"
    )


def test_status_line():
    s = {"epoch": 2, "step": 50, "total_steps": 200, "samples_per_second": 412.4, "eta_s": 41.2}
    assert status_line(s | {"world_size": 2}, loss=0.31234) == (
        "[train] epoch 2  step 50/200 (25%)  412 samples/s  loss 0.3123  eta 41s  2 workers"
    )


def test_plain_progress_is_a_line_now_and_then_not_a_redrawn_bar(capsys):
    from lepton_ray.train.progress import _Lines

    lines = _Lines(every_s=3600)
    s = {"epoch": 1, "step": 4, "total_steps": 8, "world_size": 2, "train_loss": None}
    lines.show(s, final=False)  # not due yet: nothing
    lines.note("worker 1 is lagging")
    lines.show(s | {"step": 8, "train_loss": 0.5}, final=True)
    lines.show(s | {"step": 8, "train_loss": 0.5}, final=True)  # the same line is not repeated
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [
        "[train] worker 1 is lagging",
        "[train] epoch 1  step 8/8 (100%)  loss 0.5000  2 workers",
    ]


def test_run_observer_keeps_one_event_file_of_every_epoch_and_no_temp_folder(tmp_path, monkeypatch):
    """The TensorBoard events are rewritten whole at each epoch end: a resumed run (its epoch 2
    again) replaces epoch 2 instead of adding a second file, and the controller keeps no folder."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lepton_ray.train.observe import TB_EVENTS, RunObserver

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    run = tmp_path / "run"
    run.mkdir()
    observer = RunObserver(str(run), None)
    for epoch, loss in ((1, 2.0), (2, 1.5), (2, 1.25), (3, 1.0)):  # the second epoch 2: a resume
        observer.after_report(
            None,
            [{"epoch_end": True, "epoch": epoch, "train_loss": loss, "train_accuracy": 0.5}],
            None,
        )
    assert [p.name for p in (run / "tensorboard").iterdir()] == [TB_EVENTS]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
        (1, 2.0),
        (2, 1.25),
        (3, 1.0),
    ]
    assert list(scratch.iterdir()) == []
