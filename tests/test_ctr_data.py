"""Click datasets (pure, no Ray): the spec, the row bytes, the exact AUC, prepare and the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lepton_ray.data import ctr, open_dataset, prepare, read_arrays
from lepton_ray.errors import DataError

SOURCE = "synthetic-ctr:rows=600,tables=3,cardinality=5/7/9,dense=2,seed=3"


def test_spec_defaults_per_table_cardinalities_and_canonical_name():
    s = ctr.parse("synthetic-ctr:rows=500,tables=2,cardinality=10/20")
    assert (s.rows, s.cardinalities, s.dense, s.seed) == (500, (10, 20), 4, 0)
    assert s.row_bytes == 4 * (4 + 2)
    assert ctr.parse("synthetic-ctr").cardinalities == (100,) * 4
    same = ctr.parse("synthetic-ctr:seed=0,cardinality=100,rows=10000")
    assert same.canonical() == ctr.parse("synthetic-ctr").canonical()
    assert same.canonical() == "synthetic-ctr:rows=10000,tables=4,cardinality=100,dense=4,seed=0"


@pytest.mark.parametrize(
    "bad, why",
    [
        ("synthetic-ctr:rows=-1", "bad synthetic-ctr option 'rows=-1'"),
        ("synthetic-ctr:colour=3", "bad synthetic-ctr option 'colour=3'"),
        ("synthetic-ctr:rows=1/2", "bad synthetic-ctr option 'rows=1/2'"),
        ("synthetic-ctr:tables=3,cardinality=4/5", "2 cardinalities given for tables=3"),
        ("synthetic-ctr:cardinality=0", "every cardinality must be >= 1"),
        ("synthetic-ctr:cardinality=4294967296", "does not fit an int32 id"),
    ],
)
def test_bad_spec_is_one_line_naming_it(bad, why):
    with pytest.raises(DataError, match=why.replace("(", r"\(")) as e:
        ctr.parse(bad)
    assert "\n" not in str(e.value)


def test_rows_pack_and_unpack_exactly():
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((5, 3)).astype(np.float32)
    ids = np.array([[0, 2**31 - 1], [1, 2], [3, 4], [5, 6], [7, 8]])
    rows = ctr.pack(dense, ids)
    assert rows.shape == (5, 1, 4 * 5, 1) and rows.dtype == np.uint8
    d, i = ctr.unpack(rows, 3)
    np.testing.assert_array_equal(d, dense)
    np.testing.assert_array_equal(i, ids)
    assert i.dtype == np.int64
    assert rows[0, 0, :4, 0].tobytes() == dense[0, 0].astype("<f4").tobytes()  # little-endian


def test_auc_exact_with_ties_against_every_pair():
    assert ctr.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert ctr.auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert ctr.auc([3, 2, 1], [1, 0, 0]) == 1.0 and ctr.auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert np.isnan(ctr.auc([1, 2], [1, 1]))
    rng = np.random.default_rng(1)
    s, y = rng.integers(0, 6, 300).astype(float), rng.integers(0, 2, 300)  # many ties
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    pairs = ((pos > neg) + 0.5 * (pos == neg)).mean()
    assert ctr.auc(s, y) == pytest.approx(pairs, abs=1e-12)


def test_prepare_writes_click_rows_a_ctr_manifest_and_the_planted_ceiling(tmp_path):
    infos = prepare(SOURCE, str(tmp_path))
    assert set(infos) == {"train", "test"}
    train, test = infos["train"], infos["test"]
    assert (train.num_rows, test.num_rows) == (600, 60)
    assert train.kind == "ctr" and train.shape == (1, 4 * (2 + 3), 1)
    assert train.classes == ("0", "1")
    assert train.model_kwargs() == {"cardinalities": [5, 7, 9], "dense": 2}
    m = json.loads((tmp_path / "test" / "manifest.json").read_text())
    assert m["kind"] == "ctr" and m["cardinalities"] == [5, 7, 9] and m["dense"] == 2
    x, y, ids = read_arrays(test)
    assert ids.tolist() == list(range(600, 660))  # after the training rows'
    dense, sparse = ctr.unpack(x, 2)
    assert (sparse >= 0).all() and (sparse < np.array([5, 7, 9])).all()
    assert set(np.unique(y)) == {0, 1}
    # the recorded ceiling is the planted model's AUC on exactly these held-out rows
    planted = ctr.Planted(ctr.parse(SOURCE))
    assert m["planted_auc"] == pytest.approx(ctr.auc(planted.logit(dense, sparse), y), abs=1e-6)
    assert 0.7 < m["planted_auc"] < 0.95  # a signal to learn, not a certainty
    # reproducible and idempotent: the same source writes the same rows
    again = prepare(SOURCE, str(tmp_path / "again"))
    np.testing.assert_array_equal(read_arrays(again["test"])[0], x)
    assert prepare(SOURCE, str(tmp_path))["train"].shards == train.shards


def test_chunks_are_seeded_by_their_start():
    spec = ctr.parse(SOURCE)
    make = ctr.maker(spec, ctr.Planted(spec), 1, 0)
    whole = make(0, 100)
    tail = make(50, 100)
    assert tail[2].tolist() == list(range(50, 100))
    assert not np.array_equal(whole[0][50:], tail[0])  # a chunk is its own draw, not a slice
    np.testing.assert_array_equal(make(50, 100)[0], tail[0])


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("cardinalities", [], "'cardinalities' must be a non-empty list"),
        ("cardinalities", [5, 0, 9], "'cardinalities' must be a non-empty list"),
        ("dense", -1, "'dense' must be a whole number"),
        ("dense", 3, r"'shape' must be \[1, 24, 1\]"),
        ("classes", ["a", "b"], "'classes' must be \\['0', '1'\\]"),
        ("encoding", "png", "'encoding' must be 'raw' for click data"),
        ("planted_auc", "high", "'planted_auc' must be a number"),
    ],
)
def test_a_tampered_click_manifest_is_refused_naming_the_field(tmp_path, field, value, why):
    prepare(SOURCE, str(tmp_path))
    path = tmp_path / "test" / "manifest.json"
    m = json.loads(path.read_text())
    m[field] = value
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=why):
        open_dataset(str(tmp_path / "test"))
