"""Random numbers per row: a counter-based hash of (seed, epoch, row id, augmentation, draw).

An augmentation's random parameters for a row (its crop offset, whether it is flipped, its angle)
are a pure function of those five numbers, so a row is augmented the same way whatever batch,
block, worker or world size it lands in, differently every epoch, and the same on the CPU (numpy, in
Ray Data's ``map_batches``) as on the training device (torch): a stateful generator gives none of
these.

Written once for both libraries: every function here uses only ``^ & >> *`` on int64 arrays or
tensors (or Python ints), with every value in [0, 2**32). The mixing function is C. Wellons'
``lowbias32`` (hash-prospector; two xorshift-multiply rounds, a bijection of 32-bit values whose
output bits each flip with probability 0.5 +- 0.001 when one input bit does) with multipliers below
2**31: a product stays below 2**63, int64 never overflows, and numpy, torch on the CPU and torch on
CUDA compute the same bits. Worked example: ``hash32(1) == 0x86D2FA73``, and for the largest input
the first product is ``0xFFFF8000 * 0x21F0AAAD``, about 2**61.1. ``hash32(0) == 0``: hence the
constants mixed in before hashing.

Per batch: a row key ``hash32(fold(id) ^ run_key)`` (``run_key`` from seed and epoch, in Python),
then every draw of every augmentation at once, ``hash32(row_key ^ draw_key)`` over an
(augmentations, DRAWS, rows) block: about 25 elementwise integer kernels in all, whatever the batch
size.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

M32 = 0xFFFF_FFFF
DRAWS = 4
"""Random numbers per row an augmentation may draw (random_affine draws four)."""
_M1, _M2 = 0x21F0_AAAD, 0x735A_2D97  # lowbias32's multipliers, both < 2**31


def hash32(x: Any) -> Any:
    """A bijection of 32-bit values (int64 arrays, tensors or ints in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = (x * _M1) & M32
    x = x ^ (x >> 15)
    x = (x * _M2) & M32
    return x ^ (x >> 15)


def run_key(seed: int, epoch: int) -> int:
    """The 32-bit key of (seed, epoch): any Python ints, negative included, taken as 64 bits."""
    h = 0x1EB7_0A11
    for word in (seed, epoch):
        word &= (1 << 64) - 1
        h = hash32(hash32(h ^ (word & M32)) ^ (word >> 32))
    return h


def row_keys(key: int, ids: Any) -> Any:
    """One 32-bit key per row from :func:`run_key` and the rows' int64 ``ids`` (array or tensor).
    The id's two halves are folded by xor first: distinct for ids below 2**32."""
    return hash32(((ids ^ (ids >> 32)) & M32) ^ key)


def draw_keys(names: Sequence[str]) -> list[list[int]]:
    """(augmentation, draw) constants, ``DRAWS`` per augmentation. An augmentation is named by its
    name and how many times it came before in ``names``, so a row's flip does not change when a crop
    is added before it, and ``("hflip", "hflip")`` flips twice independently."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        occurrence = seen[name] = seen.get(name, -1) + 1
        h = hash32(hash32(0x0A06_3E47 ^ zlib.crc32(name.encode())) ^ occurrence)
        out.append([hash32(h ^ (0x9E37_79B9 * (d + 1) & M32)) for d in range(DRAWS)])
    return out


def draw_bits(rows: Any, keys: Any) -> Any:
    """32-bit draws for every (augmentation, draw, row): ``rows`` (N,) from :func:`row_keys`,
    ``keys`` (S, DRAWS, 1) from :func:`draw_keys` -> (S, DRAWS, N)."""
    return hash32(rows ^ keys)


UNIT = 2.0**-24
"""``(bits >> 8) * UNIT`` is a uniform float in [0, 1) with 24 random bits: exact in float32, so
numpy and torch give the same floats."""


def numpy_bits(seed: int | None, epoch: int, ids: Any, names: Sequence[str], n: int) -> Any:
    """Every draw of every augmentation in ``names`` for ``n`` rows with ``ids`` (numpy):
    (augmentations, DRAWS, n) int64 values in [0, 2**32). Without a seed or ids a row cannot be
    keyed: fresh entropy then."""
    import secrets

    import numpy as np

    if seed is None or ids is None:
        seed, ids = secrets.randbits(63), np.arange(n, dtype=np.int64)
    rows = row_keys(run_key(seed, epoch), np.asarray(ids, np.int64))
    keys = np.asarray(draw_keys(names), np.int64)[:, :, None]  # (S, DRAWS, 1)
    return draw_bits(rows, keys)
