"""A dataset bigger than Ray Data is allowed to hold streams through an epoch with bounded
object-store use (shard-order shuffling plus a local shuffle buffer), and ``auto`` picks that
mode when a global shuffle would not fit. The large-size run is ``benchmarks/streaming.py``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lepton_ray.data import prepare, shuffle_mode

ROWS = 80_000  # 32x32x3: 234 MiB of pixels, streamed through an 80 MiB object store


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return prepare(
        f"synthetic:{ROWS}:32x32x3", str(tmp_path_factory.mktemp("synth")), rows_per_shard=2000
    )["train"]


@pytest.mark.ray
@pytest.mark.parametrize("feed", ["stream", "ring"])
def test_an_epoch_larger_than_the_object_store_streams(synthetic, tmp_path, feed):
    """``benchmarks/streaming.py`` at a small size, in its own Ray (the object store must be
    smaller than the data, so it cannot be the session's): every row once, nothing spilled, read
    as the streamed feed reads it and as a ring-fed worker does."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.streaming",
            "--feed",
            feed,
            "--rows",
            str(ROWS),
            "--object-store-mb",
            "80",
            "--rows-per-shard",
            "2000",
            "--dataset-dir",
            str(Path(synthetic.uri).parent),
            "--no-report",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["feed"] == feed
    assert result["rows"] == ROWS and result["dataset_to_store_ratio"] > 2.5
    assert result["every_row_once"]
    assert result["spilled_mib"] == 0, result
    assert 0 < result["peak_object_store_mib"] <= 80


def test_auto_shuffle_streams_when_a_global_shuffle_would_not_fit(synthetic):
    pixels = ROWS * 32 * 32 * 3
    assert shuffle_mode(synthetic, "auto", object_store_bytes=8 * pixels) == "global"
    assert shuffle_mode(synthetic, "auto", object_store_bytes=2 * pixels) == "files"
    assert shuffle_mode(synthetic, "none", object_store_bytes=2 * pixels) == "none"


def test_synthetic_source_is_reproducible_and_learnable(tmp_path):
    from lepton_ray.data import read_arrays
    from lepton_ray.errors import DataError

    a = prepare("synthetic:300:8x8x1:3", str(tmp_path / "a"))
    b = prepare("synthetic:300:8x8x1:3", str(tmp_path / "b"))
    assert (
        a["train"].num_rows == 300
        and a["test"].num_rows == 30
        and a["train"].classes == ("0", "1", "2")
    )
    xa, ya, ia = read_arrays(a["train"])
    xb, yb, ib = read_arrays(b["train"])
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert not np.intersect1d(ia, read_arrays(a["test"])[2]).size  # ids unique across splits
    # Nearest class mean separates the classes: the images carry their label.
    means = np.stack([xa[ya == c].reshape((ya == c).sum(), -1).mean(0) for c in range(3)])
    pred = np.argmin(((xa.reshape(300, 1, -1) - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == ya).mean() > 0.9
    with pytest.raises(DataError, match="bad synthetic source '12:8x8x2'"):
        prepare("synthetic:12:8x8x2", str(tmp_path / "c"))


@pytest.mark.ray
def test_read_ray_augments_each_row_by_seed_epoch_and_id(ray_session, tmp_path):
    """Through Ray Data (blocks, tasks, a global shuffle) a row gets exactly the augmentation the
    Preprocessor gives it alone, and another one the next epoch."""
    from lepton_ray.data import read_arrays, read_ray
    from lepton_ray.data.transforms import Preprocessor

    info = prepare("synthetic:240:8x8x3:2", str(tmp_path / "s"), rows_per_shard=40)["train"]
    images, labels, ids = read_arrays(info)
    augment = ("random_crop", "hflip")

    def epoch(e: int) -> dict[int, np.ndarray]:
        ds = read_ray(
            info,
            augment=augment,
            augment_seed=7,
            epoch=e,
            shuffle="global",
            shuffle_seed=e,
            normalize=False,
            batch_size=32,
        )
        rows = ds.take_all()
        return {int(r["id"]): np.asarray(r["image"]) for r in rows}

    def alone(e: int) -> np.ndarray:
        pre = Preprocessor(info.shape, info.mean, info.std, augment, 7, normalize=False, epoch=e)
        return pre({"image": images, "label": labels, "id": ids})["image"]

    for e in (0, 1):
        got, want = epoch(e), alone(e)
        assert sorted(got) == sorted(ids.tolist())
        for i, row_id in enumerate(ids.tolist()):
            np.testing.assert_array_equal(got[row_id], want[i])
    changed = (alone(0) != alone(1)).reshape(len(ids), -1).any(axis=1)
    assert changed.mean() > 0.8


@pytest.mark.ray
def test_describe_ray_dataset(ray_session):
    import ray.data

    from lepton_ray.data import describe_ray_dataset
    from lepton_ray.errors import DataError

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
    ds = ray.data.from_numpy(images).map_batches(
        lambda b: {"image": b["data"], "label": np.arange(len(b["data"])) % 4}
    )
    info = describe_ray_dataset(ds, "train")
    assert info.num_rows == 50 and info.shape == (6, 5, 3) and info.num_classes == 4
    np.testing.assert_allclose(info.mean, (images / 255.0).mean(axis=(0, 1, 2)))
    with pytest.raises(DataError, match=r"the val Ray Dataset needs 'image' and 'label' columns"):
        describe_ray_dataset(ray.data.from_numpy(images), "val")
    grey = ray.data.from_numpy(images[..., 0]).map_batches(
        lambda b: {"image": b["data"], "label": np.zeros(len(b["data"]), np.int64)}
    )
    with pytest.raises(DataError, match="must have a channel axis"):
        describe_ray_dataset(grey, "train")
    for labels, problem in (
        (np.arange(50) - 1, "class indices >= 0, got -1"),
        (["a"] * 50, "class indices, got object values"),
    ):
        bad = ray.data.from_numpy(images).map_batches(
            lambda b, labels=labels: {
                "image": b["data"],
                "label": np.asarray(labels[: len(b["data"])]),
            }
        )
        with pytest.raises(DataError, match=re.escape(problem)):
            describe_ray_dataset(bad, "train")
