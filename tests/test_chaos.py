"""Faults, for real: S3 errors and throttling, the S3 server going away during a checkpoint, and
training workers SIGKILLed at seeded random steps. ``benchmarks/chaos.py`` runs the same cases
with more iterations and reports them as figures; these tests assert the invariants:

* every S3 request answered 500 InternalError / 503 SlowDown fewer times than the retry
  budget is retried by the SDK and the operation succeeds; a request faulted the whole budget
  fails as one line (the budget is what lepton_ray.storage configures);
* an outage while a checkpoint is written never leaves a complete checkpoint (one with a
  manifest) that fails to verify, and the run resumes and finishes;
* an outage while Ray Train's controller writes its own snapshot is waited out by ``fit``, which
  resumes the run by itself (no ``resume=True``) and returns it complete;
* after N worker kills every run finishes, and from the sample log no sample of an epoch is lost
  and none is trained twice beyond the steps the restored weights had not seen.

The pure S3 tests need no Ray; the rest are in the Ray tier.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.chaos import storage_round
from lepton_ray import storage
from lepton_ray.errors import StorageError
from tests.s3_faults import S3FaultProxy, SeededFaults

BUDGET = 4  # attempts per request: lepton_ray.storage configures 3 retries


@pytest.fixture
def bucket_uri(s3_bucket) -> str:
    return f"s3://{s3_bucket}/chaos"


def test_s3_errors_and_throttling_within_the_budget_are_retried_for_the_whole_session(
    s3_server, bucket_uri
):
    """Each request is faulted at most BUDGET - 1 times, so every operation must succeed.
    Hundreds of faults through one filesystem: a retry budget that drains over a session (the
    AWS "standard" mode's retry quota, never refilled through pyarrow) would give up part way."""
    faults = SeededFaults(seed=7, p500=0.25, p503=0.25, max_per_request=BUDGET - 1)
    with S3FaultProxy(s3_server, faults=faults) as proxy:
        root = storage.resolve(bucket_uri, endpoint_url=proxy.url)
        failed = []
        for i in range(40):
            try:
                storage_round(root, i)
            except StorageError as exc:
                failed.append((i, str(exc)))
        counts = dict(proxy.counts)
    assert counts["injected_500"] + counts["injected_503"] > 150, counts  # > 100 retries
    assert counts["injected_500"] > 50 and counts["injected_503"] > 50, counts
    assert failed == [], (len(failed), failed[:3], counts)


def test_a_request_faulted_for_the_whole_budget_fails_in_one_line(s3_server, bucket_uri):
    """The budget is BUDGET attempts: a PUT answered 503 every time is tried exactly that many
    times, then the write fails with a one-line StorageError."""
    root = storage.resolve(bucket_uri, endpoint_url=s3_server)
    root.join("ok.json").write_json({"a": 1})
    target = r"/doomed\.json"
    with S3FaultProxy(s3_server, faults=SeededFaults(p503=1.0, only=target)) as proxy:
        via = storage.resolve(bucket_uri, endpoint_url=proxy.url)
        assert via.join("ok.json").read_json() == {"a": 1}  # other requests pass
        with pytest.raises(StorageError) as info:
            via.join("doomed.json").write_json({"b": 2})
        attempts = proxy.counts["injected_503"]
    assert "\n" not in str(info.value) and "s3://" in str(info.value)
    # A small object goes up as one PUT (allow_delayed_open): that request is the one retried.
    assert attempts == BUDGET, attempts
    assert not root.join("doomed.json").exists()


def test_a_pickled_filesystem_keeps_the_retry_budget(s3_server, bucket_uri):
    """Ray ships the filesystem to its tasks and actors by pickling it; the copy must retry as the
    original does. Every request here is answered 503 three times (BUDGET - 1), then passed."""
    import pickle

    root = storage.resolve(bucket_uri, endpoint_url=s3_server)
    kept = {"a": "x" * 1000}  # larger than an error body (see storage_round)
    root.join("kept.json").write_json(kept)
    with S3FaultProxy(
        s3_server, faults=SeededFaults(p503=1.0, max_per_request=BUDGET - 1)
    ) as proxy:
        via = storage.resolve(bucket_uri, endpoint_url=proxy.url)
        copy = storage.Location(pickle.loads(pickle.dumps(via.fs)), via.path, via.uri, proxy.url)
        copy.join("copied.json").write_json({"b": 2})
        assert copy.join("kept.json").read_json() == kept
        assert proxy.counts["injected_503"] >= 2 * (BUDGET - 1), dict(proxy.counts)
    assert root.join("copied.json").read_json() == {"b": 2}


def test_a_small_object_read_through_errors_is_retried(s3_server, bucket_uri):
    """Pointers and manifests are smaller than an S3 error body (~250 bytes). pyarrow reads an
    object into a buffer of the object's size, so such an error answer does not fit and the SDK
    gives up without a retry; lepton_ray's reads must still get through BUDGET - 1 faults."""
    root = storage.resolve(bucket_uri, endpoint_url=s3_server)
    pointer = {"path": "best/checkpoint_epoch0001_step0000020"}  # 50 bytes, like best.json
    root.join("best.json").write_json(pointer)
    faults = SeededFaults(p500=0.5, p503=0.5, max_per_request=BUDGET - 1, only=r"best\.json$")
    with S3FaultProxy(s3_server, faults=faults) as proxy:
        via = storage.resolve(bucket_uri, endpoint_url=proxy.url)
        assert via.join("best.json").read_json() == pointer
        faulted = proxy.counts["injected_500"] + proxy.counts["injected_503"]
    assert faulted >= 2, faulted


def test_small_ranged_reads_through_errors_are_retried(s3_server, bucket_uri):
    """A ranged read asks for a buffer of the range's size, and a sharded checkpoint's small
    tensors are smaller than an error answer: without lepton_ray's retry, the 16-byte read below
    failed on its first fault. A shard's row ids (its Parquet footer and id column, what every
    training worker reads to plan its epochs) are read the same way, through the same retry."""
    import numpy as np

    from lepton_ray.data import open_dataset, prepare, read_shard_ids

    info = prepare("synthetic:24:4x4x1:2", f"{bucket_uri}/d", endpoint_url=s3_server)["train"]
    root = storage.resolve(bucket_uri, endpoint_url=s3_server)
    root.join("blob.bin").write_bytes(bytes(range(256)) * 8)
    faults = SeededFaults(
        p500=0.5, p503=0.5, max_per_request=BUDGET - 1, only=r"(\.parquet|blob\.bin)$"
    )
    with S3FaultProxy(s3_server, faults=faults) as proxy:
        via = storage.resolve(bucket_uri, endpoint_url=proxy.url)
        assert via.join("blob.bin").read_range(300, 16) == bytes(range(44, 60))
        ids = read_shard_ids(open_dataset(info.uri, endpoint_url=proxy.url))
        faulted = proxy.counts["injected_500"] + proxy.counts["injected_503"]
    assert sorted(np.concatenate(ids).tolist()) == list(range(24))
    assert faulted >= 3, faulted


def test_an_outage_is_seen_as_unreachable_and_the_state_is_kept_after(s3_server, bucket_uri):
    """The proxy's cut is an outage: requests fail as 'cannot reach'; once it listens again on the
    same port, what was written before is there."""
    with S3FaultProxy(s3_server) as proxy:
        root = storage.resolve(bucket_uri, endpoint_url=proxy.url)
        root.join("before.json").write_json({"x": 1})
        port = proxy.port
        proxy.cut()
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
            root.join("before.json").read_json()
        proxy.restore()
        assert proxy.port == port
        assert root.join("before.json").read_json() == {"x": 1}


def test_a_cut_drops_the_clients_retries_too_however_late_the_proxy_stops_listening(
    s3_server, bucket_uri
):
    """The request that cuts is dropped, and so is every retry the SDK sends within the outage
    (25/50/100 ms later), even one the closing listener still accepts: the write fails, and after
    the outage the object is not there."""
    with S3FaultProxy(
        s3_server, cut_on=lambda m, t: m == "PUT" and "/cut.json" in t, outage_s=3.0
    ) as proxy:
        root = storage.resolve(bucket_uri, endpoint_url=proxy.url)
        with pytest.raises(StorageError):
            root.join("cut.json").write_json({"x": 1})
        assert proxy.outage_ended.wait(30)
        assert not root.join("cut.json").exists()
        assert proxy.counts["outages"] == 1 and proxy.counts["dropped"] == 1, proxy.counts


# --- the sample audit, on logs written by hand --------------------------------------------------
def _log(run, key: str, steps: list[tuple[int, int, float, list[int]]]) -> None:
    d = run / "sample_ids"
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"epoch": e, "step": s, "t": t, "ids": ids}) for e, s, t, ids in steps]
    (d / f"{key}-00000.jsonl").write_text("\n".join(lines))


@pytest.mark.parametrize(
    ("resumed", "lost", "repeated"),
    [
        ({3: [4, 5], 4: [6, 7]}, 0, 0),
        ({3: [6, 7]}, 2, 0),  # the resumed epoch skipped ids 4, 5
        ({3: [4, 5], 4: [6, 7, 1]}, 0, 1),  # id 1 was in the restored weights already
    ],
    ids=["exact", "lost", "repeated"],
)
def test_the_audit_counts_lost_and_repeated_samples(tmp_path, resumed, lost, repeated):
    """One epoch of 8 ids, one rank, 2 ids a step. The first attempt trained steps 1-3 and was
    killed after its checkpoint at step 2; its step 3 died with its weights. The next attempt
    restored step 2 and trained ``resumed``: the audit keeps steps 1-2 of the first attempt and
    all of the second, and counts what the epoch misses or holds twice."""
    from benchmarks.chaos import audit

    first = [(1, s, float(s), [2 * s - 2, 2 * s - 1]) for s in (1, 2, 3)]
    _log(tmp_path, "rank0-aaaa", first)
    _log(tmp_path, "rank0-bbbb", [(1, s, 20.0 + s, ids) for s, ids in resumed.items()])
    r = audit(tmp_path, [10.0], rows=8)
    assert (r["samples_lost"], r["samples_repeated"]) == (lost, repeated), r
    assert r["attempts"] == 2 and r["logged_steps_redone"] == 1 and r["recovery_s"] == [13.0]
    assert r["restored_steps"] == [2]


# --- Ray tier: worker kills and an outage during a checkpoint -----------------------------------
@pytest.fixture(scope="module")
def digits_1200(tmp_path_factory):
    from benchmarks.chaos import digits

    return digits(tmp_path_factory.mktemp("chaos-digits"))


@pytest.mark.ray
def test_worker_kills_at_seeded_random_points_lose_and_repeat_no_sample(
    ray_session, digits_1200, tmp_path
):
    """Two SIGKILLs of this run's training workers (seeded points between checkpoints every 5
    steps of 60): Ray Train replaces the worker group twice, each new group restores the
    checkpoint Ray had committed at its kill (or the one whose upload the kill did not stop), the
    run finishes, and the sample log shows each epoch trained exactly once."""
    from benchmarks.chaos import kill_run

    r = kill_run(digits_1200, tmp_path, "kills", seed=3, kills=2)
    assert r["kills"] == 2 and r["finished"], r
    assert r["attempts"] == 3 and r["epochs_audited"] == 3, r
    kills = zip(r["restored_steps"], r["killed_after_committed_step"], strict=True)
    for restored, committed in kills:
        assert restored % 5 == 0 and committed <= restored <= committed + 5, r
    assert r["samples_lost"] == 0 and r["samples_repeated"] == 0, r
    assert len(r["recovery_s"]) == 2 and all(s > 0 for s in r["recovery_s"]), r


@pytest.mark.ray
def test_s3_outage_while_a_checkpoint_is_written_leaves_nothing_unloadable(
    ray_session, s3_server, s3_bucket, digits_1200
):
    """The S3 server stops listening when the manifest of the checkpoint at step 10 is PUT (the
    request is dropped) and comes back 3 s later: no complete checkpoint fails to verify, the
    latest one loads, and the run resumes and finishes."""
    from benchmarks.chaos import outage_run

    r = outage_run(
        s3_server,
        s3_bucket,
        digits_1200,
        "outage",
        cut_step=10,
        cut_file="manifest.json",
        workers=1,  # rank 0 writes the checkpoint whatever the world size
    )
    assert r["outages"] == 1 and r["dropped_requests"] == 1, r
    assert r["finished"], r
    assert r["failed_to_verify"] == [] and r["latest_loads"] and r["complete"] >= 1, r


@pytest.mark.ray
def test_s3_outage_while_ray_train_writes_its_snapshot_is_resumed_by_fit_itself(
    ray_session, s3_server, s3_bucket, digits_1200, capsys
):
    """The S3 server goes away for 3 s at the second PUT of Ray Train's
    checkpoint_manager_snapshot.json (the controller's write after the checkpoint at step 10):
    the controller fails the run, and fit waits, resumes it and returns it complete."""
    from benchmarks.chaos import BATCH, ROWS, small_cnn
    from lepton_ray import Trainer

    snapshots: list[str] = []

    def cut_on(method: str, target: str) -> bool:
        if method == "PUT" and "/checkpoint_manager_snapshot.json" in target:
            snapshots.append(target)
            return len(snapshots) == 2
        return False

    with S3FaultProxy(s3_server, cut_on=cut_on, outage_s=3.0) as proxy:
        res = Trainer(1).fit(  # the controller writes the snapshot whatever the world size
            small_cnn(),
            digits_1200,
            batch_size=BATCH,
            epochs=1,
            lr=0.05,
            storage=f"s3://{s3_bucket}/runs",
            endpoint_url=proxy.url,
            run_name="snapshot-outage",
            checkpoint_every_steps=5,
            progress_bar=False,
        )
    retries = [line for line in capsys.readouterr().out.splitlines() if "resuming run" in line]
    with capsys.disabled():
        print("\n".join(retries))  # recorded in the log
    assert proxy.counts["outages"] == 1 and retries, (dict(proxy.counts), retries)
    assert res["history"][-1]["step"] == ROWS // BATCH and res["checkpoint"], res


@pytest.mark.ray
def test_prepare_and_a_training_run_through_s3_errors_and_throttling_finish(
    ray_session, s3_server, s3_bucket, tmp_path
):
    """Half the requests of a prepare and a 1-epoch run (data, checkpoints, Ray Train's own
    files, all on S3) answered 500/503, each at most BUDGET - 1 times: the SDK retries them
    and the run finishes without Ray Train restarting anything."""
    from benchmarks.chaos import faults_train

    r = faults_train(s3_server, s3_bucket, tmp_path, seed=5, p=0.5, max_per_request=BUDGET - 1)
    assert r["finished"], r
    assert r["injected_500"] > 20 and r["injected_503"] > 20, r
