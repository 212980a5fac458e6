"""benchmarks/_usage.py: the sampler that says whether a benchmark side's step thread or its GPU
was the busy one. A real sampler process reading /proc, and its summary of known samples."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from benchmarks._usage import Usage, _shares, kind_of, summarise, thread_state
from tests.spin import spin


def _sample(t, procs, gpu=None, dt=1.0):
    return {"t": t, "dt": dt, "procs": procs, "gpu": gpu}


def test_kinds_are_the_driver_rays_titles_and_rays_daemons_and_nothing_else():
    assert kind_of("python -m benchmarks.gpu_train", 7, driver=7) == "driver"
    assert kind_of("ray::RayTrainWorker.run_train_fn", 8, driver=7) == "ray::RayTrainWorker"
    assert kind_of("ray::IDLE", 9, driver=7) == "ray::IDLE"
    assert kind_of("/x/site-packages/ray/core/src/ray/raylet/raylet --a", 10, 7) == "ray (daemons)"
    assert kind_of("/usr/sbin/sshd -D", 11, driver=7) is None


def test_the_step_thread_is_the_busiest_thread_plus_autograd_in_the_busiest_focus_process():
    worker = {
        "pid": 2,
        "kind": "ray::RayTrainWorker",
        "threads": [["ray::RayTrainW", 0.6], ["pt_autograd_0", 0.35], ["ray::RayTrainW", 0.05]],
    }
    idle_worker = {"pid": 3, "kind": "ray::RayTrainWorker", "threads": [["ray::RayTrainW", 0.1]]}
    reader = {"pid": 4, "kind": "ray::ReadParquet->MapBatches", "threads": [["ray::Read", 1.5]]}
    samples = [
        _sample(9.0, [worker, reader], gpu=[99.0]),  # before the window
        _sample(11.0, [worker, idle_worker, reader], gpu=[60.0]),
        _sample(12.0, [worker], gpu=[70.0]),
        _sample(14.0, [worker], gpu=[10.0]),  # after it
    ]
    got = summarise(samples, start=10.0, end=12.0, focus="ray::RayTrainWorker")
    assert got["samples"] == 2
    assert got["step_thread_cores"] == pytest.approx(0.95)
    assert got["other_thread_cores"] == pytest.approx(0.05)
    assert got["gpu_util_pct"] == 65.0
    assert got["cores_by_kind"] == {
        "ray::RayTrainWorker": 1.05,
        "ray::ReadParquet->MapBatches": 0.75,
    }
    assert summarise(samples, 20.0, 30.0, "driver") == {"samples": 0}
    assert "gpu_util_pct" not in summarise([_sample(11.0, [worker])], 10.0, 12.0, "driver")


def test_a_real_sampler_agrees_with_a_threads_own_cpu_clock_busy_or_idle():
    # What the thread got of a core depends on what else runs on the machine (Ray's daemons took
    # one of 2 cores in a CI run); the sampler must agree with the thread's own clock either way.
    with Usage(interval=0.25) as usage:
        time.sleep(0.6)  # the sampler's first reading is its baseline
        start, cpu0 = time.time(), time.thread_time()
        while time.time() - start < 3.0:
            sum(range(1000))
        busy, got = (start, time.time()), (time.thread_time() - cpu0) / (time.time() - start)
        idle = (time.time(), time.time() + 2.0)
        time.sleep(2.3)
    assert not os.path.exists(usage.path)  # the samples kept, the file gone
    working = usage.window(*busy, focus="driver")
    resting = usage.window(*idle, focus="driver")
    assert working["samples"] >= 8 and resting["samples"] >= 5, (working, resting)
    assert got > 0.05, got  # the loop ran at all
    assert working["step_thread_cores"] == pytest.approx(got, abs=0.2), (got, working)
    assert resting["step_thread_cores"] < 0.15, resting
    # the whole host was at least as busy as the thread, and nothing was stolen beyond its CPUs
    assert working["host_busy_cores"] >= working["step_thread_cores"] - 0.2, working
    assert 0.0 <= working["steal_cores"] <= os.cpu_count(), working


def test_a_fits_window_is_its_epochs_after_the_first_ending_where_its_teardown_began():
    from benchmarks._gpu import trainer_window

    res = {
        "history": [{"epoch_time_s": 9.0}, {"epoch_time_s": 4.0}, {"epoch_time_s": 5.0}],
        "startup_s": {"teardown": 1.5},
    }
    assert trainer_window(res, returned=100.0) == (89.5, 98.5, "ray::RayTrainWorker")


def test_the_usage_table_is_rendered_for_the_sides_that_have_samples_only():
    from benchmarks._gpu_report import usage_table

    u = {
        "samples": 12,
        "step_thread_cores": 0.97,
        "other_thread_cores": 0.05,
        "gpu_util_pct": 81.0,
        "cores_by_kind": {"ray::RayTrainWorker": 1.02, "ray::ReadParquet": 0.6},
    }
    r = {"plain_uint8": {"samples_per_s": 1.0}, "trainer_ring": {"usage": u}}
    text = "\n".join(usage_table(r))
    assert "| trainer_ring | 12 | 0.97 | 0.05 | 81% | ray::ReadParquet 0.60 |" in text
    assert "plain_uint8 |" not in text
    assert usage_table({"trainer_ring": {"usage": {"samples": 0}}}) == []


def test_the_machines_state_is_the_mean_clock_the_share_held_down_and_the_hosts_cpus():
    samples = [
        {**_sample(11.0, [], gpu=[90.0]), "sm_mhz": [1980.0], "slowdown": [False]},
        {**_sample(12.0, [], gpu=[95.0]), "sm_mhz": [1500.0], "slowdown": [True]},
    ]
    samples[0].update(host_busy=3.0, steal=0.5)
    samples[1].update(host_busy=5.0, steal=1.5)
    got = summarise(samples, 10.0, 12.0, "driver")
    assert got["gpu_sm_mhz"] == 1740
    assert got["gpu_slowdown_share"] == 0.5
    assert (got["host_busy_cores"], got["steal_cores"]) == (4.0, 1.0)
    older = summarise([_sample(11.0, [], gpu=[90.0])], 10.0, 12.0, "driver")  # a sampler before
    assert not {"gpu_sm_mhz", "gpu_slowdown_share", "host_busy_cores"} & older.keys()


def test_a_driver_that_does_not_know_the_reasons_field_is_asked_the_older_name(
    tmp_path, monkeypatch
):
    # nvidia-smi before driver 535 knows clocks_throttle_reasons, not clocks_event_reasons: it
    # refuses the whole query, and the sampler must still read the utilisation and the clock.
    from benchmarks import _usage

    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *clocks_event_reasons*) echo "Field is not a valid field" >&2; exit 2;; esac\n'
        'case "$*" in *clocks_throttle_reasons*) echo "97, 1755, 0x0000000000000004"; exit 0;; esac\n'
        'echo "97, 1755"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(_usage, "_REASON_FIELDS", list(_usage._REASON_FIELDS))
    # this sample without the reasons; the next asks by the older name, and keeps it
    assert _usage._gpu_state() == {"gpu": [97.0], "sm_mhz": [1755.0], "slowdown": []}
    assert _usage._gpu_state() == {"gpu": [97.0], "sm_mhz": [1755.0], "slowdown": [True]}
    assert _usage._REASON_FIELDS[0] == "clocks_throttle_reasons.active"
    fake.write_text("#!/bin/sh\nexit 9\n")  # nvidia-smi failing once: no name is dropped
    assert _usage._gpu_state() == {"gpu": None, "sm_mhz": [], "slowdown": []}
    assert _usage._REASON_FIELDS[0] == "clocks_throttle_reasons.active"
    fake.write_text('#!/bin/sh\ncase "$*" in *reasons*) exit 2;; esac\necho "40, 900"\n')
    assert _usage._gpu_state() == {"gpu": [40.0], "sm_mhz": [900.0], "slowdown": []}
    assert _usage._REASON_FIELDS == [None]  # a driver that knows neither name
    assert _usage._gpu_state() == {"gpu": [40.0], "sm_mhz": [900.0], "slowdown": []}


def test_the_machines_state_is_rendered_where_the_sampler_read_it():
    from benchmarks._gpu_report import usage_table

    base = {"samples": 3, "step_thread_cores": 0.9, "other_thread_cores": 0.1, "cores_by_kind": {}}
    u = {**base, "gpu_util_pct": 70.0, "gpu_sm_mhz": 1500, "gpu_slowdown_share": 0.25}
    u.update(host_busy_cores=4.5, steal_cores=1.25)
    text = "\n".join(usage_table({"trainer_ring": {"usage": u}}))
    assert (
        "| trainer_ring | 3 | 0.90 | 0.10 | 70% | – | 1,500 MHz (held down 25%) | 4.50 / 1.25 |"
        in text
    )
    assert "GPU SM clock" not in "\n".join(usage_table({"trainer_ring": {"usage": base}}))


def test_the_step_threads_states_are_those_of_the_busiest_focus_process_as_shares():
    worker = {"pid": 2, "kind": "ray::RayTrainWorker", "threads": [["ray::RayTrainW", 0.9]]}
    idle = {"pid": 3, "kind": "ray::RayTrainWorker", "threads": [["ray::RayTrainW", 0.1]]}
    states = {
        "2": {"step": {"running": 60, "futex_do_wait": 30}, "autograd": {"futex_do_wait": 8}},
        "3": {"step": {"ep_poll": 100}},  # not the busiest: not counted
    }
    s1 = _sample(11.0, [worker, idle]) | {"states": states}
    s2 = _sample(12.0, [worker]) | {"states": {"2": {"step": {"D:folio_wait_bit": 10}}}}
    got = summarise([s1, s2], 10.0, 12.0, "ray::RayTrainWorker")["step_thread_states"]
    assert got == {
        "autograd": {"futex_do_wait": 1.0},
        "step": {"running": 0.6, "futex_do_wait": 0.3, "D:folio_wait_bit": 0.1},
    }
    polls = summarise([s1, s2], 10.0, 12.0, "ray::RayTrainWorker")["step_thread_polls"]
    assert polls == {"autograd": 8, "step": 100}
    assert "step_thread_states" not in summarise([_sample(11.0, [worker])], 10.0, 12.0, "driver")
    many = {f"w{i}": 10 - i for i in range(8)}  # the six most frequent, the rest as other
    assert list(_shares(many)) == ["w0", "w1", "w2", "w3", "w4", "w5", "other"]
    assert sum(_shares(many).values()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")
def test_a_real_sampler_sees_the_step_thread_running_or_asleep():
    # The busiest thread spins 20 ms and sleeps 20 ms in turn: about half of the polls find it
    # running, the rest asleep in the kernel; this (main) thread waits without using a CPU.
    stop = threading.Event()

    def duty():
        while not stop.is_set():
            spin(0.02)
            time.sleep(0.02)

    with Usage(interval=0.5) as usage:
        worker = threading.Thread(target=duty)
        worker.start()
        time.sleep(1.2)  # the sampler's baseline, then an interval that picks the thread out
        start = time.time()
        stop.wait(3.0)
        end = time.time()
        stop.set()
        worker.join()
    got = usage.window(start, end, focus="driver")["step_thread_states"]["step"]
    asleep = sum(v for k, v in got.items() if k != "running")
    assert 0.2 <= got.get("running", 0.0) <= 0.85, got
    assert asleep >= 0.15, got
    assert thread_state(os.getpid(), str(threading.get_native_id())) == "running"


def _burn_without_the_gil(seconds: float) -> None:
    """Busy on a CPU for ``seconds`` with the GIL released (hashlib drops it for large inputs)."""
    data, end = b"\0" * (1 << 20), time.perf_counter() + seconds
    while time.perf_counter() < end:
        hashlib.sha256(data).digest()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")
def test_while_the_step_thread_waits_on_a_lock_the_sampler_names_the_futex_and_who_ran():
    # Two threads take turns: each burns 20 ms of a CPU (without the GIL) while the other waits
    # on its semaphore, an untimed futex. Whichever is the step thread, in the polls where it
    # sleeps it sleeps on a futex without a timeout, and the other thread runs.
    stop = threading.Event()
    turn = {"a": threading.Semaphore(1), "b": threading.Semaphore(0)}
    tids: dict[str, str] = {}

    def player(me: str, other: str) -> None:
        tids[me] = str(threading.get_native_id())
        while True:
            turn[me].acquire()  # no timeout: a timed wait would read as the GIL's kind
            if stop.is_set():
                turn[other].release()  # the other wakes, sees stop and ends too
                return
            _burn_without_the_gil(0.02)
            turn[other].release()

    threads = [threading.Thread(target=player, args=p) for p in (("a", "b"), ("b", "a"))]
    with Usage(interval=0.5) as usage:
        for t in threads:
            t.start()
        time.sleep(1.2)
        start = time.time()
        stop.wait(3.0)
        end = time.time()
        stop.set()
        for t in threads:
            t.join()
    got = usage.window(start, end, focus="driver")["step_thread_states"]
    futexes = got.get("step_futex", {})
    assert sum(v for k, v in futexes.items() if not k.endswith("+t")) >= 0.5, got
    named = [
        v for k, v in got["others_running"].items() if any(f":{t}" in k for t in tids.values())
    ]
    assert sum(named) >= 0.5, got
