"""Random numbers per row: a counter-based hash of (seed, epoch, row id, augmentation, draw).

An augmentation's random parameters for a row (its crop offset, whether it is flipped, its angle)
are a pure function of those five numbers, so a row is augmented the same way whatever batch,
block, worker or world size it lands in, differently every epoch, and the same on the CPU (numpy, in
Ray Data's ``map_batches``) as on the training device (torch): a stateful generator gives none of
these. Murmur3's word mixing and finaliser, on 32-bit values.

Written once for both libraries: every function here uses only ``^ & | >> << * +`` on int64
arrays or tensors (or Python ints), keeping each value in [0, 2**32). A product of two 32-bit values
would overflow int64, so :func:`mul32` multiplies by the constant's two 16-bit halves: numpy, torch
on the CPU and torch on CUDA then compute the same bits. Worked example:
``mul32(0xFFFFFFFF, 5) == 0xFFFFFFFB`` (-1 * 5 = -5 modulo 2**32).

Cost: about 70 elementwise integer operations per batch for the row keys and all draws together,
a few hundred microseconds of kernel launches on a GPU for any batch size.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

M32 = 0xFFFF_FFFF
DRAWS = 4
"""Random numbers per row an augmentation may draw (random_affine draws four)."""
_C1, _C2 = 0xCC9E_2D51, 0x1B87_3593  # murmur3's word constants
_F1, _F2 = 0x85EB_CA6B, 0xC2B2_AE35  # murmur3's finaliser constants


def mul32(a: Any, c: int) -> Any:
    """``a * c`` modulo 2**32 for ``a`` in [0, 2**32) and a constant ``c`` < 2**32, without ever
    exceeding 2**48 (so int64 never overflows)."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & M32


def rotl32(x: Any, r: int) -> Any:
    return ((x << r) | (x >> (32 - r))) & M32


def fmix32(h: Any) -> Any:
    """Murmur3's finaliser: a bijection of 32-bit values in which every input bit flips about half
    of the output bits."""
    h = h ^ (h >> 16)
    h = mul32(h, _F1)
    h = h ^ (h >> 13)
    h = mul32(h, _F2)
    return h ^ (h >> 16)


def absorb(h: Any, k: Any) -> Any:
    """Mix one 32-bit word ``k`` into the running hash ``h`` (murmur3's body step)."""
    k = mul32(rotl32(mul32(k, _C1), 15), _C2)
    h = rotl32(h ^ k, 13)
    return (mul32(h, 5) + 0xE654_6B64) & M32


def run_key(seed: int, epoch: int) -> int:
    """The hash state after (seed, epoch): Python ints, computed once per batch."""
    h = 0x1EB7_0A11
    for word in (seed, epoch):
        word &= (1 << 64) - 1  # any int, negative included, as 64 bits
        h = absorb(absorb(h, word & M32), word >> 32)
    return h


def row_keys(key: int, ids: Any) -> Any:
    """One 32-bit key per row from :func:`run_key` and the rows' int64 ``ids`` (array or tensor)."""
    return fmix32(absorb(absorb(key, ids & M32), (ids >> 32) & M32))


def draw_keys(names: Sequence[str]) -> list[list[int]]:
    """(augmentation, draw) constants, ``DRAWS`` per augmentation. An augmentation is named by its
    name and how many times it came before in ``names``, so a row's flip does not change when a crop
    is added before it, and ``("hflip", "hflip")`` flips twice independently."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        occurrence = seen[name] = seen.get(name, -1) + 1
        h = absorb(absorb(0x0A06_3E47, zlib.crc32(name.encode())), occurrence)
        out.append([fmix32(absorb(h, d)) for d in range(DRAWS)])
    return out


def draw_bits(rows: Any, keys: Any) -> Any:
    """32-bit draws for every (augmentation, draw, row): ``rows`` (N,) from :func:`row_keys`,
    ``keys`` (S, DRAWS, 1) from :func:`draw_keys` -> (S, DRAWS, N)."""
    return fmix32(rows ^ keys)


UNIT = 2.0**-24
"""``(bits >> 8) * UNIT`` is a uniform float in [0, 1) with 24 random bits: exact in float32, so
numpy and torch give the same floats."""
