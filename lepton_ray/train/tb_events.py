"""TensorBoard scalar event files, written without TensorBoard.

A run's ``<run>/tensorboard/`` file is rewritten whole at each epoch end by Ray Train's controller
(:class:`~lepton_ray.train.observe.RunObserver`). Through ``torch.utils.tensorboard`` the first
write imported TensorBoard and protobuf into the controller (0.3-0.5 s on 2 loaded CPUs, and at a
1-epoch fit's last report, so on the way to ``fit()`` returning); the file holds nothing but
scalars, so it is encoded here: the format TensorBoard reads (``EventAccumulator``,
``tensorboard --logdir``) and ``SummaryWriter.add_scalar`` writes.

- The file is TFRecord framed: per record the length (uint64 little-endian), its masked CRC-32C,
  the bytes, their masked CRC-32C.
- Each record is an ``Event`` protobuf: ``wall_time`` (1, double), ``step`` (2, int64), and
  either ``file_version`` (3, the first record: ``brain.Event:2``) or ``summary`` (5) holding one
  ``Summary.Value`` (1) of ``tag`` (1, string) and ``simple_value`` (2, float).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

FILE_VERSION = "brain.Event:2"
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord checksums its records."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf sends it: two's complement, 10 bytes when negative
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


def record(data: bytes) -> bytes:
    """One TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + _masked(length) + data + _masked(data)


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """The ``Event`` of one scalar (what ``SummaryWriter.add_scalar`` writes)."""
    value_msg = _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)
    return _event(wall_time, step, _field(5, _field(1, value_msg)))


def scalar_file(points: Iterable[tuple[str, float, int, float]], created: float) -> bytes:
    """An event file of ``(tag, value, step, wall_time)`` points, led by its version record.
    A value that is not a number is left out; NaN and infinities are kept (a diverged loss)."""
    out = [record(_event(created, 0, _field(3, FILE_VERSION.encode())))]
    for tag, value, step, wall_time in points:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(record(scalar_event(tag, float(value), int(step), wall_time)))
    return b"".join(out)
