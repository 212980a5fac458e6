"""A JPEG folder in a real ``fit`` (CPU workers): rows of many sizes decoded and random-resized-
cropped by Ray Data's CPU tasks, or handed to the worker as JPEG bytes and decoded there (the GPU
path, run on the CPU), each row trained exactly once per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_ray import DataConfig, Trainer, build_model
from lepton_ray.data import jpeg
from lepton_ray.data.writer import prepare
from lepton_ray.train.feed import Plan, StreamedFeed
from tests.test_resume import sample_logs

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg-folder")
    jpeg.generate(root / "src", train=200, test=40, classes=4, sizes=(40, 64), seed=0)
    return prepare(f"imagefolder:{root / 'src'}", str(root / "ds"), encoding="jpeg", crop=32)


def test_a_jpeg_folder_trains_every_row_once_per_epoch(ray_session, jpegs, tmp_path):
    model = build_model("cnn", in_channels=3, num_classes=4, width=8)
    res = Trainer(2).fit(
        model,
        jpegs["train"],
        jpegs["test"],
        batch_size=40,
        epochs=1,
        lr=0.05,
        storage=str(tmp_path),
        run_name="jpeg",
        record_sample_ids=True,
        data=DataConfig(augment=()),  # on CPUs: decoded and cropped by Ray Data's CPU tasks
    )
    assert res["epochs"] == 1 and 0.0 <= res["val_accuracy"] <= 1.0
    logs = [s for steps in sample_logs(tmp_path / "jpeg").values() for s in steps]
    for epoch in (1,):
        ids = np.concatenate([s["ids"] for s in logs if s["epoch"] == epoch])
        assert len(ids) == len(np.unique(ids)) == 200  # 5 global batches of 40: every row once
        assert set(ids.tolist()) == set(range(200))


def test_the_device_decode_feed_hands_each_row_once_cropped_as_the_cpu_path(ray_session, jpegs):
    """The GPU path's feed, run on the CPU: Ray Data hands JPEG bytes, the worker decodes them;
    every planned row comes once, each crop the one Ray Data's CPU tasks make of it."""
    info = jpegs["train"]
    common = dict(augment=(), preprocess_batch=64, shuffle_buffer_rows=0, pin_memory=False)
    feeds = {
        where: StreamedFeed(
            info, Plan(3, 40, 1, 0, "sequential-unshuffled"), decode_on=where, **common
        )
        for where in ("device", "cpu")
    }
    got = {where: list(feed.epoch(1)) for where, feed in feeds.items()}
    dev, cpu = got["device"], got["cpu"]
    assert len(dev) == 5 and all(b["image"].shape == (40, 3, 32, 32) for b in dev)
    ids = np.concatenate([b["id"].numpy() for b in dev])
    assert sorted(ids.tolist()) == list(range(200))
    np.testing.assert_array_equal(ids, np.concatenate([b["id"].numpy() for b in cpu]))
    for d, c in zip(dev, cpu, strict=True):  # the CPU's resize here: the very same pixels
        np.testing.assert_array_equal(d["image"].numpy(), c["image"].numpy())
        np.testing.assert_array_equal(d["label"].numpy(), c["label"].numpy())


def test_the_device_decode_feed_decodes_on_its_reader_thread_and_reads_the_next_epoch_ahead(
    ray_session, jpegs
):
    """Device decoding runs on the reader's thread, which starts the next epoch's read once this
    epoch's input is all read; the batches are those a fresh feed serves."""

    def feed(epochs: int) -> StreamedFeed:
        return StreamedFeed(
            jpegs["train"],
            Plan(3, 20, 1, 0, "shuffled"),
            augment=(),
            preprocess_batch=64,
            shuffle_buffer_rows=0,
            pin_memory=False,
            decode_on="device",
            epochs=epochs,
        )

    f = feed(2)
    first = [b["id"].tolist() for b in f.epoch(0)]
    assert len(first) == 10 and f.ahead is not None and f.ahead.epoch == 1
    ahead = f.ahead
    got = list(f.epoch(1))
    assert all(b["image"].shape == (20, 3, 32, 32) for b in got)
    want = list(feed(0).epoch(1))
    assert [b["id"].tolist() for b in got] == [b["id"].tolist() for b in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["image"].numpy(), w["image"].numpy())
    assert f.ahead is None  # the last epoch reads nothing ahead
    f.close()
    assert not ahead.batches.alive


def test_jpegs_decoded_by_ray_data_are_mixed_as_bytes_and_stream_in_a_seeded_order(
    ray_session, jpegs
):
    """A shuffled plan's JPEG rows are shuffled as compressed bytes before Ray Data decodes them
    (no shuffle buffer of decoded pixels): every planned row once, in an order that is not the
    stored one, the same for the same seed and epoch, another the next epoch."""
    info = jpegs["train"]

    def served(seed: int, epoch: int) -> list[int]:
        feed = StreamedFeed(
            info,
            Plan(seed, 40, 1, 0, "shuffled"),
            augment=(),
            preprocess_batch=64,
            shuffle_buffer_rows=0,
            pin_memory=False,
        )
        batches = list(feed.epoch(epoch))
        assert len(batches) == 5 and all(b["image"].shape == (40, 3, 32, 32) for b in batches)
        return np.concatenate([b["id"].numpy() for b in batches]).tolist()

    first = served(3, 0)
    assert sorted(first) == list(range(200)) and first != sorted(first)
    assert served(3, 0) == first
    assert served(3, 1) != first
