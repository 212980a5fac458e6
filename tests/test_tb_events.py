"""TensorBoard event files written without TensorBoard (lepton_ray.train.tb_events) and the run's
curves written without matplotlib (lepton_ray.viz.curves_svg): pure tests, read back with TensorBoard's
own reader and compared with what torch's SummaryWriter writes."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from xml.etree import ElementTree

from lepton_ray.train import tb_events
from lepton_ray.viz import curves_svg


def test_crc32c_and_the_record_framing_are_tfrecords():
    assert tb_events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tb_events.crc32c(b"") == 0
    rec = tb_events.record(b"abc")
    (length,) = struct.unpack("<Q", rec[:8])
    assert length == 3 and rec[12:15] == b"abc" and len(rec) == 8 + 4 + 3 + 4


def test_a_scalar_record_is_byte_for_byte_what_summary_writer_writes(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for tag, value, step in (("train_loss", 1.5, 7), ("lr", 0.0125, 300), ("world_size", 3, 1)):
        writer.add_scalar(tag, value, step, walltime=1234.5 + step)
    writer.close()
    (written,) = tmp_path.glob("events.out.tfevents.*")
    data = written.read_bytes()
    for tag, value, step in (("train_loss", 1.5, 7), ("lr", 0.0125, 300), ("world_size", 3, 1)):
        ours = tb_events.record(tb_events.scalar_event(tag, value, step, 1234.5 + step))
        assert ours in data, tag


def test_tensorboard_reads_the_file_back_with_steps_times_and_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = [("train_loss", 2.0 / e, e, 100.0 + e) for e in (1, 2, 3)]
    points += [("val_loss", math.nan, 3, 103.0), ("lr", None, 1, 101.0), ("lr", True, 2, 102.0)]
    points += [("step_of_a_long_run", 5.0, 2**40, 104.0)]
    (tmp_path / "events.out.tfevents.x").write_bytes(tb_events.scalar_file(points, 99.0))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["step_of_a_long_run", "train_loss", "val_loss"]
    got = [(e.step, e.wall_time, e.value) for e in events.Scalars("train_loss")]
    assert got == [
        (1, 101.0, 2.0),
        (2, 102.0, 1.0),
        (3, 103.0, struct.unpack("<f", struct.pack("<f", 2 / 3))[0]),
    ]
    assert math.isnan(events.Scalars("val_loss")[0].value)  # a diverged loss is kept
    assert events.Scalars("step_of_a_long_run")[0].step == 2**40


SVG = "{http://www.w3.org/2000/svg}"


def _lines(svg: str) -> dict[tuple[str, str], list[list[tuple[float, float]]]]:
    """(panel metric, series) -> the polylines' points, from a curves SVG parsed as XML."""
    out: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    for panel in ElementTree.fromstring(svg).iter(f"{SVG}g"):
        for line in panel.iter(f"{SVG}polyline"):
            points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
            key = (panel.get("data-metric"), line.get("data-series"))
            out.setdefault(key, []).append(points)
    return out


def test_the_runs_curves_are_an_svg_made_without_matplotlib():
    code = (
        "import sys; from lepton_ray.viz import curves_svg;"
        "h = [{'epoch': e, 'train_loss': 1 / e, 'train_accuracy': 0.5, 'val_loss': 1.2 / e,"
        " 'val_accuracy': 0.4} for e in (1, 2, 3)];"
        "svg = curves_svg(h); assert 'matplotlib' not in sys.modules; print(svg)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = _lines(out.stdout)
    assert sorted(lines) == [
        ("accuracy", "train"),
        ("accuracy", "validation"),
        ("loss", "train"),
        ("loss", "validation"),
    ]
    (train_loss,) = lines[("loss", "train")]
    xs, ys = [p[0] for p in train_loss], [p[1] for p in train_loss]
    assert len(train_loss) == 3 and xs == sorted(xs)  # one point per epoch, left to right
    assert ys[0] < ys[1] < ys[2]  # a falling loss: SVG's y grows downwards
    root = ElementTree.fromstring(out.stdout)
    width, height = float(root.get("width")), float(root.get("height"))
    points = [p for series in lines.values() for line in series for p in line]
    assert all(0 <= x <= width and 0 <= y <= height for x, y in points)
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert {"loss", "accuracy", "epoch", "train", "validation", "1", "2", "3"} <= texts


def test_curves_leave_a_gap_for_a_diverged_loss_and_draw_one_epoch_or_a_flat_line():
    nan = float("nan")
    h = [
        {"epoch": e, "train_loss": loss, "train_accuracy": 0.5}
        for e, loss in ((1, 2.0), (2, nan), (3, 1.0), (4, 0.5))
    ]
    lines = _lines(curves_svg(h))
    assert [len(line) for line in lines[("loss", "train")]] == [1, 2]  # epoch 1 | epochs 3-4
    assert [len(line) for line in lines[("accuracy", "train")]] == [4]  # flat, all four
    assert ("loss", "validation") not in lines  # no validation set: no such line
    one = _lines(curves_svg([{"epoch": 1, "train_loss": 0.3, "train_accuracy": 0.9}]))
    assert [len(line) for line in one[("loss", "train")]] == [1]
    assert ElementTree.fromstring(curves_svg([]))  # nothing yet: empty axes, still a document
