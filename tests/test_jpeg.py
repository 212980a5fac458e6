"""JPEG folders (lepton_ray.data.jpeg): the generator, preparing with encoding 'jpeg', the crop
boxes, and the CPU and device decode paths agreeing. Pure: no Ray; small images, well under a
second each."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lepton_ray import build_model
from lepton_ray.data import jpeg, open_dataset, read_arrays
from lepton_ray.data.jpeg import (
    aa_weights,
    crop_boxes,
    decode,
    decode_cpu,
    resize_boxes,
    resize_uint8,
)
from lepton_ray.data.transforms import Preprocessor
from lepton_ray.data.writer import prepare
from lepton_ray.errors import DataError

SIZES = (40, 72)  # small: every test stays cheap


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return jpeg.generate(
        tmp_path_factory.mktemp("jpegs"), train=60, test=20, classes=4, sizes=SIZES, seed=3
    )


def jpeg_files(root: Path, split: str = "train") -> list[Path]:
    return sorted((root / split).glob("*/*.jpg"))


def test_generate_writes_jpegs_of_varied_sizes_per_class_reproducibly(folder, tmp_path):
    files = jpeg_files(folder)
    assert len(files) == 60 and len(jpeg_files(folder, "test")) == 20
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["c000", "c001", "c002", "c003"]
    sizes = set()
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert SIZES[0] <= min(im.size) and max(im.size) <= SIZES[1]
            sizes.add(im.size)
    assert len(sizes) > 30  # sizes and aspect ratios vary
    again = jpeg.generate(tmp_path, train=60, test=20, classes=4, sizes=SIZES, seed=3)
    assert [f.read_bytes() for f in jpeg_files(again)] == [f.read_bytes() for f in files]


def test_generated_classes_differ_in_colour(folder):
    """The class signal: the mean colour of each class's images differs clearly between classes
    (a model has something to learn from)."""
    means = {}
    for c in range(4):
        pix = [
            np.asarray(Image.open(f), np.float64).mean((0, 1))
            for f in (folder / "train").glob(f"c{c:03d}/*.jpg")
        ]
        means[c] = np.mean(pix, 0)
    gaps = [np.abs(means[a] - means[b]).max() for a in range(4) for b in range(a + 1, 4)]
    assert min(gaps) > 10


def test_prepare_keeps_the_jpeg_bytes_and_sizes(folder, tmp_path):
    infos = prepare(f"imagefolder:{folder}", str(tmp_path / "ds"), encoding="jpeg", crop=32)
    info = infos["train"]
    m = info.manifest
    assert (m["encoding"], m["crop"], m["shape"], info.num_rows) == ("jpeg", 32, [32, 32, 3], 60)
    assert infos["test"].num_rows == 20 and sum(m["class_counts"]) == 60
    assert all(0.1 < v < 0.9 for v in m["mean"]) and all(0.05 < v < 0.5 for v in m["std"])
    files = {f.read_bytes(): f for f in jpeg_files(folder)}
    rows = 0
    for shard in info.shards:
        t = pq.read_table(tmp_path / "ds" / "train" / shard["path"]).to_pydict()
        for data, h, w, label in zip(t["image"], t["height"], t["width"], t["label"], strict=True):
            f = files[data]  # the file's own bytes
            with Image.open(f) as im:
                assert (w, h) == im.size
            assert int(f.parent.name[1:]) == label
            rows += 1
    assert rows == 60
    images, labels, ids = read_arrays(infos["test"])  # evaluation's centre crops
    assert images.shape == (20, 32, 32, 3) and sorted(ids) == list(range(60, 80))
    again = prepare(f"imagefolder:{folder}", str(tmp_path / "ds"), encoding="jpeg", crop=32)
    assert again["train"].shards == info.shards  # idempotent
    assert open_dataset(info.uri).encoding == "jpeg"


def bad_folder(tmp_path: Path, folder: Path, bad: bytes, name: str = "bad.jpg") -> Path:
    root = tmp_path / "bad"
    for f in jpeg_files(folder)[:6]:
        (root / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "train" / f.parent.name / f.name).write_bytes(f.read_bytes())
    (root / "train" / "c000" / name).write_bytes(bad)
    return root


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


def cmyk_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (50, 40)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "bad, why",
    [
        (png_bytes(), "a PNG image, not a JPEG"),
        (b"not an image at all", "not a readable JPEG"),
        (cmyk_bytes(), "a CMYK JPEG"),
        ("truncated", "does not decode"),
    ],
)
def test_a_bad_file_in_a_jpeg_dataset_is_named_or_skipped(folder, tmp_path, bad, why):
    if bad == "truncated":
        data = jpeg_files(folder)[0].read_bytes()
        bad = data[: len(data) // 2]  # the header whole, the scan cut
    root = bad_folder(tmp_path, folder, bad)
    with pytest.raises(DataError, match=why) as exc:
        prepare(f"imagefolder:{root}", str(tmp_path / "ds"), encoding="jpeg", crop=32)
    assert "bad.jpg" in str(exc.value) and "\n" not in str(exc.value)
    info = prepare(
        f"imagefolder:{root}", str(tmp_path / "ds"), encoding="jpeg", crop=32, skip_bad=True
    )["train"]
    assert info.num_rows == 6 and info.manifest["skipped_rows"] == 1


def test_jpeg_options_are_checked(folder, tmp_path):
    with pytest.raises(DataError, match="crop applies to encoding 'jpeg' only"):
        prepare(f"imagefolder:{folder}", str(tmp_path / "a"), crop=32)
    with pytest.raises(DataError, match="takes an imagefolder"):
        prepare("mnist5k", str(tmp_path / "b"), encoding="jpeg")
    with pytest.raises(DataError, match="crop must be 1 to 4096"):
        prepare(f"imagefolder:{folder}", str(tmp_path / "c"), encoding="jpeg", crop=0)
    with pytest.raises(DataError, match="prepare them with encoding 'jpeg'"):
        prepare(f"imagefolder:{folder}", str(tmp_path / "d"))  # sizes vary: raw cannot hold them


def test_a_jpeg_manifest_with_a_wrong_shape_names_the_field(folder, tmp_path):
    info = prepare(f"imagefolder:{folder}", str(tmp_path / "ds"), encoding="jpeg", crop=32)["train"]
    path = Path(info.uri) / "manifest.json"
    m = json.loads(path.read_text())
    m["shape"] = [64, 64, 3]
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="'shape' must be \\[32, 32, 3\\]"):
        open_dataset(info.uri)


# --- crop boxes ----------------------------------------------------------------------------------
def random_sizes(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(256, 401, n), rng.integers(256, 401, n)


def test_random_resized_crop_boxes_are_seeded_in_bounds_and_in_range():
    h, w = random_sizes()
    ids = np.arange(1000, 1000 + len(h))
    boxes, flips = crop_boxes(h, w, ids, seed=7, epoch=2, train=True)
    again, flips2 = crop_boxes(h, w, ids, seed=7, epoch=2, train=True)
    np.testing.assert_array_equal(boxes, again)
    np.testing.assert_array_equal(flips, flips2)
    # a row's box depends on its id alone, not on the batch it is in
    part, _ = crop_boxes(h[500:510], w[500:510], ids[500:510], seed=7, epoch=2, train=True)
    np.testing.assert_array_equal(part, boxes[500:510])
    other, _ = crop_boxes(h, w, ids, seed=7, epoch=3, train=True)
    assert (other != boxes).any(1).mean() > 0.99  # a new epoch crops anew
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    area = bh * bw / (h * w)
    assert area.min() >= 0.08 * 0.95 and area.max() <= 1.0  # rounding to whole pixels
    assert area.min() < 0.1 and area.max() > 0.9  # its mean: against torchvision, below
    ratio = bw / bh
    assert ratio.min() >= 0.75 * 0.97 and ratio.max() <= 4 / 3 * 1.03
    assert 0.47 < flips.mean() < 0.53


def test_random_resized_crop_matches_torchvisions_distribution():
    """Against torchvision's own RandomResizedCrop.get_params on the same sizes: the same
    distribution of areas and ratios (means within a few standard errors)."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    h, w = random_sizes(3000)
    ours, _ = crop_boxes(h, w, np.arange(len(h)), seed=1, epoch=0, train=True)
    theirs = np.array(
        [
            RandomResizedCrop.get_params(torch.empty(1, a, b), [0.08, 1.0], [3 / 4, 4 / 3])
            for a, b in zip(h, w, strict=True)
        ]
    )
    for k in (2, 3):  # box height, width
        a, b = ours[:, k] / (h if k == 2 else w), theirs[:, k] / (h if k == 2 else w)
        assert abs(a.mean() - b.mean()) < 4 * math.sqrt(a.var() / len(a) + b.var() / len(b))


def test_a_box_no_try_fits_falls_back_to_the_centred_whole_image():
    """A very wide image: few tries fit, and with none the whole height at ratio 4/3, centred."""
    h, w = np.full(2000, 10), np.full(2000, 400)
    boxes, _ = crop_boxes(h, w, np.arange(2000), seed=0, epoch=0, train=True)
    assert (boxes[:, 2] <= 10).all() and (boxes[:, 0] + boxes[:, 2] <= 10).all()
    fallback = boxes[(boxes[:, 2] == 10) & (boxes[:, 3] == 13)]
    assert len(fallback) and (fallback[:, 1] == (400 - 13) // 2).all()


def test_eval_boxes_are_the_centred_square_of_seven_eighths_of_the_shorter_side():
    boxes, flips = crop_boxes(
        np.array([300, 256, 400]), np.array([400, 256, 100]), None, seed=None, epoch=0, train=False
    )
    assert boxes.tolist() == [[19, 69, 262, 262], [16, 16, 224, 224], [156, 6, 87, 87]]
    assert not flips.any()


def resize_float(patch: torch.Tensor, crop: int) -> torch.Tensor:
    """The reference for the GPU's resize: torch's antialiased bilinear resize of one (1, 3, h, w)
    uint8 patch, computed in float32 and rounded."""
    import torch.nn.functional as F

    out = F.interpolate(patch.float(), (crop, crop), mode="bilinear", antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# --- decoding --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(folder) -> list[bytes]:
    return [f.read_bytes() for f in jpeg_files(folder)[:24]]


@pytest.mark.parametrize("train", [True, False])
def test_decode_crops_the_box_as_torchvision_resized_crop_does(encoded, train):
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    ids = np.arange(24) + 5
    out = decode(encoded, ids, 32, seed=4, epoch=1, train=train)
    assert out.shape == (24, 3, 32, 32) and out.dtype == torch.uint8
    sizes = [decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)).shape for b in encoded]
    boxes, flips = crop_boxes(
        np.array([s[1] for s in sizes]),
        np.array([s[2] for s in sizes]),
        ids,
        seed=4,
        epoch=1,
        train=train,
    )
    for i, b in enumerate(encoded):
        img = decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
        want = TF.resized_crop(img, *boxes[i].tolist(), [32, 32], antialias=True)
        want = want.flip(2) if flips[i] else want
        assert torch.equal(out[i], want)


def test_the_cpu_and_gpu_resizes_agree_within_one_grey_level(encoded):
    """The device path on a GPU resizes in float32 (CUDA has no uint8 antialiased resize); run
    here on the CPU, it agrees with the CPU path's uint8 resize within one grey level."""
    from torchvision.io import decode_jpeg

    for b in encoded:
        img = decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))[None]
        for crop in (24, 32, 96):  # down and up
            d = (resize_uint8(img, crop).int() - resize_float(img, crop).int()).abs()
            assert d.max() <= 1


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "crop", [16, 32, 96]
)  # every box shrunk; some shrunk, some grown; all grown
def test_the_gpu_paths_batched_resize_is_each_rows_float_resize(encoded, train, crop):
    """On a GPU a batch's boxes are resized by two batched matmuls of torch's antialiasing
    weights (:func:`resize_boxes`): the pixels of :func:`resize_float` row by row, flips
    included (run here on the CPU; the sums' order differs, so a rounding tie may go the other
    way: at most one grey level, on a few pixels in a hundred thousand)."""
    from torchvision.io import decode_jpeg

    imgs = [decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)) for b in encoded]
    heights = np.array([im.shape[1] for im in imgs])
    widths = np.array([im.shape[2] for im in imgs])
    boxes, flips = crop_boxes(heights, widths, np.arange(24), seed=7, epoch=2, train=train)
    boxes[0] = (0, 0, heights[0], widths[0])  # the whole image
    boxes[1] = (5, 6, 1, 1)  # one pixel
    boxes[2] = (0, 0, heights[2], 3)  # a thin strip
    flips[:3] = (True, False, True)
    out = resize_boxes(imgs, boxes, flips, crop)
    assert out.shape == (24, 3, crop, crop) and out.dtype == torch.uint8
    rows = []
    for img, (top, left, bh, bw), flip in zip(imgs, boxes.tolist(), flips, strict=True):
        row = resize_float(img[None, :, top : top + bh, left : left + bw], crop)[0]
        rows.append(row.flip(2) if flip else row)
    diff = (out.int() - torch.stack(rows).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert torch.equal(out[1], out[1, :, :1, :1].expand(3, crop, crop))  # one pixel, spread
    assert resize_boxes([], np.zeros((0, 4), np.int64), np.zeros(0, bool), crop).shape == (
        0,
        3,
        crop,
        crop,
    )


def test_antialiasing_weights_are_torchs_and_stay_inside_each_length():
    """Row ``i`` of :func:`aa_weights` applied to a signal is torch's antialiased resize of it:
    shrinking, growing and the same size, each in a wider padded tensor."""
    import torch.nn.functional as F

    sizes = torch.tensor([7, 20, 33, 80])
    w = aa_weights(sizes, 20, 80)
    assert w.shape == (4, 20, 80)
    torch.testing.assert_close(w.sum(2), torch.ones(4, 20))
    signal = torch.rand(4, 80, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    for n, size in enumerate(sizes.tolist()):
        assert torch.all(w[n, :, size:] == 0)  # nothing read past the row's own pixels
        want = F.interpolate(
            signal[n, :size][None, None, None], (1, 20), mode="bilinear", antialias=True
        )
        torch.testing.assert_close(w[n] @ signal[n], want.flatten(), rtol=0, atol=1e-5)
    same = aa_weights(torch.tensor([20]), 20, 20)[0]
    torch.testing.assert_close(same, torch.eye(20))


def test_the_cpu_path_gives_the_device_paths_pixels_in_its_layout(encoded):
    ids = np.arange(24)
    cpu = decode_cpu(encoded, ids, 32, seed=2, epoch=0, train=True)
    dev = decode(encoded, ids, 32, seed=2, epoch=0, train=True, device="cpu")
    assert cpu.shape == (24, 32, 32, 3) and cpu.flags.c_contiguous
    np.testing.assert_array_equal(cpu, dev.permute(0, 2, 3, 1).numpy())


def test_a_row_that_does_not_decode_is_named(encoded):
    with pytest.raises(ValueError, match="row id 12: JPEG bytes do not decode"):
        decode(
            [encoded[0], b"\xff\xd8garbage"], np.array([11, 12]), 32, seed=0, epoch=0, train=True
        )


def test_preprocessor_crops_jpeg_rows_per_epoch_and_passes_bytes_through(encoded):
    batch = {"image": encoded, "label": np.arange(24) % 4, "id": np.arange(24)}

    def prep(epoch: int, jpeg: str) -> Preprocessor:
        return Preprocessor(
            (32, 32, 3),
            [0.5] * 3,
            [0.25] * 3,
            seed=0,
            encoding="jpeg",
            normalize=False,
            epoch=epoch,
            jpeg=jpeg,
        )

    e0, again, e1 = (prep(e, "random")(dict(batch))["image"] for e in (0, 0, 1))
    assert e0.shape == (24, 3, 32, 32) and e0.dtype == np.uint8
    np.testing.assert_array_equal(e0, again)
    assert (e0 != e1).any((1, 2, 3)).all()
    centre = prep(0, "center")(dict(batch))["image"]
    np.testing.assert_array_equal(centre, prep(5, "center")(dict(batch))["image"])
    passed = prep(0, "bytes")(dict(batch))
    assert list(passed["image"]) == encoded and list(passed) == ["id", "image", "label"]


def test_resnet50_is_registered_without_weights():
    with torch.device("meta"):  # the architecture, without seconds of initialising 25M weights
        m = build_model("resnet50", num_classes=7)
        assert m.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 7)
    assert m.fc.out_features == 7 and sum(p.numel() for p in m.parameters()) > 23_000_000
    assert m.lepton_spec == {"name": "resnet50", "kwargs": {"num_classes": 7}}


def test_decoding_goes_to_cpu_only_nodes_when_the_cluster_has_gpu_nodes_too():
    from lepton_ray.train.feed import cpu_only_nodes

    def node(name: str, cpus: int, gpus: int = 0, alive: bool = True) -> dict:
        res = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
        return {"NodeID": name, "Alive": alive, "Resources": res}

    gpu, a, b = node("g", 16, 1), node("a", 8), node("b", 4)
    assert cpu_only_nodes([gpu, b, a]) == {"label_selector": {"ray.io/node-id": "in(a,b)"}}
    assert cpu_only_nodes([gpu, a, node("b", 4, alive=False)]) == {
        "label_selector": {"ray.io/node-id": "in(a)"}
    }
    assert cpu_only_nodes([gpu]) == {}  # one GPU node: its CPUs decode
    assert cpu_only_nodes([a, b]) == {}  # CPUs only: anywhere
    assert cpu_only_nodes([gpu, node("c", 0)]) == {}  # no CPUs to decode with


def test_decoding_calls_are_capped_by_the_bytes_they_return():
    """A decoding call of read_ray returns at most DECODED_BATCH_BYTES: 224x224x3 rows (147 KiB
    each) go 111 at a time, not the 1,024 asked (147 MiB blocks, a few long tasks); small rows
    keep the asked size."""
    from lepton_ray.data.dataset import DECODED_BATCH_BYTES, decode_batch_rows

    assert decode_batch_rows((224, 224, 3), 1024, normalize=False) == 111
    assert decode_batch_rows((224, 224, 3), 1024, normalize=True) == 27  # float32 rows
    assert decode_batch_rows((224, 224, 3), 64, normalize=False) == 64
    assert decode_batch_rows((32, 32, 3), 1024, normalize=False) == 1024
    assert decode_batch_rows((32, 32, 3), 8192, normalize=True) == DECODED_BATCH_BYTES // 12288
    assert decode_batch_rows((4096, 4096, 3), 1024, normalize=True) == 1  # never zero
