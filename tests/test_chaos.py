"""Faults, for real: S3 errors and throttling, the S3 server going away during a checkpoint, and
training workers SIGKILLed at seeded random steps. ``benchmarks/chaos.py`` runs the same cases
with more iterations and reports them as figures; these tests assert the invariants:

* every S3 request answered 500 InternalError / 503 SlowDown fewer times in a row than the retry
  budget is retried by the SDK and the operation succeeds; a request faulted the whole budget
  fails as one line (the budget is what lepton_ray.storage configures);
* an outage while a checkpoint is written never leaves a complete checkpoint (one with a
  manifest) that fails to verify, and the run resumes and finishes;
* after N worker kills every run finishes, and from the sample log no sample of an epoch is lost
  and none is trained twice beyond the steps the restored weights had not seen.

The pure S3 tests need no Ray; the rest are in the Ray tier.
"""

from __future__ import annotations

import pytest

from lepton_ray import storage
from lepton_ray.errors import StorageError
from tests.s3_faults import S3FaultProxy, SeededFaults

BUDGET = 4  # attempts per request: lepton_ray.storage configures 3 retries


@pytest.fixture
def bucket_uri(s3_bucket) -> str:
    return f"s3://{s3_bucket}/chaos"


def storage_round(root: storage.Location, i: int) -> None:
    """One round of what lepton_ray does with a store: write an object, check it, list, read it
    back, delete it."""
    data = (f"{i:06d}" * 200).encode()  # 1.2 kB: a manifest or a pointer is a few hundred bytes
    loc = root.join(f"obj-{i}.bin")
    loc.write_bytes(data)
    assert loc.exists() and f"obj-{i}.bin" in root.listdir()
    assert loc.read_bytes() == data
    loc.delete()


def test_s3_errors_and_throttling_within_the_budget_are_retried_for_the_whole_session(
    s3_server, bucket_uri
):
    """Each request is faulted at most BUDGET - 1 times in a row, so every operation must succeed.
    Hundreds of faults through one filesystem: a retry budget that drains over a session (the
    AWS "standard" mode's retry quota, never refilled through pyarrow) would give up part way."""
    faults = SeededFaults(seed=7, p500=0.25, p503=0.25, max_in_a_row=BUDGET - 1)
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
