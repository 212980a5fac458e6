"""Dataset sources for prepare: image folders, Parquet, torchvision on disk; bad data. No Ray."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lepton_ray.data import open_dataset, prepare, read_arrays
from lepton_ray.errors import DataError


def png(value: int, size=(8, 8), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=value if mode == "L" else (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pets"
    for split, n in (("train", 3), ("val", 2)):
        for cls, value in (("cat", 10), ("dog", 200)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(png(value + i))
    return root


def test_image_folder_with_splits(folder, tmp_path):
    infos = prepare(f"imagefolder:{folder}", str(tmp_path / "out"))
    assert set(infos) == {"train", "test"}  # val/ becomes the test split
    train = infos["train"]
    assert train.classes == ("cat", "dog") and train.num_rows == 6 and train.shape == (8, 8, 1)
    images, labels, _ = read_arrays(train)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert images[labels == 1].min() >= 200  # the dog images
    again = prepare(
        str(folder), str(tmp_path / "out")
    )  # a bare folder path is the same source: nothing rewritten
    assert again["train"].shards == train.shards


def test_mixed_sizes_and_corrupt_files_name_the_file_or_are_skipped(folder, tmp_path):
    (folder / "train" / "cat" / "big.png").write_bytes(png(5, size=(9, 9)))
    (folder / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG definitely not")
    with pytest.raises(DataError, match=r"big\.png: image is 9x9, the first image is 8x8"):
        prepare(f"imagefolder:{folder}", str(tmp_path / "a"))
    infos = prepare(f"imagefolder:{folder}", str(tmp_path / "b"), skip_bad=True)
    m = infos["train"].manifest
    assert infos["train"].num_rows == 6 and m["skipped_rows"] == 2
    assert any("broken.png: not a readable PNG" in e for e in m["skipped_examples"])


def _parquet(path, rows):
    pq.write_table(pa.table({"image": [r[0] for r in rows], "label": [r[1] for r in rows]}), path)


def test_parquet_source(tmp_path):
    _parquet(tmp_path / "d.parquet", [(png(1), 3), (png(2), 7), (png(3), 3)])
    info = prepare(f"parquet:{tmp_path / 'd.parquet'}", str(tmp_path / "out"))["train"]
    assert info.classes == ("3", "7") and info.num_rows == 3


def test_parquet_bad_rows(tmp_path):
    _parquet(tmp_path / "bad.parquet", [(png(1), 1), (png(2), None), (b"junk", 2)])
    with pytest.raises(DataError, match="bad.parquet row 1: missing label"):
        prepare(f"parquet:{tmp_path / 'bad.parquet'}", str(tmp_path / "o1"))
    info = prepare(f"parquet:{tmp_path / 'bad.parquet'}", str(tmp_path / "o2"), skip_bad=True)[
        "train"
    ]
    assert info.num_rows == 1 and info.manifest["skipped_rows"] == 2


def _idx(path, arr, magic):
    path.write_bytes(
        struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    )


def test_torchvision_mnist_from_local_disk(tmp_path):
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _idx(
            raw / f"{prefix}-images-idx3-ubyte",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            2051,
        )
        _idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), 2049)
    infos = prepare("torchvision:MNIST", str(tmp_path / "out"), root=str(tmp_path / "tv"))
    assert (
        infos["train"].num_rows == 20
        and infos["test"].num_rows == 10
        and infos["train"].shape == (28, 28, 1)
    )
    assert infos["train"].classes[0].startswith("0")


def test_torchvision_errors(tmp_path):
    with pytest.raises(DataError, match="needs --root"):
        prepare("torchvision:MNIST", str(tmp_path / "o"))
    with pytest.raises(DataError, match="not found under"):
        prepare("torchvision:CIFAR10", str(tmp_path / "o"), root=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="unsupported torchvision dataset 'ImageNet'"):
        prepare("torchvision:ImageNet", str(tmp_path / "o"), root=str(tmp_path))


def test_inspect_writes_a_grid(folder, tmp_path):
    prepare(f"imagefolder:{folder}", str(tmp_path / "out"))
    grid = tmp_path / "grid.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton_ray.cli",
            "data",
            "inspect",
            str(tmp_path / "out" / "train"),
            "--grid",
            str(grid),
            "--augment",
            "random_crop,hflip",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["class_counts"] == {"cat": 3, "dog": 3}
    assert Image.open(grid).size[0] > 8 * 6
    assert open_dataset(str(tmp_path / "out" / "train")).num_rows == 6


def test_image_folder_in_object_storage(folder, s3_server, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for f in sorted(folder.rglob("*.png")):
        s3.put_object(
            Bucket=s3_bucket, Key=f"raw/pets/{f.relative_to(folder)}", Body=f.read_bytes()
        )
    infos = prepare(
        f"imagefolder:s3://{s3_bucket}/raw/pets",
        f"s3://{s3_bucket}/datasets/pets",
        endpoint_url=s3_server,
    )
    local = prepare(f"imagefolder:{folder}", str(tmp_path / "local"))
    for split in ("train", "test"):
        got, want = read_arrays(infos[split]), read_arrays(local[split])
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert infos["train"].manifest["source"] == f"imagefolder:s3://{s3_bucket}/raw/pets/train"
    with pytest.raises(DataError, match="does not exist"):
        prepare(
            f"imagefolder:s3://{s3_bucket}/raw/none",
            f"s3://{s3_bucket}/datasets/x",
            endpoint_url=s3_server,
        )


def test_png_encoded_dataset_round_trips(folder, tmp_path):
    raw = prepare(f"imagefolder:{folder}", str(tmp_path / "raw"))["train"]
    enc = prepare(f"imagefolder:{folder}", str(tmp_path / "png"), encoding="png")["train"]
    assert enc.encoding == "png" and enc.manifest["encoding"] == "png" and raw.encoding == "raw"
    for a, b in zip(read_arrays(enc), read_arrays(raw), strict=True):
        np.testing.assert_array_equal(a, b)
    # The Ray Data preprocessor decodes PNG rows into the same tensors as raw rows.
    t = pq.read_table(tmp_path / "png" / "train" / enc.shards[0]["path"]).to_pydict()
    batch = {k: np.array(v, dtype=object if k == "image" else np.int64) for k, v in t.items()}
    assert batch["image"][0].startswith(b"\x89PNG")
    images, _, ids = read_arrays(raw)
    out = enc.preprocessor()(batch)
    want = raw.preprocessor()(
        {"image": images[np.searchsorted(ids, batch["id"])], "label": batch["label"]}
    )
    np.testing.assert_allclose(out["image"], want["image"])
    batch["image"][0] = b"garbage"
    with pytest.raises(ValueError, match=f"row id {batch['id'][0]}: image bytes do not decode"):
        enc.preprocessor()(batch)
    with pytest.raises(DataError, match="unknown image encoding 'jpeg2000'"):
        prepare(f"imagefolder:{folder}", str(tmp_path / "bad"), encoding="jpeg2000")
