"""Text datasets (pure, no Ray): byte tokens, blocks, the sources, the manifest, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_ray import cli
from lepton_ray.data import open_dataset, prepare, read_arrays, text
from lepton_ray.errors import DataError

DOCS = ["Hello, world!\n", "Grüße aus Köln — ünïcode.\n" * 3, "", "the end"]


def _stream(docs):
    """What the blocks must cover: each non-empty document's bytes, EOT after each."""
    return b"".join(d.encode() + bytes([text.EOT]) for d in docs if d)


def _rebuilt(infos) -> tuple[bytes, np.ndarray]:
    """Every block of every split placed back at its offset: (the covered stream, ids sorted)."""
    rows, ids = [], []
    for info in infos.values():
        x, labels, i = read_arrays(info)
        assert labels.tolist() == [0] * len(i)
        rows.append(x.reshape(len(x), -1))
        ids.append(i)
    rows, ids = np.concatenate(rows), np.concatenate(ids)
    order = np.argsort(ids)
    rows, ids = rows[order], ids[order]
    t = rows.shape[1] - 1
    for a, b in zip(rows[:-1], rows[1:], strict=True):
        assert a[-1] == b[0]  # consecutive blocks share one token
    return bytes(rows[0]) + b"".join(bytes(r[1:]) for r in rows[1:]), ids * t


# --- tokens and blocks -------------------------------------------------------------------------
def test_bytes_round_trip():
    s = "naïve café ☕ 日本語"
    tokens = text.encode(s)
    assert tokens.dtype == np.uint8 and len(tokens) == len(s.encode("utf-8"))
    assert text.decode(tokens) == s
    assert text.decode(tokens[:-1]).endswith("\ufffd")  # a cut character, not an error


def test_blocks_overlap_by_one_token_and_drop_the_tail():
    tokens = np.arange(10, dtype=np.uint8)
    b = text.cut_blocks(tokens, 3)
    assert b.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert text.cut_blocks(np.arange(12, dtype=np.uint8), 3).shape == (3, 4)  # 10, 11 dropped
    assert text.cut_blocks(np.arange(3, dtype=np.uint8), 3).shape == (0, 4)
    assert not b.flags.writeable  # a view of the stream, not a copy


def test_split_holds_out_a_seeded_tenth_of_the_blocks():
    s = text.split_blocks(25)
    assert len(s["test"]) == 2 and len(s["train"]) == 23  # round(2.5) = 2
    assert sorted([*s["train"], *s["test"]]) == list(range(25))
    assert text.split_blocks(25)["test"].tolist() == s["test"].tolist()
    assert len(text.split_blocks(2)["test"]) == 1


# --- sources -----------------------------------------------------------------------------------
def test_text_file_round_trip(tmp_path):
    src = tmp_path / "a.txt"
    body = "".join(DOCS)
    src.write_text(body, encoding="utf-8")
    infos = prepare(f"text:{src}", str(tmp_path / "ds"), block_size=8)
    stream = body.encode() + bytes([text.EOT])
    covered, offsets = _rebuilt(infos)
    n = (len(stream) - 1) // 8
    assert offsets.tolist() == [8 * i for i in range(n)]
    assert covered == stream[: 8 * n + 1]
    train = infos["train"]
    assert train.kind == "text" and train.shape == (1, 9, 1) and train.classes == ()
    assert train.block_size == 8 and train.vocab_size == 256
    assert train.model_kwargs() == {"vocab_size": 256, "block_size": 8}
    m = json.loads((tmp_path / "ds" / "train" / "manifest.json").read_text())
    assert (m["kind"], m["tokenizer"], m["block_size"], m["classes"]) == ("text", "bytes", 8, [])
    assert infos["test"].num_rows == max(1, round(n * text.VAL_FRACTION))


def test_folder_of_text_files_in_path_order(tmp_path):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    (d / "b" / "2.txt").write_text(DOCS[1])
    (d / "1.txt").write_text(DOCS[0])
    (d / "3.txt").write_text(DOCS[3])
    (d / "notes.md").write_text("not text for us")
    infos = prepare(f"text:{d}", str(tmp_path / "ds"), block_size=4)
    covered, _ = _rebuilt(infos)
    stream = _stream([DOCS[0], DOCS[3], DOCS[1]])  # 1.txt, 3.txt, b/2.txt: by path
    assert covered == stream[: len(covered)] and len(stream) - len(covered) < 4


def test_parquet_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), path)
    infos = prepare(f"text-parquet:{path}:body", str(tmp_path / "ds"), block_size=4)
    covered, _ = _rebuilt(infos)
    assert covered == _stream(DOCS)[: len(covered)]
    with pytest.raises(DataError, match=r"column 'n' holds int64, not text"):
        prepare(f"text-parquet:{path}:n", str(tmp_path / "ds2"), block_size=4)
    with pytest.raises(DataError, match=r"no column 'text' \(has body, n\)"):
        prepare(f"text-parquet:{path}", str(tmp_path / "ds3"), block_size=4)


def test_pydoc_topics_ship_with_python(tmp_path):
    docs = text.pydoc_topics()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    infos = prepare("pydoc-topics", str(tmp_path / "ds"), block_size=256)
    n = sum(i.num_rows for i in infos.values())
    assert n == (len(text.join_documents(docs)) - 1) // 256
    assert infos["train"].manifest["source"] == "builtin:pydoc-topics/train"


def test_prepare_is_idempotent_per_block_size(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("abcdefghij" * 10)
    first = prepare(f"text:{src}", str(tmp_path / "ds"), block_size=8)
    again = prepare(f"text:{src}", str(tmp_path / "ds"), block_size=8)
    assert again["train"].manifest["created_at"] == first["train"].manifest["created_at"]
    assert again["train"].shards == first["train"].shards  # nothing rewritten
    other = prepare(f"text:{src}", str(tmp_path / "ds"), block_size=16)
    assert other["train"].block_size == 16 and other["train"].shape == (1, 17, 1)


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "block_size", "match"),
    [
        ("", 8, "the text is empty"),
        ("abc", 8, r"4 tokens make 0 block\(s\) of 9; at least 2 are needed"),
        ("abcdefghij", 1, "block_size must be a whole number >= 2"),
    ],
)
def test_bad_text_is_one_clear_error(tmp_path, content, block_size, match):
    src = tmp_path / "a.txt"
    src.write_text(content)
    with pytest.raises(DataError, match=match):
        prepare(f"text:{src}", str(tmp_path / "ds"), block_size=block_size)


def test_not_utf8_and_missing_paths(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe nope")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(byte 3\)"):
        prepare(f"text:{bad}", str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no text file or folder at"):
        prepare(f"text:{tmp_path / 'missing.txt'}", str(tmp_path / "ds"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.txt files under"):
        prepare(f"text:{tmp_path / 'empty'}", str(tmp_path / "ds"))
    with pytest.raises(DataError, match="block_size applies to text sources only"):
        prepare("mnist5k", str(tmp_path / "ds"), block_size=8)


def test_skip_bad_leaves_unreadable_files_out(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("good text " * 10)
    (d / "b.txt").write_bytes(b"\xff" * 50)
    infos = prepare(f"text:{d}", str(tmp_path / "ds"), block_size=8, skip_bad=True)
    assert infos["train"].manifest["skipped_rows"] == 1
    assert "b.txt: not UTF-8 text" in infos["train"].manifest["skipped_examples"][0]


def test_cli_prepares_text_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("some words to learn from. " * 20)
    out = tmp_path / "ds"
    assert cli.main(["data", "prepare", f"text:{src}", str(out), "--block-size", "16"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["kind"] == "text" and shown["train"]["block_size"] == 16
    assert cli.main(["data", "inspect", str(out / "test")]) == 0
    assert json.loads(capsys.readouterr().out)["block_size"] == 16
    assert cli.main(["data", "prepare", f"text:{src}", str(out), "--block-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lepton-ray: error: block_size must be a whole number >= 2, got 1"]


def test_a_tampered_text_manifest_is_refused(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("abcdefghij" * 10)
    prepare(f"text:{src}", str(tmp_path / "ds"), block_size=8)
    path = tmp_path / "ds" / "train" / "manifest.json"
    m = json.loads(path.read_text())
    for key, value, match in [
        ("shape", [1, 8, 1], r"'shape' must be \[1, 9, 1\]"),
        ("block_size", 1, "'block_size' must be a whole number >= 2"),
        ("vocab_size", 50304, "'tokenizer' must be 'bytes' with vocab_size 256"),
        ("kind", "audio", "'kind' must be 'image' or 'text'"),
        ("classes", ["a"], r"'classes' must be \[\] for text"),
    ]:
        path.write_text(json.dumps({**m, key: value}))
        with pytest.raises(DataError, match=match):
            open_dataset(str(tmp_path / "ds" / "train"))
