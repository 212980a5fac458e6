"""Click data for a recommendation model, with a planted signal, stored the way pixels are.

``synthetic-ctr:rows=N,tables=T,cardinality=C,dense=D,seed=S`` (every key optional; defaults
below; ``cardinality`` one number for every table or one per table, ``C1/C2/...``). Each row has
``D`` dense features ``x ~ N(0, 1)`` and one id per table, drawn uniformly from its ``C_t`` values.
A planted model, drawn from ``seed``, gives each id a bias and a ``LATENT``-wide vector, and the
row's click logit is

    logit = sum_t bias_t[i_t] + sum_{t<s} <v_t[i_t], v_s[i_s]> + w . x + b

(DLRM's own shape: per-table embeddings meeting in pairwise dot products, plus the dense part);
the label is a Bernoulli draw of ``sigmoid(logit)``. No learner can beat the planted model on
average, so its AUC on the held-out split (``planted_auc`` in the manifest) is the ceiling a
trained model approaches.

A row is ``D`` float32 then ``T`` int32 (little-endian), ``4 * (D + T)`` bytes, stored as an
"image" of shape ``(1, 4 * (D + T), 1)`` in the fixed-width column text also uses
(:mod:`lepton_ray.data.text`); label 0/1 (classes ``["0", "1"]``); the manifest says
``kind: "ctr"`` with ``cardinalities`` and ``dense``. The ``test`` split holds a tenth as many
rows (at most 10,000, at least 1), with ids after the training rows'; rows are made chunk by
chunk, seeded per chunk, so any size streams in bounded memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lepton_ray.errors import DataError

PREFIX = "synthetic-ctr"
LATENT = 4  # width of the planted id vectors
DEFAULTS = {"rows": 10_000, "tables": 4, "cardinality": "100", "dense": 4, "seed": 0}
_KEY = re.compile(r"(rows|tables|cardinality|dense|seed)=([0-9/]+)$")


@dataclass(frozen=True)
class CtrSpec:
    rows: int
    cardinalities: tuple[int, ...]
    dense: int
    seed: int

    @property
    def row_bytes(self) -> int:
        return 4 * (self.dense + len(self.cardinalities))

    def canonical(self) -> str:
        c = self.cardinalities
        cards = str(c[0]) if len(set(c)) == 1 else "/".join(map(str, c))
        return (
            f"{PREFIX}:rows={self.rows},tables={len(self.cardinalities)},"
            f"cardinality={cards},dense={self.dense},seed={self.seed}"
        )


def is_ctr_source(source: str) -> bool:
    return source == PREFIX or source.startswith(PREFIX + ":")


def parse(source: str) -> CtrSpec:
    """``synthetic-ctr[:key=value,...]`` -> its spec; one-line :class:`DataError` naming a bad key.
    E.g. ``synthetic-ctr:rows=500,tables=2,cardinality=10/20`` -> 500 rows, tables of 10 and 20
    ids, 4 dense features, seed 0."""
    _, _, arg = source.partition(":")
    values = dict(DEFAULTS)
    for part in filter(None, arg.split(",")):
        m = _KEY.match(part)
        if not m or (m.group(1) != "cardinality" and "/" in m.group(2)):
            raise DataError(
                f"bad {PREFIX} option {part!r}: expected rows=N, tables=T, cardinality=C (or "
                "C1/C2/...), dense=D or seed=S"
            )
        values[m.group(1)] = m.group(2) if m.group(1) == "cardinality" else int(m.group(2))
    tables, cards = values["tables"], [int(c) for c in str(values["cardinality"]).split("/")]
    if len(cards) == 1:
        cards *= tables
    if len(cards) != tables:
        raise DataError(f"{PREFIX}: {len(cards)} cardinalities given for tables={tables}")
    if values["rows"] < 1 or tables < 1 or min(cards) < 1:
        raise DataError(f"{PREFIX}: rows, tables and every cardinality must be >= 1")
    if max(cards) > 2**31 - 1:
        raise DataError(f"{PREFIX}: a cardinality past 2**31 - 1 does not fit an int32 id")
    return CtrSpec(values["rows"], tuple(cards), values["dense"], values["seed"])


def manifest_fields(spec: CtrSpec, planted_auc: float) -> dict:
    """What a click dataset's manifest says besides what every dataset's says."""
    return {
        "kind": "ctr",
        "cardinalities": list(spec.cardinalities),
        "dense": spec.dense,
        "planted_auc": round(float(planted_auc), 6),
    }


# --- rows (pure) ------------------------------------------------------------------------------
def pack(dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """(N, D) float32 and (N, T) ids -> (N, 1, 4 * (D + T), 1) uint8 rows (little-endian)."""
    n = len(dense)
    both = np.concatenate(
        [np.asarray(dense, "<f4").view(np.uint8), np.asarray(sparse, "<i4").view(np.uint8)], axis=1
    )
    return both.reshape(n, 1, -1, 1)


def unpack(rows: np.ndarray, dense: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`pack`: rows (N, ...) uint8 -> (dense (N, D) float32, ids (N, T) int64)."""
    flat = np.ascontiguousarray(rows).reshape(len(rows), -1)
    x = flat[:, : 4 * dense].copy().view("<f4").astype(np.float32)
    ids = flat[:, 4 * dense :].copy().view("<i4").astype(np.int64)
    return x, ids


class Planted:
    """The planted click model of a spec: ``logit(dense, ids)`` as the module docstring gives it."""

    def __init__(self, spec: CtrSpec):
        rng = np.random.default_rng([spec.seed, 0])
        t = len(spec.cardinalities)
        self.bias = [rng.normal(0.0, 0.6, c) for c in spec.cardinalities]
        # vectors scaled so the pairwise part has about unit variance, whatever T is
        scale = (LATENT * max(1, t * (t - 1) / 2)) ** -0.25
        self.vectors = [rng.normal(0.0, scale, (c, LATENT)) for c in spec.cardinalities]
        self.w = rng.normal(0.0, 1.0 / np.sqrt(max(spec.dense, 1)), spec.dense)
        self.b = -0.5  # fewer clicks than not, as in real click logs

    def logit(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        v = [vec[ids[:, k]] for k, vec in enumerate(self.vectors)]  # T x (N, LATENT)
        out = dense.astype(np.float64) @ self.w + self.b
        for k, bias in enumerate(self.bias):
            out += bias[ids[:, k]]
            for s in range(k + 1, len(v)):
                out += (v[k] * v[s]).sum(1)
        return out


def maker(
    spec: CtrSpec, planted: Planted, split_seed: int, first_id: int
) -> Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows ``[start, stop)`` of a split, each chunk seeded by its start (reproducible in any
    chunking of the same starts): (rows uint8, labels 0/1, ids)."""

    def make(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dense, ids, labels = draw(spec, planted, split_seed, start, stop)
        return (
            pack(dense, ids),
            labels,
            np.arange(first_id + start, first_id + stop, dtype=np.int64),
        )

    return make


def draw(
    spec: CtrSpec, planted: Planted, split_seed: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense float32, ids int64, labels int64) of rows ``[start, stop)`` of a split."""
    rng = np.random.default_rng([spec.seed, split_seed, start])
    n = stop - start
    dense = rng.standard_normal((n, spec.dense), dtype=np.float32)
    ids = np.stack([rng.integers(0, c, n) for c in spec.cardinalities], axis=1)
    p = 1.0 / (1.0 + np.exp(-planted.logit(dense, ids)))
    labels = (rng.random(n) < p).astype(np.int64)
    return dense, ids, labels


def held_out_rows(spec: CtrSpec) -> int:
    return max(1, min(spec.rows // 10, 10_000))


def load(source: str) -> tuple[str, dict[str, tuple[int, Callable]], dict]:
    """(canonical name, ``{split: (rows, make)}``, manifest fields) of a click source; the
    planted model's AUC is measured on the whole held-out split (at most 10,000 rows)."""
    spec = parse(source)
    planted = Planted(spec)
    held = held_out_rows(spec)
    dense, ids, labels = draw(spec, planted, 2, 0, held)
    ceiling = auc(planted.logit(dense, ids), labels)
    splits = {
        "train": (spec.rows, maker(spec, planted, 1, 0)),
        "test": (held, maker(spec, planted, 2, spec.rows)),
    }
    return spec.canonical(), splits, manifest_fields(spec, ceiling)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The exact ROC AUC of ``scores`` for 0/1 ``labels``: the chance a random positive scores
    above a random negative, ties counting half (Mann-Whitney U over tie-averaged ranks); NaN when
    one class is absent. E.g. scores [0.1, 0.4, 0.35, 0.8], labels [0, 0, 1, 1] -> 0.75."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    first = np.r_[True, sorted_s[1:] != sorted_s[:-1]]  # where each run of equal scores starts
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(s)]
    mean_rank = (starts + 1 + ends) / 2.0  # ranks start+1 .. end, averaged
    ranks = np.empty(len(s))
    ranks[order] = mean_rank[np.cumsum(first) - 1]
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))
