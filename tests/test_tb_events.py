"""TensorBoard event files written without TensorBoard (lepton_ray.train.tb_events) and the run's
curves drawn without pyplot (lepton_ray.viz.curves_png): pure tests, read back with TensorBoard's
own reader and compared with what torch's SummaryWriter writes."""

from __future__ import annotations

import math
import struct
import subprocess
import sys

from lepton_ray.train import tb_events


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


def test_the_runs_curves_are_a_png_drawn_without_pyplot():
    code = (
        "import sys; from lepton_ray.viz import curves_png;"
        "h = [{'epoch': e, 'train_loss': 1 / e, 'train_accuracy': 0.5, 'val_loss': 1.2 / e,"
        " 'val_accuracy': 0.4} for e in (1, 2, 3)];"
        "png = curves_png(h); assert png[:8] == b'\\x89PNG\\r\\n\\x1a\\n', png[:8];"
        "assert 'matplotlib.pyplot' not in sys.modules; print(len(png))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 10_000  # two panels of axes, lines and legends
