"""Progress arithmetic of the run observer: pure tests."""

from __future__ import annotations

import pytest

from lepton_ray.train.observe import eta_seconds, slowest_worker


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
def test_progress_board_summarises_the_workers(ray_session):
    import ray

    from lepton_ray.train.observe import ProgressBoard

    board = ProgressBoard.remote(100)
    assert ray.get(board.summary.remote()) == {}
    for rank, wait in ((0, 0.1), (1, 0.1), (2, 3.0)):
        board.update.remote(
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
            },
        )
    s = ray.get(board.summary.remote())
    assert (
        s["step"] == 10
        and s["total_steps"] == 100
        and s["slowest_worker"] == 2
        and s["eta_s"] is not None
    )
