"""Reading a prepared dataset through Ray Data from its manifest (lepton_ray.data.shard_source):
the plan touches no storage, every row is read once, the shard order is shuffled per execution
reproducibly, and a shard that disagrees with its manifest (its rows always, its sha256 when asked)
fails the read naming it, here and in the readers outside Ray Data (lepton_ray.data.shard_file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lepton_ray.data import prepare
from lepton_ray.data.dataset import shard_locations
from lepton_ray.data.shard_source import ShardSource, shard_order
from lepton_ray.errors import DataError


def test_shard_order_is_stored_order_or_a_reproducible_permutation_per_execution():
    assert shard_order(5, False, 3, 7) == [0, 1, 2, 3, 4]
    first = shard_order(40, True, 3, 0)
    assert sorted(first) == list(range(40)) and first != list(range(40))
    assert shard_order(40, True, 3, 0) == first  # the same seed and execution: the same order
    assert shard_order(40, True, 3, 1) != first  # the next execution (epoch): another one
    assert shard_order(40, True, 4, 0) != first
    assert sorted(shard_order(40, True, None, 0)) == list(range(40))
    assert shard_order(40, True, -1, 0) == shard_order(40, True, -1, 0)  # any int is a seed


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return prepare(
        "synthetic:300:8x8x3:3", str(tmp_path_factory.mktemp("shards")), rows_per_shard=40
    )["train"]


def test_the_plan_is_the_manifests_shards_and_sizes(small):
    source = ShardSource(small, shard_locations(small), ("id", "image", "label"))
    assert source.estimate_inmemory_data_size() == small.num_rows * (8 * 8 * 3 + 16)
    tasks = source.get_read_tasks(200)  # more tasks asked than shards: one task per shard
    assert [t.metadata.input_files for t in tasks] == [(s["path"],) for s in small.shards]
    assert [t.metadata.size_bytes for t in tasks] == [s["rows"] * 208 for s in small.shards]
    grouped = source.get_read_tasks(3)  # fewer: consecutive shards share a task
    assert sum(len(t.metadata.input_files) for t in grouped) == len(small.shards)
    assert len(grouped) == 3


def test_a_piece_of_the_set_is_its_shards_at_the_positions_given_in_that_order(small):
    piece = small.only([5, 0, 2])
    assert piece.shards == (small.shards[5], small.shards[0], small.shards[2])
    assert (piece.uri, piece.num_rows, piece.manifest) == (
        small.uri,
        small.num_rows,
        small.manifest,
    )
    assert small.only([]).shards == () and len(small.shards) == 8  # the whole set is untouched


@pytest.mark.ray
def test_a_read_plan_touches_no_storage(ray_session, tmp_path):
    """Planning reads nothing (Ray's Parquet reader samples files in remote tasks on every call):
    with the shards gone, the Dataset is still made, and fails only once it is read."""
    from lepton_ray.data import read_ray

    info = prepare("synthetic:60:4x4x1", str(tmp_path / "d"), rows_per_shard=20)["train"]
    for s in info.shards:
        (Path(info.uri) / s["path"]).unlink()
    ds = read_ray(info, normalize=False, layout="nhwc")
    with pytest.raises(Exception, match=info.shards[0]["path"]):
        ds.take_all()


@pytest.mark.ray
def test_every_row_once_and_files_shuffled_per_execution(ray_session, small):
    from ray.data import DataContext

    from lepton_ray.data import read_ids, read_ray

    options = DataContext.get_current().execution_options
    previous, options.preserve_order = options.preserve_order, True
    try:

        def orders(seed: int) -> list[list[int]]:
            ds = read_ray(small, normalize=False, layout="nhwc", shuffle="files", shuffle_seed=seed)
            got = []
            for _ in range(2):  # two executions of one Dataset: two epochs
                ids = np.concatenate([b["id"] for b in ds.iter_batches(batch_format="numpy")])
                assert sorted(ids.tolist()) == sorted(read_ids(small).tolist())
                got.append([int(i) for i in ids[:: small.shards[0]["rows"]]])  # each shard's 1st
            return got

        a, b = orders(11), orders(11)
        assert a == b  # reproducible from the seed, execution by execution
        assert a[0] != a[1]  # and another order the next execution
    finally:
        options.preserve_order = previous


def _tamper(info, edit) -> None:
    path = Path(info.uri) / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.ray
def test_a_shard_that_disagrees_with_its_manifest_fails_naming_it(ray_session, tmp_path):
    from lepton_ray.data import open_dataset, read_ray

    info = prepare("synthetic:60:4x4x1", str(tmp_path / "d"), rows_per_shard=20)["train"]
    first = info.shards[0]["path"]

    def swap_rows(m: dict) -> None:  # the total still matches num_rows
        m["shards"][0]["rows"] += 1
        m["shards"][1]["rows"] -= 1

    _tamper(info, swap_rows)
    with pytest.raises(DataError, match=f"shard {first} of .* holds 20 rows; its manifest says 21"):
        read_ray(open_dataset(info.uri), normalize=False, layout="nhwc").take_all()

    other = prepare("synthetic:60:4x4x1", str(tmp_path / "e"), rows_per_shard=20)["train"]
    garbled = other.shards[1]["path"]
    (Path(other.uri) / garbled).write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=f"shard {garbled} of .* is not Parquet"):
        read_ray(other, normalize=False, layout="nhwc").take_all()


def test_the_readers_outside_ray_data_check_shards_the_same_way(tmp_path):
    """read_arrays (a small set as numpy) and read_shard_ids (what feeds plan from) go through the
    same shard reader as Ray Data's tasks, with the same one-line errors."""
    from lepton_ray.data import open_dataset, read_arrays, read_shard_ids

    info = prepare("synthetic:60:4x4x1", str(tmp_path / "d"), rows_per_shard=20)["train"]
    first = info.shards[0]["path"]

    def swap_rows(m: dict) -> None:
        m["shards"][0]["rows"] += 1
        m["shards"][1]["rows"] -= 1

    _tamper(info, swap_rows)
    lying = open_dataset(info.uri)
    for read in (read_arrays, read_shard_ids):
        with pytest.raises(DataError, match=f"shard {first} of .* holds 20 rows; its manifest"):
            read(lying)

    other = prepare("synthetic:60:4x4x1", str(tmp_path / "e"), rows_per_shard=20)["train"]
    garbled = other.shards[1]["path"]
    (Path(other.uri) / garbled).write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=f"shard {garbled} of .* does not match its checksum"):
        read_arrays(other)  # checked before it is parsed
    with pytest.raises(DataError, match=f"shard {garbled} of .* is not Parquet with \\['id'\\]"):
        read_shard_ids(other)


def test_row_ids_are_read_without_fetching_whole_shards(
    tmp_path, monkeypatch, s3_server, s3_bucket
):
    """Every training worker plans its epochs from the row ids (read_shard_ids): it reads the
    Parquet footer and the id column's chunks only (ranged reads on S3), not the pixels."""
    from lepton_ray import storage
    from lepton_ray.data import read_ids, read_shard_ids
    from lepton_ray.errors import NotFoundError

    local = prepare("synthetic:90:8x8x3:3", str(tmp_path / "d"), rows_per_shard=40)["train"]
    on_s3 = prepare(
        "synthetic:90:8x8x3:3", f"s3://{s3_bucket}/d", endpoint_url=s3_server, rows_per_shard=40
    )["train"]
    expected = read_ids(local)

    def whole(self):
        raise AssertionError(f"{self.uri} fetched whole for its row ids")

    monkeypatch.setattr(storage.Location, "read_bytes", whole)
    for info in (local, on_s3):
        ids = read_shard_ids(info)
        assert [len(i) for i in ids] == [s["rows"] for s in info.shards] == [40, 40, 10]
        np.testing.assert_array_equal(np.concatenate(ids), expected)
    (Path(local.uri) / local.shards[2]["path"]).unlink()
    with pytest.raises(NotFoundError, match=f"not found: .*{local.shards[2]['path']}"):
        read_shard_ids(local)


def _relabel(info, shard: int) -> str:
    """Rewrite one shard with every label changed: the same rows and ids, other bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(info.uri) / info.shards[shard]["path"]
    t = pq.read_table(path)
    labels = pa.array((t.column("label").to_numpy() + 1) % len(info.classes))
    pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", labels), path)
    return info.shards[shard]["path"]


@pytest.mark.ray
def test_verify_checks_each_shards_sha256_as_it_is_read(ray_session, tmp_path):
    import dataclasses

    from lepton_ray.data import read_ray

    info = prepare("synthetic:60:4x4x1:3", str(tmp_path / "d"), rows_per_shard=20)["train"]
    changed = _relabel(info, 1)
    assert len(read_ray(info, normalize=False, layout="nhwc").take_all()) == 60  # rows still agree
    checked = dataclasses.replace(info, verify=True)
    with pytest.raises(DataError, match=f"shard {changed} of .* does not match its checksum"):
        read_ray(checked, normalize=False, layout="nhwc").take_all()


@pytest.mark.ray
@pytest.mark.parametrize("feed", ["stream", "ring"])  # read in the worker; in the ring's actor
def test_a_fit_with_verify_checksums_refuses_a_changed_shard(ray_session, tmp_path, feed):
    from lepton_ray import Trainer
    from lepton_ray.config import DataConfig
    from lepton_ray.errors import LeptonError
    from lepton_ray.models import build_model

    info = prepare("synthetic:200:8x8x1:2", str(tmp_path / "d"), rows_per_shard=50)["train"]
    changed = _relabel(info, 2)
    with pytest.raises(LeptonError, match=f"shard {changed} of .* does not match its checksum"):
        Trainer(1).fit(
            build_model("cnn", in_channels=1, num_classes=2),
            info.uri,
            batch_size=50,
            epochs=1,
            storage=str(tmp_path / "runs"),
            data=DataConfig(verify_checksums=True, feed=feed),
            max_failures=0,
        )
